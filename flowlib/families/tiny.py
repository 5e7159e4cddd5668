"""Tiny Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision models built offline from their config classes.

Like `flowlib.tiny` for LLaVA: random weights, a word-level tokenizer, the family's own processor
class; nothing is downloaded. No Qwen tokenizer is on disk, so the tokenizer is a tiny word-level one
with Qwen's special tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<|vision_start|>`,
`<|image_pad|>`, `<|vision_end|>`, and OneVision's `<image>`); it tokenises the ChatML prompt as Qwen's
byte-level BPE would at the special tokens, and word by word elsewhere (newlines are dropped).

`local_vision=True` makes every image token depend on its own pixels only, which the geometric oracle
needs: Qwen's vision blocks get a zero attention output (each block is then the identity plus a
per-patch MLP) and the 2 x 2 merger reads its own four patches; OneVision reads SigLIP's embeddings
(hidden state -2 of a one-layer tower), as the LLaVA builders do with CLIP.

Example:
    >>> loaded = tiny_family("qwen2.5-vl")
    >>> loaded.prepare(sample).layout.group("Image")
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..config import INSTRUCTION
from ..tiny import _WORD_PATTERN, TEST_WORDS
from .base import CHATML_SYSTEM
from .processors import image_only

#: Qwen's special tokens (Qwen2 / Qwen2.5-VL vocabularies) and OneVision's image and video placeholders.
CHATML_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
)
PROMPT_WORDS = tuple(re.findall(_WORD_PATTERN, f"system user assistant {CHATML_SYSTEM} {INSTRUCTION}"))
FAMILIES = ("qwen2-vl", "qwen2.5-vl", "llava-onevision")
#: Qwen2.5-VL-7B-Instruct's preprocessor bounds: 4 to 16,384 merged tokens (28 x 28 pixels each).
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 16384


def chatml_tokenizer(words: Iterable[str] = TEST_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen's special tokens: no BOS, eos `<|im_end|>`, pad `<|endoftext|>`."""
    vocab: dict[str, int] = {"<unk>": 0}
    for token in CHATML_SPECIALS:
        vocab.setdefault(token, len(vocab))
    for word in (*PROMPT_WORDS, *words):
        for piece in re.findall(_WORD_PATTERN, word):
            vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(CHATML_SPECIALS),
    )


def _text(tokenizer, hidden: int, layers: int, heads: int) -> dict:
    head_dim = hidden // heads
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),  # grouped-query attention, as the 7B models
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Qwen's temporal / height / width split of the rotary frequencies, scaled to the head (7B: 16, 24, 24).
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
        },
    )


def _qwen_model(family, tokenizer, hidden, layers, heads, vision_hidden, vision_layers):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHATML_SPECIALS}
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, num_heads=2, patch_size=14, spatial_merge_size=2)
    if family == "qwen2.5-vl":
        # 112-pixel attention windows as released (the tower reorders patches by window and back); block 0 full.
        vision.update(intermediate_size=2 * vision_hidden, out_hidden_size=hidden, window_size=112)
        vision.update(fullatt_block_indexes=[0])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(
        text_config=_text(tokenizer, hidden, layers, heads),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return model_class(config)


def _onevision_model(tokenizer, hidden, layers, heads, vision_hidden, vision_layers, image_size, local):
    text = dict(_text(tokenizer, hidden, layers, heads), model_type="qwen2")
    text.pop("rope_parameters")
    vision = dict(
        model_type="siglip_vision_model",
        image_size=image_size,
        patch_size=14,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=1 if local else vision_layers,
        num_attention_heads=2,
    )
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-2 if local else -1,  # -2 of one layer: the patch embeddings, local to each patch
        image_grid_pinpoints=onevision_pinpoints(image_size),
        vision_aspect_ratio="anyres_max_9",
    )
    return LlavaOnevisionForConditionalGeneration(config)


def onevision_pinpoints(image_size: int) -> list[list[int]]:
    """OneVision's canvases: 1..6 views of `image_size` along each side (384: 384 x 384 .. 2304 x 2304)."""
    return [[image_size * a, image_size * b] for a in range(1, 7) for b in range(1, 7)]


def build_family_model(
    family: str,
    tokenizer,
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    image_size: int = 384,
    local_vision: bool = False,
    seed: int = 0,
):
    """A randomly initialised model of `family` ("qwen2-vl", "qwen2.5-vl", "llava-onevision"), fp32, eval mode."""
    torch.manual_seed(seed)
    if family in ("qwen2-vl", "qwen2.5-vl"):
        model = _qwen_model(family, tokenizer, hidden, layers, heads, vision_hidden, vision_layers)
        if local_vision:
            with torch.no_grad():
                for block in model.model.visual.blocks:  # no mixing between patches: attention adds exactly 0
                    block.attn.proj.weight.zero_()
                    block.attn.proj.bias.zero_()
    elif family == "llava-onevision":
        model = _onevision_model(
            tokenizer, hidden, layers, heads, vision_hidden, vision_layers, image_size, local_vision
        )
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    model.generation_config.update(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model.eval()


def build_family_processor(
    family: str,
    tokenizer,
    *,
    image_size: int = 384,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    resample=None,
):
    """The family's processor class (image-only, see `families.processors`) around `tokenizer`."""
    extra = {} if resample is None else {"resample": resample}
    if family in ("qwen2-vl", "qwen2.5-vl"):
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **extra
        )
        cls = Qwen2_5_VLProcessor if family == "qwen2.5-vl" else Qwen2VLProcessor
        return image_only(cls)(image_processor=image_processor, tokenizer=tokenizer)
    if family == "llava-onevision":
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": image_size, "width": image_size},
            image_grid_pinpoints=onevision_pinpoints(image_size),
            image_mean=[0.5, 0.5, 0.5],  # SigLIP's normalisation
            image_std=[0.5, 0.5, 0.5],
            **extra,
        )
        return image_only(LlavaOnevisionProcessor)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=(image_size // 14) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")


def tiny_family(
    family: str = "qwen2.5-vl",
    *,
    resample=None,
    words: Iterable[str] = TEST_WORDS,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = 28 * 28 * 256,
    **model_kwargs,
):
    """A tiny random model of `family` wrapped as a `flowlib.models.LoadedModel`.

    `max_pixels` defaults to 256 merged tokens (a 448 x 448 image) so that tests stay fast; the
    released checkpoints allow 16,384 (`QWEN_MAX_PIXELS`). OneVision's `image_size` defaults to SigLIP's 384.
    """
    from ..models import wrap_model

    tokenizer = chatml_tokenizer(words)
    image_size = model_kwargs.setdefault("image_size", 384)
    model = build_family_model(family, tokenizer, **model_kwargs)
    processor = build_family_processor(
        family, tokenizer, image_size=image_size, min_pixels=min_pixels, max_pixels=max_pixels, resample=resample
    )
    return wrap_model(model, processor, name=f"tiny-{family}")


def image_tokens(processor, width: int, height: int) -> int:
    """The processor's own count of image tokens for a `width` x `height` image (what the layout must match)."""
    if hasattr(processor, "num_image_tokens"):  # OneVision
        side = processor.image_processor.size["height"]
        return processor._get_number_of_features(height, width, side, side)
    ip = processor.image_processor
    return ip.get_number_of_image_patches(height, width) // ip.merge_size**2
