"""A run's saved state: what an interrupted training run needs to continue to the same weights.

`train(out=...)` saves it in the output folder every `save_every` steps (`STATE_FILE`) and removes it
when all its steps are done; the same call with the same settings resumes from it. Training draws
nothing from torch's global generator (tested), so the state below is all a resumed run needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..run_folder import atomic_write, provenance_changes
from .model import ToyConfig
from .recipe import TrainConfig

#: The state a run saves in its output folder as it goes, removed when it is done.
STATE_FILE = "training_state.pt"


class TrainingStateMismatch(ValueError):
    """An output folder holds the saved state of a run with other settings."""


def run_identity(model_config: ToyConfig, train_config: TrainConfig, seed: int) -> dict:
    """What a saved state must match to be resumed: the seed and both configs, as JSON stores them."""
    return json.loads(
        json.dumps({"seed": seed, "model_config": model_config.to_dict(), "train_config": train_config.to_dict()})
    )


def save_training_state(path: Path, state: dict) -> None:
    """Write `state` (identity, written_by, steps_done, seconds, pretrained, log and the state dicts of the
    model, the patch loss's position heads and the optimizer) whole or not at all."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path, identity: dict, device: torch.device) -> dict | None:
    """The state saved at `path`, if any; TrainingStateMismatch if it belongs to a run with other settings."""
    if not path.exists():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state["identity"] != identity:
        stored = state["identity"]
        diffs = [f"seed {stored['seed']} (now {identity['seed']})"] if stored["seed"] != identity["seed"] else []
        diffs += [
            f"{section}.{key} {stored[section].get(key)!r} (now {value!r})"
            for section in ("model_config", "train_config")
            for key, value in identity[section].items()
            if stored[section].get(key) != value
        ]
        raise TrainingStateMismatch(
            f"{path} holds the saved state of a run with other settings: {'; '.join(diffs) or 'other fields'}. "
            "Run the same command to continue that run, pass --fresh (train(fresh=True)) to delete it and "
            "start over, or choose another --out folder"
        )
    for change in provenance_changes(state["written_by"]):  # allowed, but the continued run may round differently
        print(f"warning: resuming a run saved with {change}", flush=True)
    return state
