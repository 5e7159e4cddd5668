"""Image-only variants of processors that also carry a video processor.

Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision's processors hold a video processor, which transformers can
only build with torchvision installed. flowlib feeds them single images and never needs it, so without
torchvision it builds the same processor class with the video part left out: same tokenizer, same
image processor, same placeholder expansion. The class keeps its parent's name, so a checkpoint folder
saved from it holds the family's standard processor config.
"""

from __future__ import annotations

import functools
import inspect

from transformers.utils import is_torchvision_available


@functools.cache
def image_only(processor_class: type) -> type:
    """A subclass of `processor_class` built from an image processor and a tokenizer alone (one per class)."""

    class ImageOnlyProcessor(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            kwargs.pop("video_processor", None)
            # The parent passes (image_processor, tokenizer, None); the mixin pairs them with this class's
            # attributes, which lack the video processor.
            super().__init__(image_processor, tokenizer, None, **kwargs)

    # The parent's signature less the video processor: transformers reads it to know what to save.
    parameters = inspect.signature(processor_class.__init__).parameters
    ImageOnlyProcessor.__init__.__signature__ = inspect.Signature(
        [p for name, p in parameters.items() if name != "video_processor"]
    )
    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    globals()[processor_class.__name__] = ImageOnlyProcessor  # where pickle looks it up, by that name
    return ImageOnlyProcessor


def load_image_only(path: str, revision, processor_class: type, image_processor_class: type, **processor_kwargs):
    """The checkpoint's processor: transformers' own when torchvision is there, else its image-only variant."""
    from transformers import AutoProcessor, AutoTokenizer

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path, revision=revision)
    import json
    from pathlib import Path

    from transformers.utils import cached_file

    saved = {}
    config_file = cached_file(
        path, "processor_config.json", revision=revision, _raise_exceptions_for_missing_entries=False
    )
    if config_file:
        saved = {k: v for k, v in json.loads(Path(config_file).read_text()).items() if k in processor_kwargs}
    return image_only(processor_class)(
        image_processor=image_processor_class.from_pretrained(path, revision=revision),
        tokenizer=AutoTokenizer.from_pretrained(path, revision=revision),
        **{**processor_kwargs, **saved},
    )
