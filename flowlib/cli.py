"""Command line: knockout runs and the answer lens without a notebook (e.g. in a GPU cluster job).

Examples:
    flowlib run --model llava-hf/llava-1.5-7b-hf --data paper --csv-dir datasets --image-dir gqa/images \\
        --tasks ChooseAttr ChooseRel --window 7 --samples-per-task 200 --device cuda --dtype float16 \\
        --output runs/llava15-7b
    flowlib run --model toy-llava --data synthetic --samples-per-task 20      # offline default model
    flowlib lens --model toy-llava --data synthetic --samples-per-task 20 --lenses normed raw

A stopped `run` resumes when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import config as cfg
from .knockout import PAPER_FLOWS
from .sample import TASKS


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
    parser.add_argument("--synthetic-count", type=int, default=100, help="synthetic: samples generated per task")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: generation seed")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK",
                        help=f"tasks to use (default all: {' '.join(TASKS)})")
    parser.add_argument("--samples-per-task", type=int, default=None,
                        help="at most this many correctly answered samples per task (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="greedy answer length for the filter")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_samples(args) -> tuple[list, str]:
    """The samples the arguments select (all of them: the runner limits the analysed ones) and a data name."""
    from .data.sources import load_samples as load  # imported here: the data stack is slow to import

    if args.data == "synthetic":
        grouped = load("synthetic", tasks=args.tasks, per_task=args.synthetic_count, seed=args.seed, split=args.split)
        name = f"synthetic-n{args.synthetic_count}-seed{args.seed}-{args.split}"
    elif args.data == "paper":
        if args.csv_dir is None:
            raise SystemExit("--data paper needs --csv-dir (and --image-dir for the GQA images)")
        grouped = load("paper", tasks=args.tasks, csv_dir=args.csv_dir, image_dir=args.image_dir)
        name = f"paper-{Path(args.csv_dir).name}"
    else:
        grouped = load("gqa", tasks=args.tasks, questions=args.questions, scene_graphs=args.scene_graphs,
                       image_dir=args.image_dir)
        name = f"gqa-{Path(args.questions).stem}"
    return [s for task in grouped for s in grouped[task]], name


def _load_model(args):
    from .models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, image_mode=args.image_mode,
                      revision=args.revision)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def cmd_run(args) -> int:
    from .runner import run_experiment

    samples, data_name = load_samples(args)  # first: bad data arguments fail before a slow model load
    loaded = _load_model(args)
    window = args.window or cfg.default_window(loaded.num_layers)
    output = args.output or cfg.runs_dir() / _slug(f"{Path(args.model).name}-{data_name}-w{window}")
    summary = run_experiment(loaded, samples, output, flows=args.flows, window=window, engine=args.engine,
                             max_new_tokens=args.max_new_tokens, per_task=args.samples_per_task,
                             data=data_name, max_batch=args.max_batch, progress=not args.quiet)
    print(f"{summary.count('analysed')} samples analysed ({summary.count('wrong_answer')} answered wrongly, "
          f"{summary.count('zero_base')} zero base); {len(summary.table)} rows in {output / 'results.parquet'}")
    return 0


def cmd_lens(args) -> int:
    from .lens import lens_table
    from .runner import correct_samples

    samples, data_name = load_samples(args)
    loaded = _load_model(args)
    chosen = correct_samples(loaded, samples, args.samples_per_task, args.max_new_tokens, progress=not args.quiet)
    table = lens_table(loaded, chosen, lenses=args.lenses, progress=not args.quiet)
    output = args.output or cfg.runs_dir() / _slug(f"lens-{Path(args.model).name}-{data_name}.parquet")
    output.parent.mkdir(parents=True, exist_ok=True)
    table.attrs = {}
    table.to_parquet(output, index=False)
    print(f"{table.question_id.nunique() if len(table) else 0} samples, lenses {', '.join(args.lenses)}: {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowlib", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="attention-knockout layer sweeps over a dataset")
    _common(run)
    run.add_argument("--flows", nargs="+", default=list(PAPER_FLOWS), metavar="FLOW",
                     help="flows 'Source->Target' (default: the paper's six)")
    run.add_argument("--window", type=int, default=None, help="k layers per window (default: 7 for 32 layers)")
    run.add_argument("--engine", choices=("fast", "reference"), default="fast")
    run.add_argument("--max-batch", type=int, default=None, help="fast engine: windows per batch (memory bound)")
    run.add_argument("--output", type=Path, default=None, help="results folder (default under runs/)")
    run.set_defaults(func=cmd_run)
    lens = commands.add_parser("lens", help="the answer lens over a dataset's correctly answered samples")
    _common(lens)
    lens.add_argument("--lenses", nargs="+", default=["normed"], choices=("normed", "raw"))
    lens.add_argument("--output", type=Path, default=None, help="parquet file (default under runs/)")
    lens.set_defaults(func=cmd_lens)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `flowlib` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
