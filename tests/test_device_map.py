"""One model across devices (`load_model(device_map=...)`, `--device-map auto`): the option reaches
`from_pretrained`, and the knockout and the fast engine move their cached tensors to each decoder layer's device.

On a CPU-only machine every device is the CPU, so the CPU tests check the code path (which device each layer's
inputs are asked for, one copy per device, numbers unchanged); `test_layers_split_between_a_gpu_and_the_cpu`
runs the real thing when a GPU is present (skipped otherwise)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from flowlib import models, sweep
from flowlib.knockout import language_model
from flowlib.sweep import layer_sweep
from flowlib.tiny import tiny_llava
from tests.conftest import white_sample

pytestmark = pytest.mark.usefixtures("one_thread")
FLOW = "Image->Question"


def move_inputs_to(module: torch.nn.Module) -> None:
    """What accelerate's dispatch does to each placed module: its tensor inputs move to its device first."""

    def to_device(value, device):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (tuple, list)):
            return type(value)(to_device(v, device) for v in value)
        return value

    def hook(mod, args, kwargs):
        device = next(mod.parameters()).device
        return to_device(args, device), {k: to_device(v, device) for k, v in kwargs.items()}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def split(loaded, first_device: str, second_device: str, at: int):
    """Decoder layers from `at` on, the final norm and the head on `second_device`; the rest on `first_device`."""
    model = loaded.model.to(first_device)
    lm = language_model(model)
    for module in [*lm.layers[at:], lm.norm, model.get_output_embeddings()]:
        module.to(second_device)
    for module in [*lm.layers, lm.norm, model.get_output_embeddings()]:
        move_inputs_to(module)
    return loaded


def test_load_model_passes_the_device_map_to_from_pretrained(checkpoint, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    real, seen = LlavaForConditionalGeneration.from_pretrained.__func__, {}

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        kwargs.pop("device_map", None)  # accelerate may be absent here; the placement itself is transformers' job
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "accelerate" else None)
    layers = {f"model.language_model.layers.{i}": "cpu" for i in range(3)}
    loaded = models.load_model(str(checkpoint), device_map={"": "cpu", **layers})
    assert seen["device_map"] == {"": "cpu", **layers} and loaded.num_layers == 3
    seen.clear()
    models.load_model(str(checkpoint))
    assert "device_map" not in seen  # no map: the model is moved to `device` as before


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is not None, reason="accelerate is installed")
def test_a_device_map_without_accelerate_says_what_to_install(checkpoint):
    with pytest.raises(ValueError, match=r"device_map='auto' needs the accelerate package \(pip install accelerate\)"):
        models.load_model(str(checkpoint), device_map="auto")


def test_the_fast_engine_follows_each_layers_device(monkeypatch):
    """Layers 0-1 report device cpu:0, layers 2-3 and the norm cpu:1 (the CPU either way): the sweep asks each
    layer's device, copies its shared tensors once per device, and gives the numbers of one device."""
    loaded = tiny_llava("llava-1.5", layers=4)
    prepared = loaded.prepare(white_sample())
    expected = layer_sweep(loaded, prepared, FLOW, 1, engine="reference").blocked_probs
    lm = language_model(loaded.model)
    fake = {id(layer): torch.device("cpu", 0 if i < 2 else 1) for i, layer in enumerate(lm.layers)}
    fake[id(lm.norm)] = torch.device("cpu", 1)
    asked, copies = [], []
    real_on = sweep.PerDevice.on

    def module_device(module):
        asked.append(fake[id(module)])
        return fake[id(module)]

    def on(self, device):
        copies.append(device)
        return real_on(self, device)

    monkeypatch.setattr(sweep, "module_device", module_device)
    monkeypatch.setattr(sweep.PerDevice, "on", on)
    split(loaded, "cpu", "cpu", 2)  # with the hooks a dispatched model has
    fast = layer_sweep(loaded, prepared, FLOW, 1, max_batch=None)
    assert asked == [torch.device("cpu", i) for i in (0, 0, 1, 1, 1)]  # layers 0..3, then the norm
    assert copies == asked[:4]  # each layer's inputs asked for on its own device
    np.testing.assert_allclose(fast.blocked_probs, expected, rtol=1e-6)


def test_the_knockout_cuts_on_the_device_of_each_layers_queries():
    from flowlib.knockout import KnockoutAttention

    cut = torch.ones(4, 4, dtype=torch.bool).tril()
    attention = KnockoutAttention(cut, torch.ones(2, 1, dtype=torch.bool), "sdpa")
    here = attention.on(torch.device("cpu"))
    assert here[0] is cut  # its own device: no copy
    other = attention.on(torch.device("cpu", 1))
    assert other is attention.on(torch.device("cpu", 1)) and torch.equal(other[0], cut)  # copied once, then reused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: layers split between cuda:0 and the CPU")
def test_layers_split_between_a_gpu_and_the_cpu():
    whole = tiny_llava("llava-1.5", layers=4)
    prepared = whole.prepare(white_sample())
    expected = layer_sweep(whole, prepared, FLOW, 3, engine="reference").blocked_probs
    loaded = split(tiny_llava("llava-1.5", layers=4), "cuda:0", "cpu", 2)
    on_gpu = loaded.prepare(white_sample())
    devices = [sweep.module_device(layer).type for layer in language_model(loaded.model).layers]
    assert devices == ["cuda", "cuda", "cpu", "cpu"]
    reference = layer_sweep(loaded, on_gpu, FLOW, 3, engine="reference")  # the knockout's per-layer proof holds
    fast = layer_sweep(loaded, on_gpu, FLOW, 3, max_batch=None)
    np.testing.assert_allclose(reference.blocked_probs, expected, rtol=1e-4)
    np.testing.assert_allclose(fast.blocked_probs, reference.blocked_probs, rtol=1e-4)
