"""Small LLaVA-family models, tokenizers and processors built offline in seconds.

Tests use randomly initialised tiny models of each family (LLaVA-1.5 and
LLaVA-NeXT with anyres); the offline default model uses the same builders at a
trainable size. Everything here is built from configs: nothing is downloaded.

Example:
    >>> loaded = tiny_llava("llava-1.5")          # a LoadedModel, ready for prepare()
    >>> loaded.model.config.text_config.num_hidden_layers
    4
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .config import INSTRUCTION, VICUNA_SYSTEM

SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>")
#: Words splits: runs of letters/digits/apostrophes, or any single other non-space character.
_WORD_PATTERN = r"[A-Za-z0-9']+|[^\sA-Za-z0-9']"
#: The words of the paper's Vicuna prompt, always in a tiny vocabulary.
PROMPT_WORDS = tuple(re.findall(_WORD_PATTERN, f"{VICUNA_SYSTEM} USER : ASSISTANT : {INSTRUCTION}"))


def word_level_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer over `words` plus the chat-prompt words and special tokens.

    Each word is one token (case-sensitive, so "red" and "Red" differ, which the
    answer lens needs); punctuation characters are tokens of their own; `<s>` is
    prepended like the Llama tokenizers of LLaVA do.
    """
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *PROMPT_WORDS, *words):
        for piece in re.findall(_WORD_PATTERN, token) if token not in SPECIAL_TOKENS else [token]:
            vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return tokenizer


def _vision_config(image_size: int, patch_size: int, hidden: int, layers: int, local: bool) -> CLIPVisionConfig:
    # A "local" tower has one encoder layer and LLaVA reads hidden state -2, i.e. the
    # embeddings before any attention: each feature then
    # depends only on its own patch (patch embedding + position embedding + layer
    # norm), which is what the geometric oracle needs.
    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1 if local else layers,
        num_attention_heads=max(1, hidden // 16),
        projection_dim=hidden,
    )


def _text_config(tokenizer, hidden: int, layers: int, heads: int, tie: bool = False) -> LlamaConfig:
    # The special-token ids must be the tokenizer's: generation stops at eos_token_id.
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=8192,
        tie_word_embeddings=tie,
    )


def next_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's grid pinpoints scaled to a base resolution of `image_size`."""
    return [[image_size * a, image_size * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def build_processor(family: str, tokenizer, image_size: int, patch_size: int, pad: bool = True, resample=None):
    """A LlavaProcessor (pad or crop) or LlavaNextProcessor (anyres) around `tokenizer`."""
    common = dict(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    if resample is not None:
        common["resample"] = resample
    if family == "llava-1.5":
        image_processor = LlavaImageProcessorPil(do_pad=pad, **common)
        cls = LlavaProcessor
    elif family == "llava-next":
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=next_pinpoints(image_size), **common)
        cls = LlavaNextProcessor
    else:
        raise ValueError(f"unknown family {family!r}; use 'llava-1.5' or 'llava-next'")
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def llava_config(family: str, vision: CLIPVisionConfig, text: LlamaConfig, image_token_id: int, tie: bool = False):
    """The `LlavaConfig` or `LlavaNextConfig` around `vision` and `text`, wired as the released models are.

    As in the paper's four checkpoints, a two-layer GELU projector reads the tower's second-to-last
    layer without its CLS token; NeXT's pinpoints are scaled to the tower's image size.
    """
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=tie,
    )
    if family == "llava-1.5":
        return LlavaConfig(image_seq_length=(vision.image_size // vision.patch_size) ** 2, **common)
    if family == "llava-next":
        return LlavaNextConfig(image_grid_pinpoints=next_pinpoints(vision.image_size), **common)
    raise ValueError(f"unknown family {family!r}; use 'llava-1.5' or 'llava-next'")


def build_llava(
    family: str,
    tokenizer,
    *,
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    local_vision: bool = False,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    tie_embeddings: bool = False,
    seed: int = 0,
):
    """A randomly initialised LLaVA-1.5 or LLaVA-NeXT model of the given size (fp32, eval mode)."""
    torch.manual_seed(seed)
    vision = _vision_config(image_size, patch_size, vision_hidden, vision_layers, local_vision)
    text = _text_config(tokenizer, hidden, layers, heads, tie_embeddings)
    config = llava_config(family, vision, text, tokenizer.convert_tokens_to_ids("<image>"), tie_embeddings)
    model = (LlavaForConditionalGeneration if family == "llava-1.5" else LlavaNextForConditionalGeneration)(config)
    model.generation_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model.eval()


#: Words tiny test models know besides the prompt: enough for test questions and answers.
TEST_WORDS = (
    "is the star red or blue ? which shape object , a circle square triangle to left right of "
    "what do and have in common there either that green on side image Yes No yes no Red Blue "
    "Left Right Circle Star Color color"
).split()


def tiny_llava(
    family: str = "llava-1.5",
    *,
    pad: bool = True,
    resample=None,
    words: Iterable[str] = TEST_WORDS,
    **model_kwargs,
):
    """A tiny randomly initialised model of `family` wrapped as a `flowlib.models.LoadedModel`."""
    from .models import wrap_model

    tokenizer = word_level_tokenizer(words)
    image_size = model_kwargs.setdefault("image_size", 112)
    patch_size = model_kwargs.setdefault("patch_size", 14)
    model = build_llava(family, tokenizer, **model_kwargs)
    processor = build_processor(family, tokenizer, image_size, patch_size, pad=pad, resample=resample)
    image_mode = ("pad" if pad else "crop") if family == "llava-1.5" else None
    return wrap_model(model, processor, name=f"tiny-{family}", image_mode=image_mode)


def llava_next_from_llava(loaded, pinpoints=None, name: str = "toy-llava-next"):
    """The same weights as a LLaVA-NeXT model (anyres), to exercise the NeXT path with a model that answers.

    A random tiny model answers almost nothing correctly, so the correct-answer filter would leave
    the notebooks nothing to analyse. This puts a trained LLaVA-1.5 model's vision tower, projector
    and decoder into `LlavaNextForConditionalGeneration` with a zero image-newline vector. With one
    pinpoint of the base resolution (the default) the high-resolution view is a single tile that
    keeps the aspect ratio, close to the padded square the model was trained on, so it still answers
    most synthetic questions (it sees base view + tile + newlines: other inputs, other numbers).
    """
    from .models import wrap_model

    config = loaded.model.config
    side = config.vision_config.image_size
    pinpoints = pinpoints or [[side, side]]
    next_config = LlavaNextConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_feature_layer=config.vision_feature_layer,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    model = LlavaNextForConditionalGeneration(next_config).to(loaded.dtype)
    missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
    if unexpected or missing != ["model.image_newline"]:
        raise ValueError(f"weights do not carry over: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.model.image_newline.zero_()
    model.generation_config = loaded.model.generation_config
    old = loaded.processor.image_processor
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=pinpoints,
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=old.image_mean,
        image_std=old.image_std,
        resample=old.resample,
        do_convert_rgb=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=loaded.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return wrap_model(model.eval(), processor, name=name)
