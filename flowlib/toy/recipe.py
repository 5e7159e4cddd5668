"""The recipe that trained the committed `toy-llava`: every setting of a run, and the learning-rate schedule.

Each default is the committed model's (its card, `flowlib/checkpoints/toy-llava/card.json`, records them
all); what the alternatives measured is in docs/toy-model.md. Chunk k of the training stream is drawn
from `chunk_seed(seed, k)` (`flowlib.toy.stream`), so a run is a function of the seed and these settings.
"""

from __future__ import annotations

import dataclasses
import math

from ..sample import TASKS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings; every default says why it is what it is."""

    steps: int = 5500  # fixed steps, not a time budget, so that a run is reproducible; about an hour on 2 CPU cores
    batch_size: int = 16  # small batches mean more updates from the few samples a CPU hour affords
    lr: float = 3e-4  # decoder: faster rates left the 12-layer decoder unable to copy an option
    vision_lr: float = 1e-3  # vision tower and projector: their patch-word loss learns fast at this rate
    warmup_steps: int = 100  # a short warmup keeps the first steps of Adam from overshooting
    min_lr_ratio: float = 0.05  # cosine decay to 5% of the peak: the late steps polish the hard tasks
    weight_decay: float = 0.01  # light: the stream of fresh scenes already prevents overfitting
    grad_clip: float = 1.0  # guards against the occasional spike with a high learning rate
    chunk_per_task: int = 32  # 192 fresh samples per generated chunk (12 batches of 16)
    # Each task's share of a chunk (`task_counts`): more samples where a model trained on equal shares
    # made its errors (ChooseCat, ChooseRel, LogicalObj, CompareAttr), fewer where it was near perfect.
    task_weights: tuple = (
        ("ChooseAttr", 1),
        ("QueryAttr", 1),
        ("ChooseRel", 3),
        ("LogicalObj", 2),
        ("CompareAttr", 2),
        ("ChooseCat", 3),
    )
    eval_every: int = 300  # steps between progress evaluations on the monitor set
    monitor_per_task: int = 20  # progress evaluation: 120 samples, a few seconds
    heldout_per_task: int = 200  # final held-out evaluation: 1200 samples of the test split
    heldout_seed: int = 0
    threads: int = 2  # both cores train; the data worker's share of a core is small
    aux_weight: float = 1.0  # patch-word loss: stands in for LLaVA's pretrained, aligned image tokens (PatchLoss)
    question_weight: float = 0.5  # question-word prediction: dense text signal, partly grounded in the image
    describe_weight: float = 1.0  # the scene-description turn: a dozen object bindings per image (describe_scene)
    # Training-only turns asking LogicalObj's question for the shapes (named_query): an answer copied from
    # the question, as the option tasks' are, which a model learns where it does not learn a bare yes or no.
    named_queries: int = 1
    query_weight: float = 1.0  # the named queries' answers weigh as much as the main answer
    # Share of ChooseCat and LogicalObj training samples drawn hard (`generate_split(hard=...)`): a false
    # option or asked value present elsewhere in the scene, so that seeing it is not enough to answer.
    hard_negatives: float = 0.5
    # (until step, most distractor objects) stages, then full scenes: scenes holding only the named objects
    # first teach reading an object's words from the image, distractors then demand finding the right one.
    distractor_curriculum: tuple = ((600, 0), (1500, 1))
    # Vision pretraining (`flowlib.toy.vision_pretrain`), as LLaVA starts from a pretrained CLIP tower:
    # the tower and projector first learn each patch's object words, so the image tokens already say
    # which object they belong to when the decoder starts learning.
    vision_pretrain_steps: int = 2400
    vision_pretrain_chunks: int = 40  # pool of 40 x 192 = 7,680 scenes, generated once (about 45 s)
    vision_pretrain_batch: int = 64

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def task_counts(self) -> dict:
        """Samples of each task in a chunk of `chunk_per_task * 6`, shared by `task_weights`."""
        weights = dict(self.task_weights) or {task: 1 for task in TASKS}
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"task_weights names unknown tasks {unknown}; the tasks are {list(TASKS)}")
        size, total = self.chunk_per_task * len(TASKS), sum(weights.values())
        counts = {task: size * weights.get(task, 0) / total for task in TASKS}
        if any(not c.is_integer() for c in counts.values()):
            raise ValueError(
                f"task_weights {weights} do not split a chunk of {size} samples into whole counts "
                f"({counts}); choose weights whose shares of {size} are integers"
            )
        return {task: int(c) for task, c in counts.items() if c}

    def chunk_size(self) -> int:
        """Samples in a chunk of the training stream."""
        return sum(self.task_counts().values())

    def distractor_caps(self) -> tuple[int, ...]:
        """The distractor cap of chunks 0, 1, ... under `distractor_curriculum`, up to its end.

        A chunk takes the stage of its first step; chunks after the last stage hold full scenes.
        """
        caps, size = [], self.chunk_size()
        for until_step, cap in self.distractor_curriculum:
            while len(caps) * size // self.batch_size < until_step:
                caps.append(cap)
        return tuple(caps)


def chunk_seed(seed: int, k: int) -> int:
    """The `generate_split` seed of chunk k of a run's training stream."""
    return seed * 1_000_003 + k


def lr_at(step: int, train: TrainConfig) -> float:
    """The decoder's learning rate at `step`: a linear warmup, then a cosine from the peak to the floor."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
