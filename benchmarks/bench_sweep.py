"""Benchmark: the fast layer sweep against the reference (one full forward per window), same sample, same run.

Prints, per paper flow and in total, the reference time, the fast time, their ratio
and the largest absolute difference of relative change between the two engines.
Each engine pays for its own clean pass once per sample, as in a real run.

    python benchmarks/bench_sweep.py                 # CPU: LLaVA-1.5-shaped tiny model, 576 image tokens
    python benchmarks/bench_sweep.py --gpu-7b        # GPU: LLaVA-1.5-7b shape, random weights, fp16

This is not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from flowlib.config import default_window
from flowlib.flows import PAPER_FLOWS
from flowlib.sample import Box, Sample
from flowlib.sweep import clean_pass, sweep_fast, sweep_reference


def cpu_model(layers: int, hidden: int):
    """A LLaVA-1.5-shaped tiny model: 336 px images in 14 px patches (576 image tokens)."""
    from flowlib.tiny import tiny_llava

    return tiny_llava(
        "llava-1.5", image_size=336, patch_size=14, layers=layers, hidden=hidden, heads=max(1, hidden // 64)
    )


def gpu_7b_model(dtype: torch.dtype, device: str, layers: int = 32, hidden: int = 4096, vision_layers: int = 24):
    """LLaVA-1.5-7b's shape (CLIP-L/336 tower, 32 x 4096 Vicuna decoder) with random weights.

    The size arguments only exist to smoke-test this builder at a small size on a CPU.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

    from flowlib.architectures import CLIP_VIT_L_336
    from flowlib.models import wrap_model
    from flowlib.tiny import TEST_WORDS, build_processor, llava_config, word_level_tokenizer

    tokenizer = word_level_tokenizer(TEST_WORDS)
    vision = CLIPVisionConfig(**dict(CLIP_VIT_L_336, num_hidden_layers=vision_layers))
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=hidden,
        intermediate_size=hidden * 11008 // 4096,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
    )
    config = llava_config("llava-1.5", vision, text, tokenizer.convert_tokens_to_ids("<image>"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype and device: no 28 GB CPU copy
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation("sdpa")
    processor = build_processor("llava-1.5", tokenizer, 336, 14)
    return wrap_model(model, processor, name="random-llava-1.5-7b-shape", image_mode="pad")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_sweeps(engine, loaded, prepared, flows, window, device):
    """One clean pass plus a sweep per flow; returns (results by flow, seconds by flow, clean seconds)."""
    sync(device)
    start = time.perf_counter()
    clean = clean_pass(loaded, prepared)
    sync(device)
    clean_s = time.perf_counter() - start
    results, seconds = {}, {}
    for flow in flows:
        start = time.perf_counter()
        results[flow] = engine(loaded, prepared, flow, window, clean=clean)
        sync(device)
        seconds[flow] = time.perf_counter() - start
    return results, seconds, clean_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-7b", action="store_true", help="LLaVA-1.5-7b shape with random weights on a GPU")
    parser.add_argument("--layers", type=int, default=16, help="CPU model: decoder layers")
    parser.add_argument("--hidden", type=int, default=384, help="CPU model: hidden size")
    parser.add_argument("--window", type=int, default=None, help="k (default: config.default_window)")
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, float16 with --gpu-7b")
    parser.add_argument("--device", default=None, help="default cpu, cuda with --gpu-7b")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared machine more threads stall on OpenMP "
        "oversubscription, the fast engine's small kernels most; 0: torch's default)",
    )
    parser.add_argument("--flows", nargs="+", default=list(PAPER_FLOWS), help="flows to sweep (default: all six)")
    args = parser.parse_args()
    flows = tuple(args.flows)
    device = args.device or ("cuda" if args.gpu_7b else "cpu")
    if args.threads and torch.device(device).type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if args.gpu_7b else "float32"))
    torch.manual_seed(0)
    if args.gpu_7b:
        loaded = gpu_7b_model(dtype, device)
    else:
        loaded = cpu_model(args.layers, args.hidden)
        loaded.model.to(device=device, dtype=dtype)
    sample = Sample(
        "bench",
        "is the star to the left or to the right of the circle ?",
        "left",
        "ChooseRel",
        image=Image.new("RGB", (640, 480), "white"),
        true_option="left",
        false_option="right",
        central_object="star",
        boxes=[Box(100, 120, 90, 80), Box(400, 200, 120, 100)],
    )
    prepared = loaded.prepare(sample)
    layout = prepared.layout
    window = args.window or default_window(loaded.num_layers)
    text_tokens = layout.seq_len - len(layout.group("Image"))
    print(
        f"model: {loaded.name}, {loaded.num_layers} layers, hidden {loaded.model.config.text_config.hidden_size}, "
        f"{str(dtype).replace('torch.', '')} on {device}"
    )
    print(
        f"input: {len(layout.group('Image'))} image tokens + {text_tokens} text tokens; window k={window}; "
        f"flows: {len(flows)}; threads: {torch.get_num_threads()}"
    )
    timed_sweeps(sweep_fast, loaded, prepared, flows[:1], window, device)  # warm-up (allocator, kernels)
    ref, ref_s, ref_clean = timed_sweeps(sweep_reference, loaded, prepared, flows, window, device)
    fast, fast_s, fast_clean = timed_sweeps(sweep_fast, loaded, prepared, flows, window, device)
    print(f"{'flow':34s} {'reference s':>11s} {'fast s':>8s} {'ratio':>7s} {'max |d rel change|':>19s}")
    worst = 0.0
    for flow in flows:
        diff = float(np.abs(ref[flow].relative_change - fast[flow].relative_change).max())
        worst = max(worst, diff)
        print(f"{flow:34s} {ref_s[flow]:11.3f} {fast_s[flow]:8.3f} {ref_s[flow] / fast_s[flow]:6.1f}x {diff:19.3g}")
    ref_total, fast_total = ref_clean + sum(ref_s.values()), fast_clean + sum(fast_s.values())
    print(f"{'clean pass (once per engine)':34s} {ref_clean:11.3f} {fast_clean:8.3f}")
    print(f"reference time: {ref_total:.3f} s")
    print(f"fast time:      {fast_total:.3f} s")
    print(f"ratio fast/reference speed-up: {ref_total / fast_total:.1f}x")
    print(f"max abs difference of relative change (percentage points): {worst:.3g}")


if __name__ == "__main__":
    main()
