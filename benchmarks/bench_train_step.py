"""Benchmark: a toy-llava training step with the shared system prompt computed once, against a plain step.

Times forward + backward of the same batches of the recipe's training stream (from chunk 200: full scenes)
both ways, alternating, in one run, and prints the mean seconds per step, their ratio and the largest
logit difference between the two forwards.

    python benchmarks/bench_train_step.py [--steps 20] [--threads 2]
    python -m flowlib.kernels python benchmarks/bench_train_step.py   # with portable kernels

This is not a test: timings depend on the machine and its load (run it with nothing else training).
"""

from __future__ import annotations

import argparse
import time

import torch

from flowlib.kernels import kernel_description, use_configured_kernels
from flowlib.toy.model import ToyConfig, build_toy_model
from flowlib.toy.recipe import TrainConfig
from flowlib.toy.step import forward_shared_prefix
from flowlib.toy.stream import ChunkStream, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    args = parser.parse_args()
    use_configured_kernels(threads=args.threads)  # as training does
    torch.set_num_threads(args.threads)
    loaded = build_toy_model(ToyConfig(), seed=0)
    model = loaded.model.train()
    stream = ChunkStream(loaded.processor, ToyConfig(), TrainConfig(), seed=0, workers=0, first_chunk=200)
    data = batches(stream, loaded.tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "pixel_values")
    batch_list = [{key: batch[key] for key in keys} for batch, _ in zip(data, range(args.steps + 1))]

    def plain(batch):
        return model(**batch, use_cache=False).logits

    def shared(batch):
        return forward_shared_prefix(model, batch)[0]

    seconds = {"plain": [], "shared prefix": []}
    for i, batch in enumerate(batch_list):
        for name, forward in (("plain", plain), ("shared prefix", shared)):
            started = time.perf_counter()
            forward(batch).logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
            if i:  # the first batch warms up both paths
                seconds[name].append(time.perf_counter() - started)
    with torch.no_grad():
        full, (cut, prefix) = plain(batch_list[0]), forward_shared_prefix(model, batch_list[0])
    length = batch_list[0]["input_ids"].shape[1]
    print(
        f"toy-llava (untrained), batch {TrainConfig.batch_size}, {length} tokens ({prefix} shared), "
        f"{kernel_description()}, {args.steps} steps each"
    )
    for name, values in seconds.items():
        print(f"{name:>14}: {sum(values) / len(values):.3f} s/step")
    ratio = sum(seconds["plain"]) / sum(seconds["shared prefix"])
    print(
        f"ratio plain / shared prefix: {ratio:.2f}x; max |logit difference| "
        f"{(full[:, prefix:] - cut).abs().max().item():.1e}"
    )


if __name__ == "__main__":
    main()
