"""Qwen2.5-VL and Qwen2-VL: prompt, dynamic-resolution layout, oracle, knockout proof, both engines, batching, CLI.

Tiny random models built from the transformers config classes, offline (flowlib.families.tiny); the
tokenizer is a word-level one with Qwen's special tokens (no Qwen tokenizer is on disk).
"""

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flowlib import cli, models, runner
from flowlib.families.base import suffix_positions
from flowlib.families.oracle import oracle_mismatches
from flowlib.families.tiny import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, image_tokens, tiny_family
from flowlib.knockout import PAPER_FLOWS, knockout
from flowlib.lens import layer_distributions
from flowlib.sweep import clean_pass, suffix_start, sweep_fast, sweep_reference
from tests.conftest import make_sample, white_sample

FAMILIES = ("qwen2.5-vl", "qwen2-vl")
NEAREST = 0
#: A small pixel budget (64 merged tokens) keeps the knockout and sweep tests to a second or two.
SMALL = 28 * 28 * 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return tiny_family(request.param, layers=4, max_pixels=SMALL)


def logits(loaded, prepared, **kwargs):
    with torch.no_grad():
        return loaded.model(**prepared.inputs, **kwargs).logits


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


def test_no_edges_blocked_gives_identical_logits(tiny):
    prepared = tiny.prepare(white_sample())
    stock = logits(tiny, prepared)
    with knockout(tiny, prepared.layout, [], layers=range(tiny.num_layers)) as ko:
        empty = logits(tiny, prepared)
    with knockout(tiny, prepared.layout, PAPER_FLOWS, layers=[]):
        no_layers = logits(tiny, prepared)
    assert ko.removed_edges() == [0] * tiny.num_layers
    assert torch.equal(empty, stock) and torch.equal(no_layers, stock)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocking_everything_into_last_collapses_the_answer(family):
    loaded = tiny_family(family, layers=3, max_pixels=SMALL)
    with torch.no_grad():  # a confident model (sharp unembedding), so "collapse" is measurable
        loaded.model.lm_head.weight.mul_(40)
    prepared = loaded.prepare(white_sample())
    base = torch.softmax(logits(loaded, prepared)[0, -1].double(), -1)
    answer = int(base.argmax())
    with knockout(loaded, prepared.layout, ["All->Last"], layers=range(loaded.num_layers)) as ko:
        blocked = torch.softmax(logits(loaded, prepared)[0, -1].double(), -1)
    assert blocked[answer] < 0.05 * base[answer]  # what the answer rested on is gone
    assert ko.removed_edges() == [prepared.layout.seq_len - 1] * loaded.num_layers


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_the_text_model_calls_the_knockout_in_exactly_the_chosen_layers(tiny, backend):
    """The per-layer proof holds for Qwen's text model; the vision tower keeps its own attention."""
    tiny.model.set_attn_implementation(backend)
    try:
        prepared = tiny.prepare(white_sample())
        layout = prepared.layout
        sources, targets = layout.group("Image"), layout.group("Question")
        vision = tiny.model.config.vision_config._attn_implementation
        with torch.no_grad():
            clean = tiny.model(**prepared.inputs, output_attentions=backend == "eager").attentions
            with knockout(tiny, layout, ["Image->Question"], [1, 2]) as ko:
                assert ko.backend == backend and tiny.model.config.vision_config._attn_implementation == vision
                out = tiny.model(**prepared.inputs, output_attentions=backend == "eager")
        assert ko.removed_edges() == [0, len(sources) * len(targets), len(sources) * len(targets), 0]
        if backend == "eager":
            for layer, (a, b) in enumerate(zip(clean, out.attentions)):
                cut = b[0][:, targets][:, :, sources]
                assert (cut == 0).all() if layer in (1, 2) else (cut > 0).all()
                assert layer > 0 or torch.equal(a, b)  # before the window nothing changes, bit for bit
    finally:
        tiny.model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("size", [(160, 120), (90, 200), (300, 64)], ids=["4:3", "portrait", "wide"])
def test_fast_equals_reference_for_every_paper_flow(tiny, size):
    """The fast engine carries Qwen's 3-row positions into the suffix: the same numbers as one forward per window."""
    width, height = size
    prepared = tiny.prepare(make_sample(width, height, boxes=[(10, 10, 40, 30)]))
    clean = clean_pass(tiny, prepared)
    for flow in PAPER_FLOWS:
        ref = sweep_reference(tiny, prepared, flow, 3, clean=clean)
        fast = sweep_fast(tiny, prepared, flow, 3, clean=clean)
        assert np.abs(ref.relative_change).max() > 1e-3, flow
        assert np.abs(fast.relative_change - ref.relative_change).max() <= 1e-5, flow


def test_the_suffix_positions_are_the_models_own_3d_positions(tiny, monkeypatch):
    prepared = tiny.prepare(make_sample(160, 120))
    layout, flow = prepared.layout, "Image->Question"
    t0 = suffix_start(layout, [flow])
    assert t0 <= layout.image[-1]  # the recomputed suffix starts inside the image: 3 distinct rows there
    positions = suffix_positions(tiny, prepared, t0, "cpu")
    assert positions.shape == (3, 1, layout.seq_len - t0)
    assert not torch.equal(positions[1], positions[2])
    assert int(positions[0, 0, -1]) < layout.seq_len - 1  # rope deltas: the last position is not n - 1
    # Without them (0..n-1 as for LLaVA) the fast engine would disagree: the test above would catch it.
    clean = clean_pass(tiny, prepared)
    ref = sweep_reference(tiny, prepared, flow, 3, clean=clean)
    monkeypatch.setattr(type(tiny.adapter), "position_ids", lambda self, model, inputs: None)
    wrong = sweep_fast(tiny, prepared, flow, 3, clean=clean)
    assert np.abs(wrong.relative_change - ref.relative_change).max() > 1e-3


def test_a_batch_gives_the_numbers_of_each_sample_alone(tiny):
    """Images of different sizes in one right-padded batch: each row's logits are its own, not a neighbour's."""
    samples = [
        make_sample(*size, boxes=[(5, 5, 20, 20)], seed=i) for i, size in enumerate([(160, 120), (90, 200), (300, 64)])
    ]
    prepared = [tiny.prepare(s) for s in samples]
    alone = [logits(tiny, p)[0, -1] for p in prepared]
    processor = tiny.processor
    processor.tokenizer.padding_side = "right"
    batch = processor(
        images=[s.load_image() for s in samples], text=[p.prompt for p in prepared], padding=True, return_tensors="pt"
    )
    assert set(tiny.adapter.image_inputs) | set(tiny.adapter.token_inputs) <= set(batch)
    with torch.no_grad():
        out = tiny.model(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    for row, single in enumerate(alone):
        assert torch.allclose(out[row, last[row]], single, atol=1e-5, rtol=0), row
        for other, neighbour in enumerate(alone):  # the check can fail: the rows differ from each other
            assert other == row or not torch.allclose(out[row, last[row]], neighbour, atol=1e-3)


def test_official_rule_and_other_prompt_styles_are_refused(tiny):
    with pytest.raises(ValueError, match="official.*LLaVA families only"):
        models.wrap_model(tiny.model, tiny.processor, name="t", related_rule="official")
    with pytest.raises(ValueError, match="chatml"):
        models.wrap_model(tiny.model, tiny.processor, name="t", prompt_style="vicuna")


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    loaded = tiny_family("qwen2.5-vl", layers=3, max_pixels=SMALL)
    return loaded, models.save_checkpoint(loaded, tmp_path_factory.mktemp("qwen") / "model")


def test_a_saved_checkpoint_loads_with_its_adapter_and_the_same_numbers(qwen_checkpoint):
    loaded, folder = qwen_checkpoint
    disk = models.load_model(str(folder))
    assert disk.adapter.name == "qwen2.5-vl" and disk.prompt_style.value == "chatml"
    assert isinstance(disk.processor, disk.adapter.processor_class)
    assert type(pickle.loads(pickle.dumps(disk.processor))) is type(disk.processor)  # worker processes get a copy
    sample = make_sample(200, 150)
    a, b = loaded.prepare(sample), disk.prepare(sample)
    assert torch.equal(a.input_ids, b.input_ids) and np.array_equal(a.layout.image, b.layout.image)
    assert torch.equal(logits(loaded, a), logits(disk, b))


def test_flowlib_run_accepts_the_checkpoint_folder(qwen_checkpoint, tmp_path):
    from flowlib.run_folder import read_run
    from tests.test_cli_errors import run_args
    from tests.test_run_contract import make_paper_data

    _, folder = qwen_checkpoint
    disk = models.load_model(str(folder))
    csv_dir, image_dir = make_paper_data(tmp_path, disk, colours=("red", "blue"), wrong=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(run_args(folder, csv_dir, image_dir, tmp_path / "out")) == 0
    assert read_run(tmp_path / "out") is not None
    assert [s["status"] for s in runner.load_statuses(tmp_path / "out")] == ["analysed", "analysed"]


def test_images_of_any_size_have_no_newlines_and_one_grid(tiny):
    for size in [(56, 56), (500, 40), (41, 300)]:
        prepared = tiny.prepare(make_sample(*size, boxes=[]), image=Image.new("RGB", size))
        assert len(prepared.layout.image_newlines) == 0 and len(prepared.layout.base_view) == 0


def test_the_final_layer_lens_equals_the_models_own_probabilities(tiny):
    prepared = tiny.prepare(white_sample())
    lens = layer_distributions(tiny, prepared)
    stock = torch.softmax(logits(tiny, prepared)[0, -1].double(), -1)
    assert lens.shape[0] == tiny.num_layers and (lens[-1].double() - stock).abs().max() < 1e-6
