"""LLaVA-OneVision: prompt, anyres-max-9 layout with unpadding and pooling, oracle.

Tiny random models from `LlavaOnevisionConfig` (SigLIP + Qwen2), offline; most tests use 60-pixel views
(4 x 4 patches of 14 pixels, the last 4 pixels unread, as the released 384-pixel views leave 6), which
keeps every tiling, unpadding and pooling case at a fraction of the cost. The guarantees every family keeps
(the knockout's proof, fast engine = reference, batches, lens, checkpoints) are tested over all families in
test_knockout, test_sweep, test_adapters, test_lens and test_models.
"""

import numpy as np
import pytest

from flowlib.families.oracle import changed_positions, random_case
from flowlib.families.tiny import image_tokens, tiny_family
from flowlib.geometry import PooledGrid
from tests.conftest import SMALL_IMAGES, make_sample, tiny_model, white_sample

NEAREST = 0
SMALL_VIEW = SMALL_IMAGES["llava-onevision"]["image_size"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llava-onevision")


def test_prompt_is_the_qwen_1_5_conversation_with_the_papers_user_text(tiny):
    prepared = tiny.prepare(white_sample())
    assert prepared.prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        "is the star red or blue? \nAnswer the question using a single word or phrase.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    layout = prepared.layout
    tokens = tiny.tokenizer.convert_ids_to_tokens(prepared.input_ids[0])
    assert tokens[layout.last[0]] == "assistant" and tiny.prompt_style.value == "chatml"
    assert {tokens[i] for i in layout.image} == {"<image>"}
    # Base view first (no newline), then the tiles' rows, each closed by a newline.
    assert layout.base_view.tolist() == layout.image[: (SMALL_VIEW // 14) ** 2].tolist()
    assert layout.image_newlines[-1] == layout.image[-1]
    assert set(layout.related_image_patches) | set(layout.other_image_patches) | set(layout.image_newlines) == set(
        layout.image
    )


#: (width, height) -> image tokens at the released 384-pixel views: 729 for the base view, then the unpadded
#: tiles with a newline per row; 2000 x 1600 fills a 6 x 5 canvas whose 129 x 162 tokens pool down to 72 x 90.
TOKEN_COUNTS = {
    (640, 480): (2929, 40, False),
    (375, 500): (1737, 36, False),
    (200, 150): (1317, 21, False),
    (1500, 300): (3018, 21, False),
    (2000, 1600): (7281, 72, True),
}


def test_token_counts_match_the_processor():
    loaded = tiny_family("llava-onevision", layers=1, hidden=32, heads=2)
    for (width, height), (count, rows, pooled) in TOKEN_COUNTS.items():
        layout = loaded.prepare(make_sample(width, height, boxes=[])).layout
        assert len(layout.image) == count == image_tokens(loaded.processor, width, height), (width, height)
        assert len(layout.base_view) == 729 and len(layout.image_newlines) == rows
        high = loaded.adapter.geometry(loaded.processor, width, height).grid("high_resolution")
        assert (high.row_map.shape[0] < high.row_map.shape[1]) == pooled


def _oracle_model(image_size):
    return tiny_family(
        "llava-onevision", resample=NEAREST, local_vision=True, layers=1, hidden=32, heads=2, image_size=image_size
    )


@pytest.mark.filterwarnings("ignore:sample oracle")
def test_box_mapping_matches_the_oracle_in_the_base_view_the_tiles_and_after_pooling():
    loaded = _oracle_model(SMALL_VIEW)
    rng = np.random.default_rng(3)
    pooled = 0
    for _ in range(16):
        width, height, box = random_case(rng, max_side=900)
        changed, layout = changed_positions(loaded, width, height, box, rng)
        assert changed.tolist() == layout.related_image_patches.tolist(), (width, height, box)
        high = loaded.adapter.geometry(loaded.processor, width, height).grid("high_resolution")
        assert isinstance(high, PooledGrid)
        pooled += high.row_map.shape[0] < high.row_map.shape[1]
    assert pooled >= 3, "the random cases should exercise the pooling"


@pytest.mark.filterwarnings("ignore:sample oracle")
def test_box_mapping_matches_the_oracle_at_the_released_view_size():
    loaded = _oracle_model(384)
    rng = np.random.default_rng(5)
    for _ in range(6):
        width, height, box = random_case(rng, max_side=900)
        changed, layout = changed_positions(loaded, width, height, box, rng)
        assert changed.tolist() == layout.related_image_patches.tolist(), (width, height, box)
