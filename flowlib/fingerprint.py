"""A run's identity: fingerprints of everything that decides its numbers, and how two of them differ.

A knockout run's numbers are decided by four things, each fingerprinted here:
- **model**: its provenance (name, dtype, image mode, ...) plus its files: for a checkpoint folder
  the config, weight, tokenizer and processor files (size and hash, see `file_digest`); for a hub
  id the resolved commit (files under one commit never change); for an in-memory model (tests,
  `tiny_llava`) its parameters.
- **data**: every sample's index, id, task, question, answer, options, object and boxes, and its
  image's content (the file's size and hash, or the decoded pixels' hash); never the image's path,
  so the same pictures in another folder are the same data.
- **settings**: the analysis settings (`run_plan.RunConfig`).
- **code**: the flowlib version and a hash of the sources that compute the numbers.

`identity(fingerprint)` hashes the four into one hex string: equal identities, equal numbers
(up to CPU kernels' rounding, recorded apart). `changes(...)` names what differs between a stored
fingerprint and a new one, down to the file or the sample.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from .config import PACKAGE_DIR

#: Files up to this size are hashed whole; larger ones (multi-GB weight shards) are sampled.
WHOLE_FILE_LIMIT = 256 * 2**20
#: A sampled file's hash covers its first and last 4 MiB and 16 blocks of 1 MiB spread evenly in between.
EDGE_BYTES, BLOCK_BYTES, BLOCKS = 4 * 2**20, 2**20, 16
#: The files of a checkpoint folder that decide its outputs (model cards and training logs do not).
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.bin",
    "*.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template*",
)
#: In-memory tensors up to this many elements are hashed whole; larger ones by their first and last ones.
WHOLE_TENSOR_LIMIT = 2**16
PARTS = ("model", "data", "settings", "code")


def _sha256(data) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else _canonical(data).encode()).hexdigest()


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def file_digest(path) -> dict:
    """Size and sha256 of a file: of all of it up to `WHOLE_FILE_LIMIT`, else of a sample of it.

    The sample (first and last `EDGE_BYTES`, `BLOCKS` blocks of `BLOCK_BYTES` evenly spaced) keeps a
    14 GB checkpoint's fingerprint under a second; it misses a change confined to unsampled bytes that
    leaves the size equal, which retraining, re-quantising or re-exporting weights never does.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
            return {"bytes": size, "sha256": digest.hexdigest()}
        step = (size - 2 * EDGE_BYTES) // (BLOCKS + 1)
        for offset, length in [
            (0, EDGE_BYTES),
            *[(EDGE_BYTES + step * (i + 1), BLOCK_BYTES) for i in range(BLOCKS)],
            (size - EDGE_BYTES, EDGE_BYTES),
        ]:
            f.seek(offset)
            digest.update(f.read(length))
    return {"bytes": size, "sha256": digest.hexdigest(), "hashed": "sampled"}


def _tensor_digest(tensor) -> str:
    import torch

    flat = tensor.detach().reshape(-1)
    if flat.numel() > WHOLE_TENSOR_LIMIT:
        half = WHOLE_TENSOR_LIMIT // 2
        flat = torch.cat([flat[:half], flat[-half:]])
    return _sha256(flat.contiguous().view(torch.uint8).cpu().numpy().tobytes())


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit of `repo_id` (at `revision`) in the local Hugging Face cache, None when not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid repo id, or an unusable cache: the commit is unknown
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


def model_fingerprint(loaded) -> dict:
    """The model part (see the module docstring)."""
    record = dict(loaded.provenance())
    source = str(getattr(loaded.model, "name_or_path", "") or "")
    if source and Path(source).is_dir():
        folder = Path(source)
        names = sorted({p.name for pattern in CHECKPOINT_FILES for p in folder.glob(pattern) if p.is_file()})
        record["files"] = {name: file_digest(folder / name) for name in names}
    elif source and (commit := hub_commit(source, loaded.revision or None)):
        record["hub_commit"] = commit
    else:  # in memory, or a hub model whose cache entry cannot be found: hash what is loaded
        state = loaded.model.state_dict()
        record["parameters"] = _sha256(
            [[name, str(t.dtype), list(t.shape), _tensor_digest(t)] for name, t in sorted(state.items())]
        )
    return record


def image_digest(image, cache: dict | None = None) -> dict:
    """An image's content: {bytes, sha256} of its file, {pixels} of a decoded image, or why it is unreadable.

    Callables (lazily decoded images) are called, and the result is not cached in the sample.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        key = os.fspath(image)
        if cache is not None and key in cache:
            return cache[key]
        try:
            result = file_digest(key)
        except OSError as err:
            result = {"unreadable": type(err).__name__}
        if cache is not None:
            cache[key] = result
        return result
    if image is None:
        return {"unreadable": "no image"}
    if callable(image) and not isinstance(image, Image.Image):
        try:
            image = image()
        except Exception as err:  # recorded: the run excludes such a sample with the full reason
            return {"unreadable": type(err).__name__}
    if isinstance(image, Image.Image):
        return {"pixels": _sha256(f"{image.mode}:{image.size}:".encode() + image.tobytes())}
    return {"unreadable": type(image).__name__}


def sample_content(sample, index: int) -> dict:
    """What of a sample decides the numbers, besides its image."""
    return {
        "index": index,
        "question_id": sample.question_id,
        "task": sample.task,
        "question": sample.question,
        "answer": sample.answer,
        "true_option": sample.true_option,
        "false_option": sample.false_option,
        "central_object": sample.central_object,
        "image_size": list(sample.image_size) if sample.image_size is not None else None,
        "boxes": [[b.x, b.y, b.w, b.h, b.label] for b in sample.boxes],
    }


def data_fingerprint(indexed_samples: Iterable[tuple[int, object]]) -> tuple[dict, list[dict]]:
    """The data part and one record per sample (content and image digests, the image path and source).

    The records are stored beside the run (`data.json`), so that a refusal can name the sample and
    the file that changed.
    """
    records, cache, tasks = [], {}, {}
    for index, sample in indexed_samples:
        content = sample_content(sample, index)
        image = image_digest(sample.image, cache)
        path = os.fspath(sample.image) if isinstance(sample.image, (str, os.PathLike)) else None
        records.append(
            {
                "index": index,
                "question_id": sample.question_id,
                "task": sample.task,
                "source": sample.source,
                "image_path": path,
                "image": image,
                "content": content,
                "digest": _sha256([content, image]),
            }
        )
        tasks[sample.task] = tasks.get(sample.task, 0) + 1
    part = {"digest": _sha256([r["digest"] for r in records]), "samples": len(records), "tasks": tasks}
    return part, records


#: The modules that compute a run's numbers; the code part hashes them and every flowlib module they import.
#: Front doors (cli, study), plots and data loaders are left out: what they pass on is fingerprinted as
#: settings and data, so editing them never turns away a resume.
NUMERIC_MODULES = ("runner", "models")


def _module_file(name: str) -> Path | None:
    """The source file of flowlib module `name` ("flowlib.x.y"), None if it is not one."""
    parts = name.split(".")
    if parts[0] != "flowlib":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    """The flowlib source files `path` imports (at the top or inside functions)."""
    module = ".".join(("flowlib", *path.relative_to(PACKAGE_DIR).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {f for f in map(_module_file, names) if f is not None}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> dict:
    """The flowlib version and a sha256 of the sources that compute the numbers (`NUMERIC_MODULES` and
    all they import), read once per process: the code it runs."""
    try:
        version = metadata.version("flowlib")
    except metadata.PackageNotFoundError:  # pragma: no cover - flowlib is always installed here
        version = "unknown"
    todo = [PACKAGE_DIR / "__init__.py", *(_module_file(f"flowlib.{m}") for m in NUMERIC_MODULES)]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += _imports(path)
    return {
        "flowlib": version,
        "sources": {p.relative_to(PACKAGE_DIR).as_posix(): _sha256(p.read_bytes()) for p in sorted(seen)},
    }


def identity(fingerprint: dict) -> str:
    """One hex digest of the four parts: the run's identity."""
    return _sha256({part: fingerprint[part] for part in PARTS})


def _short(value) -> str:
    """A value as messages show it: digests cut to 12 hex digits, other values in full up to 80 characters."""
    if isinstance(value, str) and len(value) >= 32 and all(c in "0123456789abcdef" for c in value):
        return f"{value[:12]}…"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _describe_file(digest: dict | None) -> str:
    if not digest:
        return "absent"
    if "unreadable" in digest:
        return f"unreadable ({digest['unreadable']})"
    if "pixels" in digest:
        return f"pixels sha256 {_short(digest['pixels'])}"
    return f"{digest['bytes']} bytes, sha256 {_short(digest['sha256'])}"


def _dict_changes(prefix: str, old: dict, new: dict, skip=()) -> list[str]:
    return [
        f"{prefix}{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if key not in skip and old.get(key) != new.get(key)
    ]


def _model_changes(old: dict, new: dict) -> list[str]:
    out = _dict_changes("model ", old, new, skip=("files", "hub_commit", "parameters"))
    old_files, new_files = old.get("files"), new.get("files")
    if old_files is not None and new_files is not None:
        for name in sorted(set(old_files) | set(new_files)):
            if old_files.get(name) != new_files.get(name):
                out.append(
                    f"model file {name} changed ({_describe_file(old_files.get(name))} -> "
                    f"{_describe_file(new_files.get(name))})"
                )
    elif (old_files is None) != (new_files is None):
        out.append("model source changed (checkpoint folder <-> hub or in-memory model)")
    for key in ("hub_commit", "parameters"):
        if old.get(key) != new.get(key) and (old.get(key) or new.get(key)):
            out.append(f"model {key.replace('_', ' ')}: {_short(old.get(key))} -> {_short(new.get(key))}")
    return out


def _sample_change(old: dict, new: dict) -> str:
    where = f"sample {new['question_id']} ({new['task']}{', ' + new['source'] if new.get('source') else ''})"
    if old.get("image") != new.get("image"):
        path = new.get("image_path") or old.get("image_path") or "in memory"
        return (
            f"{where}: image {path} changed ({_describe_file(old.get('image'))} -> {_describe_file(new.get('image'))})"
        )
    fields = _dict_changes("", old.get("content") or {}, new.get("content") or {})
    return f"{where}: {'; '.join(fields) or 'content changed'}"


def _data_changes(old: dict, new: dict, old_records: list | None, new_records: list, limit: int = 3) -> list[str]:
    out = []
    if old.get("samples") != new.get("samples") or old.get("tasks") != new.get("tasks"):
        out.append(f"data: {old.get('samples')} samples {old.get('tasks')} -> {new.get('samples')} {new.get('tasks')}")
    if old_records is None:
        return out or ["data: the samples' content changed (the earlier run's data.json is missing)"]
    old_by_id = {r["question_id"]: r for r in old_records}
    new_by_id = {r["question_id"]: r for r in new_records}
    removed = [q for q in old_by_id if q not in new_by_id]
    added = [q for q in new_by_id if q not in old_by_id]
    changed = [
        _sample_change(old_by_id[q], new_by_id[q])
        for q in new_by_id
        if q in old_by_id and old_by_id[q]["digest"] != new_by_id[q]["digest"]
    ]
    for what, items in (("samples removed", removed), ("samples added", added)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            out.append(f"{what}: {', '.join(items[:limit])}{more}")
    out += changed[:limit] + ([f"and {len(changed) - limit} more samples changed"] if len(changed) > limit else [])
    return out or ["data: the samples' order changed"]


def changes(old: dict, new: dict, old_records: list | None = None, new_records: list | None = None) -> list[str]:
    """What differs between two fingerprints, part by part, naming files and samples where it can."""
    old, new, new_records = json.loads(_canonical([old, new, new_records]))  # both as stored (JSON)
    out = []
    for part in PARTS:
        a, b = old.get(part) or {}, new.get(part) or {}
        if a == b:
            continue
        if part == "model":
            out += _model_changes(a, b) or ["model changed"]
        elif part == "data":
            out += _data_changes(a, b, old_records, new_records or [])
        elif part == "settings":
            out += _dict_changes("settings.", a, b)
        else:
            out += _code_changes(a, b)
    return out


def _code_changes(old: dict, new: dict) -> list[str]:
    out = []
    if old.get("flowlib") != new.get("flowlib"):
        out.append(f"code: flowlib {old.get('flowlib')} -> {new.get('flowlib')}")
    a, b = old.get("sources") or {}, new.get("sources") or {}
    changed = [name for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
    return out + ([f"code: flowlib/{', flowlib/'.join(changed)} changed since the run began"] if changed else [])
