"""LLaVA-OneVision: prompt, anyres-max-9 layout with unpadding and pooling, oracle, knockout, engines, batching, CLI.

Tiny random models from `LlavaOnevisionConfig` (SigLIP + Qwen2), offline; most tests use 60-pixel views
(4 x 4 patches of 14 pixels, the last 4 pixels unread, as the released 384-pixel views leave 6), which
keeps every tiling, unpadding and pooling case at a fraction of the cost.
"""

import warnings

import numpy as np
import pytest
import torch

from flowlib import cli, models, runner
from flowlib.families.oracle import changed_positions, random_case
from flowlib.families.tiny import image_tokens, tiny_family
from flowlib.geometry import PooledGrid
from flowlib.knockout import PAPER_FLOWS, knockout
from flowlib.lens import layer_distributions
from flowlib.sweep import clean_pass, sweep_fast, sweep_reference
from tests.conftest import make_sample, white_sample

NEAREST = 0
SMALL_VIEW = 60

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_family("llava-onevision", layers=4, image_size=SMALL_VIEW)


def logits(loaded, prepared, **kwargs):
    with torch.no_grad():
        return loaded.model(**prepared.inputs, **kwargs).logits


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


def test_no_edges_blocked_gives_identical_logits(tiny):
    prepared = tiny.prepare(white_sample())
    stock = logits(tiny, prepared)
    with knockout(tiny, prepared.layout, [], layers=range(tiny.num_layers)) as ko:
        empty = logits(tiny, prepared)
    with knockout(tiny, prepared.layout, PAPER_FLOWS, layers=[]):
        no_layers = logits(tiny, prepared)
    assert ko.removed_edges() == [0] * tiny.num_layers
    assert torch.equal(empty, stock) and torch.equal(no_layers, stock)


def test_blocking_everything_into_last_collapses_the_answer():
    loaded = tiny_family("llava-onevision", layers=3, image_size=SMALL_VIEW)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(40)
    prepared = loaded.prepare(white_sample())
    base = torch.softmax(logits(loaded, prepared)[0, -1].double(), -1)
    answer = int(base.argmax())
    with knockout(loaded, prepared.layout, ["All->Last"], layers=range(loaded.num_layers)) as ko:
        blocked = torch.softmax(logits(loaded, prepared)[0, -1].double(), -1)
    assert blocked[answer] < 0.05 * base[answer]
    assert ko.removed_edges() == [prepared.layout.seq_len - 1] * loaded.num_layers


def test_edges_are_cut_in_exactly_the_chosen_layers(tiny):
    tiny.model.set_attn_implementation("eager")
    try:
        prepared = tiny.prepare(white_sample())
        sources, targets = prepared.layout.group("Image"), prepared.layout.group("Question")
        with torch.no_grad():
            clean = tiny.model(**prepared.inputs, output_attentions=True).attentions
            with knockout(tiny, prepared.layout, ["Image->Question"], [1, 2]) as ko:
                blocked = tiny.model(**prepared.inputs, output_attentions=True).attentions
        assert ko.removed_edges() == [0, len(sources) * len(targets), len(sources) * len(targets), 0]
        for layer, (a, b) in enumerate(zip(clean, blocked)):
            cut = b[0][:, targets][:, :, sources]
            assert (cut == 0).all() if layer in (1, 2) else (cut > 0).all()
            assert layer > 0 or torch.equal(a, b)
    finally:
        tiny.model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("size", [(160, 120), (90, 200), (300, 64)], ids=["4:3", "portrait", "wide"])
def test_fast_equals_reference_for_every_paper_flow(tiny, size):
    prepared = tiny.prepare(make_sample(*size, boxes=[(10, 10, 40, 30)]))
    clean = clean_pass(tiny, prepared)
    for flow in PAPER_FLOWS:
        ref = sweep_reference(tiny, prepared, flow, 3, clean=clean)
        fast = sweep_fast(tiny, prepared, flow, 3, clean=clean)
        assert np.abs(ref.relative_change).max() > 1e-3, flow
        assert np.abs(fast.relative_change - ref.relative_change).max() <= 1e-5, flow


def test_a_batch_gives_the_numbers_of_each_sample_alone(tiny):
    """Images of different sizes (so different tile counts) in one right-padded batch."""
    sizes = [(160, 120), (90, 200), (300, 64)]
    samples = [make_sample(*size, boxes=[(5, 5, 20, 20)], seed=i) for i, size in enumerate(sizes)]
    prepared = [tiny.prepare(s) for s in samples]
    assert len({p.inputs["pixel_values"].shape[1] for p in prepared}) > 1  # the tile counts differ
    alone = [logits(tiny, p)[0, -1] for p in prepared]
    tiny.processor.tokenizer.padding_side = "right"
    batch = tiny.processor(
        images=[s.load_image() for s in samples], text=[p.prompt for p in prepared], padding=True, return_tensors="pt"
    )
    assert set(tiny.adapter.image_inputs) <= set(batch)
    with torch.no_grad():
        out = tiny.model(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    for row, single in enumerate(alone):
        assert torch.allclose(out[row, last[row]], single, atol=1e-5, rtol=0), row
        for other, neighbour in enumerate(alone):
            assert other == row or not torch.allclose(out[row, last[row]], neighbour, atol=1e-3)


def test_a_saved_checkpoint_loads_and_runs_from_the_command_line(tmp_path):
    from tests.test_cli_errors import run_args
    from tests.test_run_contract import make_paper_data

    loaded = tiny_family("llava-onevision", layers=3, image_size=SMALL_VIEW)
    folder = models.save_checkpoint(loaded, tmp_path / "model")
    disk = models.load_model(str(folder))
    assert disk.adapter.name == "llava-onevision" and disk.prompt_style.value == "chatml"
    sample = make_sample(200, 150)
    a, b = loaded.prepare(sample), disk.prepare(sample)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(logits(loaded, a), logits(disk, b))
    csv_dir, image_dir = make_paper_data(tmp_path, disk, colours=("red", "blue"), wrong=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(run_args(folder, csv_dir, image_dir, tmp_path / "out")) == 0
    assert [s["status"] for s in runner.load_statuses(tmp_path / "out")] == ["analysed", "analysed"]


def test_the_final_layer_lens_equals_the_models_own_probabilities(tiny):
    prepared = tiny.prepare(white_sample())
    lens = layer_distributions(tiny, prepared)
    stock = torch.softmax(logits(tiny, prepared)[0, -1].double(), -1)
    assert lens.shape[0] == tiny.num_layers and (lens[-1].double() - stock).abs().max() < 1e-6
