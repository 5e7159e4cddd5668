"""What a trained toy is measured on: the held-out set, the CI subset, and the targets it must meet.

The model card records accuracy with the image, with a blank image and with every image -> later edge
cut, on 1200 held-out samples and on the small CI subset that tests re-measure.
"""

from __future__ import annotations

import time

from ..data.synthetic import generate_split, to_samples
from ..evaluate import chance_accuracy, evaluate, format_scores
from .recipe import TrainConfig

#: The fixed small held-out set a CI test re-measures (`ci_samples`): 30 per task, validation split, seed 0.
CI_PER_TASK, CI_SEED, CI_SPLIT = 30, 0, "validation"

#: The targets the offline model must meet: held-out mean and per-task accuracy, and how close to chance
#: the accuracy with a blank image must be (so that its answers come from the image).
TARGET_MEAN, TARGET_PER_TASK, BLANK_WITHIN = 0.90, 0.80, 0.10


def ci_samples():
    """The fixed small held-out set whose accuracy the model card records and a test re-measures."""
    return to_samples(generate_split(CI_PER_TASK, seed=CI_SEED, split=CI_SPLIT))


def heldout_samples(train: TrainConfig):
    return to_samples(generate_split(train.heldout_per_task, seed=train.heldout_seed, split="test"))


def monitor_samples(train: TrainConfig, seed: int):
    """The progress evaluation's samples: a validation split of the run's own seed + 1."""
    return to_samples(generate_split(train.monitor_per_task, seed=seed + 1, split="validation"))


def final_evaluation(loaded, train_config: TrainConfig) -> dict:
    """Held-out and CI-subset accuracy: with the image, with a blank image, with image edges cut.

    With the edges cut the model's free answers are mostly no candidate at all, so the card also
    records forced choice among the candidate answers (`evaluate(forced_choice=True)`): what it still
    knows about the answer, to compare with chance.
    """
    results = {}
    for name, samples in (("heldout", heldout_samples(train_config)), ("ci_subset", ci_samples())):
        t0 = time.time()
        results[name] = {
            "n": len(samples),
            # The first token is the whole answer: the toy answers in one word.
            "image": evaluate(loaded, samples, mode="first_token"),
            "blank_image": evaluate(loaded, samples, blank=True, mode="first_token"),
            "image_blocked": evaluate(loaded, samples, block_image=True, mode="first_token"),
            "image_blocked_forced_choice": evaluate(
                loaded, samples, block_image=True, forced_choice=True, mode="first_token"
            ),
            "chance": chance_accuracy(s.task for s in samples),
        }
        for key in ("image", "blank_image", "image_blocked", "image_blocked_forced_choice"):
            results[name][key].pop("n", None)
            print(format_scores(results[name][key], f"{name} {key}"), flush=True)
        print(f"{name}: evaluated in {time.time() - t0:.0f} s", flush=True)
    return results


def target_status(heldout: dict) -> str:
    """One sentence: whether the held-out numbers meet the targets, with the numbers."""
    image, blank, chance = heldout["image"], heldout["blank_image"], heldout["chance"]["mean"]
    worst = min(image["per_task"].values())
    met = image["mean"] >= TARGET_MEAN and worst >= TARGET_PER_TASK and abs(blank["mean"] - chance) <= BLANK_WITHIN
    numbers = (
        f"held-out mean {100 * image['mean']:.1f}% (target >= {100 * TARGET_MEAN:.0f}%), worst task "
        f"{100 * worst:.1f}% (target >= {100 * TARGET_PER_TASK:.0f}%), blank image {100 * blank['mean']:.1f}% "
        f"against chance {100 * chance:.1f}%"
    )
    if met:
        return f"Meets the targets: {numbers}."
    return f"**Below the targets: {numbers}. Analyses run on this model show the pipeline, not the paper's findings.**"
