"""Command line: knockout runs and the answer lens without a notebook (e.g. in a GPU cluster job).

Examples:
    flowlib run --model llava-hf/llava-1.5-7b-hf --data paper --csv-dir datasets --image-dir gqa/images \\
        --tasks ChooseAttr ChooseRel --window 7 --samples-per-task 200 --device cuda --dtype float16 \\
        --output runs/llava15-7b
    flowlib run --model toy-llava --data synthetic --samples-per-task 20      # offline default model
    flowlib lens --model toy-llava --data synthetic --samples-per-task 20 --lenses normed raw
    flowlib run ... --shard 3/8          # one of 8 processes (SLURM: --shard slurm); torchrun sets ranks itself
    flowlib status runs/llava15-7b       # complete shards, missing samples; `flowlib merge` writes the table

The settings are an `ExperimentSettings` (`flowlib.experiment`), as in the notebooks: the same settings
give the same run folder (under runs/, named by the run's identity, unless --output names one), so a
notebook and a command reuse each other's rows. A stopped `run` resumes when started again with the same
arguments; started with other data, weights or settings into the same folder, it is refused, naming what
changed. Any number of processes can share a run (`flowlib.shards`); the one that completes it merges.

A known error prints one or two lines (what, which file or setting, what to do) and exits with 2 for a
bad setting, 1 for anything else, 130 for Ctrl-C; `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import config as cfg
from .arguments import CliError, check_model_argument, count_or_all, load_samples, positive_int
from .sample import TASKS

EXIT_ERROR, EXIT_SETTING, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """argparse with a two-line error (the message, where to look) instead of the full usage block."""

    def error(self, message: str):
        self.exit(EXIT_SETTING, f"{self.prog}: error: {message}\n  (`{self.prog} --help` lists the options)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    # Defaults are None here: `settings_from_args` leaves unset ones to `ExperimentSettings`, where each is resolved.
    parser.add_argument("--model", default=None, help="hub id, local folder or short name (default: toy-llava)")
    parser.add_argument("--revision", default=None, help="hub revision to pin")
    parser.add_argument("--image-mode", default=None, help="llava-1.5: pad (default) or crop; llava-next: anyres")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1; under torchrun cuda is per rank")
    parser.add_argument(
        "--device-map", default=None, help="e.g. auto: one model across the visible GPUs (needs accelerate)"
    )
    parser.add_argument("--dtype", default=None, help="float32 (default, CPU), float16 (the paper, GPU), bfloat16")
    parser.add_argument("--data", choices=("synthetic", "paper", "gqa"), default=None, help="default: synthetic")
    parser.add_argument("--csv-dir", type=Path, help="paper: folder of the released task CSVs")
    parser.add_argument("--image-dir", type=Path, help="paper, gqa: folder of GQA images")
    parser.add_argument("--questions", type=Path, help="gqa: GQA questions JSON")
    parser.add_argument("--scene-graphs", type=Path, help="gqa: GQA scene graphs JSON")
    parser.add_argument("--split", default=None, help="synthetic: which split (train, validation, test: the default)")
    parser.add_argument(
        "--candidates-per-task",
        "--synthetic-count",
        dest="candidates_per_task",
        type=positive_int,
        default=None,
        help="samples read per task to find the analysed ones (default: 1.5 x --samples-per-task + 2; "
        "synthetic: the samples generated)",
    )
    parser.add_argument("--seed", type=int, default=None, help="synthetic: generation seed (default 0)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=TASKS,
        metavar="TASK",
        help=f"tasks to use (default all: {' '.join(TASKS)})",
    )
    parser.add_argument(
        "--samples-per-task",
        type=count_or_all,
        default=None,
        help="correctly answered samples analysed per task, or 'all' (default 40, as the notebooks)",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help="greedy answer length for the filter (default 10)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


#: Command-line options that are settings, by their `ExperimentSettings` name (the rest are the command's own).
SETTINGS_OPTIONS = (
    "model",
    "revision",
    "image_mode",
    "device",
    "device_map",
    "dtype",
    "data",
    "csv_dir",
    "image_dir",
    "questions",
    "scene_graphs",
    "split",
    "candidates_per_task",
    "seed",
    "tasks",
    "samples_per_task",
    "max_new_tokens",
    "flows",
    "window",
    "engine",
    "max_batch",
)


def settings_from_args(args):
    """The `ExperimentSettings` the arguments give: every option left out keeps the settings' default.

    Under torchrun / accelerate launch, ``--device cuda`` becomes this rank's ``cuda:LOCAL_RANK``.
    """
    from .experiment import ExperimentSettings
    from .shards import rank_device

    given = {name: getattr(args, name) for name in SETTINGS_OPTIONS if getattr(args, name, None) is not None}
    if given.get("samples_per_task") == "all":
        given["samples_per_task"] = None
    if "device" in given:
        given["device"] = rank_device(given["device"])
    return ExperimentSettings.build(**given)


def _load_model(args):
    args.stage = "loading the model"
    return args.settings.load_model()


def cmd_run(args) -> int:
    args.settings = settings_from_args(args)  # bad settings (exit 2) before anything is read or loaded
    from .shards import resolve_shard

    shard = resolve_shard(args.shard)  # --shard K/N, slurm, and torchrun's RANK / WORLD_SIZE
    check_model_argument(args.settings.model, args.settings.revision)  # cheap checks fail before a slow load
    args.stage = "reading the data"
    samples, _ = load_samples(args)  # then bad data arguments fail before a slow model load
    from .merge import STATUSES, exclusion_reasons

    loaded = _load_model(args)
    args.settings.window_for(loaded.num_layers)  # a window the model cannot take: exit 2 before any fingerprint
    plan = args.settings.plan(loaded, samples)
    output = args.output or args.settings.run_dir(loaded, plan)
    args.stage, args.run_output = "running", output
    summary = args.settings.run(
        loaded, samples, output, plan=plan, shard=shard, strict=args.strict, progress=not args.quiet
    )
    if summary.process is not None and shard.count > 1:
        print(summary.process.describe())
        for reason, count in exclusion_reasons(summary.process.statuses).items():
            print(f"  left out {count} x: {reason}")
    if not summary.complete:
        print(
            f"{shard.label} done; the run still misses {len(summary.missing)} samples of other shards. The last "
            f"shard to finish writes {output / 'results.parquet'} (`flowlib status {output}` shows progress)"
        )
        return 0
    counts = {name: summary.count(name) for name in STATUSES}
    print(
        f"{counts['analysed']} samples analysed ({counts['wrong_answer']} answered wrongly, {counts['zero_base']} "
        f"zero base, {counts['excluded']} excluded); {len(summary.table)} rows in {output / 'results.parquet'}"
    )
    for reason, count in exclusion_reasons(summary.statuses).items():
        print(f"  left out {count} x: {reason}")
    if summary.process is not None and summary.process.statuses and shard.count == 1:
        print(f"  {summary.process.describe()}")
    return 0


def cmd_status(args) -> int:
    """Where a run stands: samples done and missing, complete shards, whether the table is merged."""
    from .shards import run_progress

    try:
        progress = run_progress(args.run_dir)
    except FileNotFoundError as err:
        raise CliError(f"{err}; give the folder a `flowlib run` wrote") from err
    config, counts = progress.run["config"], progress.counts()
    print(
        f"{args.run_dir}: run {progress.run['identity'][:12]} of {progress.run['provenance']['model']} on "
        f"{progress.run.get('data') or 'its data'}, window {config['window']}, "
        f"{config.get('per_task') or 'all'} samples per task"
    )
    done = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
    total, missing = len(progress.records), len(progress.missing)
    print(f"  {total} candidates: {sum(counts.values())} done ({done or 'none'}), {missing} missing")
    counts_seen = sorted({int(key.split("-of-")[1]) for key in progress.shard_records()} | set(args.shards or ()))
    for count in counts_seen:
        if count < 2:
            continue
        missing = progress.shards(count)
        complete = [k for k, ids in missing.items() if not ids]
        print(
            f"  shards of {count}: {len(complete)} complete"
            + (f" ({', '.join(map(str, complete))})" if complete else "")
        )
        for k, ids in missing.items():
            if ids:
                print(f"    shard {k}/{count}: {len(ids)} missing, e.g. {', '.join(ids[:3])}")
    for key, record in progress.shard_records().items():
        rate = record.get("seconds_per_sample")
        print(f"  {record['shard']} ({key}): {record['samples']} samples" + (f", {rate} s per sample" if rate else ""))
    merged = (progress.output / "results.parquet").exists()
    if progress.complete:
        print(
            "  complete; " + ("merged table: results.parquet" if merged else f"merge it: flowlib merge {args.run_dir}")
        )
        return 0
    print(f"  incomplete; missing e.g. {', '.join(progress.missing[:5])}")
    return EXIT_INCOMPLETE


def cmd_merge(args) -> int:
    """Write a complete run's merged table and summary (what its last shard does by itself)."""
    from .merge import merge

    args.stage = "merging"
    summary = merge(args.run_dir)
    print(
        f"{summary.count('analysed')} samples analysed; {len(summary.table)} rows in {args.run_dir / 'results.parquet'}"
    )
    return 0


def cmd_lens(args) -> int:
    args.settings = settings = settings_from_args(args)
    check_model_argument(settings.model, settings.revision)
    args.stage = "reading the data"
    samples, data_name = load_samples(args)
    from .answers import correct_samples
    from .experiment import slug
    from .lens import lens_table

    loaded = _load_model(args)
    args.stage = "running the lens (its table is written at the end)"
    per_task, max_new_tokens = settings.samples_per_task, settings.max_new_tokens
    chosen = list(correct_samples(loaded, samples, per_task, max_new_tokens, progress=not args.quiet))
    if not chosen:
        raise CliError(
            f"{loaded.name} answers none of the {len(samples)} samples correctly, so there is nothing to "
            "read the lens on; check the model, its prompt style and the data's answers"
        )
    table = lens_table(loaded, chosen, lenses=args.lenses, progress=not args.quiet)
    output = args.output or cfg.runs_dir() / slug(f"lens-{Path(settings.model).name}-{data_name}.parquet")
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
    run.add_argument("--engine", choices=("fast", "reference"), default=None, help="default: fast")
    run.add_argument(
        "--max-batch",
        type=positive_int,
        default=None,
        help="fast engine: windows per batch (default: as many as the device's free memory holds)",
    )
    run.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results folder (default: runs/<model>/<data>/knockout-w<k>-<identity>)",
    )
    run.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="run only shard K of N (0-based) of the samples, split by question id; 'slurm' reads "
        "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT. Under torchrun each rank takes its own part",
    )
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
    status = commands.add_parser(
        "status", help="a run folder's progress: samples done and missing, complete shards (exit 3 if incomplete)"
    )
    status.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    status.add_argument("--shards", type=positive_int, nargs="+", help="also report shards of these N")
    status.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    status.set_defaults(func=cmd_status)
    merge = commands.add_parser("merge", help="write a complete run's merged table (its last shard does this itself)")
    merge.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    merge.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    merge.set_defaults(func=cmd_merge)
    return parser


def _error_class(module: str, name: str):
    # The class if its module was imported (else no error can be of it), without importing torch to check.
    return getattr(sys.modules.get(module), name, ())


def explain(err: BaseException) -> tuple[int, str, str | None]:
    """(exit code, message, hint or None) for an error raised by a command."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    setting = (
        _error_class("flowlib.run_plan", "RunSettingsError"),
        _error_class("flowlib.flows", "FlowError"),
        _error_class("flowlib.shards", "ShardSpecError"),
    )
    if any(isinstance(err, c) for c in setting):
        return EXIT_SETTING, str(err), None
    if isinstance(err, _error_class("flowlib.runner", "SampleExcluded")):
        return EXIT_ERROR, str(err), "without --strict such samples are recorded as excluded and the run goes on"
    known = (
        CliError,
        _error_class("flowlib.run_folder", "RunMismatchError"),
        _error_class("flowlib.runner", "NothingAnalysedError"),
        _error_class("flowlib.run_plan", "NoSamplesError"),
        _error_class("flowlib.merge", "RunIncompleteError"),
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
