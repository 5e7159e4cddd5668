"""Flows: which attention edges a knockout cuts.

A flow ``"A->B"`` (group names from `flowlib.layout.GROUPS`, or "All") names the edges from keys at the
positions of group A to queries at the positions of group B. This module turns flows into those positions
and into a boolean cut matrix, and refuses, before any forward, a flow that cannot be cut: an unknown or
empty group, a flow that removes no edge, flows that leave a position nothing to attend to. Cutting them
inside the model is `flowlib.knockout`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .layout import GROUPS, TokenLayout

#: The flows the paper's figures use.
PAPER_FLOWS = (
    "Image->Question",
    "Image->Last",
    "Question->Last",
    "Last->Last",
    "Related Image Patches->Question",
    "Other Image Patches->Question",
)
#: A pseudo-group of every position, for flows such as "All->Last" (everything but itself).
ALL = "All"


class FlowError(ValueError):
    """A flow name or a flow's token groups cannot be used."""


def parse_flow(flow: str) -> tuple[str, str]:
    """Split ``"Source->Target"`` into its two group names, checking both exist."""
    parts = flow.split("->") if isinstance(flow, str) else []
    if len(parts) != 2 or not all(p.strip() in GROUPS or p.strip() == ALL for p in parts):
        raise FlowError(
            f"unknown flow {flow!r}; a flow is 'Source->Target' with groups from: {', '.join(GROUPS)}, {ALL} "
            f"(the paper's flows: {', '.join(PAPER_FLOWS)})"
        )
    return parts[0].strip(), parts[1].strip()


def flow_groups(layout: TokenLayout, flow: str) -> tuple[np.ndarray, np.ndarray]:
    """Source and target positions of `flow` in `layout`; an empty group raises naming the sample."""
    source, target = parse_flow(flow)
    groups = {name: np.arange(layout.seq_len) if name == ALL else layout.group(name) for name in (source, target)}
    for name, positions in groups.items():
        if len(positions) == 0:
            why = layout.why_empty(name) if name != ALL else ""
            raise FlowError(
                f"sample {layout.sample_id}: group {name!r} of flow {flow!r} is empty"
                f"{f' ({why})' if why else ''}, so the flow would block nothing; the sample is left out of it"
            )
    return groups[source], groups[target]


def check_flows(layout: TokenLayout, flows: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Check that `flows` can be cut in `layout`; their (sources, targets, blocks-itself) position arrays.

    Works on the groups' positions alone (no n x n matrix), so checking thousands of samples is cheap.

    Raises:
        FlowError: unknown flow or group; an empty group (with the layout's reason); a flow that
            removes no edge; flows that would leave a position nothing to attend to.
    """
    checked = []
    for flow in flows:
        sources, targets = flow_groups(layout, flow)
        source, target = parse_flow(flow)
        # An edge k -> q is causal when k <= q; k == q is cut only when a group blocks itself.
        if not (source == target or sources.min() < targets.max()):
            raise FlowError(
                f"sample {layout.sample_id}: flow {flow!r} removes no edge, since every {source!r} position "
                f"comes after every {target!r} position and causal attention already forbids it"
            )
        checked.append((np.asarray(sources), np.asarray(targets), source == target))
    # Only target rows lose edges; row q is left empty when every key 0..q is cut.
    empty_rows = []
    for q in np.unique(np.concatenate([targets for _, targets, _ in checked])):
        keys = [
            sources[sources <= q] if itself else sources[sources < q]
            for sources, targets, itself in checked
            if q in targets
        ]
        cut_keys = len(keys[0]) if len(keys) == 1 else len(np.unique(np.concatenate(keys)))  # groups hold no repeats
        if cut_keys == q + 1:
            empty_rows.append(int(q))
    if empty_rows:
        raise FlowError(
            f"sample {layout.sample_id}: flows {list(flows)} leave position(s) {empty_rows} nothing to attend to; "
            "sdpa and eager disagree on such rows, so flowlib refuses them"
        )
    return checked


def cut_matrix(layout: TokenLayout, flows: Sequence[str], device=None) -> torch.Tensor:
    """Boolean ``(seq_len, seq_len)`` matrix, True where query q may no longer attend to key k.

    Only causal edges (k <= q) are listed. The diagonal is kept unless a flow has the
    same group as source and target. Built directly on `device` from the groups' positions (a
    LLaVA-NeXT input has ~2,400 positions: a matrix built on the host and copied would cost more
    than the sweep's suffix on a GPU). Raises what `check_flows` raises.
    """
    n = layout.seq_len
    cut = torch.zeros(n, n, dtype=torch.bool, device=device)
    for sources, targets, itself in check_flows(layout, flows):
        rows, cols = torch.as_tensor(targets, device=device), torch.as_tensor(sources, device=device)
        block = cols[None, :] <= rows[:, None] if itself else cols[None, :] < rows[:, None]
        cut[rows[:, None].expand_as(block)[block], cols[None, :].expand_as(block)[block]] = True
    return cut


def check_cut(cut: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Check a cut matrix made by other means than `cut_matrix`: boolean, square, causal, no empty row.

    Raises:
        FlowError: wrong shape or dtype, an edge to a later key (causal attention has none), or a
            row with nothing left to attend to (sdpa and eager disagree on such rows).
    """
    if cut.dtype != torch.bool or tuple(cut.shape) != (seq_len, seq_len):
        raise FlowError(f"a cut matrix must be bool ({seq_len}, {seq_len}), not {cut.dtype} {tuple(cut.shape)}")
    if bool(torch.triu(cut, diagonal=1).any()):
        raise FlowError("the cut matrix removes edges to later keys, which causal attention never has")
    empty = (cut.sum(dim=1) == torch.arange(1, seq_len + 1, device=cut.device)).nonzero().flatten().tolist()
    if empty:
        raise FlowError(f"the cut matrix leaves position(s) {empty} nothing to attend to; flowlib refuses such rows")
    return cut
