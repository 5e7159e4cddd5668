"""The new families' 7B checkpoints: their config numbers by hub id, for random-weight stand-ins.

Like `flowlib.architectures` for the paper's four LLaVA checkpoints: `released_config(name)` gives the
transformers config at full width (every size as released, e.g. for a GPU check of memory and speed) or
at tiny width (small hidden sizes; image geometry, token ids and vocabulary kept), with any depth.
`load_model(name)` itself needs no entry here: it reads the checkpoint's own config.

Where the numbers come from (stored public copies of the config.json files, checked offline):
- Qwen/Qwen2.5-VL-7B-Instruct: text 3584 / 18944 / 28 layers / 28 heads / 4 key-value heads, vocabulary
  152064, rope theta 1e6 with mrope sections (16, 24, 24); vision 32 blocks of 1280 (full attention in
  blocks 7, 15, 23, 31, windows of 112 pixels elsewhere); preprocessor 3136..12845056 pixels.
- Qwen/Qwen2-VL-7B-Instruct: the same text model (max 32768 positions); vision 32 blocks of 1280
  (embed_dim), MLP ratio 4, 16 heads: transformers' `Qwen2VLVisionConfig` defaults, which are the 7B's (its
  config.json was not seen in a stored copy).
- llava-hf/llava-onevision-qwen2-7b-ov-hf: Qwen2-7B-Instruct's text numbers, SigLIP-so400m at 384 pixels
  without its last layer (26 layers of 1152), `<image>` = 151646, feature layer -1, strategy "full",
  anyres_max_9 over 384..2304-pixel canvases. Its vocabulary size (152128, Qwen2's 151646 tokens padded)
  was not seen in a stored copy and is the least certain number here.
"""

from __future__ import annotations

from typing import Literal

from transformers import LlavaOnevisionConfig, Qwen2_5_VLConfig, Qwen2VLConfig

_QWEN2_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=151643,
    eos_token_id=151645,
)
_MROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}
_QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)

#: Per hub id: the family, the config class and its keyword arguments (text, vision, top level).
RELEASED = {
    "Qwen/Qwen2.5-VL-7B-Instruct": (
        "qwen2.5-vl",
        Qwen2_5_VLConfig,
        dict(_QWEN2_7B_TEXT, vocab_size=152064, max_position_embeddings=128000, rope_parameters=_MROPE),
        dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
        ),
        _QWEN_IDS,
    ),
    "Qwen/Qwen2-VL-7B-Instruct": (
        "qwen2-vl",
        Qwen2VLConfig,
        dict(_QWEN2_7B_TEXT, vocab_size=152064, rope_parameters=_MROPE),
        dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14),
        _QWEN_IDS,
    ),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": (
        "llava-onevision",
        LlavaOnevisionConfig,
        dict(_QWEN2_7B_TEXT, model_type="qwen2", vocab_size=152128, rope_theta=1_000_000.0),
        dict(
            model_type="siglip_vision_model",
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=26,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
        ),
        dict(
            image_token_index=151646,
            video_token_index=151647,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=[[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)],
        ),
    ),
}
#: Tiny widths (text hidden 64 with 4 heads, 2 key-value heads; vision 32 wide, 1 block).
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def released_config(name: str, *, num_layers: int | None = None, width: Literal["full", "tiny"] = "full"):
    """The config of checkpoint `name` (a key of `RELEASED`) at full or tiny width, with `num_layers` decoder layers."""
    if name not in RELEASED:
        raise KeyError(f"{name!r} is not one of {', '.join(RELEASED)}")
    if width not in ("full", "tiny"):
        raise ValueError(f"width must be 'full' or 'tiny', not {width!r}")
    family, config_class, text, vision, top = RELEASED[name]
    text, vision = dict(text), dict(vision)
    if width == "tiny":
        text.update(TINY_TEXT)
        if family == "qwen2.5-vl":
            vision.update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
            vision.update(fullatt_block_indexes=[0])
        elif family == "qwen2-vl":
            vision.update(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
        else:
            vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        if "rope_parameters" in text:  # the rotary split scaled to the 16-wide heads, as (16, 24, 24) is to 128
            text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 3, 3])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, not {num_layers}")
        text["num_hidden_layers"] = num_layers
    return config_class(text_config=text, vision_config=vision, **top)
