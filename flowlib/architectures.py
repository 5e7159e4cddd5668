"""The paper's four checkpoints, their exact architecture configs in one place, and random-weight stand-ins.

`PAPER_CHECKPOINTS` holds, per llava-hf hub id, the numbers of its `config.json` and of the
processor it ships. From them `build_config` gives a transformers config at full width (every
size as released) or at tiny width (small hidden sizes, but everything that decides the token
layout kept: image size, patch size, pinpoints, image token id, vocabulary size, feature layer
and strategy). `build_model` and `save_checkpoint_folder` turn that into random-weight models
and folders that `flowlib.models.load_model` loads as it would a downloaded checkpoint, so the
real layouts can be tested offline and without 15 GB of weights.

Example:
    >>> arch = PAPER_CHECKPOINTS["llava-hf/llava-1.5-13b-hf"]
    >>> arch.num_layers, arch.text["hidden_size"]
    (40, 5120)
    >>> # tokenizer: the Llama-2 one with <image> = 32000 (tests/real_tokenizers.py builds it offline)
    >>> save_checkpoint_folder("llava-hf/llava-1.5-7b-hf", tmp / "llava", tokenizer)
    >>> flowlib.models.load_model(str(tmp / "llava")).num_layers
    2

Where the numbers come from (checked offline, against stored public copies):
- llava-1.5-7b-hf: its config.json as transformers printed it when loading the downloaded snapshot
  (image token 32000, pad 32001, vocab 32064, 4096 positions, rms eps 1e-5, the CLIP tower,
  feature layer -2, strategy "default", untied embeddings). The rest are Vicuna-7B-v1.5 (Llama-2-7B)
  numbers that the file leaves to LlamaConfig's defaults.
- llava-1.5-13b-hf: the original llava-v1.5-13b config.json (5120 / 13824 / 40 layers / 40 heads);
  the llava-hf file itself was not found, so its top-level values are taken to match the 7b's
  (both were converted by the same script).
- The vocabulary padding and image token ids: transformers' convert_llava_next_weights_to_hf.py adds
  `<image>` and `<pad>` and resizes the embeddings to a multiple of 64 (32000 + 2 -> 32064,
  128256 + 2 -> 128320); it takes the Llama-3 model from meta-llama/Meta-Llama-3-8B-Instruct with
  `<image>` = 128256, and the pinpoints from the image processor.
- llama3-llava-next-8b-hf: the Meta-Llama-3-8B numbers (stored copies of that config), with the
  Instruct model's end of turn as eos (128009): Meta set it in the Instruct repo on 2024-05-10, before
  the conversion, and the conversion's pull request (transformers #31395) shows generation padding
  with eos 128009. Its own config.json was not found: its eos and pad are the least certain values here.
- Processor values: a stored print of a llava-hf CLIP image processor and transformers' llava
  processor tests (patch 14, strategy "default", num_additional_image_tokens 1 as on the hub).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

Width = Literal["full", "tiny"]

#: CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), the vision tower of all four.
CLIP_VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
    num_channels=3,
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: LLaVA-NeXT's anyres resolutions, (height, width) in pixels.
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# Vicuna-v1.5 is Llama-2 fine-tuned: its numbers, with the vocabulary padded by llava-hf.
_VICUNA = dict(
    vocab_size=32064,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)
VICUNA_7B = dict(
    _VICUNA,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)
VICUNA_13B = dict(
    _VICUNA,
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
)
LLAMA3_8B = dict(
    vocab_size=128320,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=128000,
    eos_token_id=128009,
)

# Top-level config values shared by all four: the two-layer GELU projector reads CLIP's
# second-to-last layer without its CLS token.
_LLAVA_TOP = dict(
    projector_hidden_act="gelu",
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    tie_word_embeddings=False,
    multimodal_projector_bias=True,
)
_CLIP_PROCESSING = dict(
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    do_resize=True,
    do_center_crop=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=list(CLIP_MEAN),
    image_std=list(CLIP_STD),
    resample=3,
    do_convert_rgb=True,  # resample 3: PIL bicubic
)
# num_additional_image_tokens 1: CLIP's CLS token, which the "default" strategy drops (576 image tokens).
_PROCESSOR = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _frozen(**values) -> Mapping:
    return types.MappingProxyType(values)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One released checkpoint: its family, prompt, tokenizer and the numbers of its configs.

    `text`, `vision` and `top` are the keyword arguments of `LlamaConfig`, `CLIPVisionConfig` and
    `LlavaConfig` / `LlavaNextConfig`; `image_processor` and `processor` those of its processor.
    """

    hub_id: str
    family: Literal["llava-1.5", "llava-next"]
    prompt_style: Literal["vicuna", "llama3"]
    tokenizer: Literal["llama-2", "llama-3"]
    text: Mapping
    vision: Mapping
    top: Mapping
    image_processor: Mapping
    processor: Mapping

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model (the depth of a layer sweep)."""
        return self.text["num_hidden_layers"]

    @property
    def image_token_id(self) -> int:
        return self.top["image_token_index"]


def _architecture(hub_id, family, text, *, llama3=False, pad_token=None):
    top = dict(_LLAVA_TOP, image_token_index=128256 if llama3 else 32000)  # <image>, right after the base vocabulary
    if pad_token is not None:
        top["pad_token_id"] = pad_token
    image_processor = dict(_CLIP_PROCESSING)
    if family == "llava-1.5":
        top["image_seq_length"] = 576  # (336 / 14)^2
    else:
        top["image_grid_pinpoints"] = [list(p) for p in NEXT_PINPOINTS]
        image_processor.update(image_grid_pinpoints=[list(p) for p in NEXT_PINPOINTS], do_pad=True)
    return Architecture(
        hub_id=hub_id,
        family=family,
        prompt_style="llama3" if llama3 else "vicuna",
        tokenizer="llama-3" if llama3 else "llama-2",
        text=_frozen(**text),
        vision=_frozen(**CLIP_VIT_L_336),
        top=_frozen(**top),
        image_processor=_frozen(**image_processor),
        processor=_frozen(**_PROCESSOR),
    )


#: The paper's checkpoints by llava-hf hub id. Pad 32001 is llava-hf's `<pad>` (LLaVA-1.5: as printed
#: from its config; v1.6: set by the first version of the NeXT conversion script, not seen in its file).
#: The Llama-3 conversion added `<pad>` (128257) to the tokenizer only and left the config's pad unset.
PAPER_CHECKPOINTS: dict[str, Architecture] = {
    a.hub_id: a
    for a in (
        _architecture("llava-hf/llava-1.5-7b-hf", "llava-1.5", VICUNA_7B, pad_token=32001),
        _architecture("llava-hf/llava-1.5-13b-hf", "llava-1.5", VICUNA_13B, pad_token=32001),
        _architecture("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-next", VICUNA_7B, pad_token=32001),
        _architecture("llava-hf/llama3-llava-next-8b-hf", "llava-next", LLAMA3_8B, llama3=True),
    )
}

#: Tiny widths: small enough that a 2-layer model builds and runs in about a second on a CPU.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=32)


def architecture(name: str) -> Architecture:
    """The `Architecture` of hub id `name`; the error lists the ids there are."""
    try:
        return PAPER_CHECKPOINTS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not one of the paper's checkpoints: {', '.join(PAPER_CHECKPOINTS)}") from None


def build_config(name: str, *, num_layers: int | None = None, width: Width = "full"):
    """The `LlavaConfig` / `LlavaNextConfig` of checkpoint `name`, at full or tiny width.

    Args:
        name: a key of `PAPER_CHECKPOINTS`.
        num_layers: decoder layers; default the checkpoint's own (32 or 40).
        width: "full" keeps every size as released; "tiny" shrinks the text and vision widths
            (text hidden 64 with 4 heads and the checkpoint's query/key-value head ratio; vision
            hidden 32, 2 layers) and keeps everything that decides the token layout: vocabulary
            size (a real tokenizer's ids must fit), image token id, image and patch size,
            pinpoints, feature layer and strategy, rope and norm settings.
    """
    arch = architecture(name)
    if width not in ("full", "tiny"):
        raise ValueError(f"width must be 'full' or 'tiny', not {width!r}")
    text, vision = dict(arch.text), dict(arch.vision)
    if width == "tiny":
        group = text["num_attention_heads"] // text["num_key_value_heads"]  # keep grouped-query attention
        text.update(TINY_TEXT, num_key_value_heads=max(1, TINY_TEXT["num_attention_heads"] // group))
        vision.update(TINY_VISION)
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, not {num_layers}")
        text["num_hidden_layers"] = num_layers
    config_class = LlavaConfig if arch.family == "llava-1.5" else LlavaNextConfig
    return config_class(
        text_config=LlamaConfig(**text).to_dict(), vision_config=CLIPVisionConfig(**vision).to_dict(), **arch.top
    )


def model_class(name: str) -> type:
    """`LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration`, by family."""
    family = architecture(name).family
    return LlavaForConditionalGeneration if family == "llava-1.5" else LlavaNextForConditionalGeneration


def build_model(
    name: str,
    *,
    num_layers: int = 2,
    width: Width = "tiny",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A random-weight model of checkpoint `name` (see `build_config`), in eval mode.

    At full width mind the memory: a 7B decoder layer holds about 200 M parameters and the
    embedding and unembedding add 2 x 32064 x 4096 (Vicuna) or 2 x 128320 x 4096 (Llama-3), so
    two full-width layers of llama3-llava-next-8b take about 6 GB in float32.
    """
    config = build_config(name, num_layers=num_layers, width=width)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in `dtype` rather than convert a float32 copy
    try:
        model = model_class(name)(config)
    finally:
        torch.set_default_dtype(previous)
    text = config.text_config
    # Generation stops and pads as the released checkpoint's generation config does.
    model.generation_config.update(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    return model.eval()


def build_processor(name: str, tokenizer):
    """The processor checkpoint `name` ships (CLIP or anyres image processor + `tokenizer`).

    llava-hf ships LLaVA-1.5 with a CLIP processor that resizes the short side and centre-crops;
    `flowlib.models` swaps in the paper's preprocessing when it loads a checkpoint. The PIL
    variants are used so this works without torchvision (saved configs drop the "Pil").
    """
    arch = architecture(name)
    if tokenizer.convert_tokens_to_ids("<image>") != arch.image_token_id:
        raise ValueError(
            f"{name} expects <image> = {arch.image_token_id}; this tokenizer has "
            f"{tokenizer.convert_tokens_to_ids('<image>')} (use the {arch.tokenizer} tokenizer)"
        )
    if arch.family == "llava-1.5":
        return LlavaProcessor(
            image_processor=CLIPImageProcessorPil(**arch.image_processor), tokenizer=tokenizer, **arch.processor
        )
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(**arch.image_processor), tokenizer=tokenizer, **arch.processor
    )


def save_checkpoint_folder(
    name: str, folder, tokenizer, *, num_layers: int = 2, width: Width = "tiny", seed: int = 0
) -> Path:
    """Write a random-weight checkpoint of `name` (safetensors, processor, tokenizer) to `folder`.

    `flowlib.models.load_model(str(folder))` loads it as it would the downloaded checkpoint: same
    config class (so the same adapter), same processor settings, and the prompt style follows
    from the tokenizer.

    Raises:
        ValueError: the tokenizer's ids do not fit the vocabulary, or its `<image>` id is not the
            checkpoint's.
    """
    arch = architecture(name)
    if len(tokenizer) > arch.text["vocab_size"]:
        raise ValueError(
            f"{name}: the tokenizer has {len(tokenizer)} tokens, more than the "
            f"{arch.text['vocab_size']} embeddings (use the {arch.tokenizer} tokenizer)"
        )
    processor = build_processor(name, tokenizer)
    model = build_model(name, num_layers=num_layers, width=width, seed=seed)
    folder = Path(folder)
    model.save_pretrained(folder)  # safetensors by default
    processor.save_pretrained(folder)  # also writes the tokenizer
    return folder
