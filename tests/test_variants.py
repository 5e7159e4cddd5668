"""Window variants: inverse and cumulative schedules, their limits, and the fast engine against the reference."""

import numpy as np
import pytest
import torch

from flowlib.controls import keep_only_cut, matched_random_cut
from flowlib.flows import cut_matrix
from flowlib.knockout import knockout
from flowlib.sweep import answer_probs, relative_change, sweep_reference
from flowlib.variants import WINDOW_KINDS, blocked_states, cut_sweep, invert, schedule_label, window_schedules

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules():
    assert window_schedules("centred", 3, 5) == [(0, 1), (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4)]
    assert window_schedules("inverse", 3, 5) == [(2, 3, 4), (3, 4), (0, 4), (0, 1), (0, 1, 2)]
    assert window_schedules("cumulative-bottom", 3, 4) == [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3)]
    assert window_schedules("cumulative-top", 3, 4) == [(0, 1, 2, 3), (1, 2, 3), (2, 3), (3,)]
    assert invert(range(5), 5) == () and invert([1, 3], 5) == (0, 2, 4)
    assert [schedule_label(s) for s in [(), (3,), (0, 1, 2), (0, 1, 3, 4)]] == ["none", "3-3", "0-2", "0-1,3-4"]
    with pytest.raises(ValueError, match="unknown window kind"):
        window_schedules("sliding", 3, 5)
    with pytest.raises(ValueError, match="does not fit"):
        window_schedules("inverse", 6, 5)


def test_inverse_of_the_whole_depth_blocks_nothing(white_tiny):
    loaded, prepared, clean = white_tiny
    cut = cut_matrix(prepared.layout, ["Image->Question", "Question->Last"])
    for engine in ("reference", "fast"):
        states = blocked_states(
            loaded, prepared, cut, [invert(range(loaded.num_layers), loaded.num_layers)], engine=engine, clean=clean
        )
        assert torch.equal(states[0], clean.hidden_states[-1][0, -1]), engine


def test_cumulative_last_step_blocks_every_layer(white_tiny):
    loaded, prepared, clean = white_tiny
    flow = "Image->Question"
    with torch.no_grad(), knockout(loaded, prepared.layout, [flow], range(loaded.num_layers)) as ko:
        out = loaded.model(**prepared.inputs, output_hidden_states=True, logits_to_keep=1)
        direct = float(answer_probs(loaded.model, out.hidden_states[-1][0, -1][None], clean.answer_token)[0])
    assert all(ko.removed_edges())
    direct = relative_change(direct, clean.base_prob)
    cut = cut_matrix(prepared.layout, [flow])
    for engine in ("reference", "fast"):
        bottom = cut_sweep(loaded, prepared, cut, "cumulative-bottom", 3, clean=clean, engine=engine)
        top = cut_sweep(loaded, prepared, cut, "cumulative-top", 3, clean=clean, engine=engine)
        assert bottom.schedules[-1] == top.schedules[0] == tuple(range(loaded.num_layers))
        assert abs(bottom.relative_change[-1] - direct) <= 1e-5 and abs(top.relative_change[0] - direct) <= 1e-5
        assert np.abs(bottom.relative_change).max() > 1e-3  # the knockout does something


@pytest.mark.parametrize("kind", WINDOW_KINDS)
def test_fast_equals_reference_for_every_variant(white_tiny, kind):
    loaded, prepared, clean = white_tiny
    layout = prepared.layout
    cuts = {
        "flow": cut_matrix(layout, ["Image->Question"]),
        "two flows": cut_matrix(layout, ["Question->Last", "Last->Last"]),
        "control": matched_random_cut(layout, ["Related Image Patches->Question"], 1),
        "keep-only": keep_only_cut(layout, "Last", ["Question"]),
    }
    for name, cut in cuts.items():
        ref = cut_sweep(loaded, prepared, cut, kind, 3, clean=clean, engine="reference")
        for max_batch in (None, 2):
            fast = cut_sweep(loaded, prepared, cut, kind, 3, clean=clean, max_batch=max_batch)
            assert np.abs(fast.relative_change - ref.relative_change).max() <= 1e-5, (name, max_batch)
        assert np.abs(ref.relative_change).max() > 1e-3, name


def test_centred_cut_sweep_is_the_paper_sweep(white_tiny):
    loaded, prepared, clean = white_tiny
    for flow in ("Image->Question", "Last->Last"):
        ours = cut_sweep(loaded, prepared, cut_matrix(prepared.layout, [flow]), "centred", 3, clean=clean)
        paper = sweep_reference(loaded, prepared, flow, 3, clean=clean)
        np.testing.assert_allclose(ours.relative_change, paper.relative_change, atol=1e-5, rtol=0)
        frame = ours.to_frame()
        assert list(frame["window_layers"]) == [f"{w.start}-{w.stop - 1}" for w in paper.windows]
