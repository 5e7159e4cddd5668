"""The experiment runner: samples -> answer filter -> flows x layer sweeps -> a tidy, resumable table.

A run is planned first (`flowlib.run_plan`): its settings are checked (a bad one raises `RunSettingsError`
naming it) and everything that decides its numbers is fingerprinted (model files, samples and images,
settings, code). Its rows then go into a run folder (`flowlib.run_folder`) that records that identity: a
later run into the same folder resumes only if its identity is the same, and is otherwise refused before
anything is written, naming what changed (a weight file, a sample's answer, an image, the window ...). One
process at a time works in a folder (a file lock). Each sample must first be answered correctly
(`flowlib.answers`).

Every sample is recorded with its fate (analysed, wrong answer, zero base, excluded with its reason),
so a killed run resumes where it stopped and gives the same table.

Example:
    >>> summary = run_experiment(loaded, samples, "runs/llava15-gqa", flows=PAPER_FLOWS, window=7)
    >>> summary.table.groupby(["flow", "layer"]).relative_change.mean()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .answers import greedy_answer, normalise_answer
from .flows import PAPER_FLOWS, FlowError
from .merge import (
    ProcessSummary,
    RunSummary,
    exclusion_reasons,
    merge,
    merge_if_complete,
)
from .run_folder import (
    COLUMNS,
    FORMAT,
    claim,
    file_key,
    write_json,
    write_parquet,
    written_by,
)
from .run_plan import RunConfig, RunPlan, count_setting, plan_run
from .sample import SampleError
from .shards import WHOLE, FolderStatuses, Selection, Shard
from .sweep import ZeroBaseProbability, clean_pass, layer_sweep

log = logging.getLogger(__name__)


class NothingAnalysedError(ValueError):
    """The run finished but analysed no sample (all answered wrongly or excluded); `.summary` says why."""

    def __init__(self, message: str, summary: RunSummary):
        super().__init__(message)
        self.summary = summary


class SampleExcluded(ValueError):
    """A sample cannot be analysed at all (unreadable image, no flow applies ...): skip it, record why."""


def _load_image(sample):
    """The sample's image; any decoding failure becomes a `SampleError` naming the file."""
    try:
        return sample.load_image()
    except SampleError:
        raise
    except Exception as err:  # PIL raises SyntaxError, ValueError, struct.error ... on some broken files
        path = isinstance(sample.image, (str, os.PathLike))
        where = f"image file {os.fspath(sample.image)!r}" if path else "its image"
        raise SampleError(
            f"sample {sample.question_id}: {where} cannot be decoded ({type(err).__name__}: {err}); "
            "replace the file or drop the sample"
        ) from err


def _analyse(loaded, sample, index: int, config: RunConfig, max_batch) -> tuple[dict, pd.DataFrame | None]:
    """One sample: filter on its greedy answer, then sweep every flow. Returns (status, rows).

    A flow whose groups are empty for this sample (an option the question does not contain, boxes
    that cover no patch) leaves the sample out of that flow only, with the reason in
    `status["excluded_flows"]`; the other flows go on.
    """
    status = {"question_id": sample.question_id, "task": sample.task, "sample_index": index, "answer": sample.answer}
    sample = dataclasses.replace(sample)  # a copy caches the decoded image, not the caller's sample
    try:
        _load_image(sample)
        prepared = loaded.prepare(sample)
    except SampleError as err:
        return {**status, "status": "excluded", "reason": str(err)}, None
    answer = greedy_answer(loaded, prepared, config.max_new_tokens)
    status["greedy_answer"] = answer
    if normalise_answer(answer) != normalise_answer(sample.answer):
        return {**status, "status": "wrong_answer"}, None
    clean = clean_pass(loaded, prepared)
    frames, excluded_flows = [], {}
    for flow in config.flows:
        try:
            result = layer_sweep(
                loaded,
                prepared,
                flow,
                config.window,
                engine=config.engine,
                clean=clean,
                **({"max_batch": max_batch} if config.engine == "fast" else {}),
            )
        except ZeroBaseProbability as err:
            log.warning("sample %s excluded: %s", sample.question_id, err)
            return {**status, "status": "zero_base", "reason": str(err)}, None
        except FlowError as err:
            excluded_flows[flow] = str(err)
            continue
        frames.append(result.to_frame())
    status["excluded_flows"] = excluded_flows
    if not frames:
        reasons = "; ".join(dict.fromkeys(excluded_flows.values()))
        return {**status, "status": "excluded", "reason": f"no flow applies: {reasons}"}, None
    rows = pd.concat(frames, ignore_index=True)
    rows.insert(0, "sample_index", index)
    rows.insert(2, "task", sample.task)
    rows["answer_token_text"] = loaded.tokenizer.convert_ids_to_tokens(clean.answer_token)
    rows["model"] = loaded.name
    return {**status, "status": "analysed"}, rows[COLUMNS]


def _nothing_analysed(summary: RunSummary) -> NothingAnalysedError:
    seen, wrong = len(summary.statuses), summary.count("wrong_answer")
    reasons = exclusion_reasons(summary.statuses)
    if wrong == seen:
        why = (
            f"the model answered none of the {seen} samples it saw correctly; check the model, its prompt style "
            "and the data's answers"
        )
    else:
        why = f"of {seen} samples seen, {wrong} were answered wrongly and {seen - wrong} left out" + (
            f" (most often: {next(iter(reasons))})" if reasons else ""
        )
    return NothingAnalysedError(
        f"no sample was analysed: {why}; the fate of each is in {summary.output}/samples", summary
    )


def run_experiment(
    loaded,
    samples: Iterable,
    output,
    *,
    flows: Sequence[str] = PAPER_FLOWS,
    window: int | None = None,
    engine: str = "fast",
    max_new_tokens: int = 10,
    per_task: int | None = None,
    data: str = "",
    resume: bool = True,
    max_batch="auto",
    strict: bool = False,
    progress: bool = True,
    plan: RunPlan | None = None,
    shard: Shard | None = None,
) -> RunSummary:
    """Run the knockout experiment over `samples`, saving as it goes; resume a stopped run in `output`.

    Args:
        loaded: a `LoadedModel`. samples: any iterable of `Sample`s (unique question ids), in a
            stable order. output: the results folder (see `flowlib.run_folder`).
        flows, window, engine, max_new_tokens, per_task: see `RunConfig`.
        data: a free-text name of the data, recorded in run.json (the data's content is fingerprinted).
        resume: continue this run if `output` holds it (else that is an error).
        max_batch: the fast engine's windows per batch (memory only; numbers are unchanged): "auto"
            (default) sizes batches to the device's free memory (`sweep.auto_max_batch`), None runs all
            windows at once, a number caps them.
        plan: `plan_run`'s result for these very arguments, when the caller already made it (its samples,
            flows and settings are used; fingerprinting every image twice is what it saves).
        strict: stop at the first sample that cannot be analysed (unreadable image, a flow's group
            empty, ...) instead of recording it as excluded and going on.
        progress: show a progress bar (labelled with the shard when there is one).
        shard: analyse only this part of the samples (`flowlib.shards`: split by question id, any number of
            processes into one folder, same table); None: all of them.

    A sample that cannot be analysed never stops the run: it is recorded with its reason
    (`samples/<sample>.json`, and counted by reason in `summary.json`), and resuming does not retry it.
    Another process running the same run (or shard) into `output` is waited for (see `run_folder.claim`);
    other shards of the run work beside it. The process that completes the run writes the merged table and
    summary.json (`merge`); a shard that leaves the run incomplete returns a summary with `complete` False.
    Every process that analysed samples leaves its end summary in ``shards/<K>-of-<N>.json``.

    Raises:
        RunSettingsError, FlowError, NoSamplesError: bad settings or no samples (see `plan_run`; nothing written).
        RunMismatchError: `output` holds another run, naming what differs (nothing is written).
        SampleExcluded: with `strict`, the first sample left out of a flow or of the run.
        NothingAnalysedError: the run completed but analysed no sample (its folder records why).
        RunIncompleteError: never from here (an incomplete shard returns); from `merge` on an incomplete run.
    """
    if plan is None:  # a caller that already planned this run (to name its folder) passes the plan instead
        plan = plan_run(
            loaded, samples, flows=flows, window=window, engine=engine, max_new_tokens=max_new_tokens, per_task=per_task
        )
    if max_batch != "auto":
        max_batch = count_setting("max_batch", max_batch)
    shard = shard or WHOLE
    output, config = Path(output), plan.config
    record = {
        "format": FORMAT,
        "identity": plan.identity,
        "fingerprint": plan.fingerprint,
        "provenance": loaded.provenance(),
        "config": plan.fingerprint["settings"],
        "data": data,
        **written_by(),
    }
    meta = {k: v for k, v in record.items() if k != "fingerprint"}
    with claim(output, record, plan.records, resume, shard_lock=None if shard.count == 1 else shard.key):
        done = FolderStatuses(output)
        selection = Selection(config.per_task)
        mine = [(index, sample) for index, sample in plan.samples if shard.owns(sample.question_id)]
        label = "" if shard.count == 1 else f" [{shard.label}]"
        bar = tqdm(mine, desc=f"knockout {loaded.name}{label}", unit="sample", disable=not progress)
        started, processed = time.monotonic(), []
        for index, sample in bar:
            for status in done.refresh():  # statuses written meanwhile, by this process or another shard
                selection.add(status)
            if sample.question_id in done.by_id or selection.enough_before(sample.task, index):
                continue
            status, rows = _analyse(loaded, sample, index, config, max_batch)
            if strict and (status["status"] in ("excluded", "zero_base") or status.get("excluded_flows")):
                reason = status.get("reason") or "; ".join(status["excluded_flows"].values())
                raise SampleExcluded(f"{reason} (strict run: nothing was written for this sample)")
            key = file_key(sample.question_id)
            if rows is not None:
                write_parquet(output / "parts" / f"{key}.parquet", rows, meta)
            write_json(output / "samples" / f"{key}.json", status)  # written last: marks the sample done
            done.note(f"{key}.json", status)
            selection.add(status)
            processed.append(status)
            bar.set_postfix(analysed=sum(len(v) for v in selection.analysed.values()), seen=len(done.by_id))
        seconds = time.monotonic() - started
        work = ProcessSummary(shard.label, processed, seconds, str(loaded.device))
        if processed:
            write_json(output / "shards" / f"{shard.key}.json", work.record())
        if shard.count == 1:  # the whole run, done by this process: it holds the folder and merges
            summary = merge(output, meta)
        else:
            summary = merge_if_complete(output, meta)
    summary.process = work
    if summary.complete and summary.table.empty:
        raise _nothing_analysed(summary)
    return summary
