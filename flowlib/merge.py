"""A run's end: the merged table and summary, written once, and what each process did.

Whoever completes a run merges it: the single process of an unsplit run, or the shard that finds
every sample done (`shards.run_progress`); `flowlib merge RUN_DIR` does the same by hand. The merged
table holds the rows the selection rule keeps (`shards.select_rows`), so it is the same however many
processes wrote the parts. Each process also leaves its own end summary in ``shards/<K>-of-<N>.json``
(samples done, left out and why, seconds per sample).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from .run_folder import folder_lock, load_results, load_statuses, write_json, write_parquet
from .shards import Selection, run_progress

log = logging.getLogger(__name__)


class RunIncompleteError(RuntimeError):
    """The run folder still misses samples (its shards have not all finished): the message names some."""


@dataclasses.dataclass
class ProcessSummary:
    """What one process did in a run: its shard, the samples it analysed or left out, and how long it took."""

    label: str
    statuses: list
    seconds: float
    device: str

    def counts(self) -> dict[str, int]:
        return {name: sum(1 for s in self.statuses if s["status"] == name) for name in STATUSES}

    @property
    def seconds_per_sample(self) -> float | None:
        return self.seconds / len(self.statuses) if self.statuses else None

    def record(self) -> dict:
        """As stored in ``shards/<K>-of-<N>.json``."""
        return {
            "shard": self.label,
            "samples": len(self.statuses),
            "counts": self.counts(),
            "exclusion_reasons": exclusion_reasons(self.statuses),
            "seconds": round(self.seconds, 3),
            "seconds_per_sample": None if not self.statuses else round(self.seconds_per_sample, 3),
            "device": self.device,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def describe(self) -> str:
        """One line: ``shard 1/4: 12 samples in 30.1 s (2.51 s per sample): 9 analysed, 2 answered wrongly ...``"""
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.counts().items() if v)
        rate = f" ({self.seconds_per_sample:.2f} s per sample)" if self.statuses else ""
        return f"{self.label}: {len(self.statuses)} samples in {self.seconds:.1f} s{rate}" + (
            f": {counts}" if counts else " (all were already done)"
        )


@dataclasses.dataclass
class RunSummary:
    """What a run produced: the table and the fate of every sample seen (one process's view when not complete)."""

    output: Path
    table: pd.DataFrame
    statuses: list[dict]
    complete: bool = True  # False: other shards still miss samples; the table is partial, results.parquet unwritten
    missing: list = dataclasses.field(default_factory=list)  # the run's missing question ids (when not complete)
    process: ProcessSummary | None = None  # what this process did (run_experiment)

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses if s["status"] == status)


#: The fates of a sample: analysed (in at least one flow), answered wrongly, or excluded for a reason.
STATUSES = ("analysed", "wrong_answer", "zero_base", "excluded")


def exclusion_reasons(statuses: Iterable[dict]) -> dict[str, int]:
    """How many samples (or sample x flow pairs) were left out, by reason with the sample's id removed."""
    counts: dict[str, int] = {}

    def add(reason: str, flow: str = "") -> None:
        reason = re.sub(r"^sample \S+: ", "", reason)
        key = f"{flow}: {reason}" if flow else reason
        counts[key] = counts.get(key, 0) + 1

    for status in statuses:
        if status["status"] in ("excluded", "zero_base"):
            add(status["reason"])
        for flow, reason in (status.get("excluded_flows") or {}).items():
            if status["status"] == "analysed":
                add(reason, flow)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def merge_if_complete(output: Path, meta: dict) -> RunSummary:
    """A shard's end: merge if the run is complete and nobody has (the folder lock held by another: it will)."""
    progress = run_progress(output)
    if progress.complete and not (output / "results.parquet").exists():
        with folder_lock(output) as held:
            if held and not (output / "results.parquet").exists():
                return merge(output, meta)
    statuses = _in_scope(load_statuses(output), progress.run["config"].get("per_task"))
    return RunSummary(output, load_results(output), statuses, complete=progress.complete, missing=progress.missing)


def _in_scope(statuses: list[dict], per_task: int | None) -> list[dict]:
    selection = Selection(per_task)
    for status in statuses:
        selection.add(status)
    return selection.in_scope(statuses)


def merge(output, meta: dict | None = None) -> RunSummary:
    """Write the run's merged table (``results.parquet``) and ``summary.json`` from its parts and statuses.

    Called by the process that completes a run (or `flowlib merge`); raises `RunIncompleteError` naming
    the missing samples when some are not done. The statuses counted are those one process would have
    written (`shards.Selection.in_scope`), so the summary, like the table, does not depend on the split.
    """
    output = Path(output)
    progress = run_progress(output)
    if not progress.complete:
        more = f" and {len(progress.missing) - 5} more" if len(progress.missing) > 5 else ""
        raise RunIncompleteError(
            f"{output}: {len(progress.missing)} samples are not done yet ({', '.join(progress.missing[:5])}{more}); "
            "run the missing shards (`flowlib status` lists them), then merge"
        )
    if meta is None:
        meta = {k: v for k, v in progress.run.items() if k != "fingerprint"}
    statuses = _in_scope(load_statuses(output), progress.run["config"].get("per_task"))
    counts = {name: sum(1 for s in statuses if s["status"] == name) for name in STATUSES}
    reasons = exclusion_reasons(statuses)
    log.info("%d samples seen: %s", len(statuses), ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    for reason, count in reasons.items():
        log.info("left out %d x: %s", count, reason)
    table = load_results(output)
    write_parquet(output / "results.parquet", table, meta)
    excluded = [s for s in statuses if s["status"] in ("zero_base", "excluded") or s.get("excluded_flows")]
    write_json(
        output / "summary.json",
        {
            "counts": counts,
            "samples": len(statuses),
            "rows": len(table),
            "exclusion_reasons": reasons,
            "excluded": excluded,
        },
    )
    return RunSummary(output, table, statuses)
