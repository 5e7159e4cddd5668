"""Configuration in one place: paths, short model names, the paper's constants.

Paths are anchored on the package (never on the working directory) and can be
moved with environment variables, so notebooks, tests and the command line
agree whatever folder they run from.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
#: Committed checkpoints that ship with the package (the offline default model).
CHECKPOINTS_DIR = PACKAGE_DIR / "checkpoints"


def _dir_from_env(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser().resolve() if value else default


def figures_dir() -> Path:
    """Where figures and their numbers are written (`FLOWLIB_FIGURES`, default `figures/`)."""
    return _dir_from_env("FLOWLIB_FIGURES", PROJECT_DIR / "figures")


def runs_dir() -> Path:
    """Where experiment tables are written (`FLOWLIB_RUNS`, default `runs/`, git-ignored)."""
    return _dir_from_env("FLOWLIB_RUNS", PROJECT_DIR / "runs")


def data_dir() -> Path:
    """Where generated datasets are cached (`FLOWLIB_DATA`, default `build/data/`, git-ignored)."""
    return _dir_from_env("FLOWLIB_DATA", PROJECT_DIR / "build" / "data")


#: Name of the offline default model, loadable by `flowlib.models.load_model`.
OFFLINE_MODEL = "toy-llava"
#: Short names resolved to local checkpoint folders before anything else is tried.
SHORT_NAMES = {OFFLINE_MODEL: CHECKPOINTS_DIR / OFFLINE_MODEL}

# The offline model's image geometry. Its smallest object keeps over 20 px after the
# model's downscaling (enough to tell a star from a circle) and spans more than one patch;
# 64 image tokens keep a training step cheap enough for two CPU cores.
TOY_IMAGE_SIZE = 128  # processed square side in pixels (LLaVA-1.5 uses 336)
TOY_PATCH_SIZE = 16  # pixels per patch side: an 8 x 8 grid, 64 image tokens (LLaVA-1.5: 24 x 24)

# The paper's prompt pieces (docs/protocol.md).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
INSTRUCTION = "Answer the question using a single word or phrase."
#: The system message of the official code's `llava_llama_3` conversation (Llama3-LLaVA-NeXT-8b).
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
#: Llama-3 ends an assistant turn with this token; generation must stop there as well as at end-of-text.
LLAMA3_END_OF_TURN = "<|eot_id|>"
LLAMA3_END_OF_TEXT = "<|end_of_text|>"
IMAGE_PLACEHOLDER = "<image>"

#: Window sizes of the paper's released plots, by number of decoder layers.
PAPER_WINDOWS = {40: 9, 32: 7}


def default_window(num_layers: int) -> int:
    """The paper's window for its depths; otherwise scaled like 7/32 (odd, at least 1)."""
    if num_layers in PAPER_WINDOWS:
        return PAPER_WINDOWS[num_layers]
    window = max(1, round(num_layers * 7 / 32))
    return window if window % 2 else window + 1
