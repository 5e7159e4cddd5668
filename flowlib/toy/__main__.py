"""Retrain the offline default model ("toy-llava") with the committed recipe.

    python -m flowlib.toy [--seed 0] [--out DIR] [--steps N] [--minutes M] [--device cuda --workers 6]

An interrupted run continues where it stopped when the same command is run again: it saves its state
in the output folder every 250 steps (`--save-every`) and removes it when done. Other settings of the
recipe are `TrainConfig`'s fields: `flowlib.toy.training.train(ToyConfig(), TrainConfig(...))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .. import config as cfg
from .model import ToyConfig
from .recipe import TrainConfig
from .state import STATE_FILE, TrainingStateMismatch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flowlib.toy", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=cfg.SHORT_NAMES[cfg.OFFLINE_MODEL])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop after this many minutes of training in all, saving the state so that the same "
        "command continues the run",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=250,
        metavar="STEPS",
        help=f"save the training state ({STATE_FILE} in --out) every STEPS steps, so that an "
        "interrupted run continues where it stopped when the same command is run again "
        "(0: only when --minutes run out; default: 250)",
    )
    parser.add_argument("--fresh", action="store_true", help="delete a saved training state in --out and start over")
    parser.add_argument(
        "--threads", type=int, default=TrainConfig.threads, help="torch threads (another count rounds differently)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="data worker processes (0: inline; one keeps up with 2 CPU cores, a GPU needs more)",
    )
    parser.add_argument("--device", default="cpu", help="where the model trains: cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig a parsed command line asks for: the recipe with its steps and threads."""
    return dataclasses.replace(TrainConfig(), steps=args.steps, threads=args.threads)


def main(argv=None) -> None:
    from . import training

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.save_every < 0:
        parser.error(f"--save-every {args.save_every}: give a number of steps, or 0")
    try:
        card = training.train(
            ToyConfig(),
            train_config_from_args(args),
            seed=args.seed,
            out=args.out,
            minutes=args.minutes,
            workers=args.workers,
            final_eval=not args.no_eval,
            device=args.device,
            save_every=args.save_every,
            fresh=args.fresh,
        )
    except TrainingStateMismatch as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(card.get("evaluation", {}).get("heldout", {}).get("image", {}), indent=1))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
