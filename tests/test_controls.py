"""Matched random controls and keep-only masks: the same edges' count in the same layers, seeded, verified."""

import numpy as np
import pytest
import torch

from flowlib.controls import (
    control_sweeps,
    control_table,
    keep_only_cut,
    mask_cut,
    matched_random_cut,
    overlap,
    variant_table,
)
from flowlib.flows import PAPER_FLOWS, FlowError, cut_matrix
from flowlib.knockout import knockout
from flowlib.sweep import sweep_reference
from flowlib.variants import WINDOW_KINDS, cut_sweep
from tests.conftest import white_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def removed(loaded, prepared, layers, **kwargs):
    with torch.no_grad(), knockout(loaded, prepared.layout, layers=layers, **kwargs) as ko:
        loaded.model(**prepared.inputs)
    return ko.removed_edges()


@pytest.mark.parametrize("flow", PAPER_FLOWS)
def test_control_cuts_as_many_edges_as_its_flow_in_the_same_layers(white_tiny, flow):
    loaded, prepared, _ = white_tiny
    layers = [1, 2]
    flow_counts = removed(loaded, prepared, layers, flows=[flow])
    control = matched_random_cut(prepared.layout, [flow], seed=0)
    assert removed(loaded, prepared, layers, flows=[], cut=control) == flow_counts
    assert [i for i, c in enumerate(flow_counts) if c] == layers
    # Row by row: the same query positions lose the same number of keys.
    flow_cut = cut_matrix(prepared.layout, [flow])
    assert torch.equal(control.sum(dim=1), flow_cut.sum(dim=1))


@pytest.mark.parametrize("flow", ["Image->Question", "Question->Last", "Last->Last"])
def test_control_draws_are_seeded(white_tiny, flow):
    layout = white_tiny[1].layout
    draws = [matched_random_cut(layout, [flow], seed=s) for s in (0, 0, 1, 2)]
    assert torch.equal(draws[0], draws[1])
    flow_cut = cut_matrix(layout, [flow])
    if flow != "Last->Last" or layout.seq_len > 3:
        assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[2], draws[3])
    for draw in draws:  # never an empty row, never a later key, never a row the flow leaves alone
        assert not torch.triu(draw, 1).any()
        assert not (draw.any(dim=1) & ~flow_cut.any(dim=1)).any()
    # another sample, same seed: other edges
    other = white_tiny[0].prepare(white_sample(qid="q2")).layout
    assert not torch.equal(matched_random_cut(other, [flow], 0), draws[0]) or flow == "Last->Last"


def test_control_excluding_the_flow_and_its_overlap(white_tiny):
    layout = white_tiny[1].layout
    flow_cut = cut_matrix(layout, ["Question->Last"])
    apart = matched_random_cut(layout, ["Question->Last"], 3, exclude_flow=True)
    assert overlap(apart, flow_cut) == 0.0 and int(apart.sum()) == int(flow_cut.sum())
    assert overlap(flow_cut, flow_cut) == 1.0
    with pytest.raises(FlowError, match="fewer edges outside"):  # the image is most of what the question sees
        matched_random_cut(layout, ["Image->Question"], 0, exclude_flow=True)


def test_keep_only_with_every_source_kept_is_no_knockout(white_tiny):
    loaded, prepared, clean = white_tiny
    everything = keep_only_cut(prepared.layout, "Last", ["All"])
    assert not everything.any()
    with torch.no_grad():
        stock = loaded.model(**prepared.inputs).logits
        with knockout(loaded, prepared.layout, [], range(loaded.num_layers), cut=everything) as ko:
            kept = loaded.model(**prepared.inputs).logits
    assert ko.removed_edges() == [0] * loaded.num_layers
    assert torch.equal(kept, stock)
    sweep = cut_sweep(loaded, prepared, everything, "centred", 3, clean=clean, engine="reference")
    assert np.all(sweep.relative_change == 0.0)


def test_keep_only_and_the_flow_make_up_everything_into_the_target(white_tiny):
    layout = white_tiny[1].layout
    keep = keep_only_cut(layout, "Question", ["Image"])
    assert not (keep & cut_matrix(layout, ["Image->Question"])).any()
    assert torch.equal(keep | cut_matrix(layout, ["Image->Question"]), cut_matrix(layout, ["All->Question"]))
    with pytest.raises(FlowError):
        keep_only_cut(layout, "Question", ["Nowhere"])


def test_controls_fast_equal_reference_and_differ_from_the_flow(white_tiny):
    loaded, prepared, clean = white_tiny
    for flow in ("Image->Question", "Question->Last", "Other Image Patches->Question"):
        fast = control_sweeps(loaded, prepared, flow, 3, seeds=(0, 1), clean=clean)
        ref = control_sweeps(loaded, prepared, flow, 3, seeds=(0, 1), clean=clean, engine="reference")
        assert np.abs(fast["relative_change"] - ref["relative_change"]).max() <= 1e-5, flow
        # the flow's rows are the flow's own sweep
        flow_rows = fast[fast["kind"] == "flow"]["relative_change"].to_numpy()
        np.testing.assert_allclose(
            flow_rows, sweep_reference(loaded, prepared, flow, 3, clean=clean).relative_change, atol=1e-5, rtol=0
        )
        assert set(fast["seed"]) == {-1, 0, 1} and (fast.groupby("seed")["edges"].nunique() == 1).all()
        assert fast["edges"].nunique() == 1  # the controls cut exactly the flow's count


def test_control_table_leaves_out_samples_without_a_group(white_tiny):
    loaded, _, _ = white_tiny
    outside = white_sample(boxes=[], qid="q-nobox")
    table = control_table(
        loaded,
        {"ChooseAttr": [white_sample(), outside]},
        ["Related Image Patches->Question"],
        3,
        seeds=(0,),
        progress=False,
    )
    assert set(table["question_id"]) == {"q1"} and set(table["task"]) == {"ChooseAttr"}
    assert [(q, f) for q, f, _ in table.attrs["excluded"]] == [("q-nobox", "Related Image Patches->Question")]


def test_named_masks_and_the_variant_table(white_tiny):
    loaded, prepared, _ = white_tiny
    layout = prepared.layout
    assert torch.equal(mask_cut(layout, "Image->Question"), cut_matrix(layout, ["Image->Question"]))
    assert torch.equal(
        mask_cut(layout, "only Question + Image->Last"), keep_only_cut(layout, "Last", ["Question", "Image"])
    )
    table = variant_table(
        loaded, [white_sample()], ["Question->Last", "only Question->Last"], 3, kinds=WINDOW_KINDS, progress=False
    )
    assert len(table) == 2 * len(WINDOW_KINDS) * loaded.num_layers
    assert set(table["window_kind"]) == set(WINDOW_KINDS) and set(table["task"]) == {"ChooseAttr"}


def test_a_cut_matrix_is_checked_before_any_forward(white_tiny):
    loaded, prepared, _ = white_tiny
    n = prepared.layout.seq_len
    good = cut_matrix(prepared.layout, ["Question->Last"])
    bad = {
        "must be bool": good.int(),
        "must be bool \\(": good[:-1, :-1],
        "later keys": good | torch.eye(n, dtype=torch.bool).roll(1, dims=1).triu(1),
        "nothing to attend to": good | torch.tril(torch.ones(n, n, dtype=torch.bool))[[n - 1]].expand(n, n).tril(),
    }
    for message, cut in bad.items():
        with pytest.raises(FlowError, match=message), knockout(loaded, prepared.layout, [], [0], cut=cut):
            pass
            pass
    with (
        pytest.raises(FlowError, match="either flows or a cut"),
        knockout(loaded, prepared.layout, ["Image->Last"], [0], cut=good),
    ):
        pass
