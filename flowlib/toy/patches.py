"""What each image token should say: per-patch word targets and the auxiliary loss that teaches them.

Real LLaVA starts from a pretrained CLIP tower and a projector aligned to the word embeddings (its
stage-1 pretraining), so its image tokens already say, in the language model's own terms, what lies
where. A tower trained from scratch in an hour needs that signal spelled out: each image token is
trained to score, against the tied word embeddings, the words of the object covering it (`PATCH_WORDS`:
shape, colour, size, texture and the image halves it lies in; none for the background), and linear
heads read the token's row and column. The halves are named by ChooseRel's option words ("left",
"right", "above", "below"), as LLaVA's aligned tokens speak the question's language.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..data import drawing, scenes
from ..geometry import llava15_geometry
from .model import ToyConfig

PATCH_WORDS = ("shape", "color", "size", "texture", "side", "level")
PATCH_POSITIONS = ("row", "col")
SIDES = ("left", "right")
LEVELS = ("above", "below")


def patch_word_values() -> dict:
    """The words each `PATCH_WORDS` kind can take, in label order (label 0 = no object)."""
    return {
        "shape": drawing.SHAPES,
        "color": tuple(drawing.COLORS),
        "size": tuple(drawing.SIZES),
        "texture": scenes.TEXTURES,
        "side": SIDES,
        "level": LEVELS,
    }


@functools.lru_cache(maxsize=8)
def _patch_centres(width: int, height: int, image_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Original-pixel row and column read by each patch's centre pixel (-1 on padding)."""
    grid = llava15_geometry(width, height, image_size, patch_size, pad=True).grids[0]
    centre = np.arange(grid.rows) * patch_size + patch_size // 2
    return grid.source_rows[centre], grid.source_cols[centre]


def object_words(obj: dict, scene: dict) -> dict:
    """A scene-graph object's word of each `PATCH_WORDS` kind, in that order: its patch targets and description.

    Its side and level are the image halves (left or right, above or below the middle) holding its box's centre.
    """
    return {
        "shape": obj["name"],
        "color": obj["color"],
        "size": obj["size"],
        "texture": obj["texture"],
        "side": "left" if obj["x"] + obj["w"] / 2 < scene["width"] / 2 else "right",
        "level": "above" if obj["y"] + obj["h"] / 2 < scene["height"] / 2 else "below",
    }


def patch_labels(scene: dict, model_config: ToyConfig) -> torch.Tensor:
    """(patches, len(PATCH_WORDS) + 2) int labels of one scene, row-major like the image tokens.

    Columns: 1 + the index of the covering object's word in `patch_word_values()` per kind (0 where no
    object covers the patch's centre pixel), then the patch's row and column.
    """
    rows, cols = _patch_centres(scene["width"], scene["height"], model_config.image_size, model_config.patch_size)
    values = patch_word_values()
    grid = len(rows)
    labels = np.zeros((grid, grid, len(PATCH_WORDS) + 2), dtype=np.int64)
    labels[..., -2] = np.arange(grid)[:, None]
    labels[..., -1] = np.arange(grid)[None, :]
    for obj in scene["objects"].values():
        inside = ((rows >= obj["y"]) & (rows < obj["y"] + obj["h"]))[:, None] & (
            (cols >= obj["x"]) & (cols < obj["x"] + obj["w"])
        )[None, :]
        words = object_words(obj, scene)
        for i, kind in enumerate(PATCH_WORDS):
            labels[inside, i] = 1 + values[kind].index(words[kind])
    return torch.from_numpy(labels.reshape(grid * grid, len(PATCH_WORDS) + 2))


class PatchLoss(torch.nn.Module):
    """The auxiliary loss on the projector output (the language model's image embeddings).

    Word scores are dot products with the model's own (tied) input embeddings of the lowercase words,
    so no head is needed for them; the row and column heads are dropped after training, leaving a
    plain LlavaForConditionalGeneration.
    """

    def __init__(self, model, tokenizer, model_config: ToyConfig):
        super().__init__()
        values = patch_word_values()
        words = sorted({w for kind in PATCH_WORDS for w in values[kind]})
        self.embeddings = model.get_input_embeddings()
        self.register_buffer("word_ids", torch.tensor(tokenizer.convert_tokens_to_ids(words)))
        # label (1 + index) of each kind -> column in `words`; label 0 (no object) -> a dummy last column
        table = torch.full((len(PATCH_WORDS), 1 + max(len(v) for v in values.values())), len(words))
        for i, kind in enumerate(PATCH_WORDS):
            table[i, 1 : 1 + len(values[kind])] = torch.tensor([words.index(w) for w in values[kind]])
        self.register_buffer("column", table)
        grid = model_config.image_size // model_config.patch_size
        self.position_heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(model_config.hidden, grid) for name in PATCH_POSITIONS}
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scores = features @ self.embeddings.weight[self.word_ids].T  # (batch, patches, words)
        columns = self.column[torch.arange(len(PATCH_WORDS), device=labels.device), labels[..., : len(PATCH_WORDS)]]
        targets = torch.zeros(*scores.shape[:-1], scores.shape[-1] + 1, dtype=scores.dtype, device=scores.device)
        targets.scatter_(-1, columns, 1.0)
        words = torch.nn.functional.binary_cross_entropy_with_logits(scores, targets[..., :-1], reduction="none").sum(
            -1
        ).mean() / len(PATCH_WORDS)
        positions = sum(
            torch.nn.functional.cross_entropy(
                self.position_heads[name](features).flatten(0, 1), labels[..., len(PATCH_WORDS) + i].flatten()
            )
            for i, name in enumerate(PATCH_POSITIONS)
        ) / len(PATCH_POSITIONS)
        return words + positions


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(batch, patches, hidden): the projector output, i.e. the language model's image embeddings."""
    features = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
