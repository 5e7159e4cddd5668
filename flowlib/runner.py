"""The experiment runner: samples -> answer filter -> flows x layer sweeps -> a tidy, resumable table.

A run writes into one folder:
- ``run.json``: provenance (model, revision, dtype, ...), the run configuration
  (flows, window, engine, ...) and what wrote it (code version, CPU kernels), written first;
  a later run into the same folder must match its provenance and configuration exactly
  or it is refused before anything is written (other code or kernels: resumed, with a warning).
- ``parts/<sample>.parquet``: the rows of one analysed sample, then
  ``samples/<sample>.json``: its status (analysed, wrong answer, zero base, ...),
  each written atomically (temporary file + rename). A sample counts as done once
  its status exists, so a killed run resumes where it stopped and gives the same table.
- ``results.parquet``: all parts in sample order, with the provenance in its
  metadata, rewritten at the end of every run.

Example:
    >>> summary = run_experiment(loaded, samples, "runs/llava15-gqa", flows=PAPER_FLOWS, window=7)
    >>> summary.table.groupby(["flow", "layer"]).relative_change.mean()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .config import PACKAGE_DIR, default_window
from .kernels import kernel_description
from .knockout import PAPER_FLOWS, FlowError, parse_flow
from .sweep import ZeroBaseProbability, clean_pass, layer_sweep, sweep_windows

log = logging.getLogger(__name__)
FORMAT = 1
COLUMNS = ["sample_index", "question_id", "task", "flow", "layer", "window", "window_layers", "window_first",
           "window_last", "base_prob", "blocked_prob", "relative_change", "answer_token", "answer_token_text", "model"]


class RunMismatchError(RuntimeError):
    """The results folder holds a run with another model or configuration."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything besides the model that decides a run's numbers (all of it is checked on resume)."""

    flows: tuple[str, ...] = PAPER_FLOWS  # the paper's six flows
    window: Optional[int] = None  # k; None: config.default_window(num_layers), e.g. 7 for 32 layers
    engine: str = "fast"  # "fast" or "reference": same numbers, the fast one an order of magnitude sooner
    max_new_tokens: int = 10  # greedy answer length for the correctness filter (answers are a word or phrase)
    per_task: Optional[int] = None  # stop after this many analysed samples per task; None: all
    skip_empty_groups: bool = False  # record and skip samples with an empty flow group instead of raising
    data: str = ""  # free-text name of the dataset, so a folder is not resumed on other data


@dataclasses.dataclass
class RunSummary:
    """What a run produced: the table and the fate of every sample seen."""

    output: Path
    table: pd.DataFrame
    statuses: list[dict]

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses if s["status"] == status)


def code_version() -> str:
    """The installed flowlib version, plus `git describe` of the checkout when there is one."""
    try:
        version = metadata.version("flowlib")
    except metadata.PackageNotFoundError:  # pragma: no cover - flowlib is always installed here
        version = "unknown"
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=PACKAGE_DIR,
                                   capture_output=True, text=True, timeout=5)
        if described.returncode == 0 and described.stdout.strip():
            version += f"+git.{described.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def written_by() -> dict:
    """What wrote a run, recorded beside its identity: the code and the CPU kernels (they round differently)."""
    return {"code_version": code_version(), "kernels": kernel_description()}


def provenance_changes(stored: dict) -> list[str]:
    """How the code and CPU kernels that wrote `stored` (a `written_by()` record) differ from now's."""
    now = written_by()
    return [f"{what} {stored.get(key)}, now {now[key]}"
            for key, what in (("code_version", "flowlib"), ("kernels", "CPU kernels")) if stored.get(key) != now[key]]


def normalise_answer(text: str) -> str:
    """The comparison form of an answer: lowercased and stripped (PAPER.md)."""
    return text.strip().lower()


@torch.no_grad()
def greedy_answer(loaded, prepared, max_new_tokens: int = 10) -> str:
    """The model's greedy answer to a prepared input, decoded without special tokens."""
    inputs = prepared.inputs
    out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def correct_samples(loaded, samples: Iterable, per_task: Optional[int] = None, max_new_tokens: int = 10,
                    progress: bool = True, verdicts: Optional[dict] = None):
    """Yield the samples the model answers correctly (greedy), at most `per_task` of each task.

    `verdicts` (question id -> answered correctly), when given, is read and filled so that
    repeated filters over the same samples generate each answer once. The filter is logged
    with its counts when the iteration ends.
    """
    verdicts = {} if verdicts is None else verdicts
    kept, seen = {}, 0
    for sample in tqdm(samples, desc="answer filter", unit="sample", disable=not progress):
        if per_task is not None and kept.get(sample.task, 0) >= per_task:
            continue
        seen += 1
        if sample.question_id not in verdicts:
            answer = greedy_answer(loaded, loaded.prepare(sample), max_new_tokens)
            verdicts[sample.question_id] = normalise_answer(answer) == normalise_answer(sample.answer)
        if verdicts[sample.question_id]:
            kept[sample.task] = kept.get(sample.task, 0) + 1
            yield sample
    log.info("answer filter: kept %d of %d samples (%d answered wrongly)", sum(kept.values()), seen,
             seen - sum(kept.values()))


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` then rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True)))


def _write_parquet(path: Path, frame: pd.DataFrame, meta: dict) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"flowlib": json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _file_key(question_id: str) -> str:
    # Readable, filesystem-safe, and unique even when two ids differ only in unsafe characters.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", question_id)[:80]
    return f"{safe}-{hashlib.sha1(question_id.encode()).hexdigest()[:8]}"


def _identity(loaded, config: RunConfig) -> dict:
    config_dict = dataclasses.asdict(config)
    config_dict["flows"] = list(config.flows)
    return {"format": FORMAT, "provenance": loaded.provenance(), "config": config_dict}


def _open_folder(output: Path, identity: dict, resume: bool) -> None:
    """Create the run folder, or check that an existing one holds this very run."""
    run_file = output / "run.json"
    if run_file.exists():
        stored = json.loads(run_file.read_text())
        stored_identity = {k: stored.get(k) for k in identity}
        if stored_identity != identity:
            diffs = [f"{section}.{key}: folder has {stored_identity.get(section, {}).get(key)!r}, run asks "
                     f"{value!r}" for section in ("provenance", "config") for key, value in identity[section].items()
                     if (stored_identity.get(section) or {}).get(key) != value]
            raise RunMismatchError(f"{output} holds a run with another model or configuration ({'; '.join(diffs)}); "
                                   "nothing was written: use another output folder")
        if not resume:
            raise RunMismatchError(f"{output} already holds a run; pass resume=True to continue it")
        for change in provenance_changes(stored):  # allowed, but its rows may round differently from the earlier ones
            log.warning("resuming %s written with %s", output, change)
        return
    if output.exists() and any(output.iterdir()):
        raise RunMismatchError(f"{output} is not empty and holds no run.json; use an empty or new folder")
    _write_json(run_file, {**identity, **written_by()})


def load_results(output) -> pd.DataFrame:
    """The run's rows (from its parts, so also mid-run), in sample order; provenance in `.attrs`."""
    output = Path(output)
    run = json.loads((output / "run.json").read_text())
    parts = sorted((output / "parts").glob("*.parquet"))
    frames = [pq.read_table(p).to_pandas() for p in parts]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    flow_order = {f: i for i, f in enumerate(run["config"]["flows"])}
    table = table.sort_values(["sample_index", "flow", "layer"], key=lambda c: c.map(flow_order) if c.name == "flow"
                              else c, kind="stable").reset_index(drop=True)
    table.attrs.update({k: run.get(k) for k in ("provenance", "config", "code_version", "kernels")})
    return table[COLUMNS]


def load_statuses(output) -> list[dict]:
    """The status record of every sample seen so far, in sample order."""
    records = [json.loads(p.read_text()) for p in (Path(output) / "samples").glob("*.json")]
    return sorted(records, key=lambda r: r["sample_index"])


def _analyse(loaded, sample, index: int, config: RunConfig, window: int, max_batch) -> tuple[dict, pd.DataFrame]:
    """One sample: filter on its greedy answer, then sweep every flow. Returns (status, rows)."""
    status = {"question_id": sample.question_id, "task": sample.task, "sample_index": index,
              "answer": sample.answer}
    prepared = loaded.prepare(sample)
    answer = greedy_answer(loaded, prepared, config.max_new_tokens)
    status["greedy_answer"] = answer
    if normalise_answer(answer) != normalise_answer(sample.answer):
        return {**status, "status": "wrong_answer"}, None
    clean = clean_pass(loaded, prepared)
    frames = []
    try:
        for flow in config.flows:
            result = layer_sweep(loaded, prepared, flow, window, engine=config.engine, clean=clean,
                                 **({"max_batch": max_batch} if config.engine == "fast" else {}))
            frames.append(result.to_frame())
    except ZeroBaseProbability as err:
        log.warning("sample %s excluded: %s", sample.question_id, err)
        return {**status, "status": "zero_base", "reason": str(err)}, None
    except FlowError as err:
        if not config.skip_empty_groups:
            raise
        log.warning("sample %s skipped: %s", sample.question_id, err)
        return {**status, "status": "empty_group", "reason": str(err)}, None
    rows = pd.concat(frames, ignore_index=True)
    rows.insert(0, "sample_index", index)
    rows.insert(2, "task", sample.task)
    rows["answer_token_text"] = loaded.tokenizer.convert_ids_to_tokens(clean.answer_token)
    rows["model"] = loaded.name
    return {**status, "status": "analysed"}, rows[COLUMNS]


def run_experiment(loaded, samples: Iterable, output, *, flows: Sequence[str] = PAPER_FLOWS,
                   window: Optional[int] = None, engine: str = "fast", max_new_tokens: int = 10,
                   per_task: Optional[int] = None, skip_empty_groups: bool = False, data: str = "",
                   resume: bool = True, max_batch: Optional[int] = None, progress: bool = True) -> RunSummary:
    """Run the knockout experiment over `samples`, saving as it goes; resume a stopped run in `output`.

    Args:
        loaded: a `LoadedModel`. samples: any iterable of `Sample`s (unique question ids), in a
            stable order. output: the results folder (see the module docstring).
        flows, window, engine, max_new_tokens, per_task, skip_empty_groups, data: see `RunConfig`.
        resume: continue a compatible run found in `output` (else an existing run is an error).
        max_batch: the fast engine's batch bound (memory only; numbers are unchanged).
        progress: show a progress bar.

    Raises:
        RunMismatchError: `output` holds another model's or configuration's run (nothing is written).
        FlowError: unknown flow, or an empty group (unless `skip_empty_groups`).
    """
    for flow in flows:
        parse_flow(flow)
    window = int(window or default_window(loaded.num_layers))
    sweep_windows(window, loaded.num_layers)  # a window wider than the model fails before any work
    config = RunConfig(tuple(flows), window, engine, max_new_tokens, per_task, skip_empty_groups, data)
    output = Path(output)
    identity = _identity(loaded, config)
    _open_folder(output, identity, resume)
    meta = {**identity, **written_by()}

    done = {s["question_id"]: s for s in load_statuses(output)}
    analysed = {}
    for s in done.values():
        analysed[s["task"]] = analysed.get(s["task"], 0) + (s["status"] == "analysed")
    seen = set()
    bar = tqdm(samples, desc=f"knockout {loaded.name}", unit="sample", disable=not progress)
    for index, sample in enumerate(bar):
        if sample.question_id in seen:
            raise ValueError(f"sample id {sample.question_id!r} occurs twice; question ids must be unique")
        seen.add(sample.question_id)
        if sample.question_id in done:
            continue
        if per_task is not None and analysed.get(sample.task, 0) >= per_task:
            continue
        status, rows = _analyse(loaded, sample, index, config, window, max_batch)
        key = _file_key(sample.question_id)
        if rows is not None:
            _write_parquet(output / "parts" / f"{key}.parquet", rows, meta)
            analysed[sample.task] = analysed.get(sample.task, 0) + 1
        _write_json(output / "samples" / f"{key}.json", status)  # written last: marks the sample done
        done[sample.question_id] = status
        bar.set_postfix(analysed=sum(analysed.values()), seen=len(done))

    statuses = load_statuses(output)
    counts = {name: sum(1 for s in statuses if s["status"] == name)
              for name in ("analysed", "wrong_answer", "zero_base", "empty_group")}
    log.info("answer filter: kept %d of %d samples (%d answered wrongly, %d zero base probability, %d empty group)",
             counts["analysed"], len(statuses), counts["wrong_answer"], counts["zero_base"], counts["empty_group"])
    table = load_results(output)
    _write_parquet(output / "results.parquet", table, meta)
    excluded = [s for s in statuses if s["status"] in ("zero_base", "empty_group")]
    _write_json(output / "summary.json",
                {"counts": counts, "samples": len(statuses), "rows": len(table), "excluded": excluded})
    return RunSummary(output, table, statuses)
