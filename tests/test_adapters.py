"""The family-adapter protocol: chosen by config class, every hook in place, a batch carrying the inputs each family
needs, unsupported families sent to the guide."""

import re

import pytest
import torch
from transformers import (
    Gemma3Config,
    LlavaConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)

from flowlib import config as cfg
from flowlib import models
from flowlib.families.base import FamilyAdapter
from flowlib.families.released import RELEASED, released_config
from flowlib.knockout import knockout
from flowlib.models import ADAPTER_GUIDE, UnsupportedModelError, adapter_for, register_family
from flowlib.tiny import tiny_llava
from tests.conftest import ALL_FAMILIES, logits, make_sample, tiny_model, white_sample

#: The hooks and attributes docs/adapters.md must explain (a new hook without its paragraph fails here).
PROTOCOL = (
    "config_class",
    "model_class",
    "processor_class",
    "image_modes",
    "prompt_styles",
    "image_token",
    "image_inputs",
    "token_inputs",
    "official_rule",
    "prompt",
    "load_processor",
    "configure_processor",
    "process",
    "geometry",
    "position_ids",
    "register_family",
    "oracle_mismatches",
)


def test_an_unsupported_family_names_its_config_class_and_the_guide():
    with pytest.raises(UnsupportedModelError) as error:
        adapter_for(Gemma3Config())
    message = str(error.value)
    assert "unsupported model config Gemma3Config" in message
    assert f"write a FamilyAdapter for Gemma3Config ({ADAPTER_GUIDE})" in message
    for name in ("llava-1.5", "llava-next", "qwen2-vl", "qwen2.5-vl", "llava-onevision"):
        assert name in message
    assert (cfg.PROJECT_DIR / ADAPTER_GUIDE).is_file()


@pytest.mark.parametrize(
    "config_class, name",
    [(Qwen2VLConfig, "qwen2-vl"), (Qwen2_5_VLConfig, "qwen2.5-vl"), (LlavaOnevisionConfig, "llava-onevision")],
)
def test_each_new_family_is_chosen_by_its_config_class(config_class, name):
    assert adapter_for(config_class()).name == name


def test_every_adapter_supplies_the_protocol_and_its_prompt_points_at_the_question():
    question = "Is the jar full or empty?"
    for adapter in models.FAMILIES:
        for hook in ("prompt", "configure_processor", "geometry"):
            assert getattr(type(adapter), hook) is not getattr(FamilyAdapter, hook), (adapter.name, hook)
        assert adapter.image_modes and adapter.prompt_styles
        for style in adapter.prompt_styles:
            prompt, start = adapter.prompt(question, models.PromptStyle(style))
            assert prompt[start : start + len(question)] == question and adapter.image_token in prompt[:start]


def test_the_guide_explains_every_hook():
    guide = (cfg.PROJECT_DIR / ADAPTER_GUIDE).read_text()
    quoted = " ".join(re.findall(r"`[^`\n]+`", guide))  # the names as the guide writes code
    assert [name for name in PROTOCOL if not re.search(rf"\b{name}\b", quoted)] == []


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "llava-1.5"])  # 1.5: one image size
def test_a_batch_of_the_processors_own_gives_each_sample_the_logits_it_gets_alone(family):
    """Images of different sizes (other tile or patch counts) in one right-padded batch: each row's logits are
    its own, not a neighbour's, and the batch carries the inputs the adapter names."""
    loaded = tiny_model(family)
    sizes = [(160, 120), (90, 200), (300, 64)]
    samples = [make_sample(*size, boxes=[(5, 5, 20, 20)], seed=i) for i, size in enumerate(sizes)]
    prepared = [loaded.prepare(s) for s in samples]
    assert len({p.inputs["pixel_values"].shape for p in prepared}) > 1  # the tile or patch counts differ
    alone = [logits(loaded, p)[0, -1] for p in prepared]
    loaded.processor.tokenizer.padding_side = "right"
    batch = loaded.processor(
        images=[s.load_image() for s in samples], text=[p.prompt for p in prepared], padding=True, return_tensors="pt"
    )
    assert set(loaded.adapter.image_inputs) | set(loaded.adapter.token_inputs) <= set(batch)
    with torch.no_grad():
        out = loaded.model(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    for row, single in enumerate(alone):
        assert torch.allclose(out[row, last[row]], single, atol=1e-5, rtol=0), row
        for other, neighbour in enumerate(alone):  # the check can fail: the rows differ from each other
            assert other == row or not torch.allclose(out[row, last[row]], neighbour, atol=1e-3)


class ThirdConfig(LlavaConfig):
    """A family flowlib does not know: LLaVA's architecture under a config class of its own."""


def test_a_third_family_works_once_its_adapter_is_registered(monkeypatch):
    monkeypatch.setattr(models, "FAMILIES", models.FAMILIES)  # restore the registry after the test
    stock = tiny_llava("llava-1.5", layers=2)
    config = ThirdConfig(**stock.model.config.to_dict())
    model = type(stock.model)(config).eval()
    model.load_state_dict(stock.model.state_dict())
    with pytest.raises(UnsupportedModelError, match="ThirdConfig"):
        models.wrap_model(model, stock.processor, name="third")

    class ThirdAdapter(models.Llava15Adapter):
        name = "third"
        config_class = ThirdConfig

    register_family(ThirdAdapter())
    loaded = models.wrap_model(model, stock.processor, name="third")
    prepared = loaded.prepare(white_sample())
    with knockout(loaded, prepared.layout, ["Image->Question"], [1]) as ko, torch.no_grad():
        loaded.model(**prepared.inputs)
    assert loaded.adapter.name == "third" and ko.removed_edges()[1] > 0


@pytest.mark.parametrize("name", list(RELEASED))
def test_the_released_7b_checkpoints_pick_their_adapter_window_and_size(name):
    """Full width on the meta device (no memory), tiny width for real: the stand-ins a GPU check builds."""
    family = RELEASED[name][0]
    config = released_config(name)
    adapter = adapter_for(config)
    assert adapter.name == family and config.text_config.num_hidden_layers == 28
    assert cfg.default_window(config.text_config.num_hidden_layers) == 7  # round(7 x 28 / 32) = 6, made odd
    with torch.device("meta"):
        full = adapter.model_class(config)
    billions = sum(p.numel() for p in full.parameters()) / 1e9
    assert abs(billions - (8.05 if family == "llava-onevision" else 8.29)) < 0.01  # Qwen: the hub's 8.29 B
    tiny = adapter.model_class(released_config(name, num_layers=2, width="tiny"))
    assert tiny.config.text_config.num_hidden_layers == 2 and tiny.get_input_embeddings().num_embeddings > 152000
