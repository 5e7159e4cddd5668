"""Portable CPU kernels, meant to give the same floats on any x86-64 processor, for 1.5-2.4x the time.

torch picks kernels for the processor it runs on: ATen's vectorised kernels by instruction set (AVX2,
AVX-512), MKL's matrix products by processor, oneDNN's and NNPACK's convolutions by instruction set.
Each rounds floats its own way, so one model on one input gives numbers that differ in the sixth
significant digit from one machine to another (the committed figures' knockout curves: up to 2.5e-5
percentage points, regenerated on an AMD processor). Portable mode pins each to a path that every
x86-64 processor runs alike:

- ATen: its generic kernels (`ATEN_CPU_CAPABILITY=default`);
- MKL: its SSE2 branch with reductions fixed for any thread count (`MKL_CBWR=COMPATIBLE,STRICT`);
- oneDNN and NNPACK: off, so convolutions take ATen's own path;
- a fixed number of threads, because ATen splits some reductions by thread.

torch and MKL read the two variables once, when they start, so they are set before Python starts:
`make figures` does (`PORTABLE=1`, its default) through `python -m flowlib.kernels COMMAND...`, which runs
COMMAND with them; `portable_environment()` gives them to a subprocess.
`FLOWLIB_PORTABLE=1` makes `use_configured_kernels()` (run whenever flowlib loads a model) check them
and set the rest. Checked on one machine only: with them, narrowing oneDNN's and MKL's instruction sets
leaves every number unchanged (`tests/test_kernels.py`: a sweep and three training steps; every figure
number, by `make figures-check TOLERANCE=0`).

Example:
    $ env ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE,STRICT FLOWLIB_PORTABLE=1 python script.py
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

SWITCH = "FLOWLIB_PORTABLE"
#: Read by torch and MKL when they start: set before Python starts.
PORTABLE_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT"}
#: The offline default's machine has two cores; a fixed count keeps the reductions' order fixed.
PORTABLE_THREADS = 2


class KernelEnvironmentError(RuntimeError):
    """Portable mode was asked for in a process started without its environment."""


def portable_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `FLOWLIB_PORTABLE` asks for portable kernels ("1"; unset, "" or "0": no)."""
    value = environ.get(SWITCH, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{SWITCH}={value!r}: use 1 for portable kernels or 0 for the processor's own")
    return value == "1"


def portable_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) with portable mode switched on, for a subprocess."""
    return {**(os.environ if environ is None else environ), **PORTABLE_ENVIRONMENT, SWITCH: "1"}


def use_configured_kernels(threads: int = PORTABLE_THREADS) -> str:
    """Apply `FLOWLIB_PORTABLE`; return `kernel_description()`.

    In portable mode this checks the environment the process started with (raising
    `KernelEnvironmentError` with the fix when it lacks a variable), turns oneDNN and NNPACK off and
    fixes the number of threads. Otherwise it changes nothing.
    """
    import torch  # here, not at the top: the command-line launcher below must start fast

    if portable_requested():
        missing = [f"{name}={value}" for name, value in PORTABLE_ENVIRONMENT.items() if os.environ.get(name) != value]
        if not missing and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
            missing = ["ATEN_CPU_CAPABILITY=default (set after torch had chosen its kernels)"]
        if missing:
            raise KernelEnvironmentError(
                f"{SWITCH}=1 needs {' '.join(missing)} in the environment before Python starts (torch and MKL "
                f"read it once, at start): run through `make figures` (PORTABLE=1), or prefix the command with "
                f"`env {' '.join(f'{k}={v}' for k, v in PORTABLE_ENVIRONMENT.items())} {SWITCH}=1`; "
                f"or unset {SWITCH} for the processor's own kernels"
            )
        torch.backends.mkldnn.enabled = False
        torch.backends.nnpack.set_flags(False)
        torch.set_num_threads(threads)
    return kernel_description()


def kernel_kind() -> str:
    """ "portable", or the instruction set of the processor's own kernels ("AVX2", "AVX512", ...)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return "portable" if portable_requested() and capability == "DEFAULT" else capability


def kernel_description() -> str:
    """The CPU kernels in use, e.g. "portable kernels, 2 threads" or "AVX2 kernels, 2 threads"."""
    import torch

    return f"{kernel_kind()} kernels, {torch.get_num_threads()} threads"


def main(argv=None) -> None:
    """`python -m flowlib.kernels COMMAND [ARGS...]`: run COMMAND in portable mode."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m flowlib.kernels COMMAND [ARGS...] (runs COMMAND with portable CPU kernels)")
    try:
        os.execvpe(argv[0], argv, portable_environment())
    except OSError as error:  # only reached when the command could not start
        raise SystemExit(
            f"python -m flowlib.kernels: cannot run {argv[0]!r}: {error.strerror}; "
            "give a command on PATH or a path to an executable"
        ) from None


if __name__ == "__main__":
    main()
