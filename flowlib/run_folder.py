"""The run folder: what a knockout run writes, how it is claimed, checked on resume and read back.

A run folder holds:
- ``run.json``: the run's identity (`fingerprint.identity`) and fingerprint, its provenance and
  settings, and what wrote it (code version, CPU kernels). It is created once, atomically and
  exclusively (a hard link of a complete file), before any row.
- ``data.json``: one record per sample (content and image digests, image path, source), so that a
  refused resume can name the sample and the file that changed.
- ``parts/<sample>.parquet`` then ``samples/<sample>.json``: one analysed sample's rows, then its
  status; each written atomically (temporary file + rename). A sample is done once its status exists.
- ``results.parquet`` and ``summary.json``: the whole table and the fates of the samples, written by
  the process that completes the run (`flowlib.merge`).
- ``shards/<K>-of-<N>.json``: each process's end summary (its samples, reasons, seconds per sample).
- ``.lock``: held (`filelock`, an OS file lock, released by the kernel if the process dies) while a
  process creates or checks run.json, for the whole run by a process that runs every sample, and while
  the merged table is written. A second process with the same identity waits for it, then resumes
  (finding its samples done); one with another identity is refused at once, before any write. So
  run.json always describes the rows beside it.
- ``.lock-<K>-of-<N>``: held by the process working on shard K of N (`flowlib.shards`). Shards of one
  run work side by side, each on its own samples; a second process on the same shard waits for the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from .config import PACKAGE_DIR
from .fingerprint import changes
from .kernels import kernel_description
from .shards import select_rows

log = logging.getLogger(__name__)
FORMAT = 3
RUN_FILE, DATA_FILE, LOCK_FILE = "run.json", "data.json", ".lock"
#: How often a process waiting for the folder's lock re-reads run.json (to refuse another run at once).
POLL_SECONDS = 0.2
COLUMNS = [
    "sample_index",
    "question_id",
    "task",
    "flow",
    "layer",
    "window",
    "window_layers",
    "window_first",
    "window_last",
    "base_prob",
    "blocked_prob",
    "relative_change",
    "answer_token",
    "answer_token_text",
    "model",
]


class RunMismatchError(RuntimeError):
    """The results folder holds another run (other model, data, settings or code), or is not a run folder."""


def code_version() -> str:
    """The installed flowlib version, plus `git describe` of the checkout when there is one."""
    try:
        version = metadata.version("flowlib")
    except metadata.PackageNotFoundError:  # pragma: no cover - flowlib is always installed here
        version = "unknown"
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=5,
        )
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
    return [
        f"{what} {stored.get(key)}, now {now[key]}"
        for key, what in (("code_version", "flowlib"), ("kernels", "CPU kernels"))
        if stored.get(key) != now[key]
    ]


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` then rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True)))


def write_parquet(path: Path, frame: pd.DataFrame, meta: dict) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"flowlib": json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def file_key(question_id: str) -> str:
    """A sample's file name: readable, filesystem-safe, and unique even when ids differ only in unsafe characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", question_id)[:80]
    return f"{safe}-{hashlib.sha1(question_id.encode()).hexdigest()[:8]}"


def read_run(output) -> dict | None:
    """The folder's run.json, None when it has none (it is never half-written)."""
    try:
        return json.loads((Path(output) / RUN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise RunMismatchError(f"{Path(output) / RUN_FILE} cannot be read ({err}); use another output folder") from err


def _stored_records(output: Path) -> list | None:
    try:
        return json.loads((output / DATA_FILE).read_text())
    except (OSError, ValueError):
        return None


def _foreign_entries(output: Path) -> list[str]:
    """What in `output` a run did not write while claiming it (its lock, data.json, temporary files)."""
    return [
        p.name
        for p in output.iterdir()
        if p.name != DATA_FILE and not p.name.startswith((LOCK_FILE, f".{RUN_FILE}.tmp", f".{DATA_FILE}.tmp"))
    ]


def _check(output: Path, stored: dict, record: dict, records: list, resume: bool) -> None:
    """Refuse unless `stored` (the folder's run.json) is this very run and resuming is allowed."""
    if stored.get("format") != FORMAT:
        raise RunMismatchError(
            f"{output} holds a run written by another flowlib (run folder format "
            f"{stored.get('format')}, now {FORMAT}); nothing was written: use another output "
            "folder, or delete this one to start over"
        )
    if stored.get("identity") != record["identity"]:
        diffs = changes(stored.get("fingerprint") or {}, record["fingerprint"], _stored_records(output), records)
        raise RunMismatchError(
            f"{output} holds another run: {'; '.join(diffs) or 'its identity differs'}. Nothing "
            "was written; use another output folder, or delete this one to start over"
        )
    if not resume:
        raise RunMismatchError(f"{output} already holds this run; pass resume=True to continue it")
    for change in provenance_changes(stored):  # allowed, but its rows may round differently from the earlier ones
        log.warning("resuming %s written with %s", output, change)


def _create(output: Path, record: dict, records: list) -> bool:
    """Write data.json, then create run.json exclusively; False if another process created it first."""
    atomic_write(output / DATA_FILE, lambda tmp: tmp.write_text(json.dumps(records)))  # compact: one per sample
    tmp = output / f".{RUN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    try:
        os.link(tmp, output / RUN_FILE)  # fails if run.json exists: never replaces another run's
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: the lock we hold keeps the rename exclusive
        if (output / RUN_FILE).exists():
            return False
        os.replace(tmp, output / RUN_FILE)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _acquire(lock: FileLock, what: str, waiting_check=None) -> None:
    """Take `lock`, waiting (with one warning) while another process holds it; `waiting_check()` runs as it waits."""
    try:
        lock.acquire(timeout=0)
        return
    except Timeout:
        log.warning("%s is in use by another process; waiting for it to finish (this run then resumes there)", what)
    while True:
        try:
            lock.acquire(timeout=POLL_SECONDS)
            return
        except Timeout:
            if waiting_check is not None:
                waiting_check()


@contextlib.contextmanager
def claim(output, record: dict, records: list, resume: bool = True, shard_lock: str | None = None) -> Iterator[None]:
    """Hold `output` for the run described by `record` (run.json's content) while the block runs.

    A folder holding another run, or files that are not a run's, is refused before anything is
    written (`RunMismatchError`, naming what differs). A folder in use by another process running the
    same run is waited for; in use by another run, it is refused as soon as that run's run.json exists.
    With `shard_lock` (a shard's key, `shards.Shard.key`) the folder lock is held only while run.json is
    created or checked; then that shard's own lock is held, so the run's other shards work beside it.

    Example:
        >>> with claim(output, record, records):
        ...     write_json(output / "samples" / "q1.json", status)
    """
    output = Path(output)
    stored = read_run(output)
    if stored is None and output.exists() and (foreign := _foreign_entries(output)):
        stored = read_run(output)  # another process may have created it meanwhile: then the entries are its run's
        if stored is None:
            raise RunMismatchError(
                f"{output} is not empty and holds no run.json ({', '.join(foreign[:3])} ...); "
                "use an empty or new folder"
            )
    if stored is not None:
        _check(output, stored, record, records, resume)
    output.mkdir(parents=True, exist_ok=True)

    def check_while_waiting() -> None:
        if (stored := read_run(output)) is not None:
            _check(output, stored, record, records, resume)

    lock = FileLock(output / LOCK_FILE)
    _acquire(lock, str(output), check_while_waiting)
    try:
        stored = read_run(output)
        if stored is None:
            if _foreign_entries(output):
                raise RunMismatchError(f"{output} is not empty and holds no run.json; use an empty or new folder")
            if not _create(output, record, records):
                stored = read_run(output)
        if stored is not None:
            _check(output, stored, record, records, resume)
        if shard_lock is not None:
            lock.release()
            lock = FileLock(output / f"{LOCK_FILE}-{shard_lock}")
            _acquire(lock, f"{output} (shard {shard_lock})")
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def folder_lock(output) -> Iterator[bool]:
    """Try to take the folder's lock without waiting; yields whether it was taken (then it is held in the block)."""
    lock = FileLock(Path(output) / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def load_results(output) -> pd.DataFrame:
    """The run's rows (from its parts, so also mid-run), in sample order; provenance in `.attrs`.

    With a per-task count, only the first that many analysed samples of each task by sample index
    (`shards.select_rows`): shards may have analysed more, never the table.
    """
    output = Path(output)
    run = read_run(output)
    if run is None:
        raise FileNotFoundError(f"{output} holds no run (no {RUN_FILE})")
    parts = sorted((output / "parts").glob("*.parquet"))
    frames = [pq.read_table(p).to_pandas() for p in parts]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    table = select_rows(table, run["config"].get("per_task"))
    flow_order = {f: i for i, f in enumerate(run["config"]["flows"])}
    table = table.sort_values(
        ["sample_index", "flow", "layer"], key=lambda c: c.map(flow_order) if c.name == "flow" else c, kind="stable"
    ).reset_index(drop=True)
    table.attrs.update({k: run.get(k) for k in ("identity", "provenance", "config", "code_version", "kernels")})
    return table[COLUMNS]


def load_statuses(output) -> list[dict]:
    """The status record of every sample seen so far, in sample order."""
    records = [json.loads(p.read_text()) for p in (Path(output) / "samples").glob("*.json")]
    return sorted(records, key=lambda r: r["sample_index"])
