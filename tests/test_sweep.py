"""Layer sweeps: the paper's windows, the metric, and the fast engine matching the reference in every family."""

import copy

import numpy as np
import pytest
import torch

from flowlib.flows import PAPER_FLOWS, FlowError, cut_matrix
from flowlib.knockout import KnockoutAttention, installed, knockout
from flowlib.memory import MEMORY_MARGIN, SweepMemory, auto_max_batch, free_memory, sweep_memory
from flowlib.models import wrap_model
from flowlib.sweep import (
    ZeroBaseProbability,
    clean_pass,
    layer_sweep,
    relative_change,
    suffix_start,
    sweep_fast,
    sweep_reference,
    sweep_windows,
    window_layers,
)
from flowlib.tiny import tiny_llava
from tests.conftest import LLAVA_FAMILIES, make_sample, white_sample

pytestmark = pytest.mark.usefixtures("one_thread")


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


#: The fast engine's inputs: the white image of the other tests, and noise of three shapes, which each family
#: resizes, tiles or pads in its own way (Qwen carries 3-row positions into the suffix, OneVision pools tiles).
SHAPES = {
    "white": white_sample(),
    "4:3": make_sample(160, 120, boxes=[(10, 10, 40, 30)]),
    "portrait": make_sample(90, 200, boxes=[(10, 10, 40, 30)]),
    "wide": make_sample(300, 64, boxes=[(10, 10, 40, 30)]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_equals_reference_for_every_paper_flow(any_tiny, shape):
    """One forward per window and the fast engine's shared prefix give the same numbers, in every family."""
    loaded = any_tiny
    prepared = loaded.prepare(SHAPES[shape])
    clean = clean_pass(loaded, prepared)
    for flow in PAPER_FLOWS:
        ref = sweep_reference(loaded, prepared, flow, 3, clean=clean)
        fast = sweep_fast(loaded, prepared, flow, 3, clean=clean)
        assert np.abs(ref.relative_change).max() > 1e-3, flow  # the knockout does something
        assert np.abs(fast.relative_change - ref.relative_change).max() <= 1e-5, flow
        assert (ref.answer_token, ref.base_prob, ref.windows) == (fast.answer_token, fast.base_prob, fast.windows)


def test_last_to_last_identical_in_both_engines(white_tiny):
    loaded, prepared, clean = white_tiny
    ref = layer_sweep(loaded, prepared, "Last->Last", 1, engine="reference", clean=clean)
    fast = layer_sweep(loaded, prepared, "Last->Last", 1, engine="fast", clean=clean)
    assert np.all(ref.relative_change != 0)  # the self edge really is cut in every single-layer window
    np.testing.assert_allclose(fast.relative_change, ref.relative_change, rtol=0, atol=1e-5)


def test_batching_does_not_change_the_numbers(white_tiny):
    loaded, prepared, clean = white_tiny
    whole = sweep_fast(loaded, prepared, "Image->Question", 3, clean=clean)
    chunked = sweep_fast(loaded, prepared, "Image->Question", 3, clean=clean, max_batch=2)
    np.testing.assert_allclose(chunked.relative_change, whole.relative_change, rtol=0, atol=1e-5)
    frame = whole.to_frame()
    assert list(frame.layer) == list(range(loaded.num_layers))
    assert list(frame.window_layers[:2]) == ["0-1", "0-2"]


def test_fast_engine_proves_its_cuts(white_tiny):
    loaded, prepared, clean = white_tiny
    schedule = torch.zeros(loaded.num_layers, 2, dtype=torch.bool)
    schedule[1, 0] = True  # row 0 scheduled in layer 1, but the function will never run
    attention = KnockoutAttention(None, schedule, "sdpa")
    with installed(loaded.model, attention):
        pass
    with pytest.raises(Exception, match="never called"):
        attention.verify()


def test_sweep_bad_input(white_tiny):
    loaded, prepared, clean = white_tiny
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


# ----------------------------------------------------------------------------- batches and memory

#: Largest |capped - uncapped| of relative change (pp) on the processor's own kernels: 0 measured with MKL's
#: AVX-512 and SSE4.2 paths, 7.6e-6 with its AVX2 path (MKL_ENABLE_INSTRUCTIONS=AVX2), which picks other
#: kernels for other row counts even at whole multiples of SUFFIX_ALIGN rows.
CAPPED_TOLERANCE_PP = 1e-5


def test_capped_batches_give_the_uncapped_numbers(white_tiny):
    loaded, prepared, clean = white_tiny
    for flow in PAPER_FLOWS:
        whole = sweep_fast(loaded, prepared, flow, 3, clean=clean, max_batch=None)
        for max_batch in (1, 2, 3, "auto"):
            capped = sweep_fast(loaded, prepared, flow, 3, clean=clean, max_batch=max_batch)
            np.testing.assert_allclose(
                capped.relative_change,
                whole.relative_change,
                rtol=0,
                atol=CAPPED_TOLERANCE_PP,
                err_msg=f"{flow}, max_batch={max_batch}",
            )


CAPPED_SWEEPS = """
import numpy as np
from flowlib.kernels import kernel_description
from flowlib.sweep import clean_pass, sweep_fast
from flowlib.tiny import tiny_llava
from tests.conftest import white_sample

differ = []
for family in ("llava-1.5", "llava-next"):
    loaded = tiny_llava(family, layers=5)
    prepared = loaded.prepare(white_sample())
    clean = clean_pass(loaded, prepared)
    for flow in ("Image->Question", "Last->Last"):  # the longest suffix and the shortest
        whole = sweep_fast(loaded, prepared, flow, 3, clean=clean, max_batch=None).blocked_probs
        for max_batch in (1, 2, 3):
            capped = sweep_fast(loaded, prepared, flow, 3, clean=clean, max_batch=max_batch).blocked_probs
            if capped.tobytes() != whole.tobytes():
                differ.append(f"{family} {flow} max_batch={max_batch}")
print(kernel_description())
print("differ: " + "; ".join(differ) if differ else "identical")
"""


@pytest.mark.slow
def test_capped_batches_are_bit_identical_on_portable_kernels():
    """On the kernels `make figures` uses, a window's probabilities have the same bits alone or batched."""
    from tests.test_kernels import run_python

    description, verdict = run_python(CAPPED_SWEEPS, True)
    assert description.startswith("portable kernels")
    assert verdict == "identical"


def test_auto_batch_follows_free_memory(white_tiny, monkeypatch):
    import flowlib.sweep as sweep

    loaded, prepared, clean = white_tiny
    widths = []

    class Recording(KnockoutAttention):
        def __init__(self, cut, schedule, *args, **kwargs):
            widths.append(schedule.shape[1])
            super().__init__(cut, schedule, *args, **kwargs)

    monkeypatch.setattr(sweep, "KnockoutAttention", Recording)
    whole = sweep_fast(loaded, prepared, "Image->Question", 3, clean=clean, max_batch=None)
    assert widths == [loaded.num_layers]
    n = prepared.layout.seq_len
    memory = sweep_memory(loaded.model.config, n, n - suffix_start(prepared.layout, ["Image->Question"]), loaded.dtype)
    room_for_two = (sum(memory.per_batch.values()) + 2.5 * sum(memory.per_window.values())) / (1 - MEMORY_MARGIN)
    for free, batches in ((room_for_two, [2, 2, 1]), (None, [5]), (10**15, [5]), (0, [1] * 5)):
        widths.clear()
        monkeypatch.setattr(sweep, "free_memory", lambda device, free=free: free)
        auto = sweep_fast(loaded, prepared, "Image->Question", 3, clean=clean)  # "auto" is the default
        assert widths == batches, free
        np.testing.assert_allclose(auto.relative_change, whole.relative_change, rtol=0, atol=CAPPED_TOLERANCE_PP)


def test_auto_max_batch_rule():
    memory = SweepMemory(
        held={"a": 10**9}, clean_forward={"b": 10**9}, per_batch={"c": 100}, per_window={"d": 1000}, batch=1
    )
    assert auto_max_batch(memory, 32, None) is None  # unknown free memory: all windows at once
    assert auto_max_batch(memory, 32, 10**9) is None  # all fit
    assert auto_max_batch(memory, 32, (100 + 7 * 1000) / 0.75 + 1, margin=0.25) == 7
    assert auto_max_batch(memory, 32, (100 + 7 * 1000) / 0.75 - 1, margin=0.25) == 6
    assert auto_max_batch(memory, 32, 50) == 1  # never below one window
    assert free_memory("cpu") is None or free_memory("cpu") > 0
    assert free_memory("meta") is None


def test_max_batch_must_be_a_count_auto_or_none(white_tiny):
    loaded, prepared, clean = white_tiny
    for bad in (0, -1, 2.5, True, "all"):
        with pytest.raises(ValueError, match="max_batch must be"):
            sweep_fast(loaded, prepared, "Image->Question", 3, clean=clean, max_batch=bad)


def test_memory_estimate_terms_are_the_tensors_sizes(white_tiny):
    loaded, prepared, clean = white_tiny
    n, config = prepared.layout.seq_len, loaded.model.config
    text = config.text_config
    memory = sweep_memory(config, n, 32, torch.float32, batch=4)
    layers = clean.cache.layers
    assert memory.held["KV cache"] == sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    assert memory.held["hidden states"] == sum(h.nbytes for h in clean.hidden_states)
    # Per window, each layer concatenates the prefix with the row's own keys and values: n positions.
    assert memory.per_window["prefix keys/values"] == layers[0].keys.nbytes + layers[0].values.nbytes
    assert memory.per_window["repeated keys/values"] == 0  # no grouped-query attention here
    assert memory.per_batch["cut matrix"] == cut_matrix(prepared.layout, ["Image->Question"]).nbytes
    assert memory.per_window["answer logits (float64)"] == 2 * text.vocab_size * 8
    # Linear in the batch, and in the element size.
    per_window = sum(memory.per_window.values())
    assert [memory.peak(b + 1) - memory.peak(b) for b in (4, 5, 6)] == [per_window] * 3
    assert memory.total == memory.peak(4)
    half = sweep_memory(config, n, 32, "float16", batch=4)
    assert half.held["KV cache"] * 2 == memory.held["KV cache"]
    with pytest.raises(ValueError, match="suffix_len"):
        sweep_memory(config, n, n + 1, torch.float32)


def test_memory_estimate_of_grouped_query_attention_counts_the_repeated_heads():
    from flowlib.architectures import build_config

    config = build_config("llava-hf/llama3-llava-next-8b-hf")  # 32 query heads share 8 key/value heads
    memory = sweep_memory(config, 2928, 48, torch.float16)
    assert memory.per_window["repeated keys/values"] == 4 * memory.per_window["prefix keys/values"]
    assert memory.per_window["prefix keys/values"] == 2 * 2928 * 8 * 128 * 2


def _measured_peak(function) -> int:
    """Peak bytes torch allocated on the CPU while `function` ran (the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        pytest.skip("this torch's profiler has no allocation event tree")
    allocations = []

    def walk(nodes):
        for node in nodes:
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation":
                allocations.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
            walk(node.children)

    walk(tree)
    if not allocations:
        pytest.skip("the profiler recorded no allocations")
    allocations.sort()
    start = allocations[0][2] - allocations[0][1]
    return max(total for _, _, total in allocations) - start


def test_memory_estimate_bounds_the_measured_peak(white_tiny):
    """The estimate of one batch is an upper bound of what the sweep allocates, and not a loose one:
    measured on the tiny models it is 1.3-1.9x the profiler's peak."""
    loaded, prepared, clean = white_tiny
    n = prepared.layout.seq_len
    for flow in ("Image->Question", "Last->Last"):
        suffix = n - suffix_start(prepared.layout, [flow])
        for batch in (1, 3):
            measured = _measured_peak(
                lambda flow=flow, batch=batch: sweep_fast(loaded, prepared, flow, 1, clean=clean, max_batch=batch)
            )
            memory = sweep_memory(loaded.model.config, n, suffix, loaded.dtype, batch)
            estimate = sum(memory.per_batch.values()) + batch * sum(memory.per_window.values())
            assert measured <= estimate <= 2.5 * measured, (flow, batch, measured, estimate)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sweeps_are_finite_under_both_backends(dtype):
    """Mask fills of finfo(dtype).min added to half-precision scores must never give NaN: cut edges get
    exactly zero weight, every probability stays finite, and the engines agree."""
    for family in LLAVA_FAMILIES:
        loaded = tiny_llava(family, layers=3)
        loaded.model.to(dtype)
        prepared = loaded.prepare(white_sample())
        for backend in ("sdpa", "eager"):
            loaded.model.set_attn_implementation(backend)
            clean = clean_pass(loaded, prepared)
            assert torch.isfinite(clean.logits).all() and all(torch.isfinite(h).all() for h in clean.hidden_states)
            for flow in PAPER_FLOWS:
                ref = sweep_reference(loaded, prepared, flow, 1, clean=clean)
                fast = sweep_fast(loaded, prepared, flow, 1, clean=clean)
                assert np.isfinite(ref.blocked_probs).all() and np.isfinite(fast.blocked_probs).all()
                np.testing.assert_allclose(fast.relative_change, ref.relative_change, rtol=0, atol=1e-5)
        with knockout(loaded, prepared.layout, ["Image->Last"], [0], backend="eager"):
            out = loaded.model(**prepared.inputs, output_attentions=True)
        weights = out.attentions[0][0, :, -1]  # heads x keys, last query row
        assert torch.isfinite(out.logits).all() and torch.isfinite(weights).all()
        assert (weights[:, prepared.layout.group("Image")] == 0).all()
        assert (weights.float().sum(-1) - 1).abs().max() < 1e-2


def test_a_window_of_zero_is_refused_not_replaced_by_the_default():
    from flowlib.tiny import tiny_llava
    from tests.conftest import white_sample

    loaded = tiny_llava("llava-1.5")
    with pytest.raises(ValueError, match="window 0 does not fit"):
        layer_sweep(loaded, loaded.prepare(white_sample()), "Question->Last", window=0)
