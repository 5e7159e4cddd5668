"""The synthetic world as datasets: deterministic splits of `flowlib.data.scenes` samples, cached, read as `Sample`s.

`generate_rows` gives each task of a split its own random stream, keyed by (seed, split, task), so a
task's samples never depend on the other tasks; answers and option order are balanced per task.

Datasets are Hugging Face `datasets` objects (`generate_world` -> `DatasetDict`
with train/validation/test) with an `Image` column, the `Sample` fields, the
boxes as a list of structs and the scene graph as a JSON string.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from flowlib import config
from flowlib.data.drawing import png
from flowlib.data.scenes import ANSWER_KEYS, HARD_TASKS, sample_row
from flowlib.sample import TASKS, Box, Sample, check_task

SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
VERSION = 2  # bump when drawing or phrasing changes: it keys the cache folder


def features():
    """The `datasets.Features` of a synthetic split."""
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    text = Value("string")
    box = {"x": Value("float32"), "y": Value("float32"), "w": Value("float32"), "h": Value("float32"), "label": text}
    return Features(
        {
            "question_id": text,
            "image": ImageFeature(),
            "question": text,
            "answer": text,
            "task": text,
            "type_detailed": text,
            "true_option": text,
            "false_option": text,
            "central_object": text,
            "boxes": List(box),
            "scene_graph": text,
            "pattern": text,
            "image_w": Value("int32"),
            "image_h": Value("int32"),
            "source": text,
        }
    )


def generate_split(n_per_task: int | Mapping[str, int], *args, **kwargs):
    """Generate one split as a `Dataset`: `generate_rows` (the arguments are its own), each image stored as PNG."""
    from datasets import Dataset

    rows = generate_rows(n_per_task, *args, **kwargs)
    columns = {name: [row[name] for row in rows] for name in features()}
    columns["image"] = [{"bytes": png(image), "path": None} for image in columns["image"]]
    return Dataset.from_dict(columns, features=features())


def generate_rows(
    n_per_task: int | Mapping[str, int],
    seed: int = 0,
    split: str = "train",
    tasks=TASKS,
    max_distractors: int | None = None,
    hard: float = 0.0,
    hard_tasks=HARD_TASKS,
) -> list[dict]:
    """Generate one split's rows: `n_per_task` samples of each task, deterministic in (`seed`, `split`).

    Each row holds `features()`'s fields, its image as the rendered `PIL.Image` (pixel for pixel what
    `generate_split`'s PNG decodes to): a training stream skips the PNG round trip and `datasets`.

    `n_per_task` may instead map tasks to their counts (`{"ChooseCat": 48, "QueryAttr": 16}`), to
    weight a training mix; `tasks` is then its keys. A task's samples depend only on (`seed`,
    `split`, the task, its count), never on the other tasks.

    `max_distractors` caps the objects besides those the question names (no cap by default); a
    training curriculum can start from scenes that hold only the named objects.

    `hard` is the share of `hard_tasks` samples (some of `HARD_TASKS`) drawn as hard cases, for a
    training stream (a hard case needs a distractor, so `max_distractors=0` leaves none); at 0 (the
    default, and every evaluation split) the samples are exactly those of a split without the option,
    and so are those of a task left out of `hard_tasks`.

    Answers cycle through the task's answer keys and option order alternates, then both are
    shuffled, so each is balanced to within one sample per task.
    """
    if not 0.0 <= hard <= 1.0:
        raise ValueError(f"hard={hard!r} is a share of samples: give a number from 0 to 1")
    if isinstance(hard_tasks, str) or not set(hard_tasks) <= set(HARD_TASKS):
        raise ValueError(f"hard_tasks={hard_tasks!r}: give a tuple of tasks from {HARD_TASKS}")
    rows = []
    split_id = int.from_bytes(split.encode()[:8], "little")
    counts = dict(n_per_task) if isinstance(n_per_task, Mapping) else {task: n_per_task for task in tasks}
    for task, n in counts.items():
        rng = np.random.default_rng([seed, split_id, TASKS.index(check_task(task))])
        keys = rng.permutation(np.arange(n) % ANSWER_KEYS[task])
        firsts = rng.permutation(np.arange(n) % 2 == 0)
        for i in range(n):
            is_hard = hard > 0 and task in hard_tasks and bool(rng.random() < hard)  # no draw at 0: same stream
            row = sample_row(task, rng, int(keys[i]), bool(firsts[i]), max_distractors, is_hard)
            rows.append({"question_id": f"syn-{split}-{task}-{i:06d}", **row})
    return rows


def generate_world(n_per_task: int = 1000, seed: int = 0, splits: dict = SPLITS, tasks=TASKS):
    """Generate a `DatasetDict` of splits; `n_per_task` is the total per task, shared by `splits` fractions.

    Example:
        >>> world = generate_world(100, seed=0)  # 80/10/10 samples per task in train/validation/test
    """
    from datasets import DatasetDict

    return DatasetDict(
        {name: generate_split(max(1, round(n_per_task * frac)), seed, name, tasks) for name, frac in splits.items()}
    )


def save_world(world, path) -> Path:
    """Write `world` with `save_to_disk` into a temporary sibling folder, then move it into `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        world.save_to_disk(str(tmp))
        if path.exists():  # replace: move the old copy aside first, since rename cannot overwrite a folder
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_or_generate_world(path=None, n_per_task: int = 1000, seed: int = 0, splits: dict = SPLITS):
    """Load the world cached at `path` (default under `config.data_dir()`), generating and saving it if absent."""
    from datasets import load_from_disk

    if path is None:
        path = config.data_dir() / f"synthetic-v{VERSION}-n{n_per_task}-seed{seed}"
    path = Path(path)
    if not path.exists():
        save_world(generate_world(n_per_task, seed, splits), path)
    return load_from_disk(str(path))


class _RowImage:
    """A picklable zero-argument loader for one row's image, so samples do not decode images up front."""

    def __init__(self, images, index: int):
        self.images, self.index = images, index

    def __call__(self) -> Image.Image:
        return self.images[self.index]["image"]


def iter_samples(dataset) -> Iterator[Sample]:
    """Yield a `Sample` per row of a synthetic `Dataset`; images load lazily on `load_image()`."""
    columns = dataset.remove_columns("image")[:]
    images = dataset.select_columns(["image"])
    for i in range(len(dataset)):
        yield Sample(
            question_id=columns["question_id"][i],
            question=columns["question"][i],
            answer=columns["answer"][i],
            task=columns["task"][i],
            image=_RowImage(images, i),
            type_detailed=columns["type_detailed"][i],
            true_option=columns["true_option"][i],
            false_option=columns["false_option"][i],
            central_object=columns["central_object"][i],
            source=columns["source"][i],
            boxes=tuple(Box(b["x"], b["y"], b["w"], b["h"], b["label"]) for b in columns["boxes"][i]),
        )


def to_samples(dataset) -> list[Sample]:
    """All rows of a synthetic `Dataset` as `Sample`s (see `iter_samples`)."""
    return list(iter_samples(dataset))
