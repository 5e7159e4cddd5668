"""LLaVA-OneVision: anyres-max-9 tiling with unpadding and pooling, on a Qwen2 language model.

What differs from LLaVA-NeXT, and where flowlib handles it:
- Prompt: the official `qwen_1_5` conversation (ChatML, system "You are a helpful assistant.") with
  `<image>\\n` before the paper's user text.
- Preprocessing: a base view squashed to 384 x 384 and 384-pixel tiles of the best-fitting canvas
  (up to 6 x 6); SigLIP reads 27 x 27 patches of 14 pixels per view, so the last 6 pixels of each view are
  never seen. The tiles' token map is trimmed of padding in token units and, when it holds more than
  about 9 views' worth of tokens, resized bilinearly down to about 9 views (`vision_aspect_ratio`
  "anyres_max_9"); a newline token ends each row; the base view has none
  (`geometry.onevision_geometry`). After pooling a token reads up to 2 x 2 patches: a box covers every
  token whose bilinear weights touch a patch it covers.
- Attention: the language model (Qwen2) is causal over every position and calls transformers'
  attention interface, so the knockout applies as to LLaVA and proves it per layer.
"""

from __future__ import annotations

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from ..config import INSTRUCTION
from ..geometry import onevision_geometry
from .base import FamilyAdapter, chatml_prompt, pil_image_processor
from .processors import load_image_only

#: SigLIP's patch side in every released OneVision checkpoint (the processor does not record it).
SIGLIP_PATCH = 14
#: The processor settings a saved folder keeps in processor_config.json (read back without torchvision).
PROCESSOR_SETTINGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")


def max_tiles(vision_aspect_ratio: str) -> int:
    """9 for "anyres_max_9": the views' worth of tokens the tiles are pooled down to."""
    prefix = "anyres_max_"
    if not vision_aspect_ratio.startswith(prefix):
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r}: flowlib maps only {prefix}N")
    return int(vision_aspect_ratio[len(prefix) :])


class OnevisionAdapter(FamilyAdapter):
    name = "llava-onevision"
    config_class = LlavaOnevisionConfig
    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor
    image_modes = ("anyres_max",)
    prompt_styles = ("chatml",)
    image_token = "<image>"
    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")

    def prompt(self, question, style):
        return chatml_prompt(question, "<image>\n", INSTRUCTION)

    def load_processor(self, path, revision=None):
        settings = {k: None for k in PROCESSOR_SETTINGS}
        return load_image_only(path, revision, self.processor_class, LlavaOnevisionImageProcessorPil, **settings)

    def configure_processor(self, processor, image_mode):
        return pil_image_processor(processor, LlavaOnevisionImageProcessorPil)

    def geometry(self, processor, width, height):
        ip = processor.image_processor
        side = int(ip.size["height"])
        if (side // SIGLIP_PATCH) ** 2 != int(processor.num_image_tokens):
            raise ValueError(
                f"the processor's {processor.num_image_tokens} tokens per view do not fit {side}-pixel views of "
                f"{SIGLIP_PATCH}-pixel patches"
            )
        return onevision_geometry(
            width,
            height,
            image_size=side,
            patch_size=SIGLIP_PATCH,
            pinpoints=ip.image_grid_pinpoints,
            max_tiles=max_tiles(processor.vision_aspect_ratio),
        )
