"""Matched random controls and keep-only masks: cut matrices for the verified knockout.

A knockout curve shows that blocking some edges lowers the answer's probability; a *matched random
control* asks whether any edges of that size would. For a flow (or several blocked together) the
control cuts, in every query row the flow cuts, exactly as many edges as the flow does there, drawn
uniformly at random (seeded) from the edges that row may attend to: the same query positions lose the
same number of keys, in the same layers. The pool includes the flow's own edges (for Image->Question
the image is almost everything a question token sees, so a pool without them would be too small), and
each control reports its `overlap` with the flow; `exclude_flow=True` draws from the other edges only,
where they suffice. A row keeps its edge to itself unless the flow cuts it (``"Last->Last"``), so no
row is ever left with nothing to attend to.

A *keep-only* mask blocks every edge into a target group except those from the named sources (and
each position's edge to itself): "only this pathway reaches the target".

Both are ``(seq_len, seq_len)`` bool matrices like `flows.cut_matrix`'s, handed to the same
machinery (`knockout.knockout(..., cut=...)`, `variants.cut_sweep`), so every forward still proves it
removed the edges in exactly the scheduled layers.

Example:
    >>> control = matched_random_cut(prepared.layout, ["Image->Question"], seed=0)
    >>> with knockout(loaded, prepared.layout, [], layers=range(3), cut=control) as ko:
    ...     loaded.model(**prepared.inputs)
    >>> ko.removed_edges()  # the flow's counts, layer for layer
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .flows import ALL, FlowError, check_cut, cut_matrix, parse_flow
from .sweep import clean_pass
from .variants import PAPER_WINDOW_KIND, cut_sweep, sample_table

#: Random draws per flow and sample: enough to show the spread of "any edges of that size" cheaply.
DEFAULT_SEEDS = (0, 1, 2)


def sample_seed(seed: int, sample_id: str) -> np.random.Generator:
    """The generator of control `seed` for one sample: reproducible, and different from sample to sample."""
    return np.random.default_rng([int(seed), zlib.crc32(str(sample_id).encode())])


def matched_random_cut(
    layout, flows: str | Sequence[str], seed: int, *, exclude_flow: bool = False, device=None
) -> torch.Tensor:
    """A random cut with as many edges as `flows` in every row, drawn from the edges that row may attend to.

    Args:
        layout: the input's `TokenLayout`; flows: the flow(s) the control matches.
        seed: the draw (the sample's id is mixed in, so each sample gets its own edges).
        exclude_flow: draw only from edges the flow does not cut (raises `FlowError` where too few).

    Returns:
        ``(seq_len, seq_len)`` bool, True where query q may no longer attend to key k.
    """
    flows = [flows] if isinstance(flows, str) else list(flows)
    flow_cut = cut_matrix(layout, flows).numpy()
    n = layout.seq_len
    counts = flow_cut.sum(axis=1)
    rows = np.flatnonzero(counts)
    keys = np.arange(n)
    # Row q may lose keys 0..q-1, and itself only where the flow cuts its own edge.
    pool = keys[None, :] < rows[:, None]
    pool |= (keys[None, :] == rows[:, None]) & flow_cut[rows, rows][:, None]
    if exclude_flow:
        pool &= ~flow_cut[rows]
        short = rows[pool.sum(axis=1) < counts[rows]]
        if len(short):
            raise FlowError(
                f"sample {layout.sample_id}: rows {short.tolist()} have fewer edges outside {flows} than the "
                "flow cuts there; draw with exclude_flow=False"
            )
    scores = sample_seed(seed, layout.sample_id).random((len(rows), n))
    scores[~pool] = np.inf  # never drawn: ranks below the count are all in the pool
    ranks = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1, kind="stable")
    cut = np.zeros((n, n), dtype=bool)
    cut[rows] = ranks < counts[rows][:, None]
    return check_cut(torch.as_tensor(cut, device=device), n)


def keep_only_cut(layout, target: str, keep: Iterable[str], device=None) -> torch.Tensor:
    """Block every edge into `target` except from the groups in `keep` and each position's edge to itself.

    `keep` names groups (or "All", which keeps everything: the cut is then empty and blocks nothing).
    """
    keep = list(keep)
    for name in [target, *keep]:
        parse_flow(f"{name}->{name}")  # a known group name
    n = layout.seq_len
    targets = np.arange(n) if target == ALL else layout.group(target)
    if len(targets) == 0:
        raise FlowError(f"sample {layout.sample_id}: target group {target!r} is empty ({layout.why_empty(target)})")
    kept = np.zeros(n, dtype=bool)
    for name in keep:
        kept[np.arange(n) if name == ALL else layout.group(name)] = True
    keys = np.arange(n)
    cut = np.zeros((n, n), dtype=bool)
    cut[targets] = (keys[None, :] < targets[:, None]) & ~kept[None, :]
    return check_cut(torch.as_tensor(cut, device=device), n)


def overlap(control: torch.Tensor, flow: torch.Tensor) -> float:
    """Share of the flow's edges that the control cuts too (1: the control is the flow itself)."""
    return float((control & flow).sum()) / max(1, int(flow.sum()))


def control_sweeps(
    loaded,
    prepared,
    flow: str,
    window: int | None = None,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    kind: str = PAPER_WINDOW_KIND,
    engine: str = "fast",
    clean=None,
    exclude_flow: bool = False,
) -> pd.DataFrame:
    """One sample: the flow's sweep and one matched random control per seed, as one tidy table.

    Columns: those of `variants.CutSweep.to_frame`, plus `flow` (the flow each row belongs to), `kind`
    ("flow" or "control"), `seed` (-1 for the flow) and `overlap` (the control's share of the flow's edges).
    """
    clean = clean or clean_pass(loaded, prepared)
    flow_cut = cut_matrix(prepared.layout, [flow])
    frames = []
    cuts = [("flow", -1, flow_cut)]
    cuts += [
        ("control", int(s), matched_random_cut(prepared.layout, [flow], s, exclude_flow=exclude_flow)) for s in seeds
    ]
    for what, seed, cut in cuts:
        result = cut_sweep(loaded, prepared, cut, kind, window, label=flow, engine=engine, clean=clean)
        frame = result.to_frame()
        frame["kind"], frame["seed"], frame["overlap"] = what, seed, overlap(cut, flow_cut)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def control_table(
    loaded,
    samples: dict | Sequence,
    flows: Sequence[str],
    window: int | None = None,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    kind: str = PAPER_WINDOW_KIND,
    engine: str = "fast",
    progress: bool = True,
) -> pd.DataFrame:
    """`control_sweeps` for every sample and flow (samples as a list or by task), with a `task` column.

    A sample whose group is empty for a flow is left out of that flow (as the runner does); one whose
    answer has probability 0 is left out altogether. `table.attrs["excluded"]` lists (question_id,
    flow, reason) for each.
    """

    def sweeps(sample, prepared, clean, flow):
        return [control_sweeps(loaded, prepared, flow, window, seeds=seeds, kind=kind, engine=engine, clean=clean)]

    return sample_table(loaded, samples, flows, sweeps, desc="controls", progress=progress)


#: Prefix of a keep-only mask's name: "only Question->Last" blocks every edge into Last but the question's.
KEEP_ONLY = "only "


def mask_cut(layout, mask: str, device=None) -> torch.Tensor:
    """The cut of a named mask: a flow ("Image->Question") or a keep-only mask ("only Question+Image->Last")."""
    if mask.startswith(KEEP_ONLY):
        sources, target = mask[len(KEEP_ONLY) :].split("->")
        return keep_only_cut(layout, target.strip(), [s.strip() for s in sources.split("+")], device)
    return cut_matrix(layout, [mask], device)


def variant_table(
    loaded,
    samples: dict | Sequence,
    masks: Sequence[str],
    window: int | None = None,
    *,
    kinds: Sequence[str] = (PAPER_WINDOW_KIND,),
    engine: str = "fast",
    progress: bool = True,
) -> pd.DataFrame:
    """Each mask (`mask_cut` names) swept over each window kind for every sample: one tidy table.

    Columns: those of `variants.CutSweep.to_frame` (the mask's name in `flow`) plus `task`. Exclusions as
    `control_table`'s, in `table.attrs["excluded"]`.
    """

    def sweeps(sample, prepared, clean, mask):
        cut = mask_cut(prepared.layout, mask)
        for kind in kinds:
            yield cut_sweep(loaded, prepared, cut, kind, window, label=mask, engine=engine, clean=clean).to_frame()

    return sample_table(loaded, samples, masks, sweeps, desc="variants", progress=progress)
