"""The prepared GPU check: the paper's model shapes at full width through the runner, in half precision.

For LLaVA-1.5-7b and Llama3-LLaVA-NeXT-8b shapes (`flowlib.architectures`), and beyond the paper
Qwen2.5-VL-7B and LLaVA-OneVision-7B shapes (`flowlib.families.released`), at full width and depth,
random weights, float16, on a few stand-in samples of GQA's image sizes, it measures:
- fast against reference engine: the largest difference of relative change (percentage points),
  one sample, every paper flow;
- time per analysed sample through `run_experiment` (answer filter, clean pass, six flows, fast engine);
- peak device memory, beside the fast engine's estimate (`memory.sweep_memory` for the longest stand-in
  sample, all windows in one batch and every paper flow's suffix, plus the weights), so that one GPU run
  tells how far the estimate the README quotes is from a measurement;
- the paper's grid projected per model: seconds per sample x 5,525 released questions (an upper
  bound: only correctly answered questions are analysed);
- the toy model through `torchrun --nproc-per-node 1 -m flowlib run` on the device, against one plain
  `flowlib run` process with the same settings: wall times and the largest difference between the tables.

Random weights answer nothing correctly, so each stand-in sample's answer is set to the model's own
greedy answer first (as the runner's tests do). The tokenizer is flowlib's word-level one (the real
ones are test data, not shipped; the new families get a word-level one with their special tokens):
prompts are a few tokens shorter than the real ones, image blocks exactly as long.

    python benchmarks/gpu_check.py                      # on a GPU: about 5 minutes on one H100
    python benchmarks/gpu_check.py --dry-run            # CPU, tiny width, 4 layers: checks the script

On a GPU it appends its figures, with date and device, to benchmarks/RESULTS.md (`--no-record` to skip).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from flowlib.answers import greedy_answer
from flowlib.architectures import PAPER_CHECKPOINTS, build_config, model_class
from flowlib.families.released import RELEASED, released_config
from flowlib.families.tiny import build_family_processor, chatml_tokenizer
from flowlib.flows import PAPER_FLOWS
from flowlib.memory import sweep_memory
from flowlib.models import adapter_for, wrap_model
from flowlib.runner import run_experiment
from flowlib.sample import Box, Sample
from flowlib.sweep import clean_pass, suffix_start, sweep_fast, sweep_reference
from flowlib.tiny import TEST_WORDS, word_level_tokenizer

MODELS = (
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/llama3-llava-next-8b-hf",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf",
)
#: GQA-like image sizes (width, height): NeXT gives 2340, 2928 and 1464 image tokens for these.
SIZES = ((640, 480), (500, 500), (500, 333))
RELEASED_QUESTIONS = 5525
#: Greedy answer length: a random model never stops early, and the paper's answers are a word or two.
ANSWER_TOKENS = 3
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def build(name: str, *, dtype: torch.dtype, device: str, num_layers=None, width="full"):
    """A random-weight model of checkpoint `name`, built directly on `device` in `dtype`, as a LoadedModel."""
    if name in RELEASED:
        family = RELEASED[name][0]
        tokenizer = chatml_tokenizer(TEST_WORDS)
        config = released_config(name, num_layers=num_layers, width=width)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<image>")}
        if family.startswith("qwen"):  # the word-level tokenizer's ids for the vision markers
            config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
            config.vision_start_token_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
            config.vision_end_token_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        else:
            config.image_token_id = ids["<image>"]
        cls = adapter_for(config).model_class
        processor = build_family_processor(family, tokenizer)
    else:
        tokenizer = word_level_tokenizer(TEST_WORDS)
        config = build_config(name, num_layers=num_layers, width=width)
        config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")  # the word-level tokenizer's id
        cls = model_class(name)
        processor = build_processor_for(name, tokenizer)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise on the device: 8 B parameters on the host would take minutes
            model = cls(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if name in RELEASED:
        model.generation_config.bos_token_id = None  # the Qwen-based models prompt without one
    return wrap_model(model, processor, name=f"{name} (random weights)")


def build_processor_for(name: str, tokenizer):
    """The checkpoint's processor settings around a tokenizer whose `<image>` id is not the checkpoint's."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    arch = PAPER_CHECKPOINTS[name]
    if arch.family == "llava-1.5":
        image_processor, processor_class = CLIPImageProcessorPil(**arch.image_processor), LlavaProcessor
    else:
        image_processor, processor_class = LlavaNextImageProcessorPil(**arch.image_processor), LlavaNextProcessor
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, **arch.processor)


def stand_in_samples(loaded, count: int) -> list[Sample]:
    """`count` samples on noise images of GQA's sizes, each answered 'correctly' by construction."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        sample = Sample(
            f"gpu{i}",
            "is the star red or blue ?",
            "?",
            "ChooseAttr",
            image=image,
            true_option="red",
            false_option="blue",
            central_object="star",
            boxes=[Box(width * 0.2, height * 0.3, width * 0.25, height * 0.3)],
        )
        sample.answer = greedy_answer(loaded, loaded.prepare(sample), max_new_tokens=ANSWER_TOKENS)
        samples.append(sample)
    return samples


def estimated_peak_gib(loaded, samples) -> float:
    """Weights plus `sweep_memory`'s peak for the longest sample, its longest flow suffix, all windows at once."""
    longest = max((loaded.prepare(s) for s in samples), key=lambda p: p.layout.seq_len)
    n = longest.layout.seq_len
    suffix = max(n - suffix_start(longest.layout, [flow]) for flow in PAPER_FLOWS)
    memory = sweep_memory(loaded.model.config, n, suffix, loaded.dtype, loaded.num_layers)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return (weights + memory.peak()) / 2**30


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check(name: str, *, dtype, device, samples: int, num_layers=None, width="full") -> dict:
    """Build one model and measure it (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loaded = build(name, dtype=dtype, device=device, num_layers=num_layers, width=width)
    built = time.perf_counter() - started
    chosen = stand_in_samples(loaded, samples)
    prepared = loaded.prepare(chosen[0])
    clean = clean_pass(loaded, prepared)
    worst = 0.0
    for flow in PAPER_FLOWS:
        fast = sweep_fast(loaded, prepared, flow, clean=clean).relative_change
        reference = sweep_reference(loaded, prepared, flow, clean=clean).relative_change
        worst = max(worst, float(np.max(np.abs(fast - reference))))
    with tempfile.TemporaryDirectory() as output:
        synchronise(device)
        started = time.perf_counter()
        summary = run_experiment(loaded, chosen, Path(output) / "run", max_new_tokens=ANSWER_TOKENS, progress=False)
        synchronise(device)
        elapsed = time.perf_counter() - started
    analysed = summary.count("analysed")
    per_sample = elapsed / max(1, analysed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {
        "model": name,
        "layers": loaded.num_layers,
        "dtype": str(dtype).replace("torch.", ""),
        "image_tokens": [int(len(loaded.prepare(s).layout.image)) for s in chosen],
        "analysed": analysed,
        "build_s": built,
        "seconds_per_sample": per_sample,
        "peak_gib": peak,
        "estimated_peak_gib": estimated_peak_gib(loaded, chosen),
        "fast_vs_reference_pp": worst,
        "grid_hours": per_sample * RELEASED_QUESTIONS / 3600,
    }


def flowlib_run(launcher: list[str], device: str, output: Path, run_arguments: list[str]) -> tuple[float, str]:
    """Run `flowlib run` on the toy model under `launcher`; (wall seconds, the process's end summary)."""
    command = [*launcher, "-m", "flowlib", "run", "--device", device, "--output", str(output), "--quiet"]
    started = time.perf_counter()
    done = subprocess.run([*command, *run_arguments], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = [line for line in done.stdout.splitlines() if "s per sample" in line]
    return seconds, (summary[-1].strip() if summary else "")


def torchrun_check(device: str, run_arguments: list[str]) -> dict:
    """The toy model as one torchrun rank and as one plain process on `device` (see the module docstring)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    with tempfile.TemporaryDirectory() as folder:
        ranked, rank_summary = flowlib_run(torchrun, device, Path(folder) / "torchrun", run_arguments)
        single, _ = flowlib_run([sys.executable], device, Path(folder) / "single", run_arguments)
        tables = [pd.read_parquet(Path(folder) / name / "results.parquet") for name in ("torchrun", "single")]
    if len(tables[0]) != len(tables[1]) or not tables[0].question_id.equals(tables[1].question_id):
        raise SystemExit("torchrun and the single process analysed different samples")
    difference = np.abs(tables[0].relative_change.to_numpy() - tables[1].relative_change.to_numpy())
    return {
        "torchrun_s": ranked,
        "single_s": single,
        "rows": len(tables[0]),
        "samples": int(tables[0].question_id.nunique()),
        "max_difference_pp": float(difference.max()),
        "rank_summary": rank_summary,
    }


def torchrun_markdown(result: dict, device: str, run_arguments: list[str]) -> str:
    return (
        f"\nToy model, one torchrun rank on `{device}` against one plain process (`flowlib run "
        f"{' '.join(run_arguments)}`): {result['samples']} samples, {result['rows']} rows; "
        f"{result['torchrun_s']:.1f} s under torchrun, {result['single_s']:.1f} s alone (model load included); "
        f"largest difference between the tables {result['max_difference_pp']:.3g} pp. "
        f"The rank's summary: `{result['rank_summary']}`.\n"
    )


def markdown(results: list[dict], device_name: str) -> str:
    lines = [
        f"## GPU check, paper model shapes at full width (`benchmarks/gpu_check.py`, "
        f"{datetime.date.today().isoformat()})",
        "",
        f"Device: {device_name}; torch {torch.__version__}. Random weights, stand-in samples of GQA's "
        "image sizes; the grid projection counts every released question as analysed (an upper bound).",
        "",
        "| model | layers | dtype | image tokens | s / sample (6 flows) | peak GiB (estimated) "
        "| fast vs reference (pp) | projected grid (h, 5,525 questions) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['dtype']} | {', '.join(map(str, r['image_tokens']))} | "
            f"{r['seconds_per_sample']:.2f} | {r['peak_gib']:.1f} ({r['estimated_peak_gib']:.3g}) | "
            f"{r['fast_vs_reference_pp']:.3g} | "
            f"{r['grid_hours']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny width, 2 layers, 1 sample: checks the script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--samples", type=int, default=4, help="stand-in samples per model")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*PAPER_CHECKPOINTS, *RELEASED])
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--toy-samples", type=int, default=10, help="samples per task of the torchrun toy run")
    args = parser.parse_args(argv)
    if args.dry_run:
        settings = dict(dtype=torch.float32, device="cpu", samples=1, num_layers=2, width="tiny")
        device_name = "CPU (dry run)"
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("no CUDA device here; run with --dry-run to check the script on a CPU")
        settings = dict(dtype=getattr(torch, args.dtype), device=args.device, samples=args.samples)
        device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    results = []
    for name in args.models:
        result = check(name, **settings)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}, flush=True)
        results.append(result)
        if settings["device"].startswith("cuda"):
            torch.cuda.empty_cache()
    table = markdown(results, device_name)
    toy_run = ["--samples-per-task", str(1 if args.dry_run else args.toy_samples)]
    toy_run += ["--tasks", "ChooseAttr"] if args.dry_run else []
    toy = torchrun_check(settings["device"], toy_run)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in toy.items()}, flush=True)
    table += torchrun_markdown(toy, settings["device"], toy_run)
    print(table)
    if not args.dry_run and not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
