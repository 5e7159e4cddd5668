"""A synthetic GQA-style world: shapes on a plain background, the six tasks, exact boxes.

Each image is 320x240 (landscape) or 240x320 (portrait), like GQA's 4:3 and 3:4
photos, and holds 2-4 non-overlapping objects. An object has a shape (its category
and its name in questions), a colour, a size and a texture; no two objects in a scene
share a shape, so "the star" always names one object. Every sample is built for its
task and answer (not mined from a random scene), so answers are balanced per task,
the true option of Choose questions comes first exactly half the time, and the
question text alone gives chance accuracy.

Size budget: the offline model pads an image to a square (side 320) and resizes it
to `config.TOY_IMAGE_SIZE` (128), a scale of 0.4. The smallest object is drawn
`SMALL_SIDE` = 56 px wide and tall, i.e. `SMALLEST_OBJECT_PROCESSED_PX` = 22.4
processed px (1.4 patches of 16 px); large objects are 96 px (38.4 processed px).

Boxes (x, y, w, h in original pixels, tight around the drawn pixels) are those of the
objects the question names, in GQA's program order (ChooseRel: the reference object,
then the subject; `central_object` is the first of them, or "object" for ChooseCat).

Datasets are Hugging Face `datasets` objects (`generate_world` -> `DatasetDict`
with train/validation/test) with an `Image` column, the `Sample` fields, the
boxes as a list of structs and the scene graph as a JSON string.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from flowlib import config
from flowlib.data.drawing import BACKGROUND, COLORS, SHAPES, SIZES, mask, png, render
from flowlib.sample import TASKS, Box, Sample, check_task

TEXTURES = ("plain", "striped", "dotted")
#: The attribute kinds; CompareAttr answers with these names (GQA spells it "color").
ATTRIBUTES = {"color": tuple(COLORS), "size": tuple(SIZES), "texture": TEXTURES}
IMAGE_SIZES = ((320, 240), (240, 320))  # (width, height): landscape and portrait
SMALL_SIDE = SIZES["small"]
SMALLEST_OBJECT_PROCESSED_PX = SMALL_SIDE * config.TOY_IMAGE_SIZE / max(max(s) for s in IMAGE_SIZES)
GAP = 8  # px between objects, so a box never touches another object's pixels
SIDE_MARGIN = 4  # px a QueryAttr object keeps from the image's vertical midline
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
VERSION = 2  # bump when drawing or phrasing changes: it keys the cache folder
SYNTHETIC_PUNCTUATION = ("?", ",")

TEMPLATES = {  # question patterns, all lowercase, words split by spaces
    "ChooseAttr": "is the {shape} {opt1} or {opt2}?",
    "ChooseCat": "which shape is the {color} object, a {opt1} or a {opt2}?",
    "ChooseRel:h": "is the {shape} to the {opt1} or to the {opt2} of the {shape2}?",
    "ChooseRel:v": "is the {shape} {opt1} or {opt2} the {shape2}?",
    "CompareAttr": "what do the {shape} and the {shape2} have in common?",
    "LogicalObj": "is there either a {shape} or a {shape2} that is {value}?",
    "QueryAttr": "on which side of the image is the {shape}?",
}
TYPE_DETAILED = {
    "ChooseAttr": "chooseAttr",
    "ChooseCat": "categoryThatChoose",
    "ChooseRel": "relChooser",
    "CompareAttr": "twoCommon",
    "LogicalObj": "existThatOr",
    "QueryAttr": "positionQuery",
}


def split_words(text: str) -> list[str]:
    """Split a synthetic question or answer into words, with `?` and `,` as their own tokens."""
    return re.sub(r"([?,])", r" \1 ", text).split()


def synthetic_vocabulary() -> tuple[str, ...]:
    """Every word that can appear in a question, option or answer of the world, sorted.

    Punctuation (`SYNTHETIC_PUNCTUATION`) is not included; `split_words` splits it off.
    """
    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(TEXTURES) | set(ATTRIBUTES)
    words |= {"left", "right", "above", "below", "yes", "no"}
    for template in TEMPLATES.values():
        words |= {w for w in split_words(template) if not w.startswith("{") and w not in SYNTHETIC_PUNCTUATION}
    return tuple(sorted(words))


# ----------------------------------------------------------------------------- scenes


def _box_of(obj: dict) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = mask(obj["name"], SIZES[obj["size"]]).getbbox()  # tight around drawn pixels
    return obj["x"] + x0, obj["y"] + y0, x1 - x0, y1 - y0


def _place(rng, width, height, required, distractors, constraint) -> list[dict] | None:
    """Place required objects (with `constraint(index, obj, placed)`) then distractors; None if stuck."""
    placed: list[dict] = []

    def free(obj):
        x, y, s = obj["x"], obj["y"], SIZES[obj["size"]]
        return all(
            x + s + GAP <= o["x"]
            or o["x"] + SIZES[o["size"]] + GAP <= x
            or y + s + GAP <= o["y"]
            or o["y"] + SIZES[o["size"]] + GAP <= y
            for o in placed
        )

    for index, spec in enumerate(required + distractors):
        side = SIZES[spec["size"]]
        for _ in range(60):
            obj = dict(spec, x=int(rng.integers(0, width - side + 1)), y=int(rng.integers(0, height - side + 1)))
            if free(obj) and (index >= len(required) or constraint(index, obj, placed)):
                placed.append(obj)
                break
        else:
            if index < len(required):
                return None  # a constrained object did not fit: the caller redraws the scene
    return placed


def _random_object(rng, shape: str, **fixed) -> dict:
    obj = {"name": shape, **{kind: str(rng.choice(values)) for kind, values in ATTRIBUTES.items()}}
    obj.update(fixed)
    return obj


def _plan(task: str, rng, key: int, first: bool, hard: bool = False):
    """The question's objects, text and answer; `key` picks the balanced answer, `first` the option order.

    `lead` holds the first distractor's fixed fields (its shape, or an attribute): `hard` samples use it
    to place the object a shortcut would be fooled by (see `HARD_TASKS`).
    """
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    s1, s2 = shapes[0], shapes[1]
    reserved, avoid_color, constraint, lead = {s1}, None, (lambda i, o, p: True), {}
    fields = {"shape": s1, "shape2": s2}
    if task == "ChooseAttr":
        kind = ("color", "size", "texture")[int(rng.integers(3))]
        true, false = (str(v) for v in rng.permutation(ATTRIBUTES[kind])[:2])
        required = [_random_object(rng, s1, **{kind: true})]
        pattern, central = "ChooseAttr", s1
    elif task == "ChooseCat":
        # The false shape is any other shape and, like ChooseAttr's false value, appears among the
        # distractors only by chance (as in GQA, where "a cat or a bird?" is asked of a bird photo).
        # It was once always the first distractor, so every question demanded colour binding.
        true, false = s1, str(rng.choice(shapes[1:]))
        color = str(rng.choice(list(COLORS)))
        required, avoid_color = [_random_object(rng, s1, color=color)], color
        fields["color"] = color
        pattern, central = "ChooseCat", "object"
        if hard:
            lead = {"name": false}
    elif task == "ChooseRel":
        vertical = bool(rng.integers(2))
        pair = ("above", "below") if vertical else ("left", "right")
        true, false = pair if key == 0 else pair[::-1]
        required, reserved = [_random_object(rng, s2), _random_object(rng, s1)], {s1, s2}

        def constraint(i, o, placed, true=true):
            if i == 0:
                return True
            ref, s, r = placed[0], SIZES[o["size"]], SIZES[placed[0]["size"]]
            return {
                "left": o["x"] + s + GAP <= ref["x"],
                "right": ref["x"] + r + GAP <= o["x"],
                "above": o["y"] + s + GAP <= ref["y"],
                "below": ref["y"] + r + GAP <= o["y"],
            }[true]

        # As in GQA's program (and the paper's CSV): the reference object is object1, the subject object2.
        pattern, central = "ChooseRel:v" if vertical else "ChooseRel:h", s2
    elif task == "CompareAttr":
        true, false = ("color", "size", "texture")[key], None
        a, b = _random_object(rng, s1), _random_object(rng, s2)
        for kind, values in ATTRIBUTES.items():
            v1, v2 = (str(v) for v in rng.permutation(values)[:2])
            a[kind], b[kind] = (v1, v1) if kind == true else (v1, v2)
        required, reserved = [a, b], {s1, s2}
        pattern, central = "CompareAttr", s1
    elif task == "LogicalObj":
        kind = ("color", "size", "texture")[int(rng.integers(3))]
        value = str(rng.choice(ATTRIBUTES[kind]))
        others = [str(v) for v in ATTRIBUTES[kind] if v != value]
        true, false = ("yes", "no")[key], None
        # Which of the two named shapes are present; for "yes" at least one of them has the value.
        presence = [(1, 0), (0, 1), (1, 1)] if true == "yes" else [(0, 0), (1, 0), (0, 1), (1, 1)]
        present = presence[int(rng.integers(len(presence)))]
        hits = [p for p, shown in zip((0, 1), present) if shown]
        with_value = {int(rng.choice(hits))} if true == "yes" else set()
        if true == "yes" and len(hits) == 2 and rng.integers(2):
            with_value = {0, 1}
        required = [
            _random_object(rng, s, **{kind: value if i in with_value else str(rng.choice(others))})
            for i, s in enumerate((s1, s2))
            if present[i]
        ]
        reserved, fields["value"] = {s1, s2}, value
        pattern, central = "LogicalObj", s1
        if hard and true == "no":
            lead = {kind: value}
    elif task == "QueryAttr":
        true, false = ("left", "right")[key], None
        required = [_random_object(rng, s1)]  # its side constraint needs the width: see `_sample`
        pattern, central = "QueryAttr", s1
    else:
        check_task(task)
    if false is not None:
        fields["opt1"], fields["opt2"] = (true, false) if first else (false, true)
    question = TEMPLATES[pattern].format(**fields)
    free_shapes = [s for s in shapes if s not in reserved]
    if "name" in lead:
        free_shapes.insert(0, free_shapes.pop(free_shapes.index(lead["name"])))
    return required, free_shapes, avoid_color, constraint, question, true, false, central, pattern, lead


def _sample(task: str, rng, key: int, first: bool, max_distractors: int | None = None, hard: bool = False) -> dict:
    while True:
        required, free_shapes, avoid_color, constraint, question, true, false, central, pattern, lead = _plan(
            task, rng, key, first, hard
        )
        width, height = IMAGE_SIZES[int(rng.integers(2))]
        if task == "QueryAttr":

            def constraint(i, o, placed, side=true, width=width):
                s = SIZES[o["size"]]
                return o["x"] + s <= width / 2 - SIDE_MARGIN if side == "left" else o["x"] >= width / 2 + SIDE_MARGIN

        n_objects = int(rng.integers(3, 5))
        if max_distractors is not None:  # after the draw, so that the random stream is the same either way
            n_objects = min(n_objects, len(required) + max_distractors)
        colors = [c for c in COLORS if c != avoid_color]
        distractors = [
            _random_object(rng, s, color=str(rng.choice(colors)))
            for s in free_shapes[: max(0, n_objects - len(required))]
        ]
        if distractors:  # placed right after the named objects, so that it fits where any distractor does
            distractors[0].update(lead)
        placed = _place(rng, width, height, required, distractors, constraint)
        if placed is not None:
            break
    objects = {}
    for i, obj in enumerate(placed):
        x, y, w, h = _box_of(obj)
        objects[f"o{i}"] = {
            "name": obj["name"],
            "x": x,
            "y": y,
            "w": w,
            "h": h,
            "color": obj["color"],
            "size": obj["size"],
            "texture": obj["texture"],
            "attributes": [obj["color"], obj["size"], obj["texture"]],
        }
    boxes = [
        {"x": float(o["x"]), "y": float(o["y"]), "w": float(o["w"]), "h": float(o["h"]), "label": o["name"]}
        for o in list(objects.values())[: len(required)]
    ]
    scene = {"width": width, "height": height, "background": list(BACKGROUND), "objects": objects}
    return {
        "image": render(width, height, placed),
        "question": question,
        "answer": true,
        "task": task,
        "type_detailed": TYPE_DETAILED[task],
        "true_option": true if false is not None else None,
        "false_option": false,
        "central_object": central,
        "boxes": boxes,
        "scene_graph": json.dumps(scene, sort_keys=True),
        "pattern": pattern,
        "image_w": width,
        "image_h": height,
        "source": "synthetic",
    }


HARD_CASES = {
    "ChooseCat": "ChooseCat's false shape always in the scene",
    "LogicalObj": "LogicalObj `no` scenes holding the asked value on an unnamed shape",
}
HARD_TASKS = tuple(HARD_CASES)

_N_KEYS = {"ChooseAttr": 1, "ChooseCat": 1, "ChooseRel": 2, "CompareAttr": 3, "LogicalObj": 2, "QueryAttr": 2}


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


def generate_split(
    n_per_task: int | Mapping[str, int],
    seed: int = 0,
    split: str = "train",
    tasks=TASKS,
    max_distractors: int | None = None,
    hard: float = 0.0,
    hard_tasks=HARD_TASKS,
):
    """Generate one split as a `Dataset`: `generate_rows` (see its options), each image stored as PNG."""
    from datasets import Dataset

    rows = generate_rows(n_per_task, seed, split, tasks, max_distractors, hard, hard_tasks)
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
        keys = rng.permutation(np.arange(n) % _N_KEYS[task])
        firsts = rng.permutation(np.arange(n) % 2 == 0)
        for i in range(n):
            is_hard = hard > 0 and task in hard_tasks and bool(rng.random() < hard)  # no draw at 0: same stream
            row = _sample(task, rng, int(keys[i]), bool(firsts[i]), max_distractors, is_hard)
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
