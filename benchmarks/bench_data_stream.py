"""Benchmark: one chunk of the training stream (what a data worker makes) against the evaluation path.

Times `encode_chunk` (scenes rendered in memory, one processor call per chunk) and, for the same
samples, the evaluation splits' path (`generate_split`'s PNG-encoded Dataset, decoded again, one
processor call per sample), alternating, in one run, on one thread as a data worker runs, and prints
the seconds per chunk of 192 samples, scenes per second and their ratio. The stream does more (its
patch labels and further turns; the recipe's), so the ratio understates the saving.

    python benchmarks/bench_data_stream.py [--chunks 6]

This is not a test: timings depend on the machine and its load (run it with nothing else training).
"""

from __future__ import annotations

import argparse
import time

import torch

from flowlib.data.synthetic import generate_split, to_samples
from flowlib.models import build_prompt
from flowlib.toy.model import ToyConfig, build_toy_model
from flowlib.toy.recipe import TrainConfig, chunk_seed
from flowlib.toy.stream import encode_chunk


def evaluation_path(processor, seed: int, k: int, counts: dict) -> list:
    samples = to_samples(generate_split(counts, seed=chunk_seed(seed, k), split="train"))
    return [processor(images=s.load_image(), text=build_prompt(s.question)[0], return_tensors="pt") for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=6, help="timed chunks of each kind")
    args = parser.parse_args()
    torch.set_num_threads(1)
    processor, train_config = build_toy_model(ToyConfig(), seed=0).processor, TrainConfig()
    counts = train_config.task_counts()
    seconds = {"training stream (encode_chunk)": 0.0, "evaluation path (PNG Dataset, per-sample processor)": 0.0}
    # Chunks from 200 on hold full scenes (past the distractor curriculum), as the evaluation path draws them.
    for k in range(200, 200 + args.chunks + 1):  # the first of each kind warms up, untimed
        for name, make in zip(
            seconds,
            (
                lambda k=k: encode_chunk(processor, ToyConfig(), train_config, 0, k),
                lambda k=k: evaluation_path(processor, 0, k, counts),
            ),
        ):
            started = time.perf_counter()
            make()
            if k > 200:
                seconds[name] += time.perf_counter() - started
    size = sum(counts.values())
    for name, total in seconds.items():
        per_chunk = total / args.chunks
        print(f"{name}: {per_chunk:.2f} s a chunk of {size}, {size / per_chunk:.0f} scenes/s")
    stream, evaluation = seconds.values()
    print(f"ratio: {evaluation / stream:.2f}x")


if __name__ == "__main__":
    main()
