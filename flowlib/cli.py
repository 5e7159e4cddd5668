"""Command line: knockout runs and the answer lens without a notebook (e.g. in a GPU cluster job).

Examples:
    flowlib run --model llava-hf/llava-1.5-7b-hf --data paper --csv-dir datasets --image-dir gqa/images \\
        --tasks ChooseAttr ChooseRel --window 7 --samples-per-task 200 --device cuda --dtype float16 \\
        --output runs/llava15-7b
    flowlib run --model toy-llava --data synthetic --samples-per-task 20      # offline default model
    flowlib lens --model toy-llava --data synthetic --samples-per-task 20 --lenses normed raw

A stopped `run` resumes when started again with the same arguments; started with other data, weights
or settings into the same folder, it is refused, naming what changed.

A known error prints one or two lines (what, which file or setting, what to do) and exits with 2 for a
bad setting, 1 for anything else, 130 for Ctrl-C; `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from . import config as cfg
from .sample import TASKS, SampleError

EXIT_ERROR, EXIT_SETTING, EXIT_INTERRUPTED = 1, 2, 130


class CliError(Exception):
    """A problem with the command's input, explained in its message (what, where, what to do)."""


class _Parser(argparse.ArgumentParser):
    """argparse with a two-line error (the message, where to look) instead of the full usage block."""

    def error(self, message: str):
        self.exit(EXIT_SETTING, f"{self.prog}: error: {message}\n  (`{self.prog} --help` lists the options)\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (0 is refused, never read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=cfg.OFFLINE_MODEL, help="hub id, local folder or short name")
    parser.add_argument("--revision", default=None, help="hub revision to pin")
    parser.add_argument("--image-mode", default=None, help="llava-1.5: pad (default) or crop; llava-next: anyres")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="float32", help="float32 (CPU), float16 (the paper, GPU), bfloat16")
    parser.add_argument("--data", choices=("synthetic", "paper", "gqa"), default="synthetic")
    parser.add_argument("--csv-dir", type=Path, help="paper: folder of the released task CSVs")
    parser.add_argument("--image-dir", type=Path, help="paper, gqa: folder of GQA images")
    parser.add_argument("--questions", type=Path, help="gqa: GQA questions JSON")
    parser.add_argument("--scene-graphs", type=Path, help="gqa: GQA scene graphs JSON")
    parser.add_argument("--split", default="test", help="synthetic: which split (train, validation, test)")
    parser.add_argument(
        "--synthetic-count", type=positive_int, default=100, help="synthetic: samples generated per task"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic: generation seed")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASKS),
        choices=TASKS,
        metavar="TASK",
        help=f"tasks to use (default all: {' '.join(TASKS)})",
    )
    parser.add_argument(
        "--samples-per-task",
        type=positive_int,
        default=None,
        help="at most this many correctly answered samples per task (default: all)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=10, help="greedy answer length for the filter")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def _load_paper(args) -> list:
    from .data.gqa_tasks import find_task_files
    from .data.sources import load_samples as load

    if args.csv_dir is None:
        raise CliError("--data paper needs --csv-dir (the folder of the released task CSVs), and --image-dir")
    for flag, folder in (("--csv-dir", args.csv_dir), ("--image-dir", args.image_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise CliError(f"{flag} {folder}: no such folder")
    try:
        files = find_task_files(args.csv_dir, args.tasks)
    except FileNotFoundError as err:
        raise CliError(f"{err}, or leave those tasks out of --tasks") from err
    samples = []
    for task in args.tasks:  # one task at a time, so that an error names its file
        try:
            grouped = load("paper", tasks=[task], csv_dir=args.csv_dir, image_dir=args.image_dir)
        except SampleError as err:  # the loader names the file and the fix
            raise CliError(str(err)) from err
        if not grouped.get(task):
            raise CliError(
                f"{files[task]} holds no rows (only a header); use the released file of {task}, "
                "or leave the task out of --tasks"
            )
        samples += grouped[task]
    return samples


def load_samples(args) -> tuple[list, str]:
    """The samples the arguments select (all of them: the runner limits the analysed ones) and a data name.

    Raises `CliError` naming the file or flag when the data cannot be read or holds no samples.
    """
    from .data.sources import load_samples as load  # imported here: the data stack is slow to import

    args.tasks = list(dict.fromkeys(args.tasks))
    if args.data == "synthetic":
        grouped = load("synthetic", tasks=args.tasks, per_task=args.synthetic_count, seed=args.seed, split=args.split)
        name = f"synthetic-n{args.synthetic_count}-seed{args.seed}-{args.split}"
        return [s for task in grouped for s in grouped[task]], name
    if args.data == "paper":
        return _load_paper(args), f"paper-{Path(args.csv_dir).name}"
    if args.questions is None or args.scene_graphs is None:
        raise CliError("--data gqa needs --questions and --scene-graphs (GQA's JSON files), and --image-dir")
    grouped = load(
        "gqa", tasks=args.tasks, questions=args.questions, scene_graphs=args.scene_graphs, image_dir=args.image_dir
    )
    samples = [s for task in grouped for s in grouped[task]]
    if not samples:
        raise CliError(f"{args.questions} holds no question of the tasks {', '.join(args.tasks)}")
    return samples, f"gqa-{Path(args.questions).stem}"


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


def _load_model(args):
    from .models import load_model

    args.stage = "loading the model"
    return load_model(
        args.model, dtype=args.dtype, device=args.device, image_mode=args.image_mode, revision=args.revision
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def cmd_run(args) -> int:
    check_model_argument(args.model, args.revision)  # first: cheap checks fail before torch is even imported
    args.stage = "reading the data"
    samples, data_name = load_samples(args)  # then bad data arguments fail before a slow model load
    from .knockout import PAPER_FLOWS
    from .runner import STATUSES, exclusion_reasons, resolve_window, run_experiment

    loaded = _load_model(args)
    window = resolve_window(args.window, loaded.num_layers)
    output = args.output or cfg.runs_dir() / _slug(f"{Path(args.model).name}-{data_name}-w{window}")
    args.stage, args.run_output = "running", output
    flows = args.flows or PAPER_FLOWS
    summary = run_experiment(
        loaded,
        samples,
        output,
        flows=flows,
        window=window,
        engine=args.engine,
        max_new_tokens=args.max_new_tokens,
        per_task=args.samples_per_task,
        data=data_name,
        max_batch=args.max_batch or "auto",
        strict=args.strict,
        progress=not args.quiet,
    )
    counts = {name: summary.count(name) for name in STATUSES}
    print(
        f"{counts['analysed']} samples analysed ({counts['wrong_answer']} answered wrongly, {counts['zero_base']} "
        f"zero base, {counts['excluded']} excluded); {len(summary.table)} rows in {output / 'results.parquet'}"
    )
    for reason, count in exclusion_reasons(summary.statuses).items():
        print(f"  left out {count} x: {reason}")
    return 0


def cmd_lens(args) -> int:
    check_model_argument(args.model, args.revision)
    args.stage = "reading the data"
    samples, data_name = load_samples(args)
    from .lens import lens_table
    from .runner import correct_samples

    loaded = _load_model(args)
    args.stage = "running the lens (its table is written at the end)"
    chosen = list(correct_samples(loaded, samples, args.samples_per_task, args.max_new_tokens, progress=not args.quiet))
    if not chosen:
        raise CliError(
            f"{loaded.name} answers none of the {len(samples)} samples correctly, so there is nothing to "
            "read the lens on; check the model, its prompt style and the data's answers"
        )
    table = lens_table(loaded, chosen, lenses=args.lenses, progress=not args.quiet)
    output = args.output or cfg.runs_dir() / _slug(f"lens-{Path(args.model).name}-{data_name}.parquet")
    output.parent.mkdir(parents=True, exist_ok=True)
    table.attrs = {}
    table.to_parquet(output, index=False)
    print(f"{table.question_id.nunique() if len(table) else 0} samples, lenses {', '.join(args.lenses)}: {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowlib", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="attention-knockout layer sweeps over a dataset")
    _common(run)
    run.add_argument(
        "--flows", nargs="+", default=None, metavar="FLOW", help="flows 'Source->Target' (default: the paper's six)"
    )
    run.add_argument(
        "--window", type=positive_int, default=None, help="k layers per window, 1..depth (default: 7 for 32 layers)"
    )
    run.add_argument("--engine", choices=("fast", "reference"), default="fast")
    run.add_argument(
        "--max-batch",
        type=positive_int,
        default=None,
        help="fast engine: windows per batch (default: as many as the device's free memory holds)",
    )
    run.add_argument("--output", type=Path, default=None, help="results folder (default under runs/)")
    run.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first sample that cannot be analysed, instead of recording it and going on",
    )
    run.set_defaults(func=cmd_run)
    lens = commands.add_parser("lens", help="the answer lens over a dataset's correctly answered samples")
    _common(lens)
    lens.add_argument("--lenses", nargs="+", default=["normed"], choices=("normed", "raw"))
    lens.add_argument("--output", type=Path, default=None, help="parquet file (default under runs/)")
    lens.set_defaults(func=cmd_lens)
    return parser


def _error_class(module: str, name: str):
    # The class if its module was imported (else no error can be of it), without importing torch to check.
    return getattr(sys.modules.get(module), name, ())


def explain(err: BaseException) -> tuple[int, str, str | None]:
    """(exit code, message, hint or None) for an error raised by a command."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    setting = (_error_class("flowlib.runner", "RunSettingsError"), _error_class("flowlib.knockout", "FlowError"))
    if any(isinstance(err, c) for c in setting):
        return EXIT_SETTING, str(err), None
    if isinstance(err, _error_class("flowlib.runner", "SampleExcluded")):
        return EXIT_ERROR, str(err), "without --strict such samples are recorded as excluded and the run goes on"
    known = (
        CliError,
        _error_class("flowlib.run_folder", "RunMismatchError"),
        _error_class("flowlib.runner", "NothingAnalysedError"),
        _error_class("flowlib.runner", "NoSamplesError"),
        _error_class("flowlib.sample", "SampleError"),
        _error_class("flowlib.models", "UnsupportedModelError"),
        _error_class("flowlib.models", "CheckpointError"),
    )
    if any(isinstance(err, c) for c in known):
        return EXIT_ERROR, str(err), None
    if isinstance(err, (OSError, ValueError)):
        return EXIT_ERROR, first_line, "rerun with --debug for the details"
    return (
        EXIT_ERROR,
        f"unexpected {type(err).__name__}: {first_line}",
        "this is a bug: rerun with --debug and report the traceback",
    )


def _interrupted(args) -> str:
    """Where a Ctrl-C stopped the command, and how to go on."""
    from .run_folder import load_statuses, read_run

    output = getattr(args, "run_output", None)
    if output is None or read_run(output) is None:
        return f"interrupted while {getattr(args, 'stage', 'starting')}; nothing was written"
    statuses = load_statuses(output)
    analysed = sum(s["status"] == "analysed" for s in statuses)
    return (
        f"interrupted: {len(statuses)} samples done ({analysed} analysed) in {output}; "
        "run the same command again to resume from there"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowlib` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its one-line usage error (or the help)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"flowlib {args.command}: {_interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every error becomes one or two lines; --debug shows the traceback
        code, message, hint = explain(err)
        print(f"flowlib {args.command}: error: {message}", file=sys.stderr)
        if hint:
            print(f"  ({hint})", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
