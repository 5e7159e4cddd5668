"""The paper's four checkpoints: documented config numbers, tiny stand-ins, and folders load_model loads."""

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

from flowlib.architectures import (
    NEXT_PINPOINTS,
    PAPER_CHECKPOINTS,
    architecture,
    build_config,
    build_model,
    build_processor,
    model_class,
    save_checkpoint_folder,
)
from flowlib.models import build_prompt, load_model
from flowlib.tiny import word_level_tokenizer

from .conftest import make_sample
from .real_tokenizers import tokenizer_for

# name: (family, prompt style, layers, hidden, intermediate, heads, kv heads, vocab, <image>, rope theta, positions)
DOCUMENTED = {
    "llava-hf/llava-1.5-7b-hf": ("llava-1.5", "vicuna", 32, 4096, 11008, 32, 32, 32064, 32000, 1e4, 4096),
    "llava-hf/llava-1.5-13b-hf": ("llava-1.5", "vicuna", 40, 5120, 13824, 40, 40, 32064, 32000, 1e4, 4096),
    "llava-hf/llava-v1.6-vicuna-7b-hf": ("llava-next", "vicuna", 32, 4096, 11008, 32, 32, 32064, 32000, 1e4, 4096),
    "llava-hf/llama3-llava-next-8b-hf": ("llava-next", "llama3", 32, 4096, 14336, 32, 8, 128320, 128256, 5e5, 8192),
}
#: Parameter counts of the documented configs; the hub pages show them rounded (7.06B, 13.4B, 7.06B, 8.36B).
PARAMETERS = {
    "llava-hf/llava-1.5-7b-hf": 7_063_427_072,
    "llava-hf/llava-1.5-13b-hf": 13_351_494_656,
    "llava-hf/llava-v1.6-vicuna-7b-hf": 7_063_431_168,  # + the image-newline vector (4096)
    "llava-hf/llama3-llava-next-8b-hf": 8_355_276_800,
}
NAMES = list(PAPER_CHECKPOINTS)


def test_the_four_paper_checkpoints_are_there():
    assert set(PAPER_CHECKPOINTS) == set(DOCUMENTED)
    with pytest.raises(KeyError, match="llava-1.5-7b-hf"):
        architecture("llava-hf/llava-1.5-7b")


@pytest.mark.parametrize("name", NAMES)
def test_full_width_config_has_the_documented_numbers(name):
    family, style, layers, hidden, inter, heads, kv, vocab, image, theta, positions = DOCUMENTED[name]
    arch = PAPER_CHECKPOINTS[name]
    assert (arch.family, arch.prompt_style, arch.num_layers, arch.image_token_id) == (family, style, layers, image)
    config = build_config(name)
    assert isinstance(config, LlavaConfig if family == "llava-1.5" else LlavaNextConfig)
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (layers, hidden, inter)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (heads, kv, vocab)
    assert text.rope_parameters["rope_theta"] == theta
    assert (text.max_position_embeddings, text.rms_norm_eps) == (positions, 1e-5)
    assert text.tie_word_embeddings is False and config.tie_word_embeddings is False
    assert config.image_token_id == image
    # CLIP ViT-L/14 at 336 px, read at its second-to-last layer without the CLS token.
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        1024,
        4096,
        24,
        16,
    )
    assert (vision.image_size, vision.patch_size, vision.projection_dim, vision.layer_norm_eps) == (336, 14, 768, 1e-5)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.projector_hidden_act == "gelu"
    if family == "llava-1.5":
        assert config.image_seq_length == 576
    else:
        assert [list(p) for p in config.image_grid_pinpoints] == [
            [336, 672],
            [672, 336],
            [672, 672],
            [1008, 336],
            [336, 1008],
        ]


@pytest.mark.parametrize("name", NAMES)
def test_documented_configs_have_the_released_parameter_counts(name):
    with torch.device("meta"):  # no memory: shapes only
        model = model_class(name)(build_config(name))
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


@pytest.mark.parametrize("name", NAMES)
def test_tiny_width_keeps_everything_that_decides_the_token_layout(name):
    full, tiny = build_config(name), build_config(name, num_layers=3, width="tiny")
    assert type(tiny) is type(full)
    assert (tiny.text_config.hidden_size, tiny.text_config.num_attention_heads, tiny.text_config.num_hidden_layers) == (
        64,
        4,
        3,
    )
    assert tiny.vision_config.hidden_size == 32 and tiny.vision_config.num_hidden_layers == 2
    # Grouped-query attention keeps its ratio (Llama-3: 4 query heads per key-value head).
    ratio = full.text_config.num_attention_heads // full.text_config.num_key_value_heads
    assert tiny.text_config.num_attention_heads // tiny.text_config.num_key_value_heads == ratio
    for keep in (
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(tiny.text_config, keep) == getattr(full.text_config, keep), keep
    for keep in ("image_size", "patch_size", "num_channels"):
        assert getattr(tiny.vision_config, keep) == getattr(full.vision_config, keep), keep
    for keep in (
        "image_token_id",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "image_grid_pinpoints",
        "image_seq_length",
    ):
        assert getattr(tiny, keep, None) == getattr(full, keep, None), keep


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="width"):
        build_config(NAMES[0], width="small")
    with pytest.raises(ValueError, match="num_layers"):
        build_config(NAMES[0], num_layers=0)
    with pytest.raises(ValueError, match="<image> = 32000"):
        build_processor(NAMES[0], word_level_tokenizer(["red"]))


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_is_the_right_class_in_eval_mode(name):
    model = build_model(name)
    expected = (
        LlavaForConditionalGeneration
        if PAPER_CHECKPOINTS[name].family == "llava-1.5"
        else (LlavaNextForConditionalGeneration)
    )
    assert type(model) is expected and not model.training
    assert model.config.text_config.num_hidden_layers == 2
    assert model.get_input_embeddings().weight.shape[0] == DOCUMENTED[name][7]
    assert model.generation_config.eos_token_id == model.config.text_config.eos_token_id
    assert torch.equal(build_model(name).get_output_embeddings().weight, model.get_output_embeddings().weight)  # seeded


def test_dtype_is_a_parameter():
    model = build_model(NAMES[0], dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert torch.get_default_dtype() == torch.float32


@pytest.fixture(scope="module")
def shared(shared_dir):
    if not (shared_dir / "tokenizers").is_dir():
        pytest.skip("../shared/tokenizers is not present beside the checkout")
    return shared_dir


@pytest.mark.shared
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow if arch.tokenizer == "llama-3" else ())
        for name, arch in PAPER_CHECKPOINTS.items()
    ],
)
def test_checkpoint_folder_loads_as_a_downloaded_checkpoint(name, shared, tmp_path):
    arch = PAPER_CHECKPOINTS[name]
    tokenizer = tokenizer_for(arch.tokenizer, shared)
    folder = save_checkpoint_folder(name, tmp_path / "checkpoint", tokenizer)
    assert (folder / "model.safetensors").is_file()

    loaded = load_model(str(folder))
    assert type(loaded.model) is model_class(name)
    assert loaded.adapter.name == arch.family and loaded.prompt_style.value == arch.prompt_style
    assert loaded.num_layers == 2
    assert loaded.model.config.image_token_id == arch.image_token_id
    built = build_model(name)
    for key, value in built.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    # The reloaded tokenizer (transformers' generic backend for llava folders) gives the same ids.
    prompt = build_prompt("Is the car red or blue?", loaded.prompt_style)[0]
    assert loaded.tokenizer(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    # The processor reloads with the checkpoint's settings (the adapter then sets the image mode).
    processor = loaded.processor
    assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)
    assert processor.vision_feature_select_strategy == "default"
    image_processor = processor.image_processor
    assert list(image_processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert list(image_processor.image_std) == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert int(image_processor.resample) == 3
    if arch.family == "llava-next":
        assert [tuple(p) for p in image_processor.image_grid_pinpoints] == list(NEXT_PINPOINTS)
    layout = loaded.prepare(make_sample(500, 375)).layout
    assert len(layout.group("Image")) == (576 if arch.family == "llava-1.5" else 2340)


@pytest.mark.shared
def test_a_tokenizer_that_does_not_fit_is_refused(shared, tmp_path):
    with pytest.raises(ValueError, match="<image> = 128256"):
        save_checkpoint_folder("llava-hf/llama3-llava-next-8b-hf", tmp_path, tokenizer_for("llama-2", shared))
