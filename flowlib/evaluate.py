"""Greedy answers and accuracy per task, with the image shown, withheld (blank) or cut off by attention.

An answer is correct when it equals the dataset's answer, both normalised (`answers.normalise_answer`:
lowercased and stripped; LLaVA answers "Red" where the dataset says "red"). `mode` says how the
model's answer is read:
- ``"generate"`` (default): the greedy answer generated to its end (`answers.greedy_answer`, which stops
  at `loaded.stop_token_ids` and decodes without special tokens), the very rule of the knockout
  runner's correct-answer filter, so the counts are those of the samples the analyses keep. Real
  tokenizers split many answers into several tokens, so any shortcut miscounts there.
- ``"first_token"``: one batched forward and an argmax at the last prompt position, decoded. Exact only
  where every answer is one token and the model stops after it (the toy model's word-level vocabulary),
  and faster: the rule the toy model's card was measured with, and the one to monitor training with.

`block_image=True` blocks the flow ``"Image->All"`` in every decoder layer through the verified
knockout (`knockout.knockout`, which proves after each forward that the edges were cut in every layer):
no position after an image token attends to it, so the image reaches the answer through no path at
all, which is what the paper's attention-knockout method assumes. Each input then runs alone, at its
own length (a knockout is built for one layout), and greedy answers are decoded without a cache, one
full forward per new token, since the knockout checks every forward against the whole sequence.

`forced_choice=True` scores instead the candidate answers (the two options, or the task's answer set):
each candidate, in lowercase and in capitalised form (the model may emit either), gets the total
log-probability of all its tokens after the prompt (teacher-forced), and the best one is the answer.
With the image cut off a model may answer no candidate at all (the toy model says "circle" to most
questions), which free answers count as wrong, below chance; forced choice measures what the model
still knows about the answer.

Batches are right-padded; LLaVA-NeXT's pixel values are padded along the tile dimension and carry
`image_sizes`, so each row of a batch gets the logits it gets alone.

Example:
    >>> scores = evaluate(loaded, samples)                 # {"per_task": {...}, "mean": 0.93, ...}
    >>> evaluate(loaded, samples, blank=True)["mean"]      # image withheld
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Sequence

import torch
from PIL import Image

from .answers import greedy_answer, normalise_answer
from .flows import ALL
from .knockout import knockout
from .sample import TASKS, Sample

#: How `evaluate` reads the model's answer (see the module docstring).
MODES = ("generate", "first_token")
#: The answers a synthetic question can have where it offers no options of its own; the others offer two.
ANSWER_SETS = {"CompareAttr": ("color", "size", "texture"), "LogicalObj": ("yes", "no"), "QueryAttr": ("left", "right")}
#: Chance accuracy of each task of the synthetic world: one over its number of candidate answers.
CHANCE = {task: 1 / len(ANSWER_SETS.get(task, ("true option", "false option"))) for task in TASKS}
#: The synthetic world's background: a "blank" image is an empty scene of the same size.
BLANK_COLOR = (232, 232, 226)
#: The flow `block_image` blocks in every layer: no later position attends to any image token.
IMAGE_BLOCKED = f"Image->{ALL}"


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
    raise ValueError(
        f"sample {sample.question_id}: task {sample.task} has no options and no known answer set; "
        "forced choice needs one (give true_option and false_option)"
    )


@contextlib.contextmanager
def image_blocked(loaded, layout, seq_len: int):
    """Block `IMAGE_BLOCKED` in every layer for forwards of `seq_len` tokens of the input `layout` describes.

    `seq_len` may exceed the prompt's length (generated or teacher-forced tokens follow it): the image
    positions are the prompt's, and the tokens after it are cut from the image like the prompt's own.
    """
    with knockout(loaded, dataclasses.replace(layout, seq_len=seq_len), [IMAGE_BLOCKED], range(loaded.num_layers)):
        yield


def image_blocked_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, dtype=torch.float32
) -> torch.Tensor:
    """Additive mask (B, 1, T, T): causal + padding, and no edge image -> any position after the image.

    Not used by `evaluate` (see `image_blocked`); kept as the independent reference the tests compare with.

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


def collate(prepared: Sequence, pad_token_id: int, continuations: Sequence[Sequence[int]] | None = None) -> dict:
    """Right-pad prepared inputs into one batch; each row optionally followed by its `continuations` token ids.

    The processor's other outputs go along, whatever the family: those with one value per token (the
    shape of input_ids, e.g. Qwen's token types) are padded like input_ids, with 0 (text) after the
    prompt; the image's (pixel values, image sizes or grids) are stacked, LLaVA-NeXT's pixel values
    (1, tiles, C, H, W) zero-padded to the batch's largest tile count (the model reads each row's real
    tile count from its `image_sizes`).

    Returns:
        input_ids and attention_mask (B, T), the other inputs, `prompt_lengths` (B,), `last` (B,), each
        row's last real position, `model_inputs` (the keys the model takes), and each row's `prepared`
        input and `continuations` (what `block_image` needs to run a row alone).
    """
    device = prepared[0].input_ids.device
    continuations = continuations or [()] * len(prepared)
    rows = [
        torch.cat([p.input_ids[0], torch.as_tensor(list(c), dtype=torch.long, device=device)])
        for p, c in zip(prepared, continuations, strict=True)
    ]
    lengths = [len(r) for r in rows]
    input_ids = torch.full((len(rows), max(lengths)), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[i, :n] = row
        attention_mask[i, :n] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_lengths": torch.tensor([p.input_ids.shape[1] for p in prepared], device=device),
        "last": torch.tensor(lengths, device=device) - 1,
        "prepared": list(prepared),
        "continuations": [list(c) for c in continuations],
        "model_inputs": ["input_ids", "attention_mask"],
    }
    first = prepared[0]
    others = [k for k, v in first.inputs.items() if torch.is_tensor(v) and k not in batch["model_inputs"]]
    per_token = [k for k in others if first.inputs[k].shape == first.input_ids.shape]
    for key in [k for k in others if k not in per_token]:
        values = [p.inputs[key] for p in prepared]
        if values[0].dim() == 5:  # (1, tiles, C, H, W): pad the tiles
            tiles = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, tiles - v.shape[1])) for v in values]
        batch[key] = torch.cat(values)
        batch["model_inputs"].append(key)
    for key in per_token:
        batch[key] = torch.zeros_like(input_ids, dtype=first.inputs[key].dtype)
        for i, p in enumerate(prepared):
            batch[key][i, : p.input_ids.shape[1]] = p.inputs[key][0]
        batch["model_inputs"].append(key)
    return batch


@torch.no_grad()
def logits_at(loaded, batch: dict, positions: Sequence[Sequence[int]], block_image: bool = False) -> list:
    """Logits (len(positions[r]), vocab), float32, at the given positions of each row r of `batch`.

    Only those positions go through the unembedding (`logits_to_keep`), which matters for real vocabularies.
    With `block_image`, each row runs alone, unpadded, under `image_blocked`.
    """
    if block_image:
        rows = []
        for r, row_positions in enumerate(positions):
            prepared, continuation = batch["prepared"][r], batch["continuations"][r]
            row = collate([prepared], 0, [continuation])
            with image_blocked(loaded, prepared.layout, row["input_ids"].shape[1]):
                rows += logits_at(loaded, row, [row_positions])
        return rows
    keep = sorted({int(p) for row in positions for p in row})
    column = {p: i for i, p in enumerate(keep)}
    out = loaded.model(
        use_cache=False,
        logits_to_keep=torch.tensor(keep, device=batch["input_ids"].device),
        **{k: batch[k] for k in batch["model_inputs"]},
    )
    return [out.logits[r, [column[int(p)] for p in row]].float() for r, row in enumerate(positions)]


def next_token_logits(loaded, batch: dict, block_image: bool = False) -> torch.Tensor:
    """Logits (B, vocab) at each row's last real position."""
    return torch.cat(logits_at(loaded, batch, [[int(i)] for i in batch["last"]], block_image))


def decode_answer(tokenizer, token_id: int) -> str:
    """A first generated token as an answer: decoded without special tokens, normalised."""
    return normalise_answer(tokenizer.decode([int(token_id)], skip_special_tokens=True))


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """The tokens of `word` as an answer: encoded alone, without special tokens (as `lens.first_token`)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer encodes {word!r} as no token at all")
    return [int(i) for i in ids]


def candidate_scores(
    loaded, prepared: Sequence, candidates: Sequence[Sequence[str]], batch_size: int = 32, block_image: bool = False
) -> list[dict[str, float]]:
    """Per input, each candidate word's total log-probability after the prompt, teacher-forced (the likelier form).

    A form of m tokens needs the logits after the prompt and after each of its first m - 1 tokens: one
    row of prompt + those tokens. Forms of one input with the same leading tokens share a row, so all
    one-token forms of an input cost one forward of the prompt.
    """
    forms = [
        (i, word, answer_token_ids(loaded.tokenizer, form))
        for i, words in enumerate(candidates)
        for word in words
        for form in dict.fromkeys((word, word.capitalize()))
    ]
    rows = list(dict.fromkeys((i, tuple(ids[:-1])) for i, _, ids in forms))
    row_logp = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate(
            [prepared[i] for i, _ in chunk],
            loaded.tokenizer.pad_token_id,
            [lead for _, lead in chunk],
        )
        positions = [range(int(n) - 1, int(n) + len(lead)) for n, (_, lead) in zip(batch["prompt_lengths"], chunk)]
        for row, logits in zip(chunk, logits_at(loaded, batch, positions, block_image)):
            row_logp[row] = logits.log_softmax(-1)
    scores: list[dict[str, float]] = [{} for _ in prepared]
    for i, word, ids in forms:
        logp = row_logp[(i, tuple(ids[:-1]))]
        total = float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
        scores[i][word] = max(total, scores[i].get(word, -float("inf")))
    return scores


def first_words(
    loaded,
    prepared: Sequence,
    batch_size: int = 32,
    block_image: bool = False,
    candidates: Sequence[Sequence[str]] | None = None,
) -> list[str]:
    """Greedy first tokens (decoded, normalised) for prepared inputs: one batched forward, no generation.

    With `candidates` (one list of lowercase words per input), each answer is instead the candidate
    with the highest `candidate_scores` (ties: the first).
    """
    if candidates is not None:
        scores = candidate_scores(loaded, prepared, candidates, batch_size, block_image)
        return [max(words, key=s.__getitem__) for s, words in zip(scores, candidates)]
    answers = []
    for start in range(0, len(prepared), batch_size):
        batch = collate(prepared[start : start + batch_size], loaded.tokenizer.pad_token_id)
        tokens = next_token_logits(loaded, batch, block_image).argmax(-1)
        answers += [decode_answer(loaded.tokenizer, i) for i in tokens]
    return answers


def first_word(loaded, prepared, block_image: bool = False) -> str:
    """The greedy first token (decoded, normalised) of one prepared input."""
    return first_words(loaded, [prepared], 1, block_image)[0]


@torch.no_grad()
def image_blocked_answer(loaded, prepared, max_new_tokens: int = 10) -> str:
    """`answers.greedy_answer` under `image_blocked`: greedy tokens until a stop token, decoded likewise."""
    new: list[int] = []
    for _ in range(max_new_tokens):
        row = collate([prepared], 0, [new])
        with image_blocked(loaded, prepared.layout, row["input_ids"].shape[1]):
            logits = loaded.model(use_cache=False, logits_to_keep=1, **{k: row[k] for k in row["model_inputs"]}).logits
        token = int(logits[0, -1].argmax())
        if token in loaded.stop_token_ids:
            break
        new.append(token)
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


def generated_answer(loaded, prepared, block_image: bool = False) -> str:
    """The normalised greedy answer (`answers.greedy_answer`), with the image blocked if `block_image`."""
    return normalise_answer(image_blocked_answer(loaded, prepared) if block_image else greedy_answer(loaded, prepared))


def evaluate(
    loaded,
    samples: Sequence[Sample],
    *,
    blank: bool = False,
    block_image: bool = False,
    forced_choice: bool = False,
    batch_size: int = 32,
    return_answers: bool = False,
    mode: str = "generate",
) -> dict:
    """Accuracy per task (and the mean over tasks) of the model's answers against the samples' answers.

    Generation is the default because it is what "correct" means everywhere else (the knockout filter);
    `mode="first_token"` is the fast path for one-token answers (see the module docstring).

    Args:
        loaded: a `flowlib.models.LoadedModel`.
        samples: the samples to answer.
        blank: replace each image by a blank one of the same size (`blank_image`).
        block_image: block the flow `IMAGE_BLOCKED` in every layer through the verified knockout
            (`image_blocked`).
        forced_choice: answer the likeliest of the sample's candidate answers (`answer_candidates`,
            `candidate_scores`); `mode` does not apply.
        batch_size: rows per forward pass (first-token and forced-choice; generation runs one sample at a time).
        return_answers: also return the normalised answers given, under "answers".
        mode: "generate" or "first_token".

    Returns:
        `score`'s dict: per_task, mean, n and correct.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; use one of {MODES}")
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        answers: list[str] = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            prepared = [loaded.prepare(s, image=blank_image(s.load_image()) if blank else None) for s in chunk]
            if forced_choice:
                answers += first_words(loaded, prepared, batch_size, block_image, [answer_candidates(s) for s in chunk])
            elif mode == "first_token":
                answers += first_words(loaded, prepared, batch_size, block_image)
            else:
                answers += [generated_answer(loaded, p, block_image) for p in prepared]
    finally:
        loaded.model.train(was_training)
    result = score(samples, answer_verdicts(samples, answers))
    if return_answers:
        result["answers"] = answers
    return result


def answer_verdicts(samples: Sequence[Sample], answers: Sequence[str]) -> list[bool]:
    """Whether each answer equals its sample's answer, both normalised (as the knockout filter decides)."""
    return [normalise_answer(a) == normalise_answer(s.answer) for s, a in zip(samples, answers, strict=True)]


def _check_verdicts(verdicts: Sequence) -> None:
    if any(isinstance(v, str) for v in verdicts):
        raise TypeError(
            "pass verdicts (answered correctly: bools), not answers; `answer_verdicts` turns answers into verdicts"
        )


def score(samples: Sequence[Sample], verdicts: Sequence[bool]) -> dict:
    """Accuracy per task, the mean over tasks, and counts `n` and `correct` per task, from per-sample verdicts."""
    _check_verdicts(verdicts)
    hits: dict[str, list[bool]] = {}
    for sample, verdict in zip(samples, verdicts, strict=True):
        hits.setdefault(sample.task, []).append(bool(verdict))
    ordered = sorted(hits.items(), key=lambda kv: TASKS.index(kv[0]))
    per_task = {t: sum(h) / len(h) for t, h in ordered}
    return {
        "per_task": per_task,
        "mean": sum(per_task.values()) / max(1, len(per_task)),
        "n": {t: len(h) for t, h in ordered},
        "correct": {t: sum(h) for t, h in ordered},
    }


def score_by_answer(samples: Sequence[Sample], verdicts: Sequence[bool]) -> list[dict]:
    """Accuracy per task and correct answer: rows of task, answer, n, correct, accuracy, in task then answer order.

    Where a model leans to one answer (a "yes" bias on LogicalObj, say), the correct-answer filter of
    the knockout analyses keeps mostly samples of that answer; this shows it.
    """
    _check_verdicts(verdicts)
    hits: dict[tuple[str, str], list[bool]] = {}
    for sample, verdict in zip(samples, verdicts, strict=True):
        hits.setdefault((sample.task, normalise_answer(sample.answer)), []).append(bool(verdict))
    return [
        {"task": task, "answer": truth, "n": len(h), "correct": sum(h), "accuracy": sum(h) / len(h)}
        for (task, truth), h in sorted(hits.items(), key=lambda kv: (TASKS.index(kv[0][0]), kv[0][1]))
    ]


def format_scores(scores: dict, label: str | None = None) -> str:
    """One line: mean and per-task accuracy in percent."""
    parts = " ".join(f"{t}={100 * a:.0f}" for t, a in scores["per_task"].items())
    return f"{label + ': ' if label else ''}mean={100 * scores['mean']:.1f} {parts}"
