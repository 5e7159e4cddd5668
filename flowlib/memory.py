"""How much memory the fast engine needs, and how many windows a batch can take on a device.

`sweep_memory` estimates the fast engine's peak from the model's config alone (the README's and
`benchmarks/gpu_check.py`'s figures); `auto_max_batch` turns the device's free memory (`free_memory`)
into windows per batch, which the fast engine's loop (`sweep.suffix_batches`, run by `sweep.sweep_fast`
and `variants.blocked_states`) uses with ``max_batch="auto"``: the numbers stay the same, only the
batches shrink.
"""

from __future__ import annotations

import dataclasses

import torch

#: Vocabulary rows of the unembedding converted to float64 at a time (`answer_probs`): 16 MiB at hidden 4096.
HEAD_CHUNK = 512
#: Share of the free memory `auto_max_batch` leaves unused, for allocator caching and fragmentation.
MEMORY_MARGIN = 0.25


@dataclasses.dataclass(frozen=True)
class SweepMemory:
    """Estimated bytes the fast engine needs beyond the weights for one sample (`sweep_memory`).

    Each field maps a term's name to bytes. `held`: the clean pass's outputs, kept for the whole
    sweep; `clean_forward`: the clean forward's largest transient; `per_batch`: each batch's shared
    tensors; `per_window`: what every window (batch row) adds in the layer being run.
    """

    held: dict
    clean_forward: dict
    per_batch: dict
    per_window: dict
    batch: int

    def peak(self, batch: int | None = None) -> int:
        """Held memory plus the larger of the clean forward and one batch of `batch` windows."""
        batch = self.batch if batch is None else batch
        sweep = sum(self.per_batch.values()) + batch * sum(self.per_window.values())
        return sum(self.held.values()) + max(sum(self.clean_forward.values()), sweep)

    @property
    def total(self) -> int:
        """`peak` at this estimate's batch."""
        return self.peak()


def sweep_memory(config, seq_len: int, suffix_len: int, dtype, batch: int = 1) -> SweepMemory:
    """Estimate the fast engine's peak extra memory for one sample, from the model's config alone.

    Args:
        config: the model's config (or its `text_config`).
        seq_len: n, input positions (image tokens included).
        suffix_len: s, positions recomputed: n minus the first target (at least `MIN_SUFFIX`).
        dtype: the model's dtype (or its name).
        batch: windows per batch (B).

    Terms, with L layers, hidden d, H query and G key/value heads of size h, MLP width I,
    vocabulary V and b bytes per element of `dtype`:
    held: KV cache ``2 L n G h b``; hidden states ``(L+1) n d b``.
    clean forward: one layer's activations over all n positions ``n (3I + 4d + 2Gh) b``.
    per batch: cut matrix ``n^2`` (bool); suffix mask ``s n``; float64 unembedding chunk ``min(V, HEAD_CHUNK) d 8``.
    per window, in the layer being run: the prefix keys and values concatenated with the row's
    ``2 n G h b``; their copy repeated to H heads when G < H (sdpa given a mask) ``2 n H h b``; attention
    scores ``H s n 4`` (an upper bound: float32, as the math kernel); knockout masks ``3 s n`` (bool);
    suffix activations ``s (3I + 6d) b``; float64 logits and softmax ``2 V 8``.
    An estimate, not a measurement: allocator caching and fragmentation come on top (`auto_max_batch`
    keeps a margin).
    """
    text = getattr(config, "text_config", config)
    n, s, batch = int(seq_len), int(suffix_len), int(batch)
    if not 1 <= s <= n or batch < 0:
        raise ValueError(f"need 1 <= suffix_len <= seq_len and batch >= 0; got suffix {s}, seq {n}, batch {batch}")
    b = (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize
    layers, d, heads = text.num_hidden_layers, text.hidden_size, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head = getattr(text, "head_dim", None) or d // heads
    inter, vocab = text.intermediate_size, text.vocab_size
    return SweepMemory(
        held={"KV cache": 2 * layers * n * kv_heads * head * b, "hidden states": (layers + 1) * n * d * b},
        clean_forward={"layer activations": n * (3 * inter + 4 * d + 2 * kv_heads * head) * b},
        per_batch={
            "cut matrix": n * n,
            "suffix mask": s * n,
            "unembedding chunk (float64)": min(vocab, HEAD_CHUNK) * d * 8,
        },
        per_window={
            "prefix keys/values": 2 * n * kv_heads * head * b,
            "repeated keys/values": 2 * n * heads * head * b if kv_heads < heads else 0,
            "attention scores": heads * s * n * 4,
            "knockout masks": 3 * s * n,
            "suffix activations": s * (3 * inter + 6 * d) * b,
            "answer logits (float64)": 2 * vocab * 8,
        },
        batch=batch,
    )


def free_memory(device) -> int | None:
    """Bytes free for new tensors on `device`, or None where it cannot be told.

    CUDA: the driver's free memory plus what PyTorch's allocator has reserved but not handed out.
    CPU: `MemAvailable` from /proc/meminfo (Linux); None elsewhere.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def auto_max_batch(memory: SweepMemory, windows: int, free: int | None, margin: float = MEMORY_MARGIN) -> int | None:
    """The most windows per batch that fit in `free` bytes less `margin`; None when all `windows` fit.

    Never less than 1 (a sample whose single window does not fit fails in the forward, as it would
    anyway). `free` None (unknown) gives None: all windows at once.
    """
    if free is None:
        return None
    budget = free * (1 - margin) - sum(memory.per_batch.values())
    rows = int(budget // max(1, sum(memory.per_window.values())))
    return None if rows >= windows else max(1, rows)
