"""Qwen2-VL and Qwen2.5-VL: ChatML prompt, dynamic resolution, merged patches, 3-D rotary positions.

What differs from LLaVA, and where flowlib handles it:
- Prompt: ChatML with the image between `<|vision_start|>` and `<|vision_end|>`; the image block is
  the run of `<|image_pad|>` tokens the processor expands it into (the markers are not image tokens).
- Preprocessing: the image is resized, aspect kept, to multiples of 28 pixels within the processor's
  min/max pixels; 14-pixel patches are merged 2 x 2 into one token (`geometry.qwen_vl_geometry`).
  No padding, no crop, no newline tokens: every box inside the image maps to some tokens.
- Positions: the language model reads 3-row position ids (temporal, height, width); image tokens share
  a temporal position and the text after the image continues from the largest image position, so the
  positions of a suffix are not its indices (`position_ids`, which the fast sweep slices).
- Attention: the vision tower's attention is bidirectional, but it runs before the language model and
  the knockout never touches it; the language model's attention is causal over every position
  (image tokens included) and calls transformers' attention interface, so the knockout applies as to
  LLaVA and proves it per layer.
"""

from __future__ import annotations

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..config import INSTRUCTION
from ..geometry import qwen_vl_geometry
from .base import FamilyAdapter, chatml_prompt, pil_image_processor
from .processors import load_image_only

#: The image as Qwen's chat template writes it: markers around one placeholder the processor expands.
VISION_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL (`Qwen2VLConfig`); Qwen2.5-VL subclasses it with its own classes."""

    name = "qwen2-vl"
    config_class = Qwen2VLConfig
    model_class = Qwen2VLForConditionalGeneration
    processor_class = Qwen2VLProcessor
    # One mode: the processor's own dynamic resolution within its min/max pixels.
    image_modes = ("dynamic",)
    prompt_styles = ("chatml",)
    image_token = "<|image_pad|>"
    image_inputs = ("pixel_values", "image_grid_thw")
    token_inputs = ("mm_token_type_ids",)

    def prompt(self, question, style):
        return chatml_prompt(question, VISION_MARKER, INSTRUCTION)

    def load_processor(self, path, revision=None):
        return load_image_only(path, revision, self.processor_class, Qwen2VLImageProcessorPil)

    def configure_processor(self, processor, image_mode):
        # The checkpoint's min/max pixels and patch and merge sizes, which `geometry` reads, carry over.
        return pil_image_processor(processor, Qwen2VLImageProcessorPil)

    def geometry(self, processor, width, height):
        ip = processor.image_processor
        return qwen_vl_geometry(
            width,
            height,
            patch_size=ip.patch_size,
            merge_size=ip.merge_size,
            min_pixels=ip.size["shortest_edge"],
            max_pixels=ip.size["longest_edge"],
        )

    def position_ids(self, model, inputs):
        """The ``(3, 1, n)`` multimodal position ids the model computes itself for `inputs` (`get_rope_index`)."""
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs.get("attention_mask"),
        )
        return positions


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's path with a windowed-attention vision tower (which the knockout never touches)."""

    name = "qwen2.5-vl"
    config_class = Qwen2_5_VLConfig
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor
