"""Loading vision-language checkpoints through transformers' own classes, with the paper's exact inputs.

A `FamilyAdapter` (`flowlib.families`) holds everything that differs between families (model class,
prompt, image preprocessing, where image tokens come from, rotary positions): LLaVA-1.5, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision; it is chosen from the config class, never from the model's
name (docs/adapters.md adds a family). `load_model` returns a
`LoadedModel`, whose `prepare(sample)` builds the paper's prompt, runs the
processor and computes the `TokenLayout` of the result.

Example:
    >>> loaded = load_model("llava-hf/llava-1.5-7b-hf", dtype="float16", device="cuda")
    >>> prepared = loaded.prepare(sample)
    >>> prepared.layout.group("Question")
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig

from . import config as cfg
from .families.base import CHATML_END_OF_TEXT, CHATML_END_OF_TURN, FamilyAdapter
from .families.llava import Llava15Adapter, LlavaNextAdapter
from .families.onevision import OnevisionAdapter
from .families.qwen_vl import Qwen2VLAdapter, Qwen25VLAdapter
from .geometry import painted_patch_offsets
from .kernels import use_configured_kernels
from .layout import TokenLayout, build_layout
from .placement import execution_device
from .sample import Sample


class UnsupportedModelError(ValueError):
    """The checkpoint's config is not one of the supported families (`FAMILIES`; docs/adapters.md adds one)."""


class CheckpointError(ValueError):
    """A checkpoint's weight files do not match its config (missing, unexpected or misshapen weights)."""


def check_loading_info(name_or_path: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not fill its config exactly (transformers' loading info).

    transformers initialises missing weights at random and only warns: a config of 14 layers over the
    weights of 12 would run with two random layers.
    """
    problems = []
    for key, what in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "of another shape"),
    ):
        names = sorted(str(k) for k in info.get(key) or ())
        if names:
            problems.append(f"{len(names)} weights {what} (e.g. {', '.join(names[:2])})")
    if problems:
        raise CheckpointError(
            f"{name_or_path}: the weight files do not match config.json: {'; '.join(problems)}; "
            "the config and the weights come from different checkpoints"
        )


FAMILIES: tuple[FamilyAdapter, ...] = (
    Llava15Adapter(),
    LlavaNextAdapter(),
    Qwen2VLAdapter(),
    Qwen25VLAdapter(),
    OnevisionAdapter(),
)
#: Where a user learns to write an adapter for a family flowlib does not support yet.
ADAPTER_GUIDE = "docs/adapters.md"


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make `adapter_for` (and so `load_model`) pick `adapter` for its config class; see docs/adapters.md.

    An adapter registered for a config class that already has one replaces it.
    """
    global FAMILIES
    FAMILIES = (*(a for a in FAMILIES if a.config_class is not adapter.config_class), adapter)
    return adapter


def adapter_for(config) -> FamilyAdapter:
    """The adapter whose config class is exactly `config`'s class (a subclass is another family)."""
    for adapter in FAMILIES:
        if type(config) is adapter.config_class:
            return adapter
    supported = ", ".join(f"{a.name} ({a.config_class.__name__})" for a in FAMILIES)
    raise UnsupportedModelError(
        f"unsupported model config {type(config).__name__}; supported families: {supported}. "
        f"To add a family, write a FamilyAdapter for {type(config).__name__} ({ADAPTER_GUIDE})"
    )


class PromptStyle(str, enum.Enum):
    """How the paper wraps a question: Vicuna's chat format, Llama-3's header template, or ChatML (Qwen-based)."""

    VICUNA = "vicuna"
    LLAMA3 = "llama3"
    CHATML = "chatml"


def detect_prompt_style(tokenizer) -> PromptStyle:
    """Llama-3 and ChatML tokenizers carry their chat template's tokens; the others use Vicuna's."""
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab:
        return PromptStyle.LLAMA3
    return PromptStyle.CHATML if "<|im_start|>" in vocab else PromptStyle.VICUNA


def build_prompt(question: str, style: PromptStyle = PromptStyle.VICUNA) -> tuple[str, int]:
    """The paper's prompt for `question` and the character offset where the question starts.

    Vicuna (LLaVA-1.5, LLaVA-1.6-Vicuna): system prompt, `USER: <image>\\n{question} \\n{instruction} ASSISTANT:`
    (with the space before the newline). Llama-3 (the official `llava_llama_3` conversation): the
    Llama-3 chat template with its system message, the same user text, the assistant header, then
    `" \\n"` appended (docs/protocol.md); the tokenizer adds `<|begin_of_text|>` itself.
    """
    user_prefix = f"{cfg.IMAGE_PLACEHOLDER}\n"
    user_text = f"{user_prefix}{question} \n{cfg.INSTRUCTION}"
    if PromptStyle(style) is PromptStyle.VICUNA:
        head = f"{cfg.VICUNA_SYSTEM} USER: "
        prompt = f"{head}{user_text} ASSISTANT:"
    elif PromptStyle(style) is PromptStyle.CHATML:
        raise ValueError("a ChatML prompt depends on the family's image marker: use the family adapter's prompt()")
    else:
        eot = cfg.LLAMA3_END_OF_TURN
        head = (
            f"<|start_header_id|>system<|end_header_id|>\n\n{cfg.LLAMA3_SYSTEM}{eot}"
            "<|start_header_id|>user<|end_header_id|>\n\n"
        )
        prompt = f"{head}{user_text}{eot}<|start_header_id|>assistant<|end_header_id|>\n\n \n"
    return prompt, len(head) + len(user_prefix)


def stop_token_ids(tokenizer, style: PromptStyle) -> list[int]:
    """The tokens that end an answer: the tokenizer's eos, and for Llama-3 both `<|eot_id|>` and `<|end_of_text|>`.

    A Llama-3 checkpoint whose generation config stops only at end-of-text would otherwise run on past
    the answer ("Yes<|eot_id|>assistant...") and fail every correctness check.
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if PromptStyle(style) is PromptStyle.LLAMA3:
        eot, end = (tokenizer.convert_tokens_to_ids(t) for t in (cfg.LLAMA3_END_OF_TURN, cfg.LLAMA3_END_OF_TEXT))
        if eot is None or eot == tokenizer.unk_token_id:
            raise UnsupportedModelError(
                f"a Llama-3 prompt needs the {cfg.LLAMA3_END_OF_TURN} token; this tokenizer lacks it"
            )
        # Whichever of the two the checkpoint names as eos, both end an answer (docs/protocol.md).
        ids += [eot] + ([end] if end is not None and end != tokenizer.unk_token_id else [])
    if PromptStyle(style) is PromptStyle.CHATML:  # an Instruct turn ends at <|im_end|>; text ends at <|endoftext|>
        for token in (CHATML_END_OF_TURN, CHATML_END_OF_TEXT):
            found = tokenizer.convert_tokens_to_ids(token)
            ids += [found] if found is not None and found != tokenizer.unk_token_id else []
    return list(dict.fromkeys(int(i) for i in ids))


@dataclasses.dataclass
class PreparedInput:
    """A sample ready for the model: processor outputs, the prompt and the token layout."""

    sample: Sample
    prompt: str
    inputs: dict
    layout: TokenLayout

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


@dataclasses.dataclass
class LoadedModel:
    """A model with its processor, family adapter and provenance."""

    model: torch.nn.Module
    processor: object
    adapter: FamilyAdapter
    prompt_style: PromptStyle
    name: str
    image_mode: str
    revision: str | None = None
    #: Which patches are "related": "geometric" (flowlib's coverage rule, exact under nearest resampling)
    #: or "official" (the official code's red-painted mask through the processor).
    related_rule: str = "geometric"

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generated answer (`stop_token_ids`)."""
        return stop_token_ids(self.tokenizer, self.prompt_style)

    @property
    def device(self) -> torch.device:
        """Where the inputs go: the input embeddings' device (their execution device under a device map)."""
        return execution_device(self.model.get_input_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def provenance(self) -> dict:
        """What identifies results computed with this model."""
        return {
            "model": self.name,
            "revision": self.revision or "",
            "family": self.adapter.name,
            "dtype": str(self.dtype).replace("torch.", ""),
            "image_mode": self.image_mode,
            "prompt_style": self.prompt_style.value,
            "num_layers": self.num_layers,
            "related_rule": self.related_rule,
        }

    def prepare(self, sample: Sample, image=None) -> PreparedInput:
        """Build the paper's prompt for `sample`, run the processor, and compute the token layout.

        `image` replaces the sample's own image (e.g. a blank one) while keeping its boxes.
        """
        image = sample.load_image() if image is None else image
        prompt, question_start = self.adapter.prompt(sample.question, self.prompt_style)
        inputs = self.adapter.process(self.processor, image, prompt)
        geometry = self.adapter.geometry(self.processor, image.width, image.height)
        painted = (
            painted_patch_offsets(self.processor.image_processor, geometry, image.width, image.height, sample.boxes)
            if self.related_rule == "official"
            else None
        )
        layout = build_layout(
            sample=sample,
            input_ids=inputs["input_ids"][0],
            tokenizer=self.tokenizer,
            prompt=prompt,
            question_start=question_start,
            geometry=geometry,
            image_size=(image.width, image.height),
            painted=painted,
            image_token=self.adapter.image_token,
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return PreparedInput(sample=sample, prompt=prompt, inputs=inputs, layout=layout)


RELATED_RULES = ("geometric", "official")


def wrap_model(
    model,
    processor,
    *,
    name: str,
    image_mode: str | None = None,
    revision=None,
    prompt_style=None,
    related_rule: str = "geometric",
):
    """Wrap an in-memory model and processor (e.g. a tiny test model) as a `LoadedModel`."""
    if related_rule not in RELATED_RULES:
        raise ValueError(f"related_rule must be one of {RELATED_RULES}, not {related_rule!r}")
    adapter = adapter_for(model.config)
    if related_rule == "official" and not adapter.official_rule:
        raise ValueError(f"related_rule='official' is implemented for the LLaVA families only, not {adapter.name}")
    image_mode = adapter.check_image_mode(image_mode)
    processor = adapter.configure_processor(processor, image_mode)
    style = PromptStyle(prompt_style) if prompt_style else detect_prompt_style(processor.tokenizer)
    adapter.check_prompt_style(style)
    return LoadedModel(model, processor, adapter, style, name, image_mode, revision, related_rule)


def resolve_checkpoint(name_or_path: str) -> str:
    """A short name (e.g. the offline default) becomes its folder; anything else is left to transformers."""
    if name_or_path in cfg.SHORT_NAMES:
        path = cfg.SHORT_NAMES[name_or_path]
        if not path.exists():
            raise FileNotFoundError(
                f"the {name_or_path!r} checkpoint is missing at {path}; "
                "train it with `python -m flowlib.toy` or check out the committed weights"
            )
        return str(path)
    return name_or_path


def load_model(
    name_or_path: str = cfg.OFFLINE_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    image_mode: str | None = None,
    revision: str | None = None,
    prompt_style: str | None = None,
    related_rule: str = "geometric",
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a LLaVA-family checkpoint by hub id, local path or short name.

    Args:
        name_or_path: e.g. "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf",
            "llava-hf/llama3-llava-next-8b-hf", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2-VL-7B-Instruct",
            "llava-hf/llava-onevision-qwen2-7b-ov-hf", a local folder, or "toy-llava" (offline default).
        dtype: torch dtype or its name ("float16" as in the paper on GPU, "float32" on CPU).
        device: where to put the model.
        image_mode: LLaVA-1.5: "pad" (default, the original) or "crop" (llava-hf's default);
            LLaVA-NeXT: "anyres"; Qwen2-VL / Qwen2.5-VL: "dynamic"; LLaVA-OneVision: "anyres_max".
        revision: the hub revision to pin.
        prompt_style: "vicuna", "llama3" or "chatml" (the Qwen-based families); detected from the tokenizer
            when omitted.
        related_rule: "geometric" (default: flowlib's coverage rule, see `flowlib.geometry`) or
            "official" (the official code's boxes painted red through the image processor).
        device_map: passed to `from_pretrained` (needs accelerate): "auto" spreads a model too large for one
            GPU over the visible ones, a dict places modules by name; `device` is then ignored. The knockout
            and the sweeps follow each decoder layer's device.
    """
    use_configured_kernels()
    path = resolve_checkpoint(name_or_path)
    config = AutoConfig.from_pretrained(path, revision=revision)
    adapter = adapter_for(config)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    placement = {} if device_map is None else {"device_map": device_map}
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ValueError(
            f"device_map={device_map!r} needs the accelerate package (pip install accelerate); "
            "without it, load the model on one device (device=...)"
        )
    model, info = adapter.model_class.from_pretrained(
        path, revision=revision, dtype=torch_dtype, attn_implementation="sdpa", output_loading_info=True, **placement
    )
    check_loading_info(name_or_path, info)
    model = (model if device_map is not None else model.to(device)).eval()
    processor = adapter.load_processor(path, revision)
    if not isinstance(processor, adapter.processor_class):
        raise UnsupportedModelError(
            f"{name_or_path}: expected a {adapter.processor_class.__name__}, got {type(processor).__name__}"
        )
    if (
        getattr(processor, "num_additional_image_tokens", 1) != 1
        and processor.vision_feature_select_strategy == "default"
    ):
        # Older llava-hf processor configs omit it and then emit one placeholder too few (575).
        processor.num_additional_image_tokens = 1
    name = name_or_path if name_or_path in cfg.SHORT_NAMES else str(name_or_path)
    return wrap_model(
        model,
        processor,
        name=name,
        image_mode=image_mode,
        revision=revision,
        prompt_style=prompt_style,
        related_rule=related_rule,
    )


def save_checkpoint(loaded: LoadedModel, path: str | Path) -> Path:
    """Save model, tokenizer and processor so that `load_model(path)` reloads them identically."""
    path = Path(path)
    loaded.model.save_pretrained(path)
    loaded.processor.save_pretrained(path)
    return path
