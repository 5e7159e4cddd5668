"""One training step: the batch's forward pass with the shared system prompt computed once, and its losses.

The main loss is on the answer tokens (the capitalised answer word and `</s>`); the auxiliary losses help
a model trained from scratch in an hour: predicting the question's words, the named queries' answers, the
scene description, and the per-patch word loss on the image tokens (`PatchLoss`).
"""

from __future__ import annotations

import torch

from .patches import PatchLoss
from .recipe import TrainConfig

#: The losses a step logs, in the order of `log.json`'s keys.
LOSSES = ("loss", "aux_loss", "question_loss", "query_loss", "describe_loss")


def shared_prefix_length(input_ids: torch.Tensor, image_token_id: int) -> int:
    """How many leading positions hold the same token in every row, up to the first image token."""
    same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != image_token_id)
    return int(same.long().cumprod(0).sum())


def forward_shared_prefix(model, batch: dict) -> tuple[torch.Tensor, int]:
    """A training batch's logits, the positions every row shares (the system prompt) computed once.

    Every sample opens with the same 30 tokens of system prompt and `USER:` before its image: they run
    for one row and their keys and values are repeated for the batch, which gives the logits of a plain
    forward pass (to float rounding, tested) in less time (`benchmarks/bench_train_step.py`). Returns the
    logits of the positions after the shared prefix and the prefix's length.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prefix = shared_prefix_length(ids, model.config.image_token_id)
    if prefix == 0:
        return model(**batch, use_cache=False).logits, 0
    cache = model(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(ids))
    rest = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
    logits = model(input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=cache, use_cache=True, **rest).logits
    return logits, prefix


def step_losses(model, patch_loss: PatchLoss, batch: dict, projected: dict, train: TrainConfig) -> dict:
    """Run `batch` forward, backpropagate the recipe's weighted sum of losses, return each loss (`LOSSES`).

    `projected` receives the projector output during the forward pass (a hook), for the patch loss.
    """
    batch = dict(batch)
    patch_targets, labels = batch.pop("patch_labels"), batch.pop("labels")
    question_labels, describe_labels = batch.pop("question_labels"), batch.pop("describe_labels")
    query_labels = batch.pop("query_labels")
    logits, prefix = forward_shared_prefix(model, batch)
    logits = logits[:, :-1].flatten(0, 1)

    def loss_on(target: torch.Tensor) -> torch.Tensor:
        # Targets of the positions after the shared prefix, each predicting the next token.
        return torch.nn.functional.cross_entropy(logits, target[:, prefix + 1 :].flatten())

    losses = {
        "loss": loss_on(labels),
        "question_loss": loss_on(question_labels),
        "query_loss": loss_on(query_labels),
        "describe_loss": loss_on(describe_labels),
        "aux_loss": patch_loss(projected.pop("features"), patch_targets),
    }
    total = losses["loss"] + train.question_weight * losses["question_loss"]
    total = total + train.query_weight * losses["query_loss"]
    total = total + train.describe_weight * losses["describe_loss"]
    (total + train.aux_weight * losses["aux_loss"]).backward()
    return losses
