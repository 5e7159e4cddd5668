"""Portable CPU kernels: asked for by FLOWLIB_PORTABLE, refused without their environment, and blind to
the processor's instruction sets (checked by narrowing oneDNN's and MKL's sets in subprocesses)."""

import os
import subprocess
import sys
from pathlib import Path

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
    with pytest.raises(SystemExit, match="cannot run 'no-such-command-here': No such file"):
        kernels.main(["no-such-command-here"])


# ----------------------------------------------------------------------------- subprocesses

# One sweep on the committed model: the computation behind every knockout figure, with the vision tower,
# the projector, the batched knockout passes and the softmax; printed exactly (float.hex).
SWEEP = """
from flowlib import config as cfg
from flowlib.kernels import kernel_description
from flowlib.models import load_model
from flowlib.sweep import layer_sweep
from flowlib.toy.evaluation import ci_samples

loaded = load_model(cfg.OFFLINE_MODEL)
result = layer_sweep(loaded, loaded.prepare(ci_samples()[0]), "Image->Question", window=3)
print(kernel_description())
print(" ".join(float(p).hex() for p in [result.base_prob, *result.blocked_probs]))
"""
# Narrower instruction sets for the libraries that dispatch on the processor.
NARROW = {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def run_python(code: str, portable: bool, *args: str, **extra: str) -> list[str]:
    """The last two lines `code` prints, run in a fresh Python (portable or not, `extra` added to its environment)."""
    env = {k: v for k, v in os.environ.items() if k not in (*PORTABLE_ENVIRONMENT, *NARROW, SWITCH)}
    env = {**(portable_environment(env) if portable else env), **extra}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-2:]


@pytest.mark.slow
def test_portable_numbers_do_not_depend_on_the_instruction_sets():
    description, portable = run_python(SWEEP, True)
    assert description == "portable kernels, 2 threads"
    assert len(portable.split()) == 1 + 12  # base probability and one per layer
    assert run_python(SWEEP, True, **NARROW) == [description, portable]


@pytest.mark.slow
def test_the_processors_own_kernels_do_depend_on_them():
    """The control: the same narrowing changes the numbers without portable mode, so the test above can fail."""
    _, native = run_python(SWEEP, False)
    _, narrowed = run_python(SWEEP, False, ATEN_CPU_CAPABILITY="default", **NARROW)
    assert native != narrowed


# Three steps of training a small toy (batches of 16: the size from which the patch convolution can take
# NNPACK), printed as the card's device and the weights' digest.
TRAIN = """
import dataclasses, hashlib, sys
from pathlib import Path
from flowlib.toy.training import TrainConfig, train
from tests.test_train_toy import SMALL

config = dataclasses.replace(TrainConfig(), steps=3, batch_size=16, chunk_per_task=4, warmup_steps=1,
                             monitor_per_task=1, eval_every=1000, threads=2, vision_pretrain_steps=2,
                             vision_pretrain_chunks=1, vision_pretrain_batch=16)
card = train(SMALL, config, seed=7, out=Path(sys.argv[1]), workers=0, final_eval=False)
print(card["training"]["device"])
print(hashlib.sha256((Path(sys.argv[1]) / "model.safetensors").read_bytes()).hexdigest())
"""


@pytest.mark.slow
def test_portable_training_does_not_depend_on_the_instruction_sets(tmp_path):
    device, portable = run_python(TRAIN, True, str(tmp_path / "a"))
    assert device.endswith(", portable kernels, 2 threads)")
    assert run_python(TRAIN, True, str(tmp_path / "b"), **NARROW) == [device, portable]
    _, native = run_python(TRAIN, False, str(tmp_path / "c"))
    _, narrowed = run_python(TRAIN, False, str(tmp_path / "d"), ATEN_CPU_CAPABILITY="default", **NARROW)
    assert native != narrowed  # the control
