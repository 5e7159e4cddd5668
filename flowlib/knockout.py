"""Attention knockout: forbid token groups to attend to each other in chosen decoder layers.

A flow ``"A->B"`` (`flowlib.flows`, which builds and checks the cut) means: queries at the
positions of group B may not attend to keys at the positions of group A. The
knockout installs flowlib's own attention function for the language model only
(registered in transformers' `AttentionInterface` and `AttentionMaskInterface`
under a name unique to this context), cuts the edges inside that function, counts
per layer how many edges it actually removed, and after every forward checks that
edges were removed in exactly the chosen layers. Anything that would bypass it
(flash or flex attention, a later re-registration, a model that never calls it)
therefore raises instead of silently giving flat curves.

Conventions, chosen so that every engine and backend gives the same numbers:
- A position keeps its edge to itself unless the flow names one group as both
  source and target (``"Last->Last"``), so no query row is ever left with nothing
  to attend to; a flow that would leave a row empty is refused.
- Layers without cuts receive the library's mask untouched, so a knockout with no
  edges reproduces the stock model bit for bit.

Example:
    >>> with knockout(loaded, prepared.layout, ["Image->Last"], layers=range(0, 7)) as ko:
    ...     logits = loaded.model(**prepared.inputs).logits
    >>> ko.removed_edges()  # per layer, edges removed by the last forward
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .flows import FlowError, check_cut, cut_matrix
from .layout import TokenLayout
from .placement import execution_device

#: Attention implementations whose masks flowlib's function reproduces exactly.
SUPPORTED_BACKENDS = ("sdpa", "eager")
_counter = itertools.count()


class UnsupportedAttentionError(RuntimeError):
    """The model's attention implementation would ignore (or not take) a knockout mask."""


class KnockoutNotApplied(RuntimeError):
    """After a forward, the edges were not removed in exactly the chosen layers."""


def language_model(model) -> torch.nn.Module:
    """The decoder (e.g. `LlamaModel`) inside a LLaVA-family model."""
    return model.get_decoder()


class KnockoutAttention:
    """flowlib's attention function plus its bookkeeping (used by `knockout` and the fast sweep).

    Args:
        cut: ``(seq_len, seq_len)`` bool matrix from `cut_matrix` (None: cut nothing).
        schedule: bool ``(num_layers, rows)``: row r of the batch is knocked out in layer l
            when ``schedule[l, r]``; a single column applies to every row.
        backend: "sdpa" or "eager" kernel after the mask is cut.
        prefix: optional per-layer ``(key, value)`` of positions before the queries
            (batch 1), prepended to every row's keys (the fast sweep's clean prefix).
    """

    def __init__(self, cut: torch.Tensor | None, schedule: torch.Tensor, backend: str, prefix=None):
        if backend not in SUPPORTED_BACKENDS:
            raise UnsupportedAttentionError(f"backend {backend!r}; flowlib supports {SUPPORTED_BACKENDS}")
        self.name = f"flowlib_knockout_{next(_counter)}"
        # The schedule decides control flow on the host (which layers to cut), so it lives on the CPU:
        # reading a device tensor in an `if` would stall the GPU in every layer. A device copy masks rows.
        self.cut, self.schedule, self.backend, self.prefix = cut, schedule.bool().cpu(), backend, prefix
        self._device_schedule = schedule.bool().to(cut.device) if cut is not None else None
        # Copies of the cut and the row schedule per device: under a device map each layer's queries live
        # on its own device, and the mask follows them (copied once per device, not once per layer).
        self._copies = {} if cut is None else {cut.device: (cut, self._device_schedule)}
        self.num_layers = schedule.shape[0]
        self.reset()

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cut matrix and the device row schedule on `device` (a layer's, under a device map)."""
        if device not in self._copies:
            self._copies[device] = (self.cut.to(device), self._device_schedule.to(device))
        return self._copies[device]

    def reset(self) -> None:
        """Forget the counts of the previous forward."""
        self.calls = [0] * self.num_layers
        self.removed: list[torch.Tensor | None] = [None] * self.num_layers

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        self.calls[layer] += 1
        if self.prefix is not None:
            k0, v0 = (t.to(key.device) for t in self.prefix[layer])  # no copy unless the layer moved
            batch = query.shape[0]
            key = torch.cat([k0.expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([v0.expand(batch, -1, -1, -1), value], dim=2)
        q_len, kv_len = query.shape[2], key.shape[2]
        wide = self.schedule.shape[1] > 1
        if self.cut is not None and bool(self.schedule[layer, : query.shape[0] if wide else 1].any()):
            cut_here, schedule_here = self.on(query.device)
            rows = schedule_here[layer, : query.shape[0]] if wide else schedule_here[layer]
            if kv_len != self.cut.shape[0]:
                raise KnockoutNotApplied(
                    f"layer {layer}: attention over {kv_len} keys, but the knockout was built for an input of "
                    f"{self.cut.shape[0]} tokens; run it on the prepared input of its layout only"
                )
            if attention_mask is None:
                # sdpa skipped the mask (purely causal): build the causal mask before cutting edges.
                attention_mask = sdpa_mask(
                    batch_size=1,
                    q_length=q_len,
                    kv_length=kv_len,
                    q_offset=kv_len - q_len,
                    allow_is_causal_skip=False,
                    device=query.device,
                )
            cut = cut_here[kv_len - q_len :, :kv_len]
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            per_row = (allowed & cut).sum(dim=(1, 2, 3))
            self.removed[layer] = per_row * rows
            drop = cut[None, None] & rows[:, None, None, None]
            if attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & ~drop
            else:
                attention_mask = attention_mask.masked_fill(drop, torch.finfo(attention_mask.dtype).min)
        if self.backend == "sdpa":
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return _eager(module, query, key, value, attention_mask, scaling)

    def verify(self) -> None:
        """Raise `KnockoutNotApplied` unless edges were removed in exactly the scheduled (layer, row)s."""
        for layer in range(self.num_layers):
            want = self.schedule[layer]
            if self.calls[layer] == 0:
                if want.any():
                    raise KnockoutNotApplied(
                        f"flowlib's attention function was never called in layer {layer}: the model does not use "
                        "it (another attention implementation, or a later registration under its name)"
                    )
                continue
            if self.calls[layer] != 1:
                raise KnockoutNotApplied(f"layer {layer}: attention ran {self.calls[layer]} times in one forward")
            removed = self.removed[layer]
            hit = torch.zeros_like(want) if removed is None else (removed > 0).cpu()
            want = want.cpu()
            if len(want) > 1:  # per-row schedule: rows past the batch must not be scheduled yet
                want = torch.cat([want, torch.zeros(max(0, len(hit) - len(want)), dtype=torch.bool)])
                hit = torch.cat([hit, torch.zeros(len(want) - len(hit), dtype=torch.bool)])
            want = want.expand_as(hit)
            if not torch.equal(hit.cpu(), want):
                raise KnockoutNotApplied(
                    f"layer {layer}: edges removed in rows {hit.nonzero().flatten().tolist()} but scheduled in rows "
                    f"{want.nonzero().flatten().tolist()}"
                )

    def removed_edges(self) -> list[int]:
        """Edges removed per layer (summed over batch rows) by the last forward."""
        return [0 if r is None else int(r.sum()) for r in self.removed]


def _eager(module, query, key, value, attention_mask, scaling):
    """Plain softmax attention that returns its weights (what tests inspect)."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # a boolean mask must be turned additive, never added as 0/1
            attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                ~attention_mask, torch.finfo(scores.dtype).min
            )
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def current_backend(model) -> str:
    """The language model's attention implementation, refusing those a knockout cannot use."""
    name = language_model(model).config._attn_implementation
    if name not in SUPPORTED_BACKENDS:
        raise UnsupportedAttentionError(
            f"the language model uses attention {name!r}, which cannot take (or ignores) an arbitrary mask; "
            f"load the model with attn_implementation='sdpa' (or one of {SUPPORTED_BACKENDS})"
        )
    return name


@contextlib.contextmanager
def installed(model, attention: KnockoutAttention):
    """Make `attention` the language model's attention function; restore the original in `finally`.

    Example:
        >>> with installed(loaded.model, KnockoutAttention(None, torch.zeros(L, 1), "sdpa")):
        ...     loaded.model(**inputs)
    """
    config = model.config
    original = {
        "text_config": config.text_config._attn_implementation,
        "vision_config": config.vision_config._attn_implementation,
    }
    current_backend(model)
    AttentionInterface.register(attention.name, attention)
    # The mask builder of the kernel we call after cutting; without it the function gets no mask at all.
    AttentionMaskInterface.register(attention.name, sdpa_mask if attention.backend == "sdpa" else eager_mask)
    try:
        model.set_attn_implementation({"text_config": attention.name, "vision_config": original["vision_config"]})
        lm = language_model(model)
        wrong = {m.config._attn_implementation for m in lm.modules() if hasattr(m, "layer_idx")}
        if lm.config._attn_implementation != attention.name or wrong - {attention.name}:
            raise UnsupportedAttentionError(
                f"setting the language model's attention to {attention.name!r} did not take (it reports "
                f"{lm.config._attn_implementation!r}); this model class cannot switch attention implementations"
            )
        yield attention
    finally:
        model.set_attn_implementation(original)
        AttentionInterface._global_mapping.pop(attention.name, None)
        AttentionMaskInterface._global_mapping.pop(attention.name, None)


def layer_schedule(layers: Iterable[int], num_layers: int, device=None) -> torch.Tensor:
    """``(num_layers, 1)`` bool schedule of `layers`, checked against the model's depth."""
    layers = sorted(set(int(l) for l in layers))
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist; the model has layers 0..{num_layers - 1}")
    schedule = torch.zeros(num_layers, 1, dtype=torch.bool, device=device)
    schedule[layers] = True
    return schedule


@contextlib.contextmanager
def knockout(
    loaded,
    layout: TokenLayout,
    flows: Sequence[str],
    layers: Iterable[int],
    *,
    backend: str | None = None,
    cut: torch.Tensor | None = None,
):
    """Block `flows` in `layers` for every forward of `loaded.model` inside the block.

    Args:
        loaded: a `flowlib.models.LoadedModel` (or anything with `.model` and `.num_layers`).
        layout: the `TokenLayout` of the prepared input the forwards will run on.
        flows: e.g. ``["Image->Question"]``; empty blocks nothing (and checks that).
        layers: decoder layers (0-based) where the flows are blocked.
        backend: kernel after the cut, "sdpa" or "eager" (returns attention weights);
            defaults to the model's own implementation.
        cut: instead of `flows` (pass ``[]``), the edges themselves as a ``(seq_len, seq_len)`` bool
            matrix like `cut_matrix`'s (random controls, keep-only masks; `check_cut`); one with no
            edge blocks nothing.

    Yields:
        The `KnockoutAttention`, whose `removed_edges()` reports the last forward.

    Raises:
        FlowError: unknown flow or group, empty group, or a flow that removes nothing.
        UnsupportedAttentionError: the model uses flash, flex or another implementation.
        KnockoutNotApplied: (from a forward) edges were not removed in exactly `layers`.

    Example:
        >>> with knockout(loaded, prepared.layout, ["Question->Last"], layers=[10, 11, 12]) as ko:
        ...     out = loaded.model(**prepared.inputs)
    """
    model = loaded.model
    backend = backend or current_backend(model)
    device = execution_device(language_model(model).layers[0])
    flows = list(flows)
    if cut is not None:
        if flows:
            raise FlowError("give either flows or a cut matrix, not both")
        cut = check_cut(cut, layout.seq_len)
        cut = cut.to(device) if bool(cut.any()) else None
    else:
        cut = cut_matrix(layout, flows, device) if flows else None
    schedule = layer_schedule(layers, loaded.num_layers, device)
    if cut is None:
        schedule.zero_()
    attention = KnockoutAttention(cut, schedule, backend)
    lm = language_model(model)
    # Hooks on the decoder bracket every forward: reset the counts before, prove the cut after.
    handles = [
        lm.register_forward_pre_hook(lambda *_: attention.reset()),
        lm.register_forward_hook(lambda *_: attention.verify()),
    ]
    try:
        with installed(model, attention):
            yield attention
    finally:
        for handle in handles:
            handle.remove()
