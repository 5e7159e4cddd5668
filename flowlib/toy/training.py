"""Train the offline default model ("toy-llava") on a stream of fresh synthetic scenes: `train()`.

A run is: set up torch for reproducible steps; resume a saved state or pretrain the vision tower
(`flowlib.toy.vision_pretrain`); take the recipe's main steps on the training stream
(`flowlib.toy.stream`, `flowlib.toy.step`), saving its state as it goes (`flowlib.toy.state`); evaluate,
and save the weights with their model card (`flowlib.toy.evaluation`, `flowlib.toy.card`). Deterministic
from the seed and the configs on the same processor and kernels.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..evaluate import evaluate, format_scores
from ..kernels import use_configured_kernels
from ..run_folder import written_by
from .card import build_card, cpu_description, save_run
from .evaluation import final_evaluation, monitor_samples
from .model import ToyConfig, build_toy_model
from .patches import PatchLoss
from .recipe import TrainConfig, lr_at
from .state import STATE_FILE, load_training_state, run_identity, save_training_state
from .step import LOSSES, step_losses
from .stream import ChunkStream, batches
from .vision_pretrain import pretrain_vision

#: Parameters whose names start so are the language model's; the rest (vision tower, projector, the
#: patch loss's position heads) learn at `vision_lr` and are clipped apart.
LANGUAGE_PARAMETERS = ("model.language_model", "lm_head")


@dataclasses.dataclass
class Progress:
    """Where a run stands, besides its weights and optimizer: steps done, clock, pretraining summary, log."""

    started: float  # the clock's start: a resumed run's starts the saved seconds earlier
    steps_done: int = 0
    pretrained: dict | None = None
    log: dict = dataclasses.field(default_factory=lambda: {"step": [], **{k: [] for k in LOSSES}, "lr": [], "eval": []})

    def saved(self) -> dict:
        """This progress as a saved state holds it (and the model card records it)."""
        return {
            "steps_done": self.steps_done,
            "seconds": time.time() - self.started,
            "pretrained": self.pretrained,
            "log": self.log,
        }


@dataclasses.dataclass
class Trainer:
    """The model, its patch loss and optimizer: what one training step updates."""

    model: torch.nn.Module
    patch_loss: PatchLoss
    optimizer: torch.optim.Optimizer
    sides: tuple  # the language side's parameters and the vision side's, clipped apart
    train_config: TrainConfig
    projected: dict  # the projector output of the current forward pass, for the patch loss

    @classmethod
    def for_model(cls, model, tokenizer, model_config: ToyConfig, train_config: TrainConfig) -> Trainer:
        # The patch loss comes right after the model: its heads' initial weights are drawn from the generator
        # the model's seed set.
        patch_loss = PatchLoss(model, tokenizer, model_config).to(model.device)
        optimizer, sides = build_optimizer(model, patch_loss, train_config)
        return cls(model, patch_loss, optimizer, sides, train_config, {})

    def step(self, batch: dict, step: int) -> dict:
        """One step of the recipe at its learning rate for `step`; returns the losses (`LOSSES`)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_at(step, self.train_config) / self.train_config.lr
        hook = self.model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, output: self.projected.__setitem__("features", output)
        )
        try:
            losses = step_losses(self.model, self.patch_loss, batch, self.projected, self.train_config)
        finally:
            hook.remove()
        for params in self.sides:  # apart: the early patch-loss gradients must not shrink the decoder's steps
            torch.nn.utils.clip_grad_norm_(params, self.train_config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def saved(self) -> dict:
        """The weights and optimizer as a saved state holds them."""
        return {
            "model": self.model.state_dict(),
            "position_heads": self.patch_loss.position_heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def restore(self, state: dict) -> Progress:
        """Load a saved state's weights and optimizer; return its progress, the clock set back."""
        print(f"resuming at step {state['steps_done']} ({state['seconds'] / 60:.1f} min trained so far)", flush=True)
        self.model.load_state_dict(state["model"])
        self.patch_loss.position_heads.load_state_dict(state["position_heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        return Progress(time.time() - state["seconds"], state["steps_done"], state["pretrained"], state["log"])


def train(
    model_config: ToyConfig,
    train_config: TrainConfig,
    seed: int = 0,
    out: Path | None = None,
    minutes: float | None = None,
    workers: int = 1,
    final_eval: bool = True,
    device: str = "cpu",
    save_every: int = 250,
    fresh: bool = False,
) -> dict:
    """Train a toy LLaVA from `seed`; save it with its card into `out` (if given); return the card.

    `device` ("cpu", "cuda", "cuda:1", ...) runs the model there; the data stream stays on the CPU
    (`workers` processes). The weights are saved from the CPU either way.

    With `out`, the run saves its state there every `save_every` steps (0: only when `minutes` run out),
    `STATE_FILE`; called again with the same settings it resumes from that state, to the same weights as a
    run never stopped, and removes it once all its steps are done. `fresh` deletes a saved state first. The
    card's training time counts the steps once: a resumed run's clock starts from the saved one.
    """
    if save_every < 0:
        raise ValueError(f"save_every={save_every}: give a number of steps, or 0 to save only when `minutes` run out")
    device = configure_torch(device, train_config.threads)
    identity = run_identity(model_config, train_config, seed)
    state_path = Path(out) / STATE_FILE if out is not None else None
    if state_path is not None and fresh:
        state_path.unlink(missing_ok=True)
    state = load_training_state(state_path, identity, device) if state_path is not None else None
    loaded = build_toy_model(model_config, seed=seed)
    trainer = Trainer.for_model(loaded.model.to(device).train(), loaded.tokenizer, model_config, train_config)
    progress = trainer.restore(state) if state is not None else pretrain(loaded, model_config, train_config, seed)

    def save_state():
        everything = {"identity": identity, "written_by": written_by(), **progress.saved(), **trainer.saved()}
        save_training_state(state_path, everything)

    per_chunk = train_config.chunk_size() // train_config.batch_size
    stream = ChunkStream(loaded.processor, model_config, train_config, seed, workers, progress.steps_done // per_chunk)
    monitor = monitor_samples(train_config, seed)
    save = save_state if state_path is not None else None
    finished = main_steps(loaded, trainer, stream, progress, monitor, minutes, save_every, save)
    trainer.model.eval()
    where = device_description(device, workers, train_config.threads)
    card = build_card(model_config, train_config, seed, trainer.model, progress.saved(), where)
    if final_eval:
        card["evaluation"] = final_evaluation(loaded, train_config)
    trainer.model.to("cpu")
    if out is not None:
        save_run(loaded, card, progress.log, Path(out))
        if finished:
            state_path.unlink(missing_ok=True)
    return card


def pretrain(loaded, model_config: ToyConfig, train_config: TrainConfig, seed: int) -> Progress:
    """A fresh run's start: its clock started, its vision tower and projector pretrained."""
    progress = Progress(started=time.time())
    progress.pretrained = pretrain_vision(loaded, model_config, train_config, seed, loaded.model.device)
    print(f"vision pretraining: {progress.pretrained}", flush=True)
    return progress


def configure_torch(device: str, threads: int) -> torch.device:
    """The device, with torch set up for deterministic steps and the configured CPU kernels and threads."""
    device = torch.device(device)
    if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    use_configured_kernels(threads=threads)  # portable kernels under FLOWLIB_PORTABLE=1
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def build_optimizer(model, patch_loss: PatchLoss, train_config: TrainConfig):
    """AdamW over the language side at `lr` and the vision side at `vision_lr`, each with and without
    weight decay (none for biases, norms and embeddings); returns it and the two sides' parameters."""
    named = list(model.named_parameters())
    named += [(f"aux.{n}", p) for n, p in patch_loss.position_heads.named_parameters()]
    language = [p for n, p in named if n.startswith(LANGUAGE_PARAMETERS)]
    vision = [p for n, p in named if not n.startswith(LANGUAGE_PARAMETERS)]
    groups = []
    for params, base_lr in ((language, train_config.lr), (vision, train_config.vision_lr)):
        ids = {id(p) for p in params}
        for decays in (True, False):
            chosen = [p for n, p in named if id(p) in ids and (p.ndim >= 2 and "embed" not in n) == decays]
            groups.append(
                {"params": chosen, "weight_decay": train_config.weight_decay if decays else 0.0, "base_lr": base_lr}
            )
    return torch.optim.AdamW(groups, lr=train_config.lr, betas=(0.9, 0.98), eps=1e-8), (language, vision)


def main_steps(loaded, trainer: Trainer, stream, progress: Progress, monitor, minutes, save_every, save) -> bool:
    """Take the steps from `progress.steps_done` on; False if `minutes` ran out first (its state then saved)."""
    from tqdm import tqdm

    train = trainer.train_config
    per_chunk = train.chunk_size() // train.batch_size
    data = batches(stream, loaded.tokenizer.pad_token_id, skip=progress.steps_done % per_chunk)
    bar = tqdm(
        range(progress.steps_done, train.steps),
        desc="train",
        mininterval=10,
        initial=progress.steps_done,
        total=train.steps,
    )
    try:
        for step in bar:
            if minutes is not None and time.time() - progress.started > 60 * minutes:
                print(f"time budget of {minutes} min reached at step {step}", flush=True)
                if save is not None:
                    save()
                    print("its state is saved in the output folder: the same command continues it", flush=True)
                return False
            losses = trainer.step({key: value.to(trainer.model.device) for key, value in next(data).items()}, step)
            progress.steps_done = step + 1
            record(progress.log, step, losses, trainer.optimizer.param_groups[0]["lr"])
            bar.set_postfix(refresh=False, **{key: f"{value:.3f}" for key, value in recent(progress.log).items()})
            if progress.steps_done % train.eval_every == 0 or progress.steps_done == train.steps:
                report(loaded, monitor, progress, train)
            if save is not None and save_every and progress.steps_done % save_every == 0:
                if progress.steps_done < train.steps:
                    save()
    finally:
        data.close()
        stream.close()
    return True


def record(log: dict, step: int, losses: dict, lr: float) -> None:
    log["step"].append(step)
    for key in LOSSES:
        log[key].append(losses[key].item())
    log["lr"].append(lr)


def recent(log: dict) -> dict:
    """The mean of each loss over the last 50 steps."""
    return {key: np.mean(log[key][-50:]) for key in LOSSES}


def report(loaded, monitor, progress: Progress, train: TrainConfig) -> None:
    """Evaluate the monitor set into the log and print where the run stands."""
    scores = evaluate(loaded, monitor, mode="first_token")  # one forward: the toy's answers are one word
    progress.log["eval"].append({"step": progress.steps_done, "mean": scores["mean"], "per_task": scores["per_task"]})
    elapsed = time.time() - progress.started
    losses = " ".join(f"{key.removesuffix('_loss')} {value:.3f}" for key, value in recent(progress.log).items())
    speed = progress.steps_done * train.batch_size / elapsed
    print(
        f"step {progress.steps_done} ({elapsed / 60:.1f} min, {speed:.1f} samples/s) {losses} "
        + format_scores(scores, "monitor"),
        flush=True,
    )


def device_description(device: torch.device, workers: int, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, data on {workers} CPU worker process(es)"
    return cpu_description(threads)
