"""Layer sweeps: the answer's relative change when a flow is blocked in a window around each layer.

For layer l the window is the k consecutive layers centred on l, truncated (not
shifted) at the ends, exactly as the paper: ``range(max(0, l - k//2), min(L, l - (-k//2)))``.
The metric is ``100 * (p_blocked - p_base) / p_base`` for the first answer token the
unblocked model generates greedily (docs/protocol.md).

Two engines share one interface and give the same numbers:
- `sweep_reference`: one full forward per window, the paper's method.
- `sweep_fast`: one clean pass; positions before the flow's first target never
  change, so their keys and values are reused, and only the suffix is recomputed
  from each window's first layer, all windows batched (a window joins the batch at
  its first layer with the clean hidden state). See docs/protocol.md. Its loop,
  `suffix_batches`, takes any cut and any layers per step (`variants.blocked_states`).

`memory.sweep_memory` estimates the fast engine's memory from the model's config; with
``max_batch="auto"`` (the default) `sweep_fast` sizes its batches of windows to the
device's free memory (`auto_max_batch`), which leaves the numbers unchanged.

Example:
    >>> result = layer_sweep(loaded, prepared, "Question->Last", window=7, engine="fast")
    >>> result.relative_change  # one value per layer
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from transformers.masking_utils import sdpa_mask

from .config import default_window
from .families.base import suffix_positions
from .flows import cut_matrix, flow_groups
from .knockout import KnockoutAttention, current_backend, installed, knockout, language_model
from .memory import HEAD_CHUNK, auto_max_batch, free_memory, sweep_memory
from .placement import execution_device, loaded_weights

Flows = str | Sequence[str]
#: The fast engine recomputes at least this many final positions (see `sweep_fast`).
MIN_SUFFIX = 16
#: ... and a multiple of this many (see `suffix_start`).
SUFFIX_ALIGN = 16


class ZeroBaseProbability(ValueError):
    """The unblocked probability of the answer token is 0 (or not finite): no relative change exists."""


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """The window of `window` layers centred on `layer`, truncated at 0 and `num_layers`."""
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


def sweep_windows(window: int, num_layers: int) -> list[range]:
    """The windows for l = 0..num_layers-1; a window wider than the model raises."""
    if not 1 <= int(window) <= num_layers:
        raise ValueError(f"window {window} does not fit a model of {num_layers} layers; use 1..{num_layers}")
    return [window_layers(l, int(window), num_layers) for l in range(num_layers)]


def relative_change(blocked, base) -> np.ndarray:
    """``100 * (blocked - base) / base``; a base of exactly 0 raises `ZeroBaseProbability`."""
    base = float(base)
    if not base > 0 or not np.isfinite(base):
        raise ZeroBaseProbability(f"base probability {base!r}: the relative change is undefined")
    return 100.0 * (np.asarray(blocked, dtype=np.float64) - base) / base


def answer_probs(model, normed: torch.Tensor, token: int) -> torch.Tensor:
    """Probability of `token` read from final-normed last-position states ``(..., hidden)``, in float64.

    The unembedding and softmax run in float64: the metric divides by p and multiplies
    by 100, so one float32 rounding unit of a logit (~1e-7) would already move the
    relative change by ~1e-5 and swamp the engines' agreement. The unembedding is
    converted `HEAD_CHUNK` vocabulary rows at a time: a whole float64 copy of Llama-3's
    128,320 x 4,096 matrix would take 4.2 GB, and chunks that stay in cache convert ~2.5x
    faster on a CPU. On a CPU each state also gets its own product, so its probability has
    the same bits however many states come with it (BLAS picks kernels by row count); GPU
    libraries promise no such thing, and one product per chunk saves thousands of launches.
    """
    head = model.get_output_embeddings()
    with loaded_weights(head):  # an offloaded head's weights are on `meta` between forwards
        states = normed.double().reshape(-1, normed.shape[-1]).to(head.weight.device)
        logits = torch.empty(len(states), head.weight.shape[0], dtype=torch.float64, device=states.device)
        one_by_one = states.device.type == "cpu"
        for start in range(0, head.weight.shape[0], HEAD_CHUNK):
            rows = slice(start, start + HEAD_CHUNK)
            weight = head.weight[rows].double()
            bias = None if head.bias is None else head.bias[rows].double()
            if one_by_one:
                for i, state in enumerate(states):
                    logits[i, rows] = torch.nn.functional.linear(state[None], weight, bias)[0]
            else:
                logits[:, rows] = torch.nn.functional.linear(states, weight, bias)
    return torch.softmax(logits, -1)[:, token].reshape(normed.shape[:-1])


@dataclasses.dataclass
class CleanPass:
    """The unblocked forward of one prepared input: answer token and what the fast engine reuses."""

    answer_token: int
    base_prob: float
    logits: torch.Tensor  # (vocab,) float32 model logits at the last position
    hidden_states: tuple  # L+1 tensors (1, seq, hidden): inputs of layers 0..L-1, then the normed output
    cache: object  # the DynamicCache of keys and values per layer


@torch.no_grad()
def clean_pass(loaded, prepared) -> CleanPass:
    """Run the unblocked model once; the greedy first answer token is the argmax at the last position."""
    current_backend(loaded.model)
    # logits_to_keep=1: only the last position is read; full logits of a NeXT input at Llama-3's
    # 128k vocabulary would take ~1.5 GB (float32) per forward.
    out = loaded.model(**prepared.inputs, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    token = int(logits.argmax())  # the greedy token, in the model's own precision
    prob = float(answer_probs(loaded.model, out.hidden_states[-1][0, -1], token))
    return CleanPass(token, prob, logits, out.hidden_states, out.past_key_values)


@dataclasses.dataclass
class SweepResult:
    """One sample x flow sweep: per layer l, the answer token's probability with window(l) blocked."""

    question_id: str
    flow: str
    window: int
    windows: list[range]
    answer_token: int
    base_prob: float
    blocked_probs: np.ndarray
    engine: str

    @property
    def relative_change(self) -> np.ndarray:
        return relative_change(self.blocked_probs, self.base_prob)

    def to_frame(self) -> pd.DataFrame:
        """One row per layer (question_id, flow, layer, window, window_layers, probabilities, change)."""
        return pd.DataFrame(
            {
                "question_id": self.question_id,
                "flow": self.flow,
                "layer": np.arange(len(self.windows), dtype=np.int64),
                "window": self.window,
                "window_layers": [f"{w.start}-{w.stop - 1}" for w in self.windows],
                "window_first": np.array([w.start for w in self.windows], dtype=np.int64),
                "window_last": np.array([w.stop - 1 for w in self.windows], dtype=np.int64),
                "base_prob": self.base_prob,
                "blocked_prob": self.blocked_probs,
                "relative_change": self.relative_change,
                "answer_token": self.answer_token,
            }
        )


def _setup(loaded, prepared, flow: Flows, window: int | None, clean: CleanPass | None):
    flows = [flow] if isinstance(flow, str) else list(flow)
    window = default_window(loaded.num_layers) if window is None else window
    windows = sweep_windows(window, loaded.num_layers)  # 0, or wider than the model: refused
    window = int(window)
    for f in flows:  # validate names and groups before any forward
        flow_groups(prepared.layout, f)
    clean = clean or clean_pass(loaded, prepared)
    if not (clean.base_prob > 0 and np.isfinite(clean.base_prob)):
        raise ZeroBaseProbability(
            f"sample {prepared.layout.sample_id}: the answer token's base probability is {clean.base_prob!r}; "
            "the sample is excluded (no relative change without a base)"
        )
    return flows, window, windows, clean


def _result(prepared, flows, window, windows, clean, probs, engine) -> SweepResult:
    return SweepResult(
        prepared.layout.sample_id,
        " + ".join(flows),
        window,
        windows,
        clean.answer_token,
        clean.base_prob,
        np.asarray(probs, dtype=np.float64),
        engine,
    )


@torch.no_grad()
def sweep_reference(
    loaded, prepared, flow: Flows, window: int | None = None, *, clean: CleanPass | None = None
) -> SweepResult:
    """The paper's method: one full knocked-out forward per window.

    Args:
        loaded: a `LoadedModel`; prepared: its `PreparedInput` for one sample.
        flow: a flow name (or several blocked together); window: k (default: `config.default_window`).
        clean: a `clean_pass` already computed for this input (saves one forward).
    """
    flows, window, windows, clean = _setup(loaded, prepared, flow, window, clean)
    normed = []
    for layers in windows:
        with knockout(loaded, prepared.layout, flows, layers):
            out = loaded.model(**prepared.inputs, output_hidden_states=True, logits_to_keep=1)
        normed.append(out.hidden_states[-1][0, -1])
    # One float64 unembedding for all windows: converting the head once per window cost ~1 s each on a CPU.
    probs = answer_probs(loaded.model, torch.stack(normed), clean.answer_token).cpu().numpy()
    return _result(prepared, flows, window, windows, clean, probs, "reference")


def suffix_start(layout, flows: Sequence[str]) -> int:
    """First position the fast engine recomputes for `flows`: their first target, or earlier.

    Nothing before the first target changes, so starting earlier is equally exact. The suffix is
    at least `MIN_SUFFIX` positions long, which keeps every matrix product above the few-row sizes
    where BLAS switches to other kernels (another summation order than the full forward's rows),
    and a multiple of `SUFFIX_ALIGN`, so that the B x suffix rows of a batch of B windows make whole
    16-row blocks whatever B is: MKL then gives a row the same bits whether its window runs alone
    or batched (on its AVX-512 and SSE paths, the latter being the portable kernels; its AVX2 path
    still differs by up to ~1e-9 in probability, ~1e-5 percentage points).
    """
    n = layout.seq_len
    first = int(min(flow_groups(layout, f)[1].min() for f in flows))
    length = max(n - first, MIN_SUFFIX)
    return max(0, n - -(-length // SUFFIX_ALIGN) * SUFFIX_ALIGN)


class PerDevice:
    """Tensors copied once to each device that asks for them (`on`): the fast sweep's shared mask, positions and
    rotary tables follow each decoder layer's device under a device map, at no cost on one device."""

    def __init__(self, *tensors: torch.Tensor):
        self._copies = {tensors[0].device: tensors}

    def on(self, device: torch.device) -> tuple:
        if device not in self._copies:
            first = next(iter(self._copies.values()))
            self._copies[device] = tuple(t.to(device) for t in first)
        return self._copies[device]


@torch.no_grad()
def suffix_batches(
    loaded, prepared, cut: torch.Tensor, t0: int, schedules: Sequence[Sequence[int]], clean: CleanPass, max_batch
):
    """The fast engine's loop (`sweep_fast`, `variants.blocked_states`): `cut` blocked in each schedule's layers.

    Positions before `t0` must be outside the cut's rows: their clean keys and values are reused, and
    only positions t0..n-1 run through the layers, from each schedule's first layer on (earlier layers
    equal the clean pass). Schedules are sorted layer numbers; empty ones are skipped. They run in
    batches of at most `max_batch` (an int, None for all at once, or "auto": `auto_max_batch`), each
    schedule joining the batch at its first layer with the clean hidden state, and every layer on its
    own device (a device map).

    Yields:
        ``(steps, normed)`` per batch: the indices of the schedules it ran, and their final-normed
        last-position states ``(len(steps), hidden)`` on the final norm's device.
    """
    model, n, num_layers = loaded.model, prepared.layout.seq_len, loaded.num_layers
    lm = language_model(model)
    backend = current_backend(model)
    device = clean.hidden_states[0].device
    order = sorted((i for i, s in enumerate(schedules) if len(s)), key=lambda i: schedules[i][0])
    if not order:
        return
    cut = cut.to(device)
    prefix = [(layer.keys[:, :, :t0], layer.values[:, :, :t0]) for layer in clean.cache.layers]
    # The suffix's rotary positions as the full forward gives them (Qwen's 3 rows after the image are not t0..n-1).
    positions = suffix_positions(loaded, prepared, t0, device)
    # The suffix's causal mask against all n keys, from the library's helper (never sdpa's is_causal,
    # which would align the suffix queries with the first keys).
    mask = sdpa_mask(batch_size=1, q_length=n - t0, kv_length=n, q_offset=t0, allow_is_causal_skip=False, device=device)
    if max_batch == "auto":
        memory = sweep_memory(model.config, n, n - t0, clean.hidden_states[0].dtype)
        max_batch = auto_max_batch(memory, len(order), free_memory(device))
    step = max_batch or len(order)
    for begin in range(0, len(order), step):
        chunk = order[begin : begin + step]
        rows = [schedules[i] for i in chunk]
        schedule = torch.zeros(num_layers, len(rows), dtype=torch.bool, device=device)
        for r, layers in enumerate(rows):
            schedule[list(layers), r] = True
        attention = KnockoutAttention(cut, schedule, backend, prefix=prefix)
        first = rows[0][0]
        rotary = lm.rotary_emb(clean.hidden_states[first][:, t0:], positions)
        shared = PerDevice(mask, positions, *rotary)  # each layer's inputs on its own device (a device map)
        hidden = None
        with installed(model, attention):
            for j in range(first, num_layers):
                here = execution_device(lm.layers[j])
                joining = sum(1 for layers in rows if layers[0] == j)
                if joining:  # schedules starting here enter with the clean state (rows stay sorted by start)
                    state = clean.hidden_states[j][:, t0:].to(here).expand(joining, -1, -1)
                    hidden = state if hidden is None else torch.cat([hidden.to(here), state])
                mask_j, positions_j, cos, sin = shared.on(here)
                hidden = lm.layers[j](
                    hidden.to(here), attention_mask=mask_j, position_ids=positions_j, position_embeddings=(cos, sin)
                )
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            attention.verify()
        # Normed over the whole suffix, as the full forward norms every row.
        yield chunk, lm.norm(hidden.to(execution_device(lm.norm)))[:, -1]


@torch.no_grad()
def sweep_fast(
    loaded,
    prepared,
    flow: Flows,
    window: int | None = None,
    *,
    clean: CleanPass | None = None,
    max_batch: int | str | None = "auto",
) -> SweepResult:
    """Same numbers as `sweep_reference`, recomputing only the suffix from the first target on.

    Args:
        max_batch: at most this many windows per batch (bounds memory: each row holds a
            copy of the prefix keys and values); "auto" (default): as many as `auto_max_batch`
            finds room for in the device's free memory; None: all windows at once. The numbers
            do not depend on it: bit for bit with MKL's AVX-512 or portable kernels, to rounding
            elsewhere (see `suffix_start`).
    """
    whole = isinstance(max_batch, numbers.Integral) and not isinstance(max_batch, bool)
    if not (max_batch is None or (isinstance(max_batch, str) and max_batch == "auto") or (whole and max_batch >= 1)):
        raise ValueError(f"max_batch must be a whole number >= 1, 'auto' or None, not {max_batch!r}")
    flows, window, windows, clean = _setup(loaded, prepared, flow, window, clean)
    cut = cut_matrix(prepared.layout, flows, clean.hidden_states[0].device)
    t0 = suffix_start(prepared.layout, flows)
    probs = np.empty(len(windows))
    for steps, normed in suffix_batches(loaded, prepared, cut, t0, windows, clean, max_batch):
        probs[steps] = answer_probs(loaded.model, normed, clean.answer_token).cpu().numpy()
    return _result(prepared, flows, window, windows, clean, probs, "fast")


ENGINES = {"reference": sweep_reference, "fast": sweep_fast}


def layer_sweep(
    loaded, prepared, flow: Flows, window: int | None = None, *, engine: str = "fast", **kwargs
) -> SweepResult:
    """Run one sweep with the named engine ("fast" or "reference")."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    return ENGINES[engine](loaded, prepared, flow, window, **kwargs)
