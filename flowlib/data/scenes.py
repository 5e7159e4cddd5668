"""The synthetic world's scenes: its objects and words, and one sample planned for its task and answer, then drawn.

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

`sample_row` builds one sample from a random generator; `flowlib.data.synthetic` draws the
generators, so the order of the draws here is part of every split's content.
"""

from __future__ import annotations

import json
import re

from flowlib import config
from flowlib.data.drawing import BACKGROUND, COLORS, SHAPES, SIZES, mask, render
from flowlib.sample import check_task

TEXTURES = ("plain", "striped", "dotted")
#: The attribute kinds; CompareAttr answers with these names (GQA spells it "color").
ATTRIBUTES = {"color": tuple(COLORS), "size": tuple(SIZES), "texture": TEXTURES}
IMAGE_SIZES = ((320, 240), (240, 320))  # (width, height): landscape and portrait
SMALL_SIDE = SIZES["small"]
SMALLEST_OBJECT_PROCESSED_PX = SMALL_SIDE * config.TOY_IMAGE_SIZE / max(max(s) for s in IMAGE_SIZES)
GAP = 8  # px between objects, so a box never touches another object's pixels
SIDE_MARGIN = 4  # px a QueryAttr object keeps from the image's vertical midline
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
        required = [_random_object(rng, s1)]  # its side constraint needs the width: see `sample_row`
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


def sample_row(task: str, rng, key: int, first: bool, max_distractors: int | None = None, hard: bool = False) -> dict:
    """One sample of `task` as a row of `synthetic.features()` without its question id, image not yet PNG.

    `key` and `first` are as in `_plan`; `max_distractors` and `hard` as in `synthetic.generate_rows`.
    """
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


#: The hard cases `_plan` draws when `hard`, by task: scenes that would fool a shortcut.
HARD_CASES = {
    "ChooseCat": "ChooseCat's false shape always in the scene",
    "LogicalObj": "LogicalObj `no` scenes holding the asked value on an unnamed shape",
}
HARD_TASKS = tuple(HARD_CASES)

#: How many answers each task's `key` cycles through (`generate_rows` balances them).
ANSWER_KEYS = {"ChooseAttr": 1, "ChooseCat": 1, "ChooseRel": 2, "CompareAttr": 3, "LogicalObj": 2, "QueryAttr": 2}
