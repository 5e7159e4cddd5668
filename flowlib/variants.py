"""Window variants and sweeps of any cut matrix: the paper's centred window and the ones the field added since.

A sweep blocks one set of edges (a cut matrix, as `flows.cut_matrix` builds for flows, or as
`flowlib.controls` builds for random controls and keep-only masks) in one set of layers per step.
The sets of layers are *schedules*, one per step l = 0..L-1:

- ``"centred"`` (the paper's): the k layers centred on l, truncated at the ends (`sweep.window_layers`).
- ``"inverse"``: every layer except the centred window (what remains when the window alone is spared).
- ``"cumulative-bottom"``: layers 0..l; step L-1 blocks every layer.
- ``"cumulative-top"``: layers l..L-1; step 0 blocks every layer.

Every step goes through the verified knockout (`knockout.KnockoutAttention`), which counts the edges
removed in each layer and proves they were removed in exactly the scheduled ones. Two engines give the
same numbers (tests: within 1e-5 percentage points):

- ``"reference"``: one full knocked-out forward per step.
- ``"fast"``: `sweep.sweep_fast`'s loop, `sweep.suffix_batches` (device maps and multimodal rotary
  positions included), run for any schedule. Rows before the cut's first row never change, so their
  clean keys and values are reused and only the suffix is recomputed, from each step's first blocked
  layer on. Every cut flowlib builds lies in its targets' rows, so the prefix is
  reused for every variant; the saving in depth is lost where a schedule starts at layer 0 (every
  cumulative-bottom step, every inverse step whose window does not start at 0): those recompute the
  suffix through all layers, still far cheaper than full forwards when the target is the question or
  the last position, and no cheaper when the target starts at the image.

Example:
    >>> cut = cut_matrix(prepared.layout, ["Question->Last"])
    >>> result = cut_sweep(loaded, prepared, cut, "inverse", window=7)
    >>> result.relative_change  # one value per step
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .flows import FlowError
from .knockout import current_backend, knockout
from .sweep import (
    MIN_SUFFIX,
    SUFFIX_ALIGN,
    CleanPass,
    ZeroBaseProbability,
    answer_probs,
    clean_pass,
    relative_change,
    suffix_batches,
    window_layers,
)

WINDOW_KINDS = ("centred", "inverse", "cumulative-bottom", "cumulative-top")
#: The paper's window, the default of every function here.
PAPER_WINDOW_KIND = "centred"
ENGINES = ("fast", "reference")

Schedule = tuple[int, ...]


def window_schedules(kind: str, window: int, num_layers: int) -> list[Schedule]:
    """The layers blocked at each step l = 0..num_layers-1 for a window `kind` (see the module docstring).

    `window` (k) matters for "centred" and "inverse" only; it must fit the model (1..num_layers).
    """
    if kind not in WINDOW_KINDS:
        raise ValueError(f"unknown window kind {kind!r}; use one of {', '.join(WINDOW_KINDS)}")
    if not 1 <= int(window) <= num_layers:
        raise ValueError(f"window {window} does not fit a model of {num_layers} layers; use 1..{num_layers}")
    steps = range(num_layers)
    if kind == "centred":
        return [tuple(window_layers(l, int(window), num_layers)) for l in steps]
    if kind == "inverse":
        return [invert(window_layers(l, int(window), num_layers), num_layers) for l in steps]
    if kind == "cumulative-bottom":
        return [tuple(range(0, l + 1)) for l in steps]
    return [tuple(range(l, num_layers)) for l in steps]


def invert(layers, num_layers: int) -> Schedule:
    """Every layer of the model that is not in `layers`."""
    chosen = set(int(l) for l in layers)
    return tuple(l for l in range(num_layers) if l not in chosen)


def schedule_label(layers: Schedule) -> str:
    """Compact text of a schedule: "3-5", "0-2,8-11", or "none"."""
    if not layers:
        return "none"
    runs, start = [], layers[0]
    for previous, current in zip(layers, [*layers[1:], None]):
        if current != previous + 1:
            runs.append(f"{start}-{previous}")
            start = current
    return ",".join(runs)


def cut_suffix_start(cut: torch.Tensor) -> int:
    """First position the fast engine recomputes for `cut`: its first cut row, or earlier.

    The same lengths as `sweep.suffix_start` (at least `MIN_SUFFIX`, a multiple of `SUFFIX_ALIGN`),
    for the same reason: a row gets the same bits batched or alone.
    """
    n = cut.shape[0]
    rows = cut.any(dim=1).nonzero().flatten()
    first = int(rows[0]) if len(rows) else n - 1
    length = max(n - first, MIN_SUFFIX)
    return max(0, n - -(-length // SUFFIX_ALIGN) * SUFFIX_ALIGN)


@torch.no_grad()
def _reference_states(loaded, prepared, cut, schedules) -> torch.Tensor:
    normed = []
    for layers in schedules:
        with knockout(loaded, prepared.layout, [], layers, cut=cut):
            out = loaded.model(**prepared.inputs, output_hidden_states=True, logits_to_keep=1)
        normed.append(out.hidden_states[-1][0, -1])
    return torch.stack(normed)


@torch.no_grad()
def _fast_states(loaded, prepared, cut, schedules, clean: CleanPass, max_batch) -> torch.Tensor:
    current_backend(loaded.model)  # an unusable kernel is refused even where nothing below runs
    states = clean.hidden_states[-1][0, -1].expand(len(schedules), -1).clone()  # empty schedules: the clean state
    if not bool(cut.any()):
        return states
    for steps, normed in suffix_batches(loaded, prepared, cut, cut_suffix_start(cut), schedules, clean, max_batch):
        states[steps] = normed.to(states.device)
    return states


def blocked_states(
    loaded,
    prepared,
    cut: torch.Tensor,
    schedules: Sequence[Sequence[int]],
    *,
    engine: str = "fast",
    clean: CleanPass | None = None,
    max_batch: int | str | None = "auto",
) -> torch.Tensor:
    """``(steps, hidden)`` final-normed last-position states with `cut` blocked in each schedule's layers.

    Args:
        cut: ``(seq_len, seq_len)`` bool matrix (`flows.cut_matrix`, `controls.matched_random_cut`, ...).
        schedules: the layers of each step (`window_schedules`); an empty one blocks nothing.
        engine: "fast" (default) or "reference"; clean: a `sweep.clean_pass` of this input (fast only).
        max_batch: steps per batch of the fast engine, as `sweep.sweep_fast`'s.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    schedules = [tuple(sorted(set(int(l) for l in s))) for s in schedules]
    if engine == "reference":
        return _reference_states(loaded, prepared, cut, schedules)
    return _fast_states(loaded, prepared, cut, schedules, clean or clean_pass(loaded, prepared), max_batch)


@dataclasses.dataclass
class CutSweep:
    """One sample x cut x window kind: per step, the answer token's probability with the cut blocked."""

    question_id: str
    label: str
    kind: str
    window: int
    schedules: list[Schedule]
    answer_token: int
    base_prob: float
    blocked_probs: np.ndarray
    edges: int  # edges the cut removes in each blocked layer
    engine: str

    @property
    def relative_change(self) -> np.ndarray:
        return relative_change(self.blocked_probs, self.base_prob)

    def to_frame(self) -> pd.DataFrame:
        """One row per step: question_id, flow (the label), window_kind, layer, window, blocked layers, change."""
        return pd.DataFrame(
            {
                "question_id": self.question_id,
                "flow": self.label,
                "window_kind": self.kind,
                "layer": np.arange(len(self.schedules), dtype=np.int64),
                "window": self.window,
                "window_layers": [schedule_label(s) for s in self.schedules],
                "blocked_layers": np.array([len(s) for s in self.schedules], dtype=np.int64),
                "edges": self.edges,
                "base_prob": self.base_prob,
                "blocked_prob": self.blocked_probs,
                "relative_change": self.relative_change,
                "answer_token": self.answer_token,
                "engine": self.engine,
            }
        )


@torch.no_grad()
def cut_sweep(
    loaded,
    prepared,
    cut: torch.Tensor,
    kind: str = PAPER_WINDOW_KIND,
    window: int | None = None,
    *,
    label: str = "cut",
    engine: str = "fast",
    clean: CleanPass | None = None,
    max_batch: int | str | None = "auto",
) -> CutSweep:
    """Sweep `cut` over the steps of window `kind`; the paper's metric on the greedy first answer token.

    `window` defaults to `config.default_window` of the model's depth.
    """
    from .config import default_window

    window = default_window(loaded.num_layers) if window is None else int(window)
    schedules = window_schedules(kind, window, loaded.num_layers)
    clean = clean or clean_pass(loaded, prepared)
    if not (clean.base_prob > 0 and np.isfinite(clean.base_prob)):
        raise ZeroBaseProbability(f"sample {prepared.layout.sample_id}: base probability {clean.base_prob!r}")
    states = blocked_states(loaded, prepared, cut, schedules, engine=engine, clean=clean, max_batch=max_batch)
    probs = answer_probs(loaded.model, states, clean.answer_token).cpu().numpy()
    return CutSweep(
        prepared.layout.sample_id,
        label,
        kind,
        window,
        schedules,
        clean.answer_token,
        clean.base_prob,
        np.asarray(probs, dtype=np.float64),
        int(cut.sum()),
        engine,
    )


def sample_table(
    loaded,
    samples: dict | Sequence,
    names: Sequence[str],
    sweeps,
    *,
    desc: str = "samples",
    progress: bool = False,
) -> pd.DataFrame:
    """The frames `sweeps(sample, prepared, clean, name)` yields for every sample and name, with a `task` column.

    The one loop behind `controls.control_table`, `controls.variant_table` and `scores.score_table`, so
    that they agree on what is left out. `samples` is a list or lists by task; each sample is prepared and
    run clean once for all `names` (flows or masks). A name whose sweeps raise `flows.FlowError` (its
    group is empty in this sample) or `sweep.ZeroBaseProbability` is left out for that sample, and
    `table.attrs["excluded"]` lists (question_id, name, reason) for each.
    """
    samples = [s for group in samples.values() for s in group] if isinstance(samples, dict) else list(samples)
    frames, excluded = [], []
    for sample in tqdm(samples, desc=desc, unit="sample", disable=not progress):
        prepared = loaded.prepare(sample)
        clean = clean_pass(loaded, prepared)
        for name in names:
            try:
                for frame in sweeps(sample, prepared, clean, name):
                    frame.insert(1, "task", sample.task)
                    frames.append(frame)
            except (FlowError, ZeroBaseProbability) as error:
                excluded.append((sample.question_id, name, str(error)))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table.attrs["excluded"] = excluded
    return table
