"""Knockout context manager: exact when empty, effective when not and applied only where asked (in every family),
always restored."""

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from flowlib.flows import PAPER_FLOWS, FlowError, cut_matrix, parse_flow
from flowlib.knockout import KnockoutNotApplied, UnsupportedAttentionError, knockout, language_model
from tests.conftest import ALL_FAMILIES, logits, tiny_model, white_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def test_no_edges_blocked_gives_identical_logits(any_tiny):
    loaded = any_tiny
    prepared = loaded.prepare(white_sample())
    stock = logits(loaded, prepared)
    with knockout(loaded, prepared.layout, [], layers=range(loaded.num_layers)) as ko:
        empty_flows = logits(loaded, prepared)
    with knockout(loaded, prepared.layout, PAPER_FLOWS, layers=[]):
        no_layers = logits(loaded, prepared)
    assert ko.removed_edges() == [0] * loaded.num_layers
    assert torch.equal(empty_flows, stock) and torch.equal(no_layers, stock)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_blocking_everything_into_last_collapses_the_answer(family):
    loaded = tiny_model(family)
    with torch.no_grad():  # a confident model (sharp unembedding), so "collapse" is measurable
        loaded.model.lm_head.weight.mul_(40)
    prepared = loaded.prepare(white_sample())
    base = torch.softmax(logits(loaded, prepared)[0, -1].double(), -1)
    answer = int(base.argmax())
    with knockout(loaded, prepared.layout, ["All->Last"], layers=range(loaded.num_layers)) as ko:
        blocked = torch.softmax(logits(loaded, prepared)[0, -1].double(), -1)
    assert blocked[answer] < 0.01 * base[answer]  # what the answer rested on is gone
    assert ko.removed_edges() == [prepared.layout.seq_len - 1] * loaded.num_layers  # all but the self edge


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_the_text_model_cuts_edges_in_exactly_the_chosen_layers(any_tiny, backend):
    """The per-layer proof: the knockout counts the edges it cut in each layer, and under eager the attention
    weights show them at zero there (the rows renormalised), present elsewhere, and nothing changed before the
    first chosen layer or outside the target rows. The vision tower keeps its own attention."""
    loaded, chosen = any_tiny, [1, 2]
    loaded.model.set_attn_implementation(backend)
    try:
        prepared = loaded.prepare(white_sample())
        layout, eager = prepared.layout, backend == "eager"
        sources, targets = layout.group("Image"), layout.group("Question")
        vision = loaded.model.config.vision_config._attn_implementation
        with torch.no_grad():
            clean = loaded.model(**prepared.inputs, output_attentions=eager).attentions
            with knockout(loaded, layout, ["Image->Question"], chosen) as ko:
                assert ko.backend == backend and loaded.model.config.vision_config._attn_implementation == vision
                blocked = loaded.model(**prepared.inputs, output_attentions=eager).attentions
    finally:
        loaded.model.set_attn_implementation("sdpa")
    cut = len(sources) * len(targets)
    assert ko.removed_edges() == [cut if layer in chosen else 0 for layer in range(loaded.num_layers)]
    if eager:
        assert len(blocked) == loaded.num_layers
        for layer, (a, b) in enumerate(zip(clean, blocked)):
            edges = b[0][:, targets][:, :, sources]
            if layer in chosen:
                assert (edges == 0).all(), layer
                rest = b[0][:, targets].sum(-1)
                torch.testing.assert_close(rest, torch.ones_like(rest))  # the rows renormalise over what is left
            else:
                assert (edges > 0).all(), layer
            if layer < chosen[0]:
                assert torch.equal(a, b)  # before the window nothing changes, bit for bit
        others = np.setdiff1d(np.arange(layout.seq_len), targets)  # untouched rows of the first chosen layer
        assert torch.equal(clean[chosen[0]][0][:, others], blocked[chosen[0]][0][:, others])


def test_restores_the_model_after_an_exception(white_llava):
    loaded, prepared = white_llava
    model = loaded.model
    before = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    stock = logits(loaded, prepared)
    with pytest.raises(RuntimeError, match="boom"):
        with knockout(loaded, prepared.layout, ["Question->Last"], [0]) as ko:
            assert language_model(model).config._attn_implementation == ko.name
            raise RuntimeError("boom")
    after = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    assert after == before
    assert ko.name not in AttentionInterface._global_mapping and ko.name not in AttentionMaskInterface._global_mapping
    lm = language_model(model)
    assert not lm._forward_hooks and not lm._forward_pre_hooks
    assert torch.equal(logits(loaded, prepared), stock)


def test_detects_a_knockout_that_did_not_take_effect(white_llava):
    loaded, prepared = white_llava
    with pytest.raises(KnockoutNotApplied, match="never called"):
        with knockout(loaded, prepared.layout, ["Question->Last"], [1]):
            loaded.model.set_attn_implementation({"text_config": "sdpa"})  # someone switches it back
            logits(loaded, prepared)
    with pytest.raises(KnockoutNotApplied, match="never called"):
        with knockout(loaded, prepared.layout, ["Question->Last"], [1]) as ko:
            AttentionInterface.register(ko.name, sdpa_attention_forward)  # a later registration replaces ours
            logits(loaded, prepared)
    assert loaded.model.config.text_config._attn_implementation == "sdpa"


def test_refuses_other_attention_implementations(white_llava):
    loaded, prepared = white_llava
    AttentionInterface.register("someone_elses", sdpa_attention_forward)
    AttentionMaskInterface.register("someone_elses", AttentionMaskInterface._global_mapping["sdpa"])
    try:
        for name in ("flex_attention", "someone_elses"):
            try:
                loaded.model.set_attn_implementation({"text_config": name})
            except (ImportError, ValueError):  # flex may be unavailable in a torch build
                continue
            with pytest.raises(UnsupportedAttentionError, match=name):
                with knockout(loaded, prepared.layout, ["Question->Last"], [0]):
                    pass
    finally:
        loaded.model.set_attn_implementation({"text_config": "sdpa"})
        AttentionInterface._global_mapping.pop("someone_elses")
        AttentionMaskInterface._global_mapping.pop("someone_elses")


def test_bad_flows_and_groups_raise(white_llava):
    loaded, prepared = white_llava
    with pytest.raises(FlowError, match="Related Image Patches"):  # the message lists the valid groups
        parse_flow("Picture->Question")
    with pytest.raises(FlowError):
        parse_flow("Image-Question")
    no_boxes = loaded.prepare(white_sample(boxes=(), qid="nobox"))
    with pytest.raises(FlowError, match=r"sample nobox: group 'Related Image Patches'"):
        with knockout(loaded, no_boxes.layout, ["Related Image Patches->Question"], [0]):
            pass
    with pytest.raises(FlowError, match="removes no edge"):  # keys after every query: causal already forbids it
        cut_matrix(prepared.layout, ["Last->Image"])
    with pytest.raises(FlowError, match="nothing to attend to"):
        cut_matrix(prepared.layout, ["All->All"])
    with pytest.raises(ValueError, match="do not exist"):
        with knockout(loaded, prepared.layout, ["Question->Last"], [loaded.num_layers]):
            pass


def test_self_edge_cut_only_when_asked(white_llava):
    loaded, prepared = white_llava
    last = prepared.layout.seq_len - 1
    cut = cut_matrix(prepared.layout, ["Last->Last"])
    assert cut.sum() == 1 and cut[last, last]
    question = prepared.layout.group("Question")
    cut = cut_matrix(prepared.layout, ["Question->Question"])
    assert cut[question, question].all()
    cut = cut_matrix(prepared.layout, ["Image->Related Image Patches"])
    related = prepared.layout.group("Related Image Patches")
    assert not cut[related, related].any() and cut.sum() > 0


def test_cut_matrix_equals_its_definition_on_random_groups():
    """True exactly where a target query may no longer see a causal source key (the diagonal only for A->A)."""
    from flowlib.layout import TokenLayout

    rng = np.random.default_rng(0)
    empty = np.zeros(0, dtype=np.int64)
    for trial in range(20):
        n = int(rng.integers(8, 60))
        image, question = (
            np.sort(rng.choice(n - 1, size=int(rng.integers(1, n // 2)), replace=False)) for _ in range(2)
        )
        layout = TokenLayout(f"r{trial}", n, image, question, np.array([n - 1]), *[empty] * 11)
        for flow in ("Image->Question", "Question->Last", "Image->Last", "Last->Last", "Question->Question"):
            source, target = (layout.group(g) for g in flow.split("->"))
            want = torch.zeros(n, n, dtype=torch.bool)
            for q in target:
                for k in source:
                    want[q, k] = bool(k < q or (k == q and flow.split("->")[0] == flow.split("->")[1]))
            if not want.any():
                with pytest.raises(FlowError, match="removes no edge"):
                    cut_matrix(layout, [flow])
                continue
            if (want.sum(-1) == torch.arange(n) + 1).any():
                with pytest.raises(FlowError, match="nothing to attend to"):
                    cut_matrix(layout, [flow])
                continue
            assert torch.equal(cut_matrix(layout, [flow]), want), (trial, flow)
