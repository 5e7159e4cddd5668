"""Where a module runs when a device map spreads a model (`load_model(device_map=...)`, accelerate's dispatch).

accelerate attaches a hook to each placed module: its inputs move to the hook's execution device before each
forward. A module offloaded to the CPU (when the GPUs are full) or to disk keeps its weights on the ``meta``
device between forwards and runs on the execution device, so a parameter's device does not say where the
module computes, and its weights can only be read while they are loaded. Without a device map these functions
fall back to the weights' own device and do nothing extra.
"""

from __future__ import annotations

import contextlib
import itertools

import torch


def _device_hooks(module: torch.nn.Module) -> list:
    """accelerate's device-alignment hooks on `module` (a SequentialHook holds several), outermost first."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return [h for h in hooks if hasattr(h, "execution_device")]


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module` computes on: its hook's execution device under a device map, else its weights' device."""
    for hook in _device_hooks(module):
        if hook.execution_device is not None:
            device = hook.execution_device
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    raise ValueError(f"{type(module).__name__} has no weights and no device hook: its device is unknown")


@contextlib.contextmanager
def loaded_weights(module: torch.nn.Module):
    """Inside, an offloaded module's weights are on its execution device (read directly, not through `forward`).

    Example:
        >>> head = model.get_output_embeddings()
        >>> with loaded_weights(head):
        ...     rows = head.weight[:1000].double()
    """
    offloaded = [hook for hook in _device_hooks(module) if getattr(hook, "offload", False)]
    for hook in offloaded:
        hook.pre_forward(module)
    try:
        yield module
    finally:
        for hook in reversed(offloaded):
            hook.post_forward(module, None)
