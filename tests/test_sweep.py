"""Layer sweeps: the paper's windows, the metric, and the fast engine matching the reference."""

import copy

import numpy as np
import pytest
import torch

from flowlib.knockout import PAPER_FLOWS, FlowError, KnockoutAttention, installed
from flowlib.models import wrap_model
from flowlib.sweep import (ZeroBaseProbability, clean_pass, layer_sweep, relative_change, sweep_fast,
                           sweep_reference, sweep_windows, window_layers)
from flowlib.tiny import tiny_llava
from tests.conftest import white_sample

FAMILIES = ("llava-1.5", "llava-next")


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    loaded = tiny_llava(request.param, layers=5)
    prepared = loaded.prepare(white_sample())
    return loaded, prepared, clean_pass(loaded, prepared)


def test_windows_follow_the_paper():
    assert window_layers(0, 7, 32) == range(0, 4)
    assert window_layers(10, 7, 32) == range(7, 14)
    assert window_layers(31, 7, 32) == range(28, 32)
    assert window_layers(5, 4, 32) == range(3, 7)  # even k: k//2 before, k - k//2 - 1 after
    for k in (1, 4, 9):
        for l, w in enumerate(sweep_windows(k, 40)):
            assert w == range(max(0, l - k // 2), min(40, l - (-k // 2)))
    assert sweep_windows(40, 40)[0] == range(0, 20)
    with pytest.raises(ValueError, match="does not fit a model of 32 layers"):
        sweep_windows(33, 32)
    with pytest.raises(ValueError):
        sweep_windows(0, 32)


def test_relative_change_and_zero_base():
    np.testing.assert_allclose(relative_change([0.25, 0.5], 0.5), [-50.0, 0.0])
    with pytest.raises(ZeroBaseProbability):
        relative_change([0.1], 0.0)


def test_fast_equals_reference_for_every_paper_flow(tiny):
    loaded, prepared, clean = tiny
    for flow in PAPER_FLOWS:
        ref = sweep_reference(loaded, prepared, flow, 3, clean=clean)
        fast = sweep_fast(loaded, prepared, flow, 3, clean=clean)
        assert np.abs(ref.relative_change).max() > 1e-3, flow  # the knockout does something
        assert np.abs(fast.relative_change - ref.relative_change).max() <= 1e-5, flow
        assert (ref.answer_token, ref.base_prob, ref.windows) == (fast.answer_token, fast.base_prob, fast.windows)


def test_last_to_last_identical_in_both_engines(tiny):
    loaded, prepared, clean = tiny
    ref = layer_sweep(loaded, prepared, "Last->Last", 1, engine="reference", clean=clean)
    fast = layer_sweep(loaded, prepared, "Last->Last", 1, engine="fast", clean=clean)
    assert np.all(ref.relative_change != 0)  # the self edge really is cut in every single-layer window
    np.testing.assert_allclose(fast.relative_change, ref.relative_change, rtol=0, atol=1e-5)


def test_batching_does_not_change_the_numbers(tiny):
    loaded, prepared, clean = tiny
    whole = sweep_fast(loaded, prepared, "Image->Question", 3, clean=clean)
    chunked = sweep_fast(loaded, prepared, "Image->Question", 3, clean=clean, max_batch=2)
    np.testing.assert_allclose(chunked.relative_change, whole.relative_change, rtol=0, atol=1e-5)
    frame = whole.to_frame()
    assert list(frame.layer) == list(range(loaded.num_layers))
    assert list(frame.window_layers[:2]) == ["0-1", "0-2"]


def test_fast_engine_proves_its_cuts(tiny):
    loaded, prepared, clean = tiny
    schedule = torch.zeros(loaded.num_layers, 2, dtype=torch.bool)
    schedule[1, 0] = True  # row 0 scheduled in layer 1, but the function will never run
    attention = KnockoutAttention(None, schedule, "sdpa")
    with installed(loaded.model, attention):
        pass
    with pytest.raises(Exception, match="never called"):
        attention.verify()


def test_sweep_bad_input(tiny):
    loaded, prepared, clean = tiny
    for engine in ("fast", "reference"):
        with pytest.raises(FlowError, match="valid|groups from"):
            layer_sweep(loaded, prepared, "Image->Answer", 3, engine=engine, clean=clean)
        with pytest.raises(ValueError, match="does not fit"):
            layer_sweep(loaded, prepared, "Image->Question", loaded.num_layers + 1, engine=engine, clean=clean)
    no_boxes = loaded.prepare(white_sample(boxes=(), qid="nobox"))
    with pytest.raises(FlowError, match="sample nobox: group 'Related Image Patches'"):
        sweep_fast(loaded, no_boxes, "Related Image Patches->Question", 3)
    zero = type(clean)(clean.answer_token, 0.0, clean.logits, clean.hidden_states, clean.cache)
    with pytest.raises(ZeroBaseProbability, match="sample q1"):
        sweep_fast(loaded, prepared, "Image->Question", 3, clean=zero)
    with pytest.raises(ValueError, match="unknown engine"):
        layer_sweep(loaded, prepared, "Image->Question", 3, engine="turbo")


def test_grouped_query_attention_model():
    """Llama-3-LLaVA-NeXT uses fewer key/value heads than query heads: the prefix reuse must handle it."""
    base = tiny_llava("llava-1.5", layers=3)
    config = copy.deepcopy(base.model.config)
    config.text_config.num_key_value_heads = 2  # 4 query heads share 2 key/value heads
    torch.manual_seed(0)
    loaded = wrap_model(type(base.model)(config).eval(), base.processor, name="tiny-gqa", image_mode="pad")
    prepared = loaded.prepare(white_sample())
    clean = clean_pass(loaded, prepared)
    for flow in ("Image->Question", "Last->Last"):
        ref = sweep_reference(loaded, prepared, flow, 1, clean=clean)
        fast = sweep_fast(loaded, prepared, flow, 1, clean=clean)
        assert np.abs(ref.relative_change).max() > 1e-4
        np.testing.assert_allclose(fast.relative_change, ref.relative_change, rtol=0, atol=1e-5)
