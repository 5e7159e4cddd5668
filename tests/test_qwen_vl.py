"""Qwen2.5-VL and Qwen2-VL: prompt, dynamic-resolution layout, oracle, the 3-D positions of the fast engine's suffix,
settings refused.

Tiny random models built from the transformers config classes, offline (flowlib.families.tiny); the
tokenizer is a word-level one with Qwen's special tokens (no Qwen tokenizer is on disk). The guarantees every
family keeps (the knockout's proof, fast engine = reference, batches, lens, checkpoints) are tested over all
families in test_knockout, test_sweep, test_adapters, test_lens and test_models.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from flowlib import models
from flowlib.families.base import suffix_positions
from flowlib.families.oracle import oracle_mismatches
from flowlib.families.tiny import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, image_tokens, tiny_family
from flowlib.sweep import clean_pass, suffix_start, sweep_fast, sweep_reference
from tests.conftest import make_sample, tiny_model, white_sample

FAMILIES = ("qwen2.5-vl", "qwen2-vl")
NEAREST = 0

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return tiny_model(request.param)


def test_prompt_is_chatml_with_the_vision_markers_and_the_papers_user_text(tiny):
    prepared = tiny.prepare(white_sample())
    question = "is the star red or blue?"
    assert prepared.prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{question} \n"
        "Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids, layout = prepared.input_ids[0], prepared.layout
    tokens = tiny.tokenizer.convert_ids_to_tokens(ids)
    assert tiny.tokenizer.decode(ids[layout.question]).replace(" ", "") == question.replace(" ", "")
    image = layout.group("Image")
    assert tokens[image[0] - 1] == "<|vision_start|>" and tokens[image[-1] + 1] == "<|vision_end|>"
    assert {tokens[i] for i in image} == {"<|image_pad|>"}  # the markers are not image tokens
    assert tokens[layout.last[0]] == "assistant" and tiny.prompt_style.value == "chatml"
    assert tiny.stop_token_ids == [tiny.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert set(layout.related_image_patches) | set(layout.other_image_patches) == set(image)


#: (width, height) -> merged image tokens under Qwen2.5-VL-7B-Instruct's bounds (3136..12845056 pixels):
#: resized to multiples of 28 (640 x 480 -> 644 x 476: 23 x 17), and under a 256-token budget.
TOKEN_COUNTS = {
    (640, 480, QWEN_MAX_PIXELS): 391,
    (375, 500, QWEN_MAX_PIXELS): 234,
    (200, 150, QWEN_MAX_PIXELS): 35,
    (30, 20, QWEN_MAX_PIXELS): 6,  # below min_pixels: scaled up to 84 x 56
    (640, 480, 28 * 28 * 256): 234,  # above max_pixels: scaled down to 504 x 364
    (1000, 60, 28 * 28 * 256): 72,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_token_counts_match_the_processor(family):
    loaded = {m: tiny_family(family, layers=1, hidden=32, heads=2, max_pixels=m) for m in {k[2] for k in TOKEN_COUNTS}}
    for (width, height, max_pixels), count in TOKEN_COUNTS.items():
        model = loaded[max_pixels]
        layout = model.prepare(make_sample(width, height, boxes=[])).layout
        assert len(layout.image) == count == image_tokens(model.processor, width, height), (width, height)
        assert model.processor.image_processor.size["shortest_edge"] == QWEN_MIN_PIXELS


@pytest.mark.filterwarnings("ignore:sample oracle")
@pytest.mark.parametrize("family", FAMILIES)
def test_box_mapping_matches_the_geometric_oracle(family):
    """Paint random boxes on random images: exactly the predicted image tokens' input embeddings change."""
    loaded = tiny_family(
        family, resample=NEAREST, local_vision=True, layers=1, hidden=32, heads=2, max_pixels=28 * 28 * 400
    )
    assert oracle_mismatches(loaded, cases=8, seed=7, max_side=700) == []


@pytest.mark.filterwarnings("ignore:sample oracle")
def test_box_mapping_matches_the_oracle_at_the_released_pixel_bounds():
    loaded = tiny_family(
        "qwen2.5-vl", resample=NEAREST, local_vision=True, layers=1, hidden=32, heads=2, max_pixels=QWEN_MAX_PIXELS
    )
    assert oracle_mismatches(loaded, cases=20, seed=11) == []


def test_the_suffix_positions_are_the_models_own_3d_positions(tiny, monkeypatch):
    prepared = tiny.prepare(make_sample(160, 120))
    layout, flow = prepared.layout, "Image->Question"
    t0 = suffix_start(layout, [flow])
    assert t0 <= layout.image[-1]  # the recomputed suffix starts inside the image: 3 distinct rows there
    positions = suffix_positions(tiny, prepared, t0, "cpu")
    assert positions.shape == (3, 1, layout.seq_len - t0)
    assert not torch.equal(positions[1], positions[2])
    assert int(positions[0, 0, -1]) < layout.seq_len - 1  # rope deltas: the last position is not n - 1
    # Without them (0..n-1 as for LLaVA) the fast engine would disagree: test_sweep's fast = reference catches it.
    clean = clean_pass(tiny, prepared)
    ref = sweep_reference(tiny, prepared, flow, 3, clean=clean)
    monkeypatch.setattr(type(tiny.adapter), "position_ids", lambda self, model, inputs: None)
    wrong = sweep_fast(tiny, prepared, flow, 3, clean=clean)
    assert np.abs(wrong.relative_change - ref.relative_change).max() > 1e-3


def test_official_rule_and_other_prompt_styles_are_refused(tiny):
    with pytest.raises(ValueError, match="official.*LLaVA families only"):
        models.wrap_model(tiny.model, tiny.processor, name="t", related_rule="official")
    with pytest.raises(ValueError, match="chatml"):
        models.wrap_model(tiny.model, tiny.processor, name="t", prompt_style="vicuna")


def test_images_of_any_size_have_no_newlines_and_one_grid(tiny):
    for size in [(56, 56), (500, 40), (41, 300)]:
        prepared = tiny.prepare(make_sample(*size, boxes=[]), image=Image.new("RGB", size))
        assert len(prepared.layout.image_newlines) == 0 and len(prepared.layout.base_view) == 0
