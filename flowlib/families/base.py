"""The family-adapter protocol: everything flowlib needs to know about one model family.

flowlib's mechanics (token layout, knockout, sweeps, lens) never look at a model's name. What differs
between families is collected in one `FamilyAdapter` subclass, chosen by the checkpoint's config
class (`flowlib.models.adapter_for`). docs/adapters.md walks through writing one; the LLaVA-1.5,
LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL and LLaVA-OneVision adapters are the worked examples.

An adapter supplies:
- the classes: `config_class` (matched exactly), `model_class`, `processor_class`;
- the prompt: `prompt(question, style)` -> (prompt text, character offset of the question);
- the processor: `load_processor`, `configure_processor` (the paper's preprocessing), `process`;
- the image block: `image_token` (the placeholder the processor expands), `geometry` (box -> tokens);
- the positions: `position_ids` (what the language model's rotary embedding reads, when not 0..n-1);
- batching: `image_inputs`, the processor outputs a batch must carry row by row.

The knockout needs no hook: it requires that `model.get_decoder()` is the language model, that its
attention layers call the function named by `config.text_config._attn_implementation` (transformers'
`AttentionInterface`) and carry `layer_idx`, and that its attention is causal (no bidirectional block
among image tokens); `flowlib.knockout` proves the first two after every forward.
"""

from __future__ import annotations

from transformers import AutoProcessor

from ..geometry import ImageGeometry

#: ChatML's default system message (Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision's `qwen_1_5` conversation).
CHATML_SYSTEM = "You are a helpful assistant."
#: ChatML ends an assistant turn with this token; Qwen's base models end text with the second.
CHATML_END_OF_TURN = "<|im_end|>"
CHATML_END_OF_TEXT = "<|endoftext|>"


def chatml_prompt(question: str, image_marker: str, instruction: str) -> tuple[str, int]:
    """The ChatML prompt with the paper's user text, and where the question starts.

    The user turn is the image marker followed by the paper's user text (`{question} \\n{instruction}`),
    so that only the chat template differs from the paper's LLaVA prompts; the prompt ends with the
    assistant header (`<|im_start|>assistant\\n`), whose last token is the Last position.
    """
    head = f"<|im_start|>system\n{CHATML_SYSTEM}{CHATML_END_OF_TURN}\n<|im_start|>user\n{image_marker}"
    prompt = f"{head}{question} \n{instruction}{CHATML_END_OF_TURN}\n<|im_start|>assistant\n"
    return prompt, len(head)


def pil_image_processor(processor, pil_class: type):
    """`processor` with its image processor rebuilt as `pil_class` from its own settings, unless it is one.

    flowlib preprocesses with the PIL image processors, which work without torchvision; a loaded
    checkpoint may bring another class. Its own numbers (sizes, pinpoints, resampling, mean and std)
    carry over.
    """
    old = processor.image_processor
    if not isinstance(old, pil_class):
        processor.image_processor = pil_class(**old.to_dict())
    return processor


class FamilyAdapter:
    """What differs between model families. Subclasses set the class attributes and the hooks marked so."""

    name: str
    config_class: type
    model_class: type
    processor_class: type
    image_modes: tuple[str, ...]
    #: The prompt styles (`flowlib.models.PromptStyle` values) this family's checkpoints use.
    prompt_styles: tuple[str, ...]
    #: The placeholder token the processor expands into the image block (one contiguous run of it).
    image_token: str = "<image>"
    #: Processor outputs besides input_ids and attention_mask that carry the image, row by row.
    image_inputs: tuple[str, ...] = ("pixel_values", "image_sizes")
    #: Processor outputs with one value per token (padded like input_ids in a batch), e.g. Qwen's token types.
    token_inputs: tuple[str, ...] = ()
    #: Whether `related_rule="official"` (boxes painted red through the image processor) is implemented.
    official_rule: bool = False

    def prompt(self, question: str, style) -> tuple[str, int]:
        """Hook: the paper's prompt for `question` in `style`, and the character offset of the question."""
        raise NotImplementedError

    def load_processor(self, path: str, revision: str | None = None):
        """The checkpoint's processor (default: `AutoProcessor`)."""
        return AutoProcessor.from_pretrained(path, revision=revision)

    def configure_processor(self, processor, image_mode: str):
        """Hook: return `processor` with the paper's image preprocessing for `image_mode`."""
        raise NotImplementedError

    def process(self, processor, image, prompt: str) -> dict:
        """The processor's tensors for one image and its prompt (batch of one)."""
        return dict(processor(images=image, text=prompt, return_tensors="pt"))

    def geometry(self, processor, width: int, height: int) -> ImageGeometry:
        """Hook: the patch geometry of a `width` x `height` image under `processor` (box -> image tokens)."""
        raise NotImplementedError

    def position_ids(self, model, inputs: dict):
        """The position ids the language model's rotary embedding reads for `inputs` (batch of one).

        None means the usual 0..n-1; a family with multimodal positions returns its own (e.g. Qwen's
        ``(3, 1, n)``), which the fast sweep slices for the suffix it recomputes.
        """
        return None

    def check_image_mode(self, image_mode: str | None) -> str:
        image_mode = image_mode or self.image_modes[0]
        if image_mode not in self.image_modes:
            raise ValueError(f"{self.name} supports image_mode {self.image_modes}, not {image_mode!r}")
        return image_mode

    def check_prompt_style(self, style) -> None:
        value = getattr(style, "value", style)
        if value not in self.prompt_styles:
            raise ValueError(f"{self.name} checkpoints use prompt style {self.prompt_styles}, not {value!r}")


def suffix_positions(loaded, prepared, start: int, device):
    """Position ids of positions `start`.. of `prepared`, as the language model's rotary embedding reads them.

    The fast sweep recomputes only a suffix; with multimodal rotary positions (Qwen's 3 rows, offset by
    the rope deltas after the image) the suffix's positions are not `start..n-1`, so they come from the
    family adapter. Shape ``(1, n - start)`` or ``(rows, 1, n - start)``.
    """
    import torch

    n = prepared.layout.seq_len
    adapter = getattr(loaded, "adapter", None)
    full = adapter.position_ids(loaded.model, prepared.inputs) if adapter is not None else None
    if full is None:
        return torch.arange(start, n, device=device)[None]
    return full[..., start:].to(device)
