"""Evaluation: batches give each row its own logits, answers are judged as the knockout filter judges them,
forced choice scores whole candidates."""

import dataclasses

import pytest
import torch

from flowlib.answers import correct_samples, greedy_answer
from flowlib.evaluate import (
    answer_token_ids,
    answer_verdicts,
    blank_image,
    candidate_scores,
    collate,
    evaluate,
    generated_answer,
    image_blocked_answer,
    image_blocked_mask,
    logits_at,
    next_token_logits,
    score,
    score_by_answer,
)
from flowlib.families.tiny import tiny_family
from flowlib.lens import first_token
from flowlib.sample import Sample
from tests.conftest import make_sample

#: Images of different aspect ratios: LLaVA-NeXT gives them different tile counts and token counts.
SIZES = ((320, 240), (100, 300), (300, 100), (200, 200))


def samples_of_sizes(**overrides):
    return [make_sample(w, h, seed=i, question_id=f"q{i}", **overrides) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def tiny_qwen():
    return tiny_family("qwen2.5-vl", layers=3, max_pixels=28 * 28 * 64)


@pytest.fixture(scope="module")
def tiny_onevision():
    return tiny_family("llava-onevision", layers=3, image_size=60)


@pytest.fixture(params=["llava-1.5", "llava-next", "qwen2.5-vl", "llava-onevision"])
def tiny(request):
    """A tiny model of each family; Qwen's batches carry grid sizes and per-token types as well."""
    fixture = {"llava-1.5": "tiny15", "llava-next": "tiny_next", "qwen2.5-vl": "tiny_qwen"}
    return request.getfixturevalue(fixture.get(request.param, "tiny_onevision"))


@pytest.mark.parametrize("block_image", [False, True])
def test_a_batch_gives_each_row_the_logits_it_gets_alone(tiny, block_image):
    prepared = [tiny.prepare(s) for s in samples_of_sizes()]
    pad = tiny.tokenizer.pad_token_id
    lengths = [p.input_ids.shape[1] for p in prepared]
    if tiny.adapter.name == "llava-next":  # the case that crashed: different tile and token counts
        assert len({p.inputs["pixel_values"].shape[1] for p in prepared}) > 1 and len(set(lengths)) > 1
    batched = logits_at(tiny, collate(prepared, pad), [range(n) for n in lengths], block_image)
    for p, n, rows in zip(prepared, lengths, batched):
        alone = logits_at(tiny, collate([p], pad), [range(n)], block_image)[0]
        assert torch.allclose(rows, alone, atol=1e-5), (p.sample.question_id, (rows - alone).abs().max())


def reference_logits(tiny, p, tokens=()):
    """Logits of every position of `p` (+ `tokens`) under the independent 4-D mask that cuts image -> later edges."""
    row = collate([p], 0, [list(tokens)])
    inputs = {k: row[k] for k in row["model_inputs"]}
    ids = inputs["input_ids"]
    positions = tiny.adapter.position_ids(tiny.model, inputs)  # Qwen reads its 3-D positions off a 2-D mask
    if positions is not None:
        inputs["position_ids"] = positions
    inputs["attention_mask"] = image_blocked_mask(ids, torch.ones_like(ids), tiny.model.config.image_token_id)
    with torch.no_grad():
        return tiny.model(use_cache=False, **inputs).logits[0].float()


def test_the_blocked_image_is_the_verified_knockout_and_matches_an_independent_mask(tiny):
    """After the image, the knockout's logits equal those of a 4-D mask built without flowlib's knockout."""
    pad, image_token = tiny.tokenizer.pad_token_id, tiny.model.config.image_token_id
    for p in [tiny.prepare(s) for s in samples_of_sizes()[:2]]:
        after = range(int((p.input_ids[0] == image_token).nonzero().max()) + 1, p.input_ids.shape[1])
        cut = logits_at(tiny, collate([p], pad), [after], block_image=True)[0]
        assert torch.allclose(reference_logits(tiny, p)[after.start :], cut, atol=1e-5)
        clean = logits_at(tiny, collate([p], pad), [after])[0]
        assert not torch.allclose(clean, cut, atol=1e-3)  # the cut changes the answer positions' logits


def test_blocked_generation_is_greedy_decoding_under_the_independent_mask(tiny):
    for p in [tiny.prepare(s) for s in samples_of_sizes()[:2]]:
        new = []
        for _ in range(10):  # the reference decoder: argmax under the 4-D mask, the whole sequence each step
            token = int(reference_logits(tiny, p, new)[-1].argmax())
            if token in tiny.stop_token_ids:
                break
            new.append(token)
        assert image_blocked_answer(tiny, p) == tiny.tokenizer.decode(new, skip_special_tokens=True)


def test_generation_with_the_image_cut_off_ignores_the_pixels(tiny):
    for s in samples_of_sizes()[:2]:
        real, blank = tiny.prepare(s), tiny.prepare(s, image=blank_image(s.load_image()))
        assert generated_answer(tiny, real, block_image=True) == generated_answer(tiny, blank, block_image=True)


def test_generated_answers_are_judged_as_the_knockout_filter_judges_them(tiny):
    """An answer of several tokens is correct when all of it matches the dataset's answer, not its first token."""
    samples = samples_of_sizes()[:3]
    answers = [greedy_answer(tiny, tiny.prepare(s)) for s in samples]
    several = [i for i, a in enumerate(answers) if len(a.split()) > 1]
    assert several  # a random model rambles on
    # Each sample labelled with the model's whole answer (in upper case), and a copy with its first word only.
    labelled = [dataclasses.replace(s, answer=a.upper()) for s, a in zip(samples, answers)]
    firsts = [answers[i].split()[0].lower() for i in several]
    labelled += [dataclasses.replace(samples[i], question_id=f"first{i}", answer=w) for i, w in zip(several, firsts)]
    verdicts = {}
    kept = [s.question_id for s in correct_samples(tiny, labelled, progress=False, verdicts=verdicts)]
    assert kept == [s.question_id for s in samples]
    generated = evaluate(tiny, labelled, return_answers=True)
    assert answer_verdicts(labelled, generated["answers"]) == [verdicts[s.question_id] for s in labelled]
    assert generated["correct"] == {"ChooseAttr": len(samples)} and generated["n"] == {"ChooseAttr": len(labelled)}
    first = evaluate(tiny, labelled, mode="first_token", return_answers=True)
    assert first["answers"] == [a.split()[0].lower() for a in answers] + firsts
    judged = answer_verdicts(labelled, first["answers"])
    assert judged == [i not in several for i in range(len(samples))] + [True] * len(several)
    with pytest.raises(ValueError, match="mode"):
        evaluate(tiny, labelled, mode="first_word")


def test_forced_choice_scores_every_token_of_each_candidate(tiny):
    """Each candidate's score is its likelier form's teacher-forced log-probability, summed over all its tokens."""
    samples = samples_of_sizes()[:3]
    prepared = [tiny.prepare(s) for s in samples]
    candidates = [("left side", "right"), ("red", "blue star"), ("yes", "no")]
    pad = tiny.tokenizer.pad_token_id
    for block_image in (False, True):
        scores = candidate_scores(tiny, prepared, candidates, batch_size=3, block_image=block_image)
        for p, words, got in zip(prepared, candidates, scores):
            assert list(got) == list(words)
            n = p.input_ids.shape[1]
            for word in words:
                totals = []
                for form in (word, word.capitalize()):
                    ids = answer_token_ids(tiny.tokenizer, form)
                    batch = collate([p], pad, [ids])
                    logits = logits_at(tiny, batch, [range(n - 1, n + len(ids) - 1)], block_image)[0]
                    totals.append(float(logits.log_softmax(-1)[torch.arange(len(ids)), torch.tensor(ids)].sum()))
                assert len(answer_token_ids(tiny.tokenizer, word)) == len(word.split())
                assert got[word] == pytest.approx(max(totals), abs=1e-4)


@pytest.fixture(scope="module")
def toy():
    from flowlib.models import load_model

    return load_model("toy-llava")


@pytest.fixture(scope="module")
def synthetic():
    from flowlib.data.sources import load_samples

    return [s for samples in load_samples("synthetic", per_task=5).values() for s in samples]


@pytest.mark.parametrize("how", [{}, {"block_image": True}, {"blank": True}])
def test_forced_choice_on_one_token_candidates_picks_what_the_first_token_picked(toy, synthetic, how):
    """On the toy model every candidate is one token: whole-sequence scores pick as first-token logits did."""
    from flowlib.evaluate import answer_candidates

    image = (lambda s: blank_image(s.load_image())) if how.get("blank") else (lambda s: None)
    prepared = [toy.prepare(s, image=image(s)) for s in synthetic]
    logits = next_token_logits(toy, collate(prepared, toy.tokenizer.pad_token_id), how.get("block_image", False))
    before = []
    for row, s in zip(logits, synthetic):
        words = answer_candidates(s)
        assert all(len(answer_token_ids(toy.tokenizer, f)) == 1 for w in words for f in (w, w.capitalize()))
        best = [max(row[first_token(toy.tokenizer, f)] for f in (w, w.capitalize())) for w in words]
        before.append(words[int(torch.stack(best).argmax())])
    assert evaluate(toy, synthetic, forced_choice=True, return_answers=True, **how)["answers"] == before


def test_score_counts_verdicts_per_task_and_refuses_answers():
    samples = [
        Sample(f"q{i}", "is it red?", answer, task)
        for i, (task, answer) in enumerate([("ChooseAttr", "red"), ("ChooseAttr", "Blue"), ("LogicalObj", "yes")])
    ]
    verdicts = answer_verdicts(samples, ["Red ", "red", "yes"])
    assert verdicts == [True, False, True]
    scores = score(samples, verdicts)
    assert scores["n"] == {"ChooseAttr": 2, "LogicalObj": 1} and scores["correct"] == {"ChooseAttr": 1, "LogicalObj": 1}
    assert scores["per_task"] == {"ChooseAttr": 0.5, "LogicalObj": 1.0} and scores["mean"] == 0.75
    with pytest.raises(TypeError, match="verdicts"):
        score(samples, ["red", "red", "yes"])
    with pytest.raises(TypeError, match="verdicts"):
        score_by_answer(samples, ["red", "red", "yes"])
