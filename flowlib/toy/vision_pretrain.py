"""Vision pretraining: the tower and projector alone learn to name each patch's object words before the main steps.

Real LLaVA starts from a pretrained CLIP tower; this one starts from scratch, so before the decoder
learns anything it is given image tokens that already say which object they belong to. One linear head
per `PATCH_WORDS` kind and per `PATCH_POSITIONS` coordinate (dropped afterwards) reads the projector
output; the scenes are a fixed pool of chunks far from the main stream's (`PRETRAIN_FIRST_CHUNK`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .model import ToyConfig
from .patches import PATCH_POSITIONS, PATCH_WORDS, image_features, patch_word_values
from .recipe import TrainConfig
from .stream import encode_images

#: Pretraining scenes are chunks k >= this of the stream's seed: the main stream never reaches them.
PRETRAIN_FIRST_CHUNK = 1_000_000


def pretrain_vision(
    loaded, model_config: ToyConfig, train_config: TrainConfig, seed: int, device: torch.device | None = None
) -> dict:
    """Train the vision tower and projector alone to name each patch's object words; return their accuracy.

    The pool of `vision_pretrain_chunks` chunks is shuffled by `seed` every epoch. Returns the per-kind
    accuracy on object patches of a held-out chunk, the mean loss of the first and the last tenth of the
    steps, the steps and the seconds taken.
    """
    device = torch.device("cpu") if device is None else device
    from tqdm import tqdm

    started = time.time()
    model = loaded.model
    values = patch_word_values()
    grid = model_config.image_size // model_config.patch_size
    kinds = PATCH_WORDS + PATCH_POSITIONS  # the columns of `patch_labels`, in order
    heads = torch.nn.ModuleList(
        [
            torch.nn.Linear(model_config.hidden, grid if kind in PATCH_POSITIONS else 1 + len(values[kind]))
            for kind in kinds
        ]
    ).to(device)
    chunks = [
        encode_images(loaded.processor, model_config, train_config.chunk_per_task, seed, PRETRAIN_FIRST_CHUNK + i)
        for i in range(train_config.vision_pretrain_chunks + 1)
    ]
    held_out = chunks.pop()
    pixels = torch.cat([c["pixel_values"] for c in chunks])
    labels = torch.cat([c["patch_labels"] for c in chunks])
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        *heads.parameters(),
    ]
    optimizer = torch.optim.AdamW(params, lr=train_config.vision_lr, weight_decay=train_config.weight_decay)
    order = torch.Generator().manual_seed(seed)
    batch = train_config.vision_pretrain_batch
    batches_per_epoch = len(pixels) // batch
    losses = []
    for step in tqdm(range(train_config.vision_pretrain_steps), desc="vision pretraining", mininterval=10):
        position = step % batches_per_epoch
        if position == 0:
            permutation = torch.randperm(len(pixels), generator=order)
        index = permutation[position * batch : (position + 1) * batch]
        features = image_features(model, pixels[index].to(device))
        target = labels[index].to(device)
        loss = sum(
            torch.nn.functional.cross_entropy(head(features).flatten(0, 1), target[..., i].flatten())
            for i, head in enumerate(heads)
        ) / len(heads)
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, train_config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        features = image_features(model, held_out["pixel_values"].to(device))
        target = held_out["patch_labels"].to(device)
        on_object = target[..., 0] > 0
        accuracy = {
            kind: round(float((head(features).argmax(-1) == target[..., i])[on_object].float().mean()), 4)
            for i, (kind, head) in enumerate(zip(kinds, heads))
        }
    tenth = max(1, len(losses) // 10)
    return {
        "steps": train_config.vision_pretrain_steps,
        "seconds": round(time.time() - started, 1),
        "loss_first_tenth": round(float(np.mean(losses[:tenth])), 4),
        "loss_last_tenth": round(float(np.mean(losses[-tenth:])), 4),
        "held_out_patch_accuracy": accuracy,
    }
