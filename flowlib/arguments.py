"""Command-line arguments checked before anything slow: counts, the model argument and the data arguments.

`flowlib run` and `flowlib lens` call these first, so that a mistyped folder, an uncached hub id
offline, or a data folder without its files fails in a second with one line naming the flag and the
fix, not after minutes of loading.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import urllib.parse
from pathlib import Path

from . import config as cfg
from .sample import SampleError


class CliError(Exception):
    """A problem with the command's input, explained in its message (what, where, what to do)."""


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (0 is refused, never read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def count_or_all(text: str) -> int | str:
    """argparse type: a whole number >= 1, or "all"."""
    return "all" if text.strip().lower() == "all" else positive_int(text)


def load_samples(args) -> tuple[list, str]:
    """The candidate samples the arguments' settings select (`ExperimentSettings.load_samples`) and a data name.

    Raises `CliError` naming the file or flag when the data cannot be read or holds no samples.
    """
    settings = args.settings
    if settings.data == "paper":
        from .data.gqa_tasks import find_task_files

        if args.csv_dir is None:
            raise CliError("--data paper needs --csv-dir (the folder of the released task CSVs), and --image-dir")
        for flag, folder in (("--csv-dir", args.csv_dir), ("--image-dir", args.image_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise CliError(f"{flag} {folder}: no such folder")
        try:
            files = find_task_files(args.csv_dir, settings.tasks)
        except FileNotFoundError as err:
            raise CliError(f"{err}, or leave those tasks out of --tasks") from err
    elif settings.data == "gqa" and (args.questions is None or args.scene_graphs is None):
        raise CliError("--data gqa needs --questions and --scene-graphs (GQA's JSON files), and --image-dir")
    try:
        grouped = settings.load_samples()
    except SampleError as err:  # the loader names the file and the fix
        raise CliError(str(err)) from err
    if settings.data == "paper":
        for task in settings.tasks:
            if not grouped.get(task):
                raise CliError(
                    f"{files[task]} holds no rows (only a header); use the released file of {task}, "
                    "or leave the task out of --tasks"
                )
    samples = [s for task in grouped for s in grouped[task]]
    if not samples:
        raise CliError(f"{args.questions} holds no question of the tasks {', '.join(settings.tasks)}")
    return samples, settings.data_name


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(name: str) -> bool:
    # A hub id is "org/name" (or a bare legacy "name"); anything else with a slash, or a leading
    # dot, slash or tilde, is meant as a folder.
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.endswith("/")
        or name.count("/") > 1
        or ("/" in name and Path(name.split("/")[0]).is_dir())
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (`HF_ENDPOINT`) opens within `timeout` seconds.

    Behind a proxy (`HTTPS_PROXY`, ...) no direct connection is expected, so the hub counts as reachable.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a thread: name resolution ignores socket timeouts
    thread.start()
    thread.join(timeout + 1)
    return bool(result and result[0])


def check_model_argument(name: str, revision: str | None = None) -> None:
    """Fail at once, with one line, on a `--model` value that cannot load.

    A short name passes; a folder must hold config.json; a value that looks like a path and does not
    exist is named as a missing folder; a hub id must be in the local cache or the hub reachable,
    and with HF_HUB_OFFLINE set an uncached id fails at once instead of waiting for the network.
    """
    from .fingerprint import hub_commit

    if name in cfg.SHORT_NAMES:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(
                f"--model {name}: the folder holds no config.json; give a checkpoint folder "
                "(as written by save_pretrained)"
            )
        return
    if path.exists():
        raise CliError(f"--model {name}: is a file; give the checkpoint's folder")
    if _looks_like_path(name):
        raise CliError(
            f"--model {name}: no such folder ({path.absolute()}); check the path "
            "(a hub id looks like llava-hf/llava-1.5-7b-hf)"
        )
    if hub_commit(name, revision):
        return
    local = f"a local checkpoint folder or a short name ({', '.join(cfg.SHORT_NAMES)})"
    if _flag("HF_HUB_OFFLINE") or _flag("TRANSFORMERS_OFFLINE"):
        raise CliError(
            f"--model {name}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded; give {local}, or unset HF_HUB_OFFLINE to download it"
        )
    if not hub_reachable():
        raise CliError(
            f"--model {name}: not in the local Hugging Face cache, and the hub cannot be reached; give "
            f"{local}, or set HF_HUB_OFFLINE=1 to work from the cache without waiting for the network"
        )
