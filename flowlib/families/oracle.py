"""The geometric oracle: which language-model input embeddings change when the pixels inside a box change.

With a vision tower whose features depend on their own patch only (the tiny builders' `local_vision`)
and nearest resampling, the image tokens whose input embeddings change when the pixels inside a box
are changed are exactly the tokens the box covers. A family adapter's `geometry` must reproduce them:
`oracle_mismatches` runs random images and boxes and lists every case where it does not.

Example:
    >>> loaded = tiny_family("qwen2.5-vl", resample=0, local_vision=True, layers=1)
    >>> assert oracle_mismatches(loaded, cases=20) == []
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..knockout import language_model
from ..sample import Box, Sample


def lm_input_embeddings(loaded, prepared) -> torch.Tensor:
    """The ``(seq, hidden)`` embeddings the language model receives for `prepared` (image features merged in)."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = language_model(loaded.model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(**prepared.inputs)
    finally:
        handle.remove()
    return captured["embeds"][0]


def changed_positions(loaded, width: int, height: int, box: Box, rng) -> tuple[np.ndarray, object]:
    """Positions whose input embedding changes when the pixels of `box` change, and the unchanged input's layout."""
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    changed = pixels.copy()
    x, y, w, h = (int(v) for v in (box.x, box.y, box.w, box.h))
    changed[y : y + h, x : x + w] = (changed[y : y + h, x : x + w].astype(np.int64) + 128) % 256
    base = Sample("oracle", "is the star red or blue?", "red", "ChooseAttr", image=Image.fromarray(pixels), boxes=[box])
    prepared = loaded.prepare(base)
    other = loaded.prepare(base, image=Image.fromarray(changed))
    diff = (lm_input_embeddings(loaded, prepared) - lm_input_embeddings(loaded, other)).abs().amax(-1)
    return np.nonzero(diff.cpu().numpy() > 0)[0], prepared.layout


def random_case(rng, min_side: int = 40, max_side: int = 900) -> tuple[int, int, Box]:
    """A random image size (sometimes GQA's 640 x 480 or 375 x 500) and a box on it, in whole pixels."""
    width, height = (int(v) for v in rng.integers(min_side, max_side, size=2))
    if rng.random() < 0.3:
        width, height = (640, 480) if rng.random() < 0.5 else (375, 500)
    w = int(rng.integers(1, width // 2 + 2))
    h = int(rng.integers(1, height // 2 + 2))
    x = int(rng.integers(0, width - min(w, width) + 1))
    y = int(rng.integers(0, height - min(h, height) + 1))
    return width, height, Box(x, y, min(w, width - x), min(h, height - y))


def oracle_mismatches(loaded, cases: int = 20, seed: int = 0, **case_kwargs) -> list[dict]:
    """Random cases where the layout's related patches differ from the oracle's changed positions (none: exact)."""
    rng = np.random.default_rng(seed)
    wrong = []
    for _ in range(cases):
        width, height, box = random_case(rng, **case_kwargs)
        changed, layout = changed_positions(loaded, width, height, box, rng)
        expected = layout.related_image_patches
        if changed.tolist() != expected.tolist():
            wrong.append(dict(size=(width, height), box=box, oracle=changed.tolist(), layout=expected.tolist()))
    return wrong
