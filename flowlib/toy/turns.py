"""The training-only conversation turns that follow each sample's question: what they ask and answer.

Every training image is encoded once and then questioned more than once, as in LLaVA's multi-turn
training conversations: the evaluation prompt and its answer first, then `named_query` turns, then a
last turn asking for `describe_scene`. Their words are all in the toy vocabulary, so the turns leave the
tokenizer unchanged (tested).
"""

from __future__ import annotations

import numpy as np

from ..data.drawing import SHAPES
from ..data.scenes import ATTRIBUTES
from .model import answer_target
from .patches import object_words

#: The user turn that asks for a scene description.
DESCRIBE_REQUEST = "what is in the image ?"

#: The user turn naming two shapes: LogicalObj's question asked for the shapes, so that its answer is
#: copied (the named shapes that have the value, or "No", LogicalObj's own answer word).
NAMED_QUERY = "which of a {shape} or a {shape2} is {value} ?"


def describe_scene(scene: dict, rng: np.random.Generator) -> str:
    """A description of every object: "star red large striped left above , blue circle ...".

    Objects come in a random order, each named by its shape or its colour first (its colour only where
    no other object shares it) and then its other words, so after the first word of an object the rest
    can only be read from that object's image patches. Questions give one such binding target per
    sample (the answer); a description gives a dozen.
    """
    parts = []
    colors = [obj["color"] for obj in scene["objects"].values()]
    for key in rng.permutation(sorted(scene["objects"])):
        obj = scene["objects"][str(key)]
        by_color = colors.count(obj["color"]) == 1 and rng.integers(2)  # only a unique colour names one object
        words = object_words(obj, scene)
        first = ["color", "shape"] if by_color else ["shape", "color"]
        parts.append(" ".join(words[kind] for kind in first + [k for k in words if k not in first]))
    return " , ".join(parts)


def named_query(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
    """A (question, answer) pair: "which of a star or a circle is large ?" -> "Star", or "No".

    The answer names those of the two shapes that have the value (in `SHAPES` order, the first word
    capitalised as every answer's) or is "No". Half are drawn with an answer (a shape of the scene, one
    of its own values, a second shape at random); the rest name two shapes, one of the scene where it has
    one, and a value neither named shape has, a value some unnamed shape of the scene has where there is
    one (as LogicalObj's hard samples), so that seeing the value is not enough.
    """
    pick = lambda items: items[int(rng.integers(len(items)))]  # noqa: E731
    objects = [scene["objects"][key] for key in sorted(scene["objects"])]
    kind = pick(tuple(ATTRIBUTES))
    if objects and rng.random() < 0.5:
        obj = pick(objects)
        named, value = [obj["name"], pick([s for s in SHAPES if s != obj["name"]])], obj[kind]
    else:
        first = pick([o["name"] for o in objects] or list(SHAPES))
        named = [first, pick([s for s in SHAPES if s != first])]
        held = {o[kind] for o in objects if o["name"] in named}
        elsewhere = sorted({o[kind] for o in objects if o["name"] not in named} - held)
        value = pick(elsewhere or [v for v in ATTRIBUTES[kind] if v not in held] or list(ATTRIBUTES[kind]))
    if rng.integers(2):
        named.reverse()
    having = {o["name"] for o in objects if o["name"] in named and o[kind] == value}
    answer = " , ".join(s for s in SHAPES if s in having) or "no"
    return NAMED_QUERY.format(shape=named[0], shape2=named[1], value=value), answer_target(answer)
