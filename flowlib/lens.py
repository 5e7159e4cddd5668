"""The answer lens: how likely each layer's last-position state makes the answer, read through the unembedding.

For every decoder layer l, the hidden state at the last input position is mapped
to vocabulary probabilities (softmax of hidden . W_unembed^T) and we read the
first token of the answer in lowercase and capitalised form and, for the Choose
tasks, of the false option in both forms (the paper's finding 4, docs/protocol.md).

Two lenses, always labelled in the output:
- "normed" (default): the model's final norm is applied to every layer's state,
  as the unembedding always sees it in the model itself.
- "raw": no norm except at the last layer, as the paper's official code does.

`output_hidden_states` returns the last layer's state already normed, so the last
layer is read as is in both lenses and equals the model's own output distribution.

Example:
    >>> table = answer_lens(loaded, loaded.prepare(sample))            # normed lens
    >>> table = answer_lens(loaded, prepared, lenses=("normed", "raw"))  # both, labelled
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .knockout import language_model

LENSES = ("normed", "raw")


def first_token(tokenizer, word: str) -> int:
    """Id of the first token of `word` as the tokenizer encodes it alone (no special tokens)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer encodes {word!r} as no token at all")
    return int(ids[0])


def lens_forms(sample) -> dict[str, str]:
    """The words the lens reads: answer (and false option, for Choose tasks) in both cases."""
    forms = {"answer": sample.answer.strip().lower(), "Answer": sample.answer.strip().lower().capitalize()}
    if sample.task.startswith("Choose") and sample.false_option:
        false = sample.false_option.strip().lower()
        forms.update({"false option": false, "False option": false.capitalize()})
    return forms


@torch.no_grad()
def layer_distributions(loaded, prepared, lens: str = "normed") -> torch.Tensor:
    """``(num_layers, vocab)`` float64 probabilities read from each layer's last-position state.

    Row l reads the output of decoder layer l; the last row is the model's own output distribution.
    """
    if lens not in LENSES:
        raise ValueError(f"unknown lens {lens!r}; use one of {LENSES}")
    model = loaded.model
    states = model(**prepared.inputs, output_hidden_states=True, logits_to_keep=1).hidden_states
    # L+1 states: the embeddings, the raw outputs of layers 0..L-2, then the last layer's output already normed.
    last = torch.stack([s[0, -1] for s in states[1:]])
    if lens == "normed":  # norm every layer but the last, which is normed already
        last = torch.cat([language_model(model).norm(last[:-1]), last[-1:]])
    return torch.softmax(model.get_output_embeddings()(last).double(), -1)


def answer_lens(loaded, prepared, lenses: Sequence[str] = ("normed",)) -> pd.DataFrame:
    """Per lens, layer and form: the probability of the form's first token at the last position.

    Args:
        loaded: a `LoadedModel`; prepared: its `PreparedInput` for one sample.
        lenses: any of "normed" (final norm on every layer, the default) and "raw" (official code).

    Returns:
        A tidy table with question_id, task, lens, layer (0-based decoder layer),
        form ("answer", "Answer", "false option", "False option"), word, token, token_id, prob.
    """
    sample = prepared.sample
    forms = lens_forms(sample)
    ids = {form: first_token(loaded.tokenizer, word) for form, word in forms.items()}
    rows = []
    for lens in lenses:
        probs = layer_distributions(loaded, prepared, lens)
        for form, word in forms.items():
            token = loaded.tokenizer.convert_ids_to_tokens(ids[form])
            for layer in range(probs.shape[0]):
                rows.append(
                    (
                        sample.question_id,
                        sample.task,
                        lens,
                        layer,
                        form,
                        word,
                        token,
                        ids[form],
                        float(probs[layer, ids[form]]),
                    )
                )
    return pd.DataFrame(
        rows, columns=["question_id", "task", "lens", "layer", "form", "word", "token", "token_id", "prob"]
    )


def lens_table(loaded, samples: Iterable, lenses: Sequence[str] = ("normed",), progress: bool = True) -> pd.DataFrame:
    """`answer_lens` over many samples, concatenated (one tidy table)."""
    frames = [answer_lens(loaded, loaded.prepare(s), lenses) for s in tqdm(samples, desc="lens", disable=not progress)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
