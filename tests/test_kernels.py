"""Portable CPU kernels: asked for by FLOWLIB_PORTABLE, refused without their environment, and blind to
the processor's instruction sets (checked by narrowing oneDNN's and MKL's sets in subprocesses)."""

import os
import subprocess
import sys

import pytest
import torch

from flowlib import kernels
from flowlib.kernels import (
    PORTABLE_ENVIRONMENT,
    SWITCH,
    KernelEnvironmentError,
    portable_environment,
    portable_requested,
    use_configured_kernels,
)


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("1", True)])
def test_switch_values(value, expected):
    assert portable_requested({SWITCH: value}) is expected


def test_switch_unset_means_the_processors_own_kernels():
    assert portable_requested({}) is False


def test_switch_rejects_anything_else():
    with pytest.raises(ValueError, match=r"FLOWLIB_PORTABLE='yes': use 1"):
        portable_requested({SWITCH: "yes"})


def test_portable_environment_adds_the_variables_and_the_switch():
    base = {"PATH": "/bin", "MKL_CBWR": "AUTO"}
    env = portable_environment(base)
    assert env == {"PATH": "/bin", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT", SWITCH: "1"}
    assert base == {"PATH": "/bin", "MKL_CBWR": "AUTO"}


def test_without_the_switch_nothing_changes(monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    description = use_configured_kernels(threads=threads + 1)
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads, mkldnn)
    assert description == f"{torch.backends.cpu.get_cpu_capability()} kernels, {threads} threads"


def test_switch_without_its_environment_names_the_fix(monkeypatch):
    monkeypatch.setenv(SWITCH, "1")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE,STRICT")
    mkldnn = torch.backends.mkldnn.enabled
    with pytest.raises(KernelEnvironmentError, match=r"needs ATEN_CPU_CAPABILITY=default .*make figures"):
        use_configured_kernels()
    assert torch.backends.mkldnn.enabled == mkldnn  # refused before changing anything


def test_variables_set_after_torch_started_are_refused(monkeypatch):
    """torch chose its kernels when it started; setting the variable later does not change them."""
    monkeypatch.setenv(SWITCH, "1")
    for name, value in PORTABLE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":  # a processor with no vector kernels: nothing to refuse
        assert use_configured_kernels().startswith("portable kernels")
        return
    with pytest.raises(KernelEnvironmentError, match="set after torch had chosen its kernels"):
        use_configured_kernels()


def test_launcher_needs_a_command():
    with pytest.raises(SystemExit, match="usage: python -m flowlib.kernels COMMAND"):
        kernels.main([])


# ----------------------------------------------------------------------------- subprocesses

# One sweep on the committed model: the computation behind every knockout figure, with the vision tower,
# the projector, the batched knockout passes and the softmax; printed exactly (float.hex).
SWEEP = """
from flowlib import config as cfg
from flowlib.kernels import kernel_description
from flowlib.models import load_model
from flowlib.sweep import layer_sweep
from flowlib.train_toy import ci_samples

loaded = load_model(cfg.OFFLINE_MODEL)
result = layer_sweep(loaded, loaded.prepare(ci_samples()[0]), "Image->Question", window=3)
print(kernel_description())
print(" ".join(float(p).hex() for p in [result.base_prob, *result.blocked_probs]))
"""
# Narrower instruction sets for the libraries that dispatch on the processor.
NARROW = {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def run_sweep(portable: bool, **extra) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*PORTABLE_ENVIRONMENT, *NARROW, SWITCH)}
    env = {**(portable_environment(env) if portable else env), **extra}
    done = subprocess.run([sys.executable, "-c", SWEEP], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    description, numbers = done.stdout.strip().splitlines()[-2:]
    return description, numbers


@pytest.mark.slow
def test_portable_numbers_do_not_depend_on_the_instruction_sets():
    description, portable = run_sweep(True)
    assert description == "portable kernels, 2 threads"
    assert len(portable.split()) == 1 + 12  # base probability and one per layer
    assert run_sweep(True, **NARROW) == (description, portable)


@pytest.mark.slow
def test_the_processors_own_kernels_do_depend_on_them():
    """The control: the same narrowing changes the numbers without portable mode, so the test above can fail."""
    _, native = run_sweep(False)
    _, narrowed = run_sweep(False, ATEN_CPU_CAPABILITY="default", **NARROW)
    assert native != narrowed
