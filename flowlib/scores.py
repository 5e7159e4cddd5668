"""Which samples and which score: the paper's choice (correct samples, the predicted token) and the others.

Sample modes (`select_samples`):
- ``"correct"`` (the paper's): the greedy answer, generated to its end, equals the dataset's answer.
- ``"wrong"``: it does not; ``"all"``: both.

Scores of one knocked-out forward against the clean one (`score_sweep`):
- ``"predicted"`` (the paper's metric): relative change (%) of the probability of the first token the
  unblocked model generates greedily, at the last input position.
- ``"gold"``: the same for the first token of the dataset's answer, in the form (lowercase or
  capitalised) the unblocked model finds likelier, as the answer filter ignores case (so it equals
  "predicted" on correct samples whose answer starts with its first token; it differs on wrong ones).
- ``"sequence"``: the answer's length-normalised log-probability, teacher-forced: the mean over its m
  tokens of log p(token | prompt, previous answer tokens). Its change is reported as the relative
  change (%) of the per-token geometric-mean probability, ``100 * (exp(after - before) - 1)``, which
  for a one-token answer is the "gold" change. Same form as "gold".
- ``"margin"`` (Choose tasks): log p(true option) - log p(false option), each the sum over its tokens,
  teacher-forced, each option in its likelier form under the unblocked model; its change is the
  difference in nats (negative: the knockout pushes towards the false option). Samples without two
  options are left out of it.

"predicted" and "gold" read the last input position, so the fast engine computes them; "sequence" and
"margin" need the positions after the prompt, which the fast engine's clean pass does not contain, so
they always run the reference engine (one forward per step and continuation).

Example:
    >>> chosen = select_samples(loaded, samples, mode="wrong", per_task=20)
    >>> table = score_sweep(loaded, prepared, cut, "centred", 7, scores=("predicted", "gold"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .answers import greedy_answer, normalise_answer
from .evaluate import answer_token_ids
from .flows import cut_matrix
from .knockout import knockout
from .sweep import CleanPass, answer_probs, clean_pass, relative_change
from .variants import PAPER_WINDOW_KIND, blocked_states, sample_table, schedule_label, window_schedules

SAMPLE_MODES = ("correct", "wrong", "all")
PAPER_MODE = "correct"
SCORES = ("predicted", "gold", "sequence", "margin")
PAPER_SCORE = "predicted"
#: How each score's change is expressed (the y-axis of its figure).
SCORE_UNITS = {
    "predicted": "change in probability (%)",
    "gold": "change in probability (%)",
    "sequence": "change in per-token probability (%)",
    "margin": "change in log-odds true vs false (nats)",
}


def select_samples(
    loaded,
    samples: Iterable,
    mode: str = PAPER_MODE,
    per_task: int | None = None,
    verdicts: dict | None = None,
) -> dict[str, list]:
    """The samples of `mode` ("correct", "wrong" or "all"), at most `per_task` per task, by task.

    `verdicts` (question id -> answered correctly), when given, is read and filled, as
    `answers.correct_samples` does (e.g. a `Study`'s), so each greedy answer is generated once.
    """
    if mode not in SAMPLE_MODES:
        raise ValueError(f"unknown sample mode {mode!r}; use one of {', '.join(SAMPLE_MODES)}")
    verdicts = {} if verdicts is None else verdicts
    kept: dict[str, list] = {}
    for sample in samples:
        chosen = kept.setdefault(sample.task, [])
        if per_task is not None and len(chosen) >= per_task:
            continue
        if mode != "all" and sample.question_id not in verdicts:
            answer = greedy_answer(loaded, loaded.prepare(sample))
            verdicts[sample.question_id] = normalise_answer(answer) == normalise_answer(sample.answer)
        if mode == "all" or verdicts[sample.question_id] == (mode == "correct"):
            chosen.append(sample)
    return kept


def answer_words(sample) -> dict[str, str]:
    """The words the scores read: the answer, and for two-option tasks the true and false options."""
    words = {"answer": normalise_answer(sample.answer)}
    if sample.true_option and sample.false_option:
        words |= {"true": normalise_answer(sample.true_option), "false": normalise_answer(sample.false_option)}
    return words


@torch.no_grad()
def continuation_logprobs(loaded, prepared, tokens: Sequence[int], cut=None, layers: Iterable[int] = ()) -> np.ndarray:
    """Log-probabilities (float64) of `tokens` teacher-forced after the prompt, with `cut` blocked in `layers`.

    One forward of the prompt followed by all but the last token. The tokens after the prompt belong
    to no group, so the cut (built for the prompt) leaves their rows and columns alone.
    """
    tokens = [int(t) for t in tokens]
    n, m = prepared.layout.seq_len, len(tokens)
    device = prepared.input_ids.device
    extra = torch.as_tensor(tokens[:-1], dtype=torch.long, device=device)[None]
    inputs = dict(prepared.inputs)
    inputs["input_ids"] = torch.cat([prepared.input_ids, extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    layers = list(layers)
    if cut is not None and layers:
        wide = torch.zeros(n + m - 1, n + m - 1, dtype=torch.bool, device=cut.device)
        wide[:n, :n] = cut
        layout = dataclasses.replace(prepared.layout, seq_len=n + m - 1)
        with knockout(loaded, layout, [], layers, cut=wide):
            logits = loaded.model(**inputs, logits_to_keep=m).logits[0]
    else:
        logits = loaded.model(**inputs, logits_to_keep=m).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return logp[torch.arange(m), torch.as_tensor(tokens)].cpu().numpy()


def answer_forms(loaded, prepared, words: dict[str, str]) -> dict[str, list[int]]:
    """Each word's tokens in the form (as written, or capitalised) the unblocked model finds likelier.

    The likelihood is the teacher-forced total log-probability (`evaluate.candidate_scores`' rule); a
    form the tokenizer cannot spell without its unknown token is never chosen.
    """
    unknown = loaded.tokenizer.unk_token_id
    chosen = {}
    for key, word in words.items():
        forms = [answer_token_ids(loaded.tokenizer, form) for form in dict.fromkeys((word, word.capitalize()))]
        forms = [ids for ids in forms if unknown is None or unknown not in ids] or forms[:1]
        chosen[key] = max(forms, key=lambda ids: continuation_logprobs(loaded, prepared, ids).sum())
    return chosen


def _sequence(loaded, prepared, forms, cut, layers) -> float:
    return float(continuation_logprobs(loaded, prepared, forms["answer"], cut, layers).mean())


def _margin(loaded, prepared, forms, cut, layers) -> float:
    return float(
        continuation_logprobs(loaded, prepared, forms["true"], cut, layers).sum()
        - continuation_logprobs(loaded, prepared, forms["false"], cut, layers).sum()
    )


@torch.no_grad()
def score_sweep(
    loaded,
    prepared,
    cut: torch.Tensor,
    kind: str = PAPER_WINDOW_KIND,
    window: int | None = None,
    *,
    scores: Sequence[str] = (PAPER_SCORE,),
    engine: str = "fast",
    clean: CleanPass | None = None,
) -> pd.DataFrame:
    """Every score of `scores` for `cut` swept over window `kind`: one row per score and step.

    Columns: question_id, score, layer, window_layers, token (the scored first token, -1 for the
    sequence scores), base, blocked, change (in the score's unit, `SCORE_UNITS`), engine. "margin" on a
    sample without two options raises ValueError.
    """
    from .config import default_window

    bad = [s for s in scores if s not in SCORES]
    if bad:
        raise ValueError(f"unknown score(s) {bad}; use {', '.join(SCORES)}")
    window = default_window(loaded.num_layers) if window is None else int(window)
    schedules = window_schedules(kind, window, loaded.num_layers)
    words = answer_words(prepared.sample)
    if "margin" in scores and "true" not in words:
        raise ValueError(f"sample {prepared.layout.sample_id}: the margin score needs a true and a false option")
    clean = clean or clean_pass(loaded, prepared)
    forms = answer_forms(loaded, prepared, words if "margin" in scores else {"answer": words["answer"]})
    frames = []
    token_scores = [s for s in scores if s in ("predicted", "gold")]
    if token_scores:
        states = blocked_states(loaded, prepared, cut, schedules, engine=engine, clean=clean)
        last = clean.hidden_states[-1][0, -1][None]
        for score in token_scores:
            token = clean.answer_token if score == "predicted" else forms["answer"][0]
            base = float(answer_probs(loaded.model, last, token)[0])
            blocked = answer_probs(loaded.model, states, token).cpu().numpy()
            frames.append((score, token, base, blocked, relative_change(blocked, base), engine))
    for score, function in (("sequence", _sequence), ("margin", _margin)):
        if score in scores:
            base = function(loaded, prepared, forms, None, ())
            blocked = np.array([function(loaded, prepared, forms, cut, layers) for layers in schedules])
            change = 100 * np.expm1(blocked - base) if score == "sequence" else blocked - base
            frames.append((score, -1, base, blocked, change, "reference"))
    return pd.concat(
        [
            pd.DataFrame(
                {
                    "question_id": prepared.layout.sample_id,
                    "score": score,
                    "layer": np.arange(len(schedules), dtype=np.int64),
                    "window_layers": [schedule_label(s) for s in schedules],
                    "token": token,
                    "base": base,
                    "blocked": blocked,
                    "change": change,
                    "engine": used,
                }
            )
            for score, token, base, blocked, change, used in frames
        ],
        ignore_index=True,
    )


def score_table(
    loaded,
    samples: dict | Sequence,
    flows: Sequence[str],
    window: int | None = None,
    *,
    scores: Sequence[str] = SCORES,
    kind: str = PAPER_WINDOW_KIND,
    engine: str = "fast",
    mode: str = PAPER_MODE,
) -> pd.DataFrame:
    """`score_sweep` of each flow for every sample (a list, or lists by task), labelled with task, flow and mode.

    "margin" is computed for the samples with two options only; a sample whose group is empty for a
    flow is left out of that flow (`table.attrs["excluded"]` lists them with the reason).
    """

    def sweeps(sample, prepared, clean, flow):
        chosen = [s for s in scores if s != "margin" or "true" in answer_words(sample)]
        cut = cut_matrix(prepared.layout, [flow])
        frame = score_sweep(loaded, prepared, cut, kind, window, scores=chosen, engine=engine, clean=clean)
        frame.insert(1, "flow", flow)  # `sample_table` puts the task before these two
        frame.insert(2, "mode", mode)
        return [frame]

    return sample_table(loaded, samples, flows, sweeps)


def mode_table(loaded, by_mode: dict, flows: Sequence[str], window: int | None = None, **kwargs) -> pd.DataFrame:
    """`score_table` for several sample modes at once (``{"correct": samples, "wrong": samples}``), concatenated.

    Adds `line` ("mode · flow"), the curve each row belongs to in a figure of modes and flows, and
    `panel` (the score with its unit, `SCORE_UNITS`, the paper's labelled as such).
    """
    frames = [score_table(loaded, samples, flows, window, mode=mode, **kwargs) for mode, samples in by_mode.items()]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    table["line"] = table["mode"] + " · " + table["flow"]
    paper = table["score"].map(lambda score: " (the paper's)" if score == PAPER_SCORE else "")
    table["panel"] = table["score"] + paper + ": " + table["score"].map(SCORE_UNITS)
    return table
