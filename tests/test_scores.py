"""Sample modes and scores: the paper's metric by default, the others checked against plain forwards."""

import numpy as np
import pytest
import torch

from flowlib.flows import cut_matrix
from flowlib.scores import (
    PAPER_SCORE,
    SAMPLE_MODES,
    continuation_logprobs,
    mode_table,
    score_sweep,
    score_table,
    select_samples,
)
from flowlib.sweep import clean_pass
from flowlib.variants import cut_sweep
from tests.conftest import white_sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(white_llava):
    """(loaded, prepared, clean pass) of each family's 4-layer tiny LLaVA."""
    loaded, prepared = white_llava
    return loaded, prepared, clean_pass(loaded, prepared)


def test_multi_token_score_is_the_sum_of_a_plain_forwards_log_probabilities(tiny):
    loaded, prepared, _ = tiny
    tokens = loaded.tokenizer.encode("red blue star", add_special_tokens=False)
    assert len(tokens) == 3
    ids = torch.cat([prepared.input_ids, torch.tensor([tokens[:-1]])], dim=1)
    with torch.no_grad():
        inputs = {**prepared.inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        logits = loaded.model(**inputs).logits[0].double()
    n = prepared.input_ids.shape[1]
    plain = sum(float(torch.log_softmax(logits[n - 1 + i], -1)[t]) for i, t in enumerate(tokens))
    ours = continuation_logprobs(loaded, prepared, tokens)
    # Both are float32 forwards, but of different lengths: the CPU's BLAS may pick other kernels for each
    # (4.6e-8 apart on an AVX2-only EPYC), so equal means equal to float32 rounding of the summed logits.
    assert ours.shape == (3,) and ours.sum() == pytest.approx(plain, abs=1e-6)
    # the knockout reaches the teacher-forced tokens: blocking the question from the last position moves them
    cut = cut_matrix(prepared.layout, ["Question->Last"])
    blocked = continuation_logprobs(loaded, prepared, tokens, cut, range(loaded.num_layers))
    assert abs(blocked[0] - ours[0]) > 1e-6


def test_scores_agree_where_they_must(tiny):
    loaded, prepared, clean = tiny
    cut = cut_matrix(prepared.layout, ["Image->Question"])
    table = score_sweep(
        loaded, prepared, cut, "centred", 3, scores=("predicted", "gold", "sequence", "margin"), clean=clean
    )
    by = {s: f.reset_index(drop=True) for s, f in table.groupby("score")}
    paper = cut_sweep(loaded, prepared, cut, "centred", 3, clean=clean)
    np.testing.assert_array_equal(by[PAPER_SCORE]["change"], paper.relative_change)  # the default is the paper's
    # a one-token answer: the length-normalised score's change is the gold token's relative change
    np.testing.assert_allclose(by["sequence"]["change"], by["gold"]["change"], atol=1e-3, rtol=0)

    # gold: the answer in its likelier form (the filter ignores case); the margin: each option likewise
    def best(word):
        forms = [loaded.tokenizer.encode(w, add_special_tokens=False) for w in (word, word.capitalize())]
        return max((continuation_logprobs(loaded, prepared, ids).sum(), ids) for ids in forms)

    assert (by["gold"]["token"] == best("red")[1][0]).all() and (by["sequence"]["engine"] == "reference").all()
    assert by["margin"]["base"].iloc[0] == pytest.approx(best("red")[0] - best("blue")[0], abs=1e-12)
    with pytest.raises(ValueError, match="unknown score"):
        score_sweep(loaded, prepared, cut, scores=("loss",), clean=clean)


def test_margin_needs_two_options(tiny):
    loaded, _, _ = tiny
    sample = white_sample(qid="q-open")
    sample.true_option = sample.false_option = None
    prepared = loaded.prepare(sample)
    with pytest.raises(ValueError, match="true and a false option"):
        score_sweep(loaded, prepared, cut_matrix(prepared.layout, ["Image->Question"]), scores=("margin",))
    table = score_table(loaded, [sample], ["Image->Question"], 3, scores=("predicted", "margin"))
    assert set(table["score"]) == {"predicted"} and set(table["mode"]) == {"correct"}


def test_sample_modes_partition_the_samples(tiny):
    loaded, _, _ = tiny
    samples = [white_sample(qid=f"q{i}") for i in range(3)]
    for i, s in enumerate(samples):  # answers the tiny model may or may not give
        s.answer = ["red", "blue", "star"][i]
    verdicts = {}
    chosen = {mode: select_samples(loaded, samples, mode, verdicts=verdicts) for mode in SAMPLE_MODES}
    ids = {mode: {s.question_id for group in kept.values() for s in group} for mode, kept in chosen.items()}
    assert ids["correct"] | ids["wrong"] == ids["all"] == {"q0", "q1", "q2"}
    assert not ids["correct"] & ids["wrong"]
    assert set(verdicts) == {"q0", "q1", "q2"} and ids["correct"] == {q for q, ok in verdicts.items() if ok}
    assert len(select_samples(loaded, samples, "all", per_task=2)["ChooseAttr"]) == 2
    with pytest.raises(ValueError, match="unknown sample mode"):
        select_samples(loaded, samples, "right")


def test_mode_table_labels_each_curve(tiny):
    loaded, _, _ = tiny
    table = mode_table(loaded, {"correct": [white_sample()], "wrong": []}, ["Question->Last"], 3, scores=("gold",))
    assert set(table["line"]) == {"correct · Question->Last"} and len(table) == loaded.num_layers
    assert mode_table(loaded, {"wrong": []}, ["Question->Last"], 3).empty


def test_the_papers_score_is_labelled(tiny):
    loaded, _, _ = tiny
    table = mode_table(loaded, {"correct": [white_sample()]}, ["Question->Last"], 3, scores=("predicted", "gold"))
    assert set(table["panel"]) == {
        "predicted (the paper's): change in probability (%)",
        "gold: change in probability (%)",
    }
