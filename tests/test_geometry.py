"""The box -> image-token mapping agrees with a geometric oracle, for every family and mode.

The oracle: a vision tower whose features depend only on their own patch, a
processor with nearest resampling, two images that differ only inside a box;
the language-model input embeddings that change are exactly the related patches.
"""

import numpy as np
import pytest
from PIL import Image

from flowlib.families.oracle import changed_positions, random_case
from flowlib.geometry import pil_nearest_source
from flowlib.sample import Box, Sample
from flowlib.tiny import tiny_llava

NEAREST = 0  # PIL.Image.NEAREST


@pytest.mark.filterwarnings("ignore:sample oracle")
@pytest.mark.parametrize(
    "family,pad,cases",
    [("llava-1.5", True, 30), ("llava-1.5", False, 30), ("llava-next", True, 30)],
    ids=["llava-1.5-pad", "llava-1.5-crop", "llava-next-anyres"],
)
def test_box_mapping_matches_oracle(family, pad, cases):
    loaded = tiny_llava(
        family,
        pad=pad,
        resample=NEAREST,
        local_vision=True,
        image_size=336,
        patch_size=14,
        layers=1,
        hidden=32,
        heads=2,
    )
    rng = np.random.default_rng(1234 if pad else 99)
    grids_seen = set()
    for _ in range(cases):
        width, height, box = random_case(rng, max_side=900)
        changed, layout = changed_positions(loaded, width, height, box, rng)
        expected = layout.related_image_patches
        if len(expected) == 0:
            assert len(changed) == 0 and layout.unmapped_boxes == (box,)
        else:
            assert changed.tolist() == expected.tolist(), (width, height, box)
        if family == "llava-next":
            grids_seen.add((len(layout.high_resolution), len(layout.image_newlines)))
    if family == "llava-next":
        assert len(grids_seen) >= 3, "the random cases should exercise several tile grids"


def test_real_scale_token_counts():
    next_model = tiny_llava("llava-next", image_size=336, patch_size=14, layers=1, hidden=32, heads=2)
    one_five = tiny_llava("llava-1.5", image_size=336, patch_size=14, layers=1, hidden=32, heads=2)
    sample = Sample("q", "is the star red or blue?", "red", "ChooseAttr", image=Image.new("RGB", (640, 480)))
    layout = next_model.prepare(sample).layout
    assert len(layout.image) == 2340
    assert len(layout.base_view) == 576
    assert len(layout.base_view) + len(layout.high_resolution) + len(layout.image_newlines) == 2340
    assert len(one_five.prepare(sample).layout.image) == 576
    portrait = Sample("q", "is the star red or blue?", "red", "ChooseAttr", image=Image.new("RGB", (375, 500)))
    assert (
        len(next_model.prepare(portrait).layout.image)
        == next_model.processor._get_number_of_features(500, 375, 336, 336) - 1
    )


def test_pil_nearest_replay_matches_pillow():
    rng = np.random.default_rng(0)
    for _ in range(200):
        old, new = (int(v) for v in rng.integers(2, 1500, size=2))
        ramp = np.tile(np.arange(old, dtype=np.int32), (2, 1))
        resized = np.asarray(Image.fromarray(ramp, mode="I").resize((new, 2), NEAREST))[0]
        assert resized.tolist() == pil_nearest_source(old, new).tolist()


def test_pad_mode_keeps_what_crop_loses():
    """A box at the far left of a landscape image is in the padded view but cropped away by llava-hf's default."""
    pad = tiny_llava("llava-1.5", pad=True, image_size=336, patch_size=14, layers=1, hidden=32, heads=2)
    crop = tiny_llava("llava-1.5", pad=False, image_size=336, patch_size=14, layers=1, hidden=32, heads=2)
    sample = Sample(
        "q",
        "is the star red or blue?",
        "red",
        "ChooseAttr",
        image=Image.new("RGB", (640, 320)),
        boxes=[Box(0, 100, 80, 100)],
    )
    assert len(pad.prepare(sample).layout.related_image_patches) > 0
    with pytest.warns(UserWarning, match="covers no image patch"):
        cropped = crop.prepare(sample).layout
    assert len(cropped.related_image_patches) == 0 and len(cropped.unmapped_boxes) == 1


@pytest.mark.parametrize("family", ["llava-1.5", "llava-next"])
def test_official_painted_rule_agrees_with_the_geometric_rule_up_to_the_border(family):
    """The official rule (boxes painted red through the processor) against flowlib's coverage rule."""
    from flowlib.layout import OFFICIAL_RULE
    from flowlib.models import wrap_model
    from tests.conftest import make_sample

    geometric_model = tiny_llava(family)
    official_model = wrap_model(geometric_model.model, geometric_model.processor, name="tiny", related_rule="official")
    cases = [(320, 240, (40, 30, 120, 90)), (200, 400, (10, 150, 60, 200)), (500, 375, (0, 0, 500, 60))]
    for width, height, box in cases:
        sample = make_sample(width, height, boxes=[box])
        geometric, official = (m.prepare(sample).layout for m in (geometric_model, official_model))
        assert official.coverage_rule == OFFICIAL_RULE and geometric.coverage_rule != OFFICIAL_RULE
        g, o = set(geometric.related_image_patches.tolist()), set(official.related_image_patches.tolist())
        assert o and o <= set(official.image.tolist()) - set(official.image_newlines.tolist())
        # Bicubic resampling blurs the painted edges: the rules differ at most by a ring of border patches.
        assert len(g ^ o) <= 0.5 * len(g) and len(g & o) >= 0.5 * len(g)
        assert set(official.other_image_patches.tolist()).isdisjoint(o)
    with pytest.raises(ValueError, match="related_rule"):
        wrap_model(geometric_model.model, geometric_model.processor, name="tiny", related_rule="red")
