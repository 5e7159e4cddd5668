"""Greedy answers and accuracy per task, with the image shown, withheld (blank) or cut off by attention.

The model's answer is its first generated word, lowercased and stripped (LLaVA
answers "Red" to a lowercase question; the dataset's answer is "red"). With a
word-level tokenizer the first word is the first token, so one forward pass and
an argmax at the last prompt position is exactly greedy decoding's first step.

`block_image=True` cuts, in every decoder layer, every attention edge from an
image token to every position after the image block (a 4-D additive mask: the
causal and padding mask plus `-inf` on those edges). The image then reaches the
answer through no path at all, which is what the paper's attention-knockout
method assumes.

`forced_choice=True` scores instead the candidate answer (the two options, or the
task's answer set) with the highest logit at that position, in either case: with
the image cut off a model may answer no candidate at all (the toy model says
"circle" to most questions), which free answers count as wrong, below chance;
forced choice measures what the model still knows about the answer.

Example:
    >>> scores = evaluate(loaded, samples)                 # {"per_task": {...}, "mean": 0.93, ...}
    >>> evaluate(loaded, samples, blank=True)["mean"]      # image withheld
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from PIL import Image

from .lens import first_token
from .sample import TASKS, Sample

#: The answers a synthetic question can have where it offers no options of its own; the others offer two.
ANSWER_SETS = {"CompareAttr": ("color", "size", "texture"), "LogicalObj": ("yes", "no"), "QueryAttr": ("left", "right")}
#: Chance accuracy of each task of the synthetic world: one over its number of candidate answers.
CHANCE = {task: 1 / len(ANSWER_SETS.get(task, ("true option", "false option"))) for task in TASKS}
#: The synthetic world's background: a "blank" image is an empty scene of the same size.
BLANK_COLOR = (232, 232, 226)


def blank_image(image: Image.Image, color=BLANK_COLOR) -> Image.Image:
    """A uniform image of the same size as `image` (default: the synthetic world's empty background)."""
    return Image.new("RGB", image.size, tuple(color))


def chance_accuracy(tasks: Iterable[str]) -> dict:
    """Chance accuracy per task and their mean (as `evaluate` averages: over tasks)."""
    per_task = {t: CHANCE[t] for t in dict.fromkeys(tasks)}
    return {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task)}


def answer_candidates(sample: Sample) -> tuple[str, ...]:
    """The answers forced choice picks from: the sample's two options, else its task's answer set."""
    if sample.has_options:
        return (sample.true_option.strip().lower(), sample.false_option.strip().lower())
    if sample.task in ANSWER_SETS:
        return ANSWER_SETS[sample.task]
    raise ValueError(f"sample {sample.question_id}: task {sample.task} has no options and no known answer set; "
                     "forced choice needs one (give true_option and false_option)")


def image_blocked_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                       dtype=torch.float32) -> torch.Tensor:
    """Additive mask (B, 1, T, T): causal + padding, and no edge image -> any position after the image.

    Args:
        input_ids: (B, T) token ids, right-padded.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        image_token_id: the id of the image placeholder tokens (one contiguous block per row).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    positions = torch.arange(length, device=device)
    allowed = positions[None, :] <= positions[:, None]  # (T, T) causal: key <= query
    allowed = allowed[None] & attention_mask.bool()[:, None, :]  # no padded keys
    is_image = input_ids == image_token_id  # (B, T)
    last_image = torch.where(is_image, positions, -1).max(dim=1).values  # (B,)
    after_image = positions[None, :] > last_image[:, None]  # (B, T) queries after the image block
    cut = after_image[:, :, None] & is_image[:, None, :]  # (B, Tq, Tk)
    allowed = allowed & ~cut
    mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def collate(prepared: Sequence, pad_token_id: int) -> dict:
    """Right-pad the inputs of several prepared samples into one batch (pixel values stacked)."""
    lengths = [p.input_ids.shape[1] for p in prepared]
    length = max(lengths)
    device = prepared[0].input_ids.device
    input_ids = torch.full((len(prepared), length), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prepared), length), dtype=torch.long, device=device)
    for row, (p, n) in enumerate(zip(prepared, lengths)):
        input_ids[row, :n] = p.input_ids[0]
        attention_mask[row, :n] = 1
    pixel_values = torch.cat([p.inputs["pixel_values"] for p in prepared])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "last": torch.tensor(lengths, device=device) - 1}


@torch.no_grad()
def next_token_logits(loaded, batch: dict, block_image: bool = False) -> torch.Tensor:
    """Logits (B, vocab) at each row's last real position."""
    attention_mask = batch["attention_mask"]
    if block_image:
        attention_mask = image_blocked_mask(batch["input_ids"], attention_mask,
                                            loaded.model.config.image_token_id, loaded.dtype)
    out = loaded.model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                       pixel_values=batch["pixel_values"], use_cache=False)
    rows = torch.arange(len(batch["last"]), device=out.logits.device)
    return out.logits[rows, batch["last"]].float()


def decode_answer(tokenizer, token_id: int) -> str:
    """The first generated word as an answer: decoded, stripped and lowercased."""
    return tokenizer.decode([int(token_id)]).strip().lower()


def first_words(loaded, prepared: Sequence, batch_size: int = 32, block_image: bool = False,
                candidates: Optional[Sequence[Sequence[str]]] = None) -> list[str]:
    """Greedy first words (lowercased) for prepared inputs, batched with right padding.

    One forward pass and an argmax, no generation loop: exact for the toy model's one-token answers.
    The knockout runner's correct-answer filter generates the whole answer (`runner.greedy_answer`).
    With `candidates` (one list of lowercase words per input), each answer is instead the candidate
    whose first token, lowercase or capitalised, has the highest logit.
    """
    answers = []
    pad = loaded.tokenizer.pad_token_id
    for start in range(0, len(prepared), batch_size):
        batch = collate(prepared[start:start + batch_size], pad)
        logits = next_token_logits(loaded, batch, block_image)
        if candidates is None:
            answers += [decode_answer(loaded.tokenizer, i) for i in logits.argmax(-1)]
            continue
        for row, words in zip(logits, candidates[start:start + batch_size]):
            scores = [max(row[first_token(loaded.tokenizer, form)] for form in (word, word.capitalize()))
                      for word in words]
            answers.append(words[int(torch.stack(scores).argmax())])
    return answers


def first_word(loaded, prepared, block_image: bool = False) -> str:
    """The greedy first word (lowercased, stripped) of one prepared input."""
    return first_words(loaded, [prepared], 1, block_image)[0]


def evaluate(loaded, samples: Sequence[Sample], *, blank: bool = False, block_image: bool = False,
             forced_choice: bool = False, batch_size: int = 32, return_answers: bool = False) -> dict:
    """Accuracy per task (and the mean over tasks) of greedy first words against the samples' answers.

    Args:
        loaded: a `flowlib.models.LoadedModel`.
        samples: the samples to answer.
        blank: replace each image by a blank one of the same size (`blank_image`).
        block_image: cut every edge image -> later positions in all layers (`image_blocked_mask`).
        forced_choice: score the likeliest of the sample's candidate answers (`answer_candidates`).
        batch_size: samples per forward pass.
        return_answers: also return the list of answers given.
    """
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        answers: list[str] = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            prepared = [loaded.prepare(s, image=blank_image(s.load_image()) if blank else None) for s in chunk]
            candidates = [answer_candidates(s) for s in chunk] if forced_choice else None
            answers += first_words(loaded, prepared, batch_size, block_image, candidates)
    finally:
        loaded.model.train(was_training)
    result = score(samples, answers)
    if return_answers:
        result["answers"] = answers
    return result


def correct_answer(sample: Sample) -> str:
    """The sample's answer as `score` compares it with a first word: stripped and lowercased."""
    return sample.answer.strip().lower()


def score(samples: Sequence[Sample], answers: Sequence[str]) -> dict:
    """Accuracy per task, the mean over tasks, and counts, for answers given to samples."""
    hits: dict[str, list[bool]] = {}
    for sample, answer in zip(samples, answers):
        hits.setdefault(sample.task, []).append(answer == correct_answer(sample))
    per_task = {t: sum(h) / len(h) for t, h in sorted(hits.items(), key=lambda kv: TASKS.index(kv[0]))}
    return {"per_task": per_task, "mean": sum(per_task.values()) / max(1, len(per_task)),
            "n": {t: len(h) for t, h in hits.items()}}


def score_by_answer(samples: Sequence[Sample], answers: Sequence[str]) -> list[dict]:
    """Accuracy per task and correct answer: rows of task, answer, n, accuracy, in task then answer order.

    Where a model leans to one answer (a "yes" bias on LogicalObj, say), the correct-answer filter of
    the knockout analyses keeps mostly samples of that answer; this shows it.
    """
    hits: dict[tuple[str, str], list[bool]] = {}
    for sample, answer in zip(samples, answers, strict=True):
        truth = correct_answer(sample)
        hits.setdefault((sample.task, truth), []).append(answer == truth)
    return [{"task": task, "answer": truth, "n": len(h), "accuracy": sum(h) / len(h)}
            for (task, truth), h in sorted(hits.items(), key=lambda kv: (TASKS.index(kv[0][0]), kv[0][1]))]


def format_scores(scores: dict, label: Optional[str] = None) -> str:
    """One line: mean and per-task accuracy in percent."""
    parts = " ".join(f"{t}={100 * a:.0f}" for t, a in scores["per_task"].items())
    return f"{label + ': ' if label else ''}mean={100 * scores['mean']:.1f} {parts}"
