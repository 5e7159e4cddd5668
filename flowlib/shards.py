"""Splitting one run over many processes: shards, ranks, the per-task selection rule, and a run's progress.

A run (one run folder, one identity) can be worked on by N processes at once: SLURM array tasks
(`--shard K/N`, `--shard slurm`), torchrun / accelerate ranks (RANK, WORLD_SIZE), or both. No
process talks to another; they share only the run folder (`flowlib.run_folder`).

- **The split.** A sample belongs to shard ``sha256(question_id) mod N``: it depends on nothing but the
  id, so a resume with another N redoes no sample already written (a sample is done once its status
  file exists, whoever wrote it).
- **The selection rule** (what ``samples_per_task = P`` means under any N). Candidates are indexed in
  their data order (`run_plan.index_samples`); a sample's fate (analysed, answered wrongly, zero base,
  excluded) depends on it alone. The run's table holds, per task, the first P *analysed* samples in index
  order, exactly what one process going through the candidates in order keeps. A shard skips a sample
  once the folder already holds P analysed samples of its task with a lower index (written by any
  shard); samples it analysed beyond that point (another shard had not yet written its own) stay in
  ``parts/`` but never enter the table. So the merged table equals a single process's, for every N.
- **Completion.** A run is complete when every candidate is done or beyond its task's P-th analysed
  sample; `run_progress` says which samples are missing, per shard of any N.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path


class ShardSpecError(ValueError):
    """A shard specification (``--shard``, SLURM or torchrun variables) that cannot be used: the message says why."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """Part `index` of `count` of a run's samples (0-based); `label` names it in progress bars and summaries."""

    index: int
    count: int
    label: str = ""

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ShardSpecError(
                f"shard {self.index}/{self.count}: the shard must be 0..{self.count - 1} of {self.count}"
            )
        if not self.label:
            object.__setattr__(self, "label", f"shard {self.index}/{self.count}")

    def owns(self, question_id: str) -> bool:
        return self.count == 1 or shard_of(question_id, self.count) == self.index

    @property
    def key(self) -> str:
        """The shard in file names: ``<index>-of-<count>``."""
        return f"{self.index}-of-{self.count}"


WHOLE = Shard(0, 1, "all samples")


def shard_of(question_id: str, count: int) -> int:
    """The shard (0..count-1) of a sample: its id's sha256 modulo `count` (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(question_id.encode()).digest()[:8], "big") % count


def _whole(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ShardSpecError(f"{what} must be a whole number, not {text!r}") from None


def parse_shard(spec: str, env: Mapping[str, str] | None = None) -> Shard:
    """``"K/N"`` (0 <= K < N) or ``"slurm"`` (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT).

    Raises `ShardSpecError` naming what is wrong (``3/2``, ``0/0``, ``a/b``, SLURM variables missing).
    """
    env = os.environ if env is None else env
    if spec.strip().lower() == "slurm":
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ShardSpecError(
                "--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (set in a SLURM job array, "
                "sbatch --array=0-N); outside an array give --shard K/N"
            )
        task = _whole(env["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID")
        first = _whole(env.get("SLURM_ARRAY_TASK_MIN", "0"), "SLURM_ARRAY_TASK_MIN")
        count = _whole(env["SLURM_ARRAY_TASK_COUNT"], "SLURM_ARRAY_TASK_COUNT")
        if count < 1 or not 0 <= task - first < count:
            raise ShardSpecError(
                f"SLURM array task {task} (first {first}) of {count}: use a contiguous array, "
                f"e.g. --array=0-{count - 1}"
            )
        return Shard(task - first, count, f"array task {task - first}/{count}")
    parts = spec.split("/")
    if len(parts) != 2:
        raise ShardSpecError(f"shard {spec!r}: use K/N, e.g. 0/4 for the first of four shards, or 'slurm'")
    index, count = _whole(parts[0], f"shard {spec!r}: K"), _whole(parts[1], f"shard {spec!r}: N")
    if count < 1:
        raise ShardSpecError(f"shard {spec!r}: N must be at least 1")
    if not 0 <= index < count:
        raise ShardSpecError(f"shard {spec!r}: K must be 0..{count - 1} (shards are numbered from 0)")
    return Shard(index, count)


def distributed_rank(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun and accelerate launch set them; None when not set."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world = _whole(env["RANK"], "RANK"), _whole(env["WORLD_SIZE"], "WORLD_SIZE")
    local = _whole(env.get("LOCAL_RANK", env["RANK"]), "LOCAL_RANK")
    if world < 1 or not 0 <= rank < world:
        raise ShardSpecError(f"RANK {rank} of WORLD_SIZE {world}: the launcher's variables are inconsistent")
    return rank, world, local


def resolve_shard(spec: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """This process's shard: `spec` (``K/N``, ``slurm`` or None), split further by torchrun's rank when set.

    Shard K/N on rank R of W is shard ``K*W + R`` of ``N*W``: every (array task, rank) pair gets its own part.
    """
    shard = parse_shard(spec, env) if spec else WHOLE
    ranks = distributed_rank(env)
    if ranks is None or ranks[1] == 1:
        return shard
    rank, world, _ = ranks
    label = f"rank {rank}/{world}" + ("" if shard.count == 1 else f" of {shard.label}")
    return Shard(shard.index * world + rank, shard.count * world, label)


def rank_device(device: str, env: Mapping[str, str] | None = None) -> str:
    """``"cuda"`` becomes ``cuda:LOCAL_RANK`` under torchrun / accelerate; any other device is kept."""
    ranks = distributed_rank(env)
    return f"cuda:{ranks[2]}" if ranks is not None and device == "cuda" else device


class Selection:
    """The per-task selection rule (module docstring) over the statuses seen so far."""

    def __init__(self, per_task: int | None):
        self.per_task = per_task
        self.analysed: dict[str, list[int]] = {}  # task -> sorted sample indices of its analysed samples

    def add(self, status: dict) -> None:
        if status["status"] == "analysed":
            bisect.insort(self.analysed.setdefault(status["task"], []), status["sample_index"])

    def enough_before(self, task: str, index: int) -> bool:
        """Whether `task` already has its `per_task` analysed samples before sample `index` (so it is not needed)."""
        if self.per_task is None:
            return False
        return bisect.bisect_left(self.analysed.get(task, []), index) >= self.per_task

    def in_scope(self, statuses: Iterable[dict]) -> list[dict]:
        """The statuses one process going through the samples in order would have written."""
        return [s for s in statuses if not self.enough_before(s["task"], s["sample_index"])]


def select_rows(table, per_task: int | None):
    """The rows of the first `per_task` analysed samples of each task (by sample index): the run's table."""
    if per_task is None or table.empty:
        return table
    first = table.drop_duplicates("sample_index")[["task", "sample_index"]].sort_values("sample_index")
    keep = first.groupby("task", sort=False).head(per_task)["sample_index"]
    return table[table["sample_index"].isin(set(keep))]


class FolderStatuses:
    """The run folder's sample statuses (``samples/*.json``), re-read incrementally as other shards write them."""

    def __init__(self, output):
        self.folder = Path(output) / "samples"
        self.by_id: dict[str, dict] = {}
        self._files: set[str] = set()

    def refresh(self) -> list[dict]:
        """Statuses written since the last call (complete files only: each is renamed into place)."""
        new = []
        try:
            names = [e.name for e in os.scandir(self.folder) if e.name.endswith(".json")]
        except FileNotFoundError:
            return new
        for name in names:
            if name not in self._files:
                status = json.loads((self.folder / name).read_text())
                self._files.add(name)
                self.by_id[status["question_id"]] = status
                new.append(status)
        return new

    def note(self, name: str, status: dict) -> None:
        """Record a status this process has just written as `name`."""
        self._files.add(name)
        self.by_id[status["question_id"]] = status


@dataclasses.dataclass
class RunProgress:
    """Where a run stands (`run_progress`)."""

    output: Path
    run: dict
    records: list  # data.json: one per candidate (index, question_id, task ...)
    statuses: dict  # question id -> status
    missing: list  # candidates neither done nor beyond their task's last needed sample, in index order

    @property
    def complete(self) -> bool:
        return not self.missing

    def shards(self, count: int) -> dict[int, list[str]]:
        """Missing question ids per shard of `count` (an empty list: that shard is complete)."""
        out: dict[int, list[str]] = {k: [] for k in range(count)}
        for qid in self.missing:
            out[shard_of(qid, count)].append(qid)
        return out

    def counts(self) -> dict[str, int]:
        selection = Selection(self.run["config"].get("per_task"))
        for status in self.statuses.values():
            selection.add(status)
        counts: dict[str, int] = {}
        for status in selection.in_scope(self.statuses.values()):
            counts[status["status"]] = counts.get(status["status"], 0) + 1
        return counts

    def shard_records(self) -> dict[str, dict]:
        """The end summaries the run's processes left (``shards/<K>-of-<N>.json``), by shard key."""
        folder = self.output / "shards"
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def run_progress(output) -> RunProgress:
    """Read a run folder's progress: done, not needed and missing candidates (raises if it holds no run)."""
    from .run_folder import DATA_FILE, read_run

    output = Path(output)
    run = read_run(output)
    if run is None:
        raise FileNotFoundError(f"{output} holds no run (no run.json)")
    records = json.loads((output / DATA_FILE).read_text())
    statuses = FolderStatuses(output)
    statuses.refresh()
    selection = Selection(run["config"].get("per_task"))
    for status in statuses.by_id.values():
        selection.add(status)
    missing = [
        r["question_id"]
        for r in sorted(records, key=lambda r: r["index"])
        if r["question_id"] not in statuses.by_id and not selection.enough_before(r["task"], r["index"])
    ]
    return RunProgress(output, run, records, statuses.by_id, missing)
