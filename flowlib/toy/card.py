"""The model card: what a run records about itself (`card.json`), renders (`MODEL_CARD.md`) and saves.

The card names the command that reproduces the run (`command_line`), the processor and kernels it ran
on (a rerun rounds floats alike only there), the recipe in words, and the evaluation with the targets.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .. import config as cfg
from ..data.scenes import HARD_CASES, HARD_TASKS
from ..kernels import kernel_kind
from ..models import save_checkpoint
from ..sample import TASKS
from .evaluation import CI_PER_TASK, CI_SEED, CI_SPLIT, target_status
from .model import ToyConfig, count_parameters
from .recipe import TrainConfig

#: How the offline model is retrained: `python -m flowlib.toy` (flowlib/toy/__main__.py).
PROGRAM = "python -m flowlib.toy"

#: TrainConfig fields the command line sets, with their flags (`flowlib.toy.__main__`, `command_line`).
CLI_FIELDS = {"steps": "--steps", "threads": "--threads"}


def build_card(model_config: ToyConfig, train_config: TrainConfig, seed: int, model, run: dict, device: str) -> dict:
    """card.json's content: the configs, the data, and `run`'s steps, seconds, pretraining summary and log."""
    steps, seconds, pretrained, log = run["steps_done"], run["seconds"], run["pretrained"], run["log"]
    return {
        "name": cfg.OFFLINE_MODEL,
        "architecture": "LlavaForConditionalGeneration (CLIP vision tower, 2-layer GELU projector, Llama decoder)",
        "model_config": model_config.to_dict(),
        "parameters": count_parameters(model),
        "train_config": train_config.to_dict(),
        "seed": seed,
        "data": {
            "world": "flowlib.data.synthetic",
            "train_stream": f"generate_split({train_config.task_counts()}, "
            "seed=seed*1000003+k, split='train') for chunk k = 0, 1, ...",
            "heldout": f"generate_split({train_config.heldout_per_task}, seed={train_config.heldout_seed}, "
            "split='test')",
            "ci_subset": f"generate_split({CI_PER_TASK}, seed={CI_SEED}, split='{CI_SPLIT}')",
        },
        "training": {
            "steps": steps,
            "samples": steps * train_config.batch_size,
            "seconds": round(seconds, 1),
            "samples_per_second": round(steps * train_config.batch_size / (seconds - pretrained["seconds"]), 2),
            "device": device,
            "torch": torch.__version__,
            "final_loss_mean_last_50": float(np.mean(log["loss"][-50:])) if log["loss"] else None,
            "vision_pretraining": pretrained,
        },
    }


def cpu_description(threads: int) -> str:
    """The CPU as a rerun needs it: the same seed gives bit-identical weights only where the processor and the
    kernels torch picks for it (AVX2, AVX512) are the same, or both runs use portable kernels (flowlib.kernels);
    elsewhere float rounding differs and the run drifts."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"cpu ({model}, {kernel_kind()} kernels, {threads} threads)"


def save_run(loaded, card: dict, log: dict, out: Path) -> None:
    """The weights, tokenizer and processor files, `log.json`, `card.json`, `loss.png` and `MODEL_CARD.md`."""
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(loaded, out)
    (out / "log.json").write_text(json.dumps(log, indent=1))
    (out / "card.json").write_text(json.dumps(card, indent=2))
    plot_loss(log, out / "loss.png")
    (out / "MODEL_CARD.md").write_text(model_card_markdown(card))


def plot_loss(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss = np.array(log["loss"])
    ax1.plot(log["step"], loss, lw=0.5, alpha=0.4, label="batch")
    if len(loss) >= 50:
        ax1.plot(log["step"][49:], np.convolve(loss, np.ones(50) / 50, mode="valid"), label="mean of 50")
    ax1.set(xlabel="step", ylabel="answer-token loss", yscale="log", title="training loss")
    ax1.legend()
    for task in log["eval"][0]["per_task"] if log["eval"] else []:
        ax2.plot([e["step"] for e in log["eval"]], [e["per_task"][task] for e in log["eval"]], label=task)
    ax2.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="monitor accuracy per task")
    if log["eval"]:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def _table(evaluation: dict) -> str:
    tasks = list(evaluation["image"]["per_task"])
    rows = ["| condition | mean | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for key, label in (
        ("image", "with the image"),
        ("blank_image", "blank image"),
        ("image_blocked", "image -> later edges cut, all layers"),
        ("image_blocked_forced_choice", "the same, forced choice among the candidate answers"),
        ("chance", "chance"),
    ):
        scores = evaluation[key]
        rows.append(
            f"| {label} | {100 * scores['mean']:.1f} | "
            + " | ".join(f"{100 * scores['per_task'][t]:.1f}" for t in tasks)
            + " |"
        )
    return "\n".join(rows)


def _losses(t: Mapping) -> str:
    """The recipe's losses in words, from a card's `train_config`."""
    return (
        f"loss on the answer tokens plus {t['question_weight']} x the loss of predicting the question's words"
        f" plus {t['query_weight']} x the loss of {t['named_queries']} training-only turn(s) asking LogicalObj's "
        "question for the shapes (`USER: which of a star or a circle is large ? ASSISTANT: Star`, or `No`)"
        f" plus {t['describe_weight']} x the loss of a last, training-only turn that describes every object "
        "(`USER: what is in the image ? ASSISTANT: star red large striped left above , ...`)"
        f" plus {t['aux_weight']} x a per-patch loss on the projector output (each image token scores, against "
        "the tied word embeddings, the shape, colour, size, texture and image halves (left or right, above or "
        "below) of the object it covers; linear heads read its row and column and are dropped after training), "
        "standing in for the pretrained, word-aligned image features real LLaVA starts from."
    )


def _data(card: Mapping) -> str:
    """The training stream in words: the draws, the curriculum's stages and the hard share."""
    t = card["train_config"]
    stages = "".join(
        f"; until step {until}, scenes with at most {cap} distractor object{'s' * (cap != 1)} (max_distractors)"
        for until, cap in t["distractor_curriculum"]
    )
    hard = (
        f"; {t['hard_negatives']:.0%} of {' and '.join(HARD_TASKS)} training samples hard "
        f"({', '.join(HARD_CASES[task] for task in HARD_TASKS)}; `generate_split(hard=...)`), "
        "the held-out split as generated"
    )
    return f"- data: {card['data']['train_stream']}{stages}{hard}."


def model_card_markdown(card: dict) -> str:
    m, t, tr = card["model_config"], card["train_config"], card["training"]
    p, pre = card["parameters"], tr["vision_pretraining"]
    lines = [
        f"# {card['name']}: the offline default model of flowlib",
        "",
        "A small LLaVA-1.5-style model trained from scratch on flowlib's synthetic world "
        f"(`{command_line(t, card['seed'])}`). It answers the paper's six task families; "
        "its first answer token is the capitalised word (e.g. `Red`), questions and options are lowercase.",
        "",
        "## Architecture",
        f"- {card['architecture']}",
        f"- parameters: {p['total']:,} (vision tower {p['vision_tower']:,}, projector {p['projector']:,}, "
        f"language model {p['language_model']:,}, head {p['lm_head']:,})",
        f"- image {m['image_size']} px padded to a square, patches of {m['patch_size']} px "
        f"({(m['image_size'] // m['patch_size']) ** 2} image tokens); vision tower {m['vision_layers']} layers x "
        f"{m['vision_hidden']} (feature layer {m['vision_feature_layer']}); decoder {m['layers']} layers x "
        f"{m['hidden']}, {m['heads']} heads; word-level tokenizer; the paper's Vicuna prompt.",
        "",
        "## Training",
        f"- seed {card['seed']}; {tr['steps']} steps of {t['batch_size']} = {tr['samples']:,} fresh samples "
        f"(no sample seen twice); AdamW lr {t['lr']} (vision tower and projector {t['vision_lr']}; warmup "
        f"{t['warmup_steps']}, cosine to {t['min_lr_ratio']} x), weight decay {t['weight_decay']}, clip "
        f"{t['grad_clip']} (language model and vision side apart); " + _losses(t),
        f"- {tr['seconds'] / 60:.1f} min on {tr['device']} in all, {tr['samples_per_second']} samples/s in the main "
        f"steps; torch {tr['torch']}."
        + (
            " Deterministic from the seed on the same processor and kernels; another processor rounds floats "
            "differently, the run drifts from the first steps and its accuracies can differ by many points "
            "(docs/toy-model.md)."
            if tr["device"].startswith("cpu")
            else ""
        ),
        _data(card),
        f"- first, vision pretraining ({pre['seconds'] / 60:.1f} min, as LLaVA starts from a pretrained CLIP "
        f"tower): {pre['steps']} steps of {t['vision_pretrain_batch']} scenes from a fixed pool of "
        f"{t['vision_pretrain_chunks'] * t['chunk_per_task'] * len(TASKS):,}, the tower and projector alone "
        "learning each patch's object words, row and column through linear heads (dropped afterwards); "
        "held-out accuracy on object patches: "
        + ", ".join(f"{kind} {100 * value:.1f}%" for kind, value in pre["held_out_patch_accuracy"].items())
        + ".",
        "",
    ]
    if "evaluation" in card:
        lines += ["## Status", "", target_status(card["evaluation"]["heldout"]), ""]
        for name, title in (
            ("heldout", f"Held-out accuracy (%), {card['data']['heldout']}"),
            (
                "ci_subset",
                f"CI subset accuracy (%), {card['data']['ci_subset']}; re-measured by tests/test_toy_model.py",
            ),
        ):
            ev = card["evaluation"][name]
            lines += [
                f"## {title}",
                "",
                f"{ev['n']} samples; accuracy = the first generated word, lowercased, "
                "equals the answer (forced choice: the candidate answer, options or the task's answer set, "
                "with the highest logit). Blank image: a uniform image of the scene's background colour, same "
                "size.",
                "",
                _table(ev),
                "",
            ]
    lines += ["![loss](loss.png)", ""]
    return "\n".join(lines)


def command_line(train_config: Mapping, seed: int) -> str:
    """What trains with `train_config` (a `TrainConfig.to_dict()`): a `python -m flowlib.toy` command.

    Names the flags whose values differ from the recipe's. Where a setting differs that no flag reaches,
    it is the Python call instead: `flowlib.toy.training.train(ToyConfig(), TrainConfig(...), seed=...)`.
    """
    changed = {}
    for field, default in TrainConfig().to_dict().items():
        value = json.loads(json.dumps(train_config.get(field, default)))  # as card.json stores it
        if value != json.loads(json.dumps(default)):
            changed[field] = _as_tuples(value)
    if set(changed) - set(CLI_FIELDS):
        settings = ", ".join(f"{field}={value!r}" for field, value in changed.items())
        return f"flowlib.toy.training.train(ToyConfig(), TrainConfig({settings}), seed={seed})"
    return " ".join([PROGRAM, f"--seed {seed}", *(f"{CLI_FIELDS[field]} {value}" for field, value in changed.items())])


def _as_tuples(value):
    """JSON lists (as card.json stores TrainConfig's tuples) back to tuples, nested."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value
