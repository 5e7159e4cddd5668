"""LLaVA-1.5 and LLaVA-NeXT, the paper's families: its own prompts, `<image>` block, the official painted rule.

LLaVA-1.5 pads the image to a square (the original) or centre-crops it (llava-hf's default) and reads one
grid of 24 x 24 patches; LLaVA-NeXT adds anyres tiles trimmed of padding with a newline token per row
(`flowlib.geometry`). Both language models are causal Llama decoders.
"""

from __future__ import annotations

from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from ..geometry import llava15_geometry, llava_next_geometry
from .base import FamilyAdapter, pil_image_processor


def _image_side(image_processor) -> int:
    crop = getattr(image_processor, "crop_size", None) or {}
    size = getattr(image_processor, "size", None) or {}
    return int(crop.get("height") or size.get("height") or size["shortest_edge"])


class LlavaFamilyAdapter(FamilyAdapter):
    """LLaVA-1.5 and LLaVA-NeXT: the paper's own prompts, `<image>` placeholder, the official painted rule."""

    prompt_styles = ("vicuna", "llama3")
    official_rule = True

    def prompt(self, question, style):
        from ..models import build_prompt  # the paper's prompts live with the prompt styles

        return build_prompt(question, style)


class Llava15Adapter(LlavaFamilyAdapter):
    name = "llava-1.5"
    config_class = LlavaConfig
    model_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor
    # "pad": the original LLaVA-1.5 (pad to a square with the mean colour); "crop": llava-hf's default.
    image_modes = ("pad", "crop")

    def configure_processor(self, processor, image_mode: str):
        # Rebuild the image processor as LlavaImageProcessorPil with the checkpoint's
        # own numbers: llava-hf ships a CLIP processor that centre-crops, and saved
        # configs drop the "Pil" suffix, so pin the class explicitly.
        old = processor.image_processor
        side = _image_side(old)
        processor.image_processor = LlavaImageProcessorPil(
            do_pad=image_mode == "pad",
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            resample=old.resample,
            image_mean=old.image_mean,
            image_std=old.image_std,
            do_convert_rgb=True,
        )
        return processor

    def geometry(self, processor, width, height):
        ip = processor.image_processor
        return llava15_geometry(width, height, _image_side(ip), processor.patch_size, pad=bool(ip.do_pad))


class LlavaNextAdapter(LlavaFamilyAdapter):
    name = "llava-next"
    config_class = LlavaNextConfig
    model_class = LlavaNextForConditionalGeneration
    processor_class = LlavaNextProcessor
    image_modes = ("anyres",)

    def configure_processor(self, processor, image_mode: str):
        return pil_image_processor(processor, LlavaNextImageProcessorPil)

    def geometry(self, processor, width, height):
        ip = processor.image_processor
        return llava_next_geometry(width, height, _image_side(ip), processor.patch_size, ip.image_grid_pinpoints)
