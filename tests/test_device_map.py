"""One model across devices (`load_model(device_map=...)`, `--device-map auto`): the map reaches accelerate's
dispatch through `from_pretrained`, and the knockout and the fast engine work on each decoder layer's execution
device, offloaded layers included.

On a CPU-only machine the CPU tests check real dispatch with layers offloaded to disk (weights on ``meta``
between forwards) and, with two device indices faked, that each layer's inputs are asked for on its own device;
the two GPU tests (a layer split between cuda:0 and the CPU, and layers offloaded to the CPU) skip without one."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from flowlib import models, sweep
from flowlib.knockout import language_model
from flowlib.placement import execution_device, loaded_weights
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


def offloading_map(num_layers: int, first_device, offloaded_from: int, offload_to: str) -> dict:
    """A per-module device map: decoder layers from `offloaded_from` on, the final norm and the head offloaded."""
    lm = "model.language_model"
    placed = {f"{lm}.layers.{i}": first_device if i < offloaded_from else offload_to for i in range(num_layers)}
    rest = {name: first_device for name in ("model.vision_tower", "model.multi_modal_projector")}
    rest |= {f"{lm}.embed_tokens": first_device, f"{lm}.rotary_emb": first_device}
    return {**rest, **placed, f"{lm}.norm": offload_to, "lm_head": offload_to}


def test_offloaded_layers_through_accelerates_dispatch_give_the_single_device_numbers(checkpoint, disk_model):
    """A real device map (transformers + accelerate): layers 1-2, the norm and the head offloaded to disk, their
    weights on ``meta`` between forwards. The knockout's per-layer check passes, both engines give the numbers
    of the model on one device, and the offloaded weights go back to ``meta`` afterwards."""
    device_map = offloading_map(3, "cpu", 1, "disk")
    loaded = models.load_model(str(checkpoint), device_map=device_map)
    assert loaded.model.hf_device_map == device_map
    lm = language_model(loaded.model)
    offloaded = [lm.layers[1], lm.layers[2], lm.norm, loaded.model.get_output_embeddings()]
    assert [next(m.parameters()).device.type for m in lm.layers] == ["cpu", "meta", "meta"]
    assert [execution_device(m) for m in lm.layers] == [torch.device("cpu")] * 3
    assert loaded.device == torch.device("cpu")

    sample = white_sample()
    whole, prepared = disk_model.prepare(sample), loaded.prepare(sample)
    torch.testing.assert_close(loaded.model(**prepared.inputs).logits, disk_model.model(**whole.inputs).logits)
    expected = layer_sweep(disk_model, whole, FLOW, 1, engine="reference").blocked_probs
    reference = layer_sweep(loaded, prepared, FLOW, 1, engine="reference")  # verifies the cut, layer by layer
    fast = layer_sweep(loaded, prepared, FLOW, 1, max_batch=None)
    np.testing.assert_allclose(reference.blocked_probs, expected, rtol=1e-6)
    np.testing.assert_allclose(fast.blocked_probs, expected, rtol=1e-6)
    assert {p.device.type for m in offloaded for p in m.parameters()} == {"meta"}


def test_loaded_weights_reads_an_offloaded_head_and_puts_it_back(checkpoint, disk_model):
    loaded = models.load_model(str(checkpoint), device_map=offloading_map(3, "cpu", 3, "disk"))
    head = loaded.model.get_output_embeddings()
    assert head.weight.device.type == "meta"
    with loaded_weights(head):
        torch.testing.assert_close(head.weight, disk_model.model.get_output_embeddings().weight)
    assert head.weight.device.type == "meta"
    with loaded_weights(disk_model.model.get_output_embeddings()) as plain:  # no device map: nothing to do
        assert plain.weight.device.type == "cpu"


def test_a_device_map_without_accelerate_says_what_to_install(checkpoint, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a)
    )
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

    def faked_device(module):
        asked.append(fake[id(module)])
        return fake[id(module)]

    def on(self, device):
        copies.append(device)
        return real_on(self, device)

    monkeypatch.setattr(sweep, "execution_device", faked_device)
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
    devices = [sweep.execution_device(layer).type for layer in language_model(loaded.model).layers]
    assert devices == ["cuda", "cuda", "cpu", "cpu"]
    reference = layer_sweep(loaded, on_gpu, FLOW, 3, engine="reference")  # the knockout's per-layer proof holds
    fast = layer_sweep(loaded, on_gpu, FLOW, 3, max_batch=None)
    np.testing.assert_allclose(reference.blocked_probs, expected, rtol=1e-4)
    np.testing.assert_allclose(fast.blocked_probs, reference.blocked_probs, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: layers offloaded to the CPU, run on cuda:0")
def test_layers_offloaded_to_the_cpu_run_on_the_gpu(checkpoint, disk_model):
    """What `device_map="auto"` does with a checkpoint larger than the GPUs: the last layers' weights wait in
    CPU memory and are brought to the GPU for each forward."""
    loaded = models.load_model(str(checkpoint), device_map=offloading_map(3, 0, 1, "cpu"))
    lm = language_model(loaded.model)
    assert [execution_device(m) for m in lm.layers] == [torch.device("cuda", 0)] * 3
    assert next(lm.layers[2].parameters()).device.type == "meta"
    sample = white_sample()
    expected = layer_sweep(disk_model, disk_model.prepare(sample), FLOW, 1, engine="reference").blocked_probs
    prepared = loaded.prepare(sample)
    reference = layer_sweep(loaded, prepared, FLOW, 1, engine="reference")
    fast = layer_sweep(loaded, prepared, FLOW, 1, max_batch=None)
    np.testing.assert_allclose(reference.blocked_probs, expected, rtol=1e-4)
    np.testing.assert_allclose(fast.blocked_probs, reference.blocked_probs, rtol=1e-4)
