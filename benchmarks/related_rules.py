"""How far flowlib's geometric "related patches" rule is from the official painted-mask rule, on the released boxes.

For every row of the six released task CSVs and each image path of the paper's models (LLaVA-1.5 padded
to a square; LLaVA-NeXT anyres), both rules map the row's boxes to image tokens with the checkpoints'
own image-processor settings (bicubic resampling, 336 px, 14 px patches):
- geometric (`flowlib.geometry`, the default): a patch is related when one of its processed pixels reads,
  under nearest-neighbour resampling, an original pixel whose centre lies inside a box;
- official (`related_rule="official"`): the boxes painted pure red on a black image, run through the
  image processor with normalisation off, and every patch holding a pure red pixel.

Prints, per model path, how often the two sets are equal, and the distribution of patches only one rule
keeps. Needs the CSVs (`--csv-dir`, default ../shared/gqa); no images (the rules read only sizes and boxes).

    python benchmarks/related_rules.py
"""

from __future__ import annotations

import argparse
import types
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from flowlib.architectures import PAPER_CHECKPOINTS
from flowlib.config import PROJECT_DIR
from flowlib.data.gqa_tasks import load_paper_tasks
from flowlib.geometry import painted_patch_offsets
from flowlib.models import Llava15Adapter, LlavaNextAdapter

PATHS = {"llava-1.5 (pad)": "llava-hf/llava-1.5-7b-hf", "llava-next (anyres)": "llava-hf/llava-v1.6-vicuna-7b-hf"}


def image_path(name: str):
    """(adapter, processor-like object) of checkpoint `name` with the paper's preprocessing."""
    arch = PAPER_CHECKPOINTS[name]
    if arch.family == "llava-1.5":
        adapter, image_processor = Llava15Adapter(), CLIPImageProcessorPil(**arch.image_processor)
    else:
        adapter, image_processor = LlavaNextAdapter(), LlavaNextImageProcessorPil(**arch.image_processor)
    processor = types.SimpleNamespace(image_processor=image_processor, patch_size=arch.processor["patch_size"])
    return adapter, adapter.configure_processor(processor, adapter.image_modes[0])


def compare(samples, name: str) -> dict:
    adapter, processor = image_path(name)
    equal, only_geometric, only_official, sizes = 0, [], [], []
    for sample in tqdm(samples, desc=name, unit="row"):
        width, height = sample.image_size
        geometry = adapter.geometry(processor, width, height)
        boxes = [b for b in (box.clip(width, height) for box in sample.boxes) if b is not None]
        geometric = np.unique(np.concatenate([geometry.box_offsets(b) for b in boxes])) if boxes else np.zeros(0)
        official = painted_patch_offsets(processor.image_processor, geometry, width, height, sample.boxes)
        equal += np.array_equal(geometric, official)
        only_geometric.append(len(np.setdiff1d(geometric, official)))
        only_official.append(len(np.setdiff1d(official, geometric)))
        sizes.append(len(geometric))
    return {
        "rows": len(samples),
        "equal": equal,
        "only_geometric": np.array(only_geometric),
        "only_official": np.array(only_official),
        "sizes": np.array(sizes),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv-dir", type=Path, default=PROJECT_DIR.parent / "shared" / "gqa")
    parser.add_argument("--limit", type=int, default=None, help="first N rows only (a quick check)")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = load_paper_tasks(args.csv_dir)[: args.limit]
    print(
        "| image path | rows | equal sets | related patches (median, geometric) | only geometric: mean, median, "
        "max | only official: mean, median, max |"
    )
    print("|---|---|---|---|---|---|")
    for label, name in PATHS.items():
        r = compare(samples, name)
        g, o = r["only_geometric"], r["only_official"]
        print(
            f"| {label} | {r['rows']} | {r['equal']} ({100 * r['equal'] / r['rows']:.1f}%) | "
            f"{np.median(r['sizes']):.0f} | {g.mean():.2f}, {np.median(g):.0f}, {g.max()} | "
            f"{o.mean():.2f}, {np.median(o):.0f}, {o.max()} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
