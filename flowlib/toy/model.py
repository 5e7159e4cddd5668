"""The offline default model ("toy-llava"): its architecture, vocabulary and answer format.

A real `LlavaForConditionalGeneration` (CLIP vision tower, two-layer GELU
projector, Llama decoder) small enough to train on two CPU cores in under an
hour (`python -m flowlib.toy`), deep enough (12 decoder layers) to speak of lower,
middle and higher layers. It reads the paper's Vicuna prompt and an image padded
to a square like the original LLaVA-1.5.

As in LLaVA, questions and options are lowercase while the model answers with
the capitalised word ("Red", then `</s>`), so the answer lens can tell the
lowercase option tokens of the question from the capitalised answer token.

Example:
    >>> loaded = build_toy_model(ToyConfig(), seed=0)   # untrained, a LoadedModel
    >>> answer_target("red")
    'Red'
"""

from __future__ import annotations

import dataclasses

import torch

from .. import config as cfg
from ..data import drawing, scenes
from ..tiny import build_llava, build_processor, word_level_tokenizer

#: Words the synthetic world answers with or offers as options (lowercase).
ANSWER_WORDS = tuple(
    sorted(
        set(drawing.SHAPES)
        | set(drawing.COLORS)
        | set(drawing.SIZES)
        | set(scenes.TEXTURES)
        | set(scenes.ATTRIBUTES)
        | {"left", "right", "above", "below", "yes", "no"}
    )
)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Architecture of the toy LLaVA; every default says why it is what it is."""

    image_size: int = cfg.TOY_IMAGE_SIZE  # 128 px square: the synthetic world's smallest object keeps 22 px
    patch_size: int = cfg.TOY_PATCH_SIZE  # 16 px: an 8 x 8 grid of 64 image tokens (LLaVA-1.5: 24 x 24)
    vision_hidden: int = 96  # wide enough for shape, colour, size and texture of a patch
    vision_layers: int = 3  # patches must exchange information to see a shape that spans several of them
    vision_feature_layer: int = -1  # the tower is trained from scratch, so its last layer is used (LLaVA-1.5: -2)
    hidden: int = 128  # decoder width: as fast as 64 or 96 on 2 CPU cores (per-op overhead dominates there)
    layers: int = 12  # enough depth for lower / middle / higher layers as in the paper's 32-40
    heads: int = 4  # head dimension 32: several heads per layer for the knockout and lens analyses
    tie_embeddings: bool = True  # with "Red" initialised as "red", copying an option is easy from step 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def toy_vocabulary() -> tuple[str, ...]:
    """The toy tokenizer's words: the world's words, `?` and `,`, and the capitalised answer words."""
    words = set(scenes.synthetic_vocabulary()) | set(ANSWER_WORDS)
    words |= {answer_target(w) for w in ANSWER_WORDS}
    return tuple(sorted(words)) + tuple(scenes.SYNTHETIC_PUNCTUATION)


def answer_target(answer: str) -> str:
    """The word the model is trained to produce first: the answer with a capital first letter."""
    answer = answer.strip()
    return answer[:1].upper() + answer[1:]


def build_toy_model(config: ToyConfig = ToyConfig(), seed: int = 0, name: str = cfg.OFFLINE_MODEL):
    """An untrained toy LLaVA with its word-level tokenizer and square-padding processor, as a LoadedModel."""
    from ..models import wrap_model

    tokenizer = word_level_tokenizer(toy_vocabulary())
    model = build_llava(
        "llava-1.5",
        tokenizer,
        image_size=config.image_size,
        patch_size=config.patch_size,
        vision_hidden=config.vision_hidden,
        vision_layers=config.vision_layers,
        hidden=config.hidden,
        layers=config.layers,
        heads=config.heads,
        tie_embeddings=config.tie_embeddings,
        seed=seed,
    )
    model.config.vision_feature_layer = config.vision_feature_layer
    if config.tie_embeddings:
        # The capitalised answer starts where its lowercase option is; training then pulls them apart.
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():
            for word in ANSWER_WORDS:
                embeddings[tokenizer.convert_tokens_to_ids(answer_target(word))] = embeddings[
                    tokenizer.convert_tokens_to_ids(word)
                ]
    processor = build_processor("llava-1.5", tokenizer, config.image_size, config.patch_size, pad=True)
    return wrap_model(model, processor, name=name, image_mode="pad")


def count_parameters(model) -> dict:
    """Parameter counts of the vision tower, projector, decoder (with embeddings and head) and in all."""
    parts = {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
