"""The committed offline model: loads by its short name, matches its model card, and really uses the image.

The accuracy tests re-measure the model card's numbers on the fixed CI subset
(`flowlib.toy.evaluation.ci_samples`, 30 samples per task) as the card measured them, by the first
generated token (`mode="first_token"`), and check that on this model that is the full greedy answer,
judged as the knockout filter judges it; together they take well under a minute on two CPU cores.
"""

import json

import pytest
import torch

from flowlib import config as cfg
from flowlib.evaluate import (
    BLANK_COLOR,
    answer_candidates,
    blank_image,
    chance_accuracy,
    collate,
    evaluate,
    first_word,
    image_blocked_mask,
    next_token_logits,
)
from flowlib.models import load_model
from flowlib.sample import Sample
from flowlib.toy.model import ANSWER_WORDS, ToyConfig, answer_target, build_toy_model, toy_vocabulary

CHECKPOINT = cfg.SHORT_NAMES[cfg.OFFLINE_MODEL]
# The checkpoint is committed; without it these tests fail (a fresh clone always has it).
needs_checkpoint = pytest.mark.usefixtures("checkpoint")


@pytest.fixture(scope="module")
def checkpoint():
    assert (CHECKPOINT / "card.json").exists(), f"the committed toy-llava checkpoint is missing at {CHECKPOINT}"
    return CHECKPOINT


# ----------------------------------------------------------------------------- untrained builders


def test_vocabulary_has_lower_and_capitalised_answers():
    vocab = set(toy_vocabulary())
    for word in ANSWER_WORDS:
        assert word in vocab and answer_target(word) in vocab
    assert answer_target("red") == "Red"


def test_untrained_model_is_a_real_llava_with_twelve_layers():
    loaded = build_toy_model(ToyConfig(), seed=0)
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert loaded.num_layers == 12
    assert loaded.model.config.projector_hidden_act == "gelu"
    assert loaded.processor.image_processor.do_pad
    tokenizer = loaded.tokenizer
    for word in ANSWER_WORDS:  # each answer form is one token, never <unk>
        for form in (word, answer_target(word)):
            ids = tokenizer(form, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def test_image_blocked_mask_cuts_exactly_image_to_later_edges():
    ids = torch.tensor([[1, 2, 9, 9, 9, 3, 4, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    allowed = image_blocked_mask(ids, attention, image_token_id=9)[0, 0] == 0
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    expected = causal.clone()
    expected[:, 7] = False  # padded key
    expected[5:, 2:5] = False  # after the image -> no image key
    assert torch.equal(allowed, expected)


# ----------------------------------------------------------------------------- the committed model


@pytest.fixture(scope="module")
def toy():
    return load_model(cfg.OFFLINE_MODEL)


@pytest.fixture(scope="module")
def card():
    return json.loads((CHECKPOINT / "card.json").read_text())


@pytest.fixture(scope="module")
def ci_set():
    from flowlib.toy.evaluation import ci_samples

    return ci_samples()


@pytest.fixture(scope="module")
def ci_scores(toy, ci_set):
    """`ci_scores(**how)`: `evaluate(toy, ci_set, return_answers=True, **how)`, each `how` computed once per run."""
    done = {}

    def scores(**how):
        key = tuple(sorted(how.items()))
        if key not in done:
            done[key] = evaluate(toy, ci_set, return_answers=True, **how)
        return done[key]

    return scores


@needs_checkpoint
def test_loads_by_short_name_offline(toy):
    assert toy.name == cfg.OFFLINE_MODEL
    assert toy.num_layers == 12
    assert toy.image_mode == "pad"
    weights = CHECKPOINT / "model.safetensors"
    assert weights.exists() and weights.stat().st_size <= 20 * 2**20


@needs_checkpoint
def test_answers_with_the_capitalised_word(toy, ci_set):
    prepared = toy.prepare(ci_set[0])
    logits = next_token_logits(toy, collate([prepared], toy.tokenizer.pad_token_id))
    token = toy.tokenizer.convert_ids_to_tokens(int(logits.argmax()))
    assert token[:1].isupper() and token.lower() in ANSWER_WORDS
    assert first_word(toy, prepared) == token.lower()


@needs_checkpoint
def test_four_d_mask_without_cuts_reproduces_the_model(toy, ci_set):
    """The 4-D mask path is the model's own path: with only causal + padding, logits are unchanged."""
    batch = collate([toy.prepare(s) for s in ci_set[:3]], toy.tokenizer.pad_token_id)
    reference = next_token_logits(toy, batch)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    mask = image_blocked_mask(ids, attention, image_token_id=-1)  # no token has id -1: nothing is cut
    with torch.no_grad():
        out = toy.model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], use_cache=False)
    rows = torch.arange(len(ids))
    assert torch.allclose(out.logits[rows, batch["last"]], reference, atol=1e-5)
    assert not torch.allclose(next_token_logits(toy, batch, block_image=True), reference, atol=1e-3)


@needs_checkpoint
def test_cut_image_edges_leave_no_path_from_the_image(toy, ci_set):
    """With every image -> later edge cut, the answer logits do not depend on the pixels at all."""
    samples = ci_set[:3]
    pad = toy.tokenizer.pad_token_id
    real = collate([toy.prepare(s) for s in samples], pad)
    blank = collate([toy.prepare(s, image=blank_image(s.load_image())) for s in samples], pad)
    assert not torch.equal(real["pixel_values"], blank["pixel_values"])
    assert not torch.allclose(next_token_logits(toy, real), next_token_logits(toy, blank), atol=1e-3)
    assert torch.allclose(
        next_token_logits(toy, real, block_image=True), next_token_logits(toy, blank, block_image=True), atol=1e-5
    )


@pytest.mark.slow
@needs_checkpoint
def test_ci_accuracy_matches_model_card(card, ci_scores):
    recorded = card["evaluation"]["ci_subset"]
    measured = ci_scores(mode="first_token")
    assert abs(measured["mean"] - recorded["image"]["mean"]) <= 0.02
    for task, accuracy in recorded["image"]["per_task"].items():
        assert abs(measured["per_task"][task] - accuracy) <= 0.02 + 1e-9, task


@pytest.mark.slow
@needs_checkpoint
def test_greedy_answers_are_the_knockout_filters_verdicts_and_the_first_token(toy, ci_set):
    """Generated to the end, the toy model's answers get the filter's verdicts; they are one token, so the card's
    first-token rule gives the same answers."""
    from flowlib.answers import correct_samples
    from flowlib.evaluate import answer_verdicts

    samples = ci_set[::10]  # 3 per task
    generated = evaluate(toy, samples, return_answers=True)["answers"]
    verdicts = {}
    list(correct_samples(toy, samples, progress=False, verdicts=verdicts))
    assert answer_verdicts(samples, generated) == [verdicts[s.question_id] for s in samples]
    assert generated == evaluate(toy, samples, mode="first_token", return_answers=True)["answers"]


@pytest.mark.slow
@needs_checkpoint
def test_blank_and_blocked_accuracy_match_model_card(card, ci_set, ci_scores):
    recorded = card["evaluation"]["ci_subset"]
    blank = ci_scores(blank=True, mode="first_token")
    blocked = ci_scores(block_image=True, mode="first_token")
    assert abs(blank["mean"] - recorded["blank_image"]["mean"]) <= 0.02
    assert abs(blocked["mean"] - recorded["image_blocked"]["mean"]) <= 0.02
    assert blank_image(ci_set[0].load_image()).getpixel((0, 0)) == BLANK_COLOR


@pytest.mark.slow
@needs_checkpoint
def test_model_answers_from_the_image(ci_scores):
    measured = ci_scores(mode="first_token")
    assert measured["mean"] >= 0.85 and min(measured["per_task"].values()) >= 0.75


@pytest.mark.slow
@needs_checkpoint
def test_without_the_image_accuracy_falls_to_chance(ci_set, ci_scores):
    # Image cut off or blank, the model often answers no candidate at all (free answers fall below chance:
    # with a blank image the committed model names neither ChooseCat option); forced choice among the
    # candidates measures what it still knows about the answer.
    chance = chance_accuracy(s.task for s in ci_set)["mean"]
    seen = ci_scores(mode="first_token")["mean"]
    blank = ci_scores(blank=True, mode="first_token")["mean"]
    blank_choice = ci_scores(blank=True, forced_choice=True)["mean"]
    blocked = ci_scores(block_image=True, forced_choice=True)["mean"]
    assert seen - chance >= 0.2  # a drop, not a model at chance anyway (the targets: the test above)
    assert blank <= chance + 0.10  # no answering from the question alone
    assert abs(blank_choice - chance) <= 0.10 and abs(blocked - chance) <= 0.10  # the image, only through attention


@pytest.mark.slow
@needs_checkpoint
def test_forced_choice_picks_a_candidate_and_keeps_free_answers_that_are_one(ci_set, ci_scores):
    free = ci_scores(block_image=True, mode="first_token")["answers"]
    forced = ci_scores(block_image=True, forced_choice=True)["answers"]
    candidates = [answer_candidates(s) for s in ci_set]
    assert all(f in c for f, c in zip(forced, candidates))
    assert all(f == a for a, f, c in zip(free, forced, candidates) if a in c)
    assert sum(a not in c for a, c in zip(free, candidates)) > len(ci_set) / 2  # cut off, it mostly answers none


def test_forced_choice_needs_options_or_a_known_answer_set():
    assert answer_candidates(
        Sample("q", "is it red or blue?", "red", "ChooseAttr", true_option="Red", false_option="blue")
    ) == ("red", "blue")
    assert answer_candidates(Sample("q", "what do they share?", "size", "CompareAttr")) == ("color", "size", "texture")
    with pytest.raises(ValueError, match="no options and no known answer set"):
        answer_candidates(Sample("q", "which one?", "red", "ChooseCat"))
