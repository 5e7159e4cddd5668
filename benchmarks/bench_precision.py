"""Benchmark: the paper's four checkpoints at full width in float32, bfloat16 and float16, on a CPU.

For every checkpoint of `flowlib.architectures.PAPER_CHECKPOINTS` it writes a random-weight checkpoint
folder at full width with a few decoder layers (`save_checkpoint_folder`, the real tokenizer from
../shared), loads it in each dtype through `flowlib.models.load_model` as a downloaded checkpoint loads,
and sweeps every paper flow with both engines on one stand-in sample. It prints every number: relative
change per window from each engine, their largest difference (percentage points), whether any module
produced a NaN or inf, and the times. Then the fast engine's memory estimate (`flowlib.memory.sweep_memory`)
for the four checkpoints at their real depth in float16, on GQA-sized inputs: estimates, not measurements.

    python benchmarks/bench_precision.py                 # the full grid: ~25 minutes on 2 cores
    python benchmarks/bench_precision.py --memory-only   # the estimates alone (seconds)

`tests/test_full_width.py` runs a part of the grid with one layer and takes its tolerances from this
benchmark's figures (benchmarks/RESULTS.md). This is not a test: timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests/real_tokenizers.py, the offline builder of the real tokenizers

from flowlib.architectures import (
    PAPER_CHECKPOINTS,
    build_config,
    build_model,
    build_processor,
    model_class,
    save_checkpoint_folder,  # noqa: E402
)
from flowlib.flows import PAPER_FLOWS  # noqa: E402
from flowlib.knockout import language_model  # noqa: E402
from flowlib.memory import sweep_memory  # noqa: E402
from flowlib.models import load_model, wrap_model  # noqa: E402
from flowlib.sample import Box, Sample  # noqa: E402
from flowlib.sweep import clean_pass, suffix_start, sweep_fast, sweep_reference  # noqa: E402
from tests.real_tokenizers import tokenizer_for  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
SHARED = ROOT.parent / "shared"
#: GQA-like inputs for the memory estimates: 640 x 480 (LLaVA-1.5: always 576 image tokens) and
#: 500 x 500 (LLaVA-NeXT: 2,928 image tokens, the most of gpu_check.py's GQA sizes).
ESTIMATE_SIZES = {"llava-1.5": (640, 480), "llava-next": (500, 500)}
ESTIMATE_QUESTION = "Is the surfer to the left or to the right of the surfboard?"


def stand_in_sample() -> Sample:
    """A 28 x 336 white image with one box: the cheapest input that still has every paper group.

    LLaVA-1.5 always gives 576 image tokens; LLaVA-NeXT gives it 648 (576 base-view tokens, then 24
    rows of 2 high-resolution patches and a newline), the fewest over a grid of sizes from 14 to 2016
    pixels but for strips that keep no high-resolution row at all, and its vision tower sees 3 crops,
    the minimum.
    """
    return Sample(
        "precision",
        "is the star red or blue?",
        "red",
        "ChooseAttr",
        image=Image.new("RGB", (28, 336), "white"),
        true_option="red",
        false_option="blue",
        central_object="star",
        boxes=[Box(0, 100, 28, 60)],
    )


def checkpoint_folder(name: str, folder, shared_dir=SHARED, *, num_layers: int = 1) -> Path:
    """`save_checkpoint_folder` of `name` at full width with its real tokenizer; the float32 model is freed."""
    tokenizer = tokenizer_for(PAPER_CHECKPOINTS[name].tokenizer, shared_dir)
    path = save_checkpoint_folder(name, folder, tokenizer, num_layers=num_layers, width="full")
    gc.collect()
    return path


def decoder_input(prepared, clean):
    """`prepared` with the clean pass's input embeddings in place of token ids and pixels.

    A knockout never reaches the vision tower, so each reference forward would recompute the same
    image features (three CLIP-L passes per LLaVA-NeXT forward). Feeding the clean pass's embeddings
    (its hidden state 0, computed in the dtype under test) leaves the decoder's input bit for bit the
    same (`tests/test_full_width.py` checks it on tiny models).
    """
    inputs = {"inputs_embeds": clean.hidden_states[0], "attention_mask": prepared.inputs["attention_mask"]}
    return dataclasses.replace(prepared, inputs=inputs)


@contextlib.contextmanager
def finite_watch(model):
    """Record the modules whose output holds a NaN or inf: vision tower, projector, decoder layers, norm, head.

    Yields the list of offending module names (with repeats, one per forward); hooks are removed in `finally`.

    Example:
        >>> with finite_watch(loaded.model) as bad:
        ...     clean_pass(loaded, prepared)
        >>> assert not bad
    """
    lm = language_model(model)
    watched = {
        "vision tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "final norm": lm.norm,
        "unembedding": model.get_output_embeddings(),
    }
    watched.update({f"decoder layer {i}": layer for i, layer in enumerate(lm.layers)})
    bad: list[str] = []

    def tensors(output):
        if isinstance(output, torch.Tensor):
            yield output
        elif isinstance(output, (tuple, list, dict)):
            for item in output.values() if isinstance(output, dict) else output:
                yield from tensors(item)

    def hook(name):
        def check(module, args, output):
            if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors(output)):
                bad.append(name)

        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in watched.items()]
    try:
        yield bad
    finally:
        for handle in handles:
            handle.remove()


def check(
    folder, dtype: str, *, name: str | None = None, flows=PAPER_FLOWS, window: int = 1, reference_flows=None
) -> dict:
    """Load `folder` (of checkpoint `name`) in `dtype`, sweep `flows` on `stand_in_sample`; every number and time.

    The fast engine sweeps every flow; the reference those of `reference_flows` (default: all), the
    others' rows hold None for it.
    """
    started = time.perf_counter()
    loaded = load_model(str(folder), dtype=dtype)
    load_s = time.perf_counter() - started
    prepared = loaded.prepare(stand_in_sample())
    with finite_watch(loaded.model) as bad:
        started = time.perf_counter()
        clean = clean_pass(loaded, prepared)
        clean_s = time.perf_counter() - started
        reference_input = decoder_input(prepared, clean)
        rows = []
        for flow in flows:
            started = time.perf_counter()
            fast = sweep_fast(loaded, prepared, flow, window, clean=clean)
            fast_s = time.perf_counter() - started
            row = {
                "flow": flow,
                "fast": fast.relative_change,
                "fast_probs": fast.blocked_probs,
                "fast_s": fast_s,
                "reference": None,
                "reference_probs": None,
                "diff_pp": None,
                "reference_s": None,
            }
            if reference_flows is None or flow in reference_flows:
                started = time.perf_counter()
                reference = sweep_reference(loaded, reference_input, flow, window, clean=clean)
                row.update(
                    reference=reference.relative_change,
                    reference_probs=reference.blocked_probs,
                    diff_pp=float(np.max(np.abs(fast.relative_change - reference.relative_change))),
                    reference_s=time.perf_counter() - started,
                )
            rows.append(row)
    result = {
        "model": name or loaded.name,
        "dtype": dtype,
        "loaded_dtypes": sorted({str(p.dtype) for p in loaded.model.parameters()}),
        "layers": loaded.num_layers,
        "seq_len": prepared.layout.seq_len,
        "image_tokens": len(prepared.layout.group("Image")),
        "answer_token": clean.answer_token,
        "base_prob": clean.base_prob,
        "clean_finite": bool(torch.isfinite(clean.logits).all())
        and all(bool(torch.isfinite(h).all()) for h in clean.hidden_states),
        "nonfinite_modules": sorted(set(bad)),
        "rows": rows,
        "load_s": load_s,
        "clean_s": clean_s,
    }
    del loaded, clean, prepared, reference_input
    gc.collect()
    return result


def print_check(result: dict, build_s: float | None = None) -> None:
    print(
        f"\n{result['model']}  {result['dtype']}  ({result['layers']} layers, {result['seq_len']} positions, "
        f"{result['image_tokens']} image tokens; answer token {result['answer_token']}, base p "
        f"{result['base_prob']:.6g}; clean pass finite: {result['clean_finite']}; modules with NaN/inf: "
        f"{result['nonfinite_modules'] or 'none'})"
    )
    print(
        f"  times: {f'build+save {build_s:.1f} s, ' if build_s is not None else ''}load {result['load_s']:.1f} s, "
        f"clean pass {result['clean_s']:.1f} s"
    )
    print(
        f"  {'flow':34s} {'reference (pp)':>28s} {'fast (pp)':>28s} {'max |diff| pp':>13s} {'ref s':>6s} {'fast s':>6s}"
    )
    for row in result["rows"]:
        fast = ", ".join(f"{v:.5g}" for v in row["fast"])
        if row["reference"] is None:
            print(f"  {row['flow']:34s} {'-':>28s} {fast:>28s} {'-':>13s} {'-':>6s} {row['fast_s']:6.1f}")
            continue
        ref = ", ".join(f"{v:.5g}" for v in row["reference"])
        print(
            f"  {row['flow']:34s} {ref:>28s} {fast:>28s} {row['diff_pp']:13.3g} {row['reference_s']:6.1f} "
            f"{row['fast_s']:6.1f}"
        )


def summary(results: list[dict]) -> list[dict]:
    """Per checkpoint and dtype: the largest |fast - reference|, and each engine's largest distance from the
    float32 reference of the same checkpoint (when float32 ran and chose the same answer token), in pp."""
    float32 = {r["model"]: r for r in results if r["dtype"] == "float32"}
    rows = []
    for r in results:
        row = {
            "model": r["model"],
            "dtype": r["dtype"],
            "finite": r["clean_finite"] and not r["nonfinite_modules"],
            "fast_vs_reference": max((x["diff_pp"] for x in r["rows"] if x["diff_pp"] is not None), default=None),
            "reference_vs_float32": None,
            "fast_vs_float32": None,
        }
        base = float32.get(r["model"])
        if base is not None and base["answer_token"] == r["answer_token"]:
            truth = {x["flow"]: x["reference"] for x in base["rows"] if x["reference"] is not None}
            pairs = [(x, truth[x["flow"]]) for x in r["rows"] if x["flow"] in truth]
            row["fast_vs_float32"] = max(float(np.max(np.abs(x["fast"] - t))) for x, t in pairs)
            row["reference_vs_float32"] = max(
                float(np.max(np.abs(x["reference"] - t))) for x, t in pairs if x["reference"] is not None
            )
        rows.append(row)
    return rows


def print_summary(rows: list[dict]) -> None:
    def cell(value):
        return "-" if value is None else f"{value:.3g}"

    print(
        "\n| checkpoint | dtype | NaN/inf | max \\|fast - reference\\| (pp) | max \\|reference - float32 "
        "reference\\| (pp) | max \\|fast - float32 reference\\| (pp) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model'].split('/')[-1]} | {r['dtype']} | {'none' if r['finite'] else 'YES'} | "
            f"{cell(r['fast_vs_reference'])} | {cell(r['reference_vs_float32'])} | {cell(r['fast_vs_float32'])} |"
        )
    for dtype in DTYPES:
        mine = [r for r in rows if r["dtype"] == dtype]
        if mine:
            worst = {
                key: max((r[key] for r in mine if r[key] is not None), default=None)
                for key in ("fast_vs_reference", "reference_vs_float32", "fast_vs_float32")
            }
            print(
                f"{dtype}: largest |fast - reference| {cell(worst['fast_vs_reference'])} pp; from the float32 "
                f"reference: reference {cell(worst['reference_vs_float32'])}, fast {cell(worst['fast_vs_float32'])}"
            )


def estimate_rows(shared_dir=SHARED) -> list[dict]:
    """`sweep_memory` for the four checkpoints at full depth in float16, all windows in one batch."""
    rows = []
    for name, arch in PAPER_CHECKPOINTS.items():
        tokenizer = tokenizer_for(arch.tokenizer, shared_dir)
        # A tiny-width model of the same checkpoint gives the real token layout (same processor and prompt).
        loaded = wrap_model(build_model(name, num_layers=1, width="tiny"), build_processor(name, tokenizer), name=name)
        width, height = ESTIMATE_SIZES[arch.family]
        sample = Sample(
            "estimate",
            ESTIMATE_QUESTION,
            "left",
            "ChooseRel",
            image=Image.new("RGB", (width, height)),
            true_option="left",
            false_option="right",
            central_object="surfer",
            boxes=[Box(10, 10, 50, 50)],
        )
        layout = loaded.prepare(sample).layout
        n = layout.seq_len
        suffix = n - suffix_start(layout, ["Image->Question"])  # the longest suffix of the paper's flows
        config = build_config(name)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in model_class(name)(config).parameters())
        estimate = sweep_memory(config, n, suffix, torch.float16, batch=arch.num_layers)
        rows.append(
            {
                "model": name,
                "layers": arch.num_layers,
                "seq_len": n,
                "image_tokens": len(layout.image),
                "suffix": suffix,
                "weights": parameters * 2,
                "estimate": estimate,
            }
        )
    return rows


def print_estimates(rows: list[dict]) -> None:
    gib, mib = 2**30, 2**20
    print(
        "\nEstimated fast-engine memory beyond the weights, float16, one sample, all windows in one batch "
        "(estimates from the config, not measurements)"
    )
    print(
        f"  {'model':36s} {'L':>3s} {'n':>5s} {'s':>3s} {'weights GiB':>11s} {'held GiB':>8s} {'clean fwd GiB':>13s} "
        f"{'per window MiB':>14s} {'peak B=1 GiB':>12s} {'peak B=L GiB':>12s}"
    )
    for r in rows:
        e = r["estimate"]
        print(
            f"  {r['model']:36s} {r['layers']:3d} {r['seq_len']:5d} {r['suffix']:3d} {r['weights'] / gib:11.2f} "
            f"{sum(e.held.values()) / gib:8.2f} {sum(e.clean_forward.values()) / gib:13.2f} "
            f"{sum(e.per_window.values()) / mib:14.1f} {e.peak(1) / gib:12.2f} {e.peak() / gib:12.2f}"
        )
        terms = {**e.held, **{f"{k} (per window)": v for k, v in e.per_window.items()}}
        print("    " + "; ".join(f"{k} {v / mib:.1f} MiB" for k, v in terms.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PAPER_CHECKPOINTS), choices=list(PAPER_CHECKPOINTS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--layers",
        type=int,
        default=2,
        help="decoder layers (default 2: with one, a cut into the question cannot reach the answer)",
    )
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
    parser.add_argument("--memory-only", action="store_true", help="print the memory estimates only")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared folder holding tokenizers/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    if not args.memory_only:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()} kernels; {args.layers} layers, window {args.window}"
        )
        for name in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                folder = checkpoint_folder(name, Path(tmp) / "checkpoint", args.shared, num_layers=args.layers)
                build_s = time.perf_counter() - started
                for dtype in args.dtypes:
                    result = check(folder, dtype, name=name, window=args.window)
                    print_check(result, build_s)
                    build_s = None
                    results.append(result)
                    if result["nonfinite_modules"] or not result["clean_finite"]:
                        print(f"  !! non-finite values in {name} {dtype}")
        print_summary(summary(results))
    print_estimates(estimate_rows(args.shared))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
