"""The model's answers: the greedy answer, the form answers are compared in, and the correct-answer filter.

Only samples the model answers correctly are analysed (docs/protocol.md): its greedy answer (up to
`max_new_tokens`, ending at the model's stop tokens) must equal the dataset's answer once both are normalised
(lowercased and stripped). The runner applies that test to each sample itself; `correct_samples` is the same
filter over any iterable of samples (the lens, a `Study`, the scores), and `flowlib.evaluate` counts accuracy
with the same two functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def normalise_answer(text: str) -> str:
    """The comparison form of an answer: lowercased and stripped (docs/protocol.md)."""
    return text.strip().lower()


@torch.no_grad()
def greedy_answer(loaded, prepared, max_new_tokens: int = 10) -> str:
    """The model's greedy answer to a prepared input, decoded without special tokens."""
    inputs = prepared.inputs
    out = loaded.model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=loaded.tokenizer.pad_token_id,
        eos_token_id=loaded.stop_token_ids,
    )
    return loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def correct_samples(
    loaded,
    samples: Iterable,
    per_task: int | None = None,
    max_new_tokens: int = 10,
    progress: bool = True,
    verdicts: dict | None = None,
):
    """Yield the samples the model answers correctly (greedy), at most `per_task` of each task.

    `verdicts` (question id -> answered correctly), when given, is read and filled so that
    repeated filters over the same samples generate each answer once. The filter is logged
    with its counts when the iteration ends.
    """
    verdicts = {} if verdicts is None else verdicts
    kept, seen = {}, 0
    for sample in tqdm(samples, desc="answer filter", unit="sample", disable=not progress):
        if per_task is not None and kept.get(sample.task, 0) >= per_task:
            continue
        seen += 1
        if sample.question_id not in verdicts:
            answer = greedy_answer(loaded, loaded.prepare(sample), max_new_tokens)
            verdicts[sample.question_id] = normalise_answer(answer) == normalise_answer(sample.answer)
        if verdicts[sample.question_id]:
            kept[sample.task] = kept.get(sample.task, 0) + 1
            yield sample
    log.info(
        "answer filter: kept %d of %d samples (%d answered wrongly)",
        sum(kept.values()),
        seen,
        seen - sum(kept.values()),
    )
