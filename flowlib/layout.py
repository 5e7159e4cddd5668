"""The token layout: one object that says where every token group of a prepared input sits.

Every knockout flow, lens reading and figure takes its positions from here,
so no group is ever re-derived by hand. Group names follow the paper
("Image", "Question", "Last", "Related Image Patches", ...).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np

from . import config as cfg
from .geometry import ImageGeometry
from .sample import Box, Sample, SampleError

#: The paper's name of each group -> the TokenLayout attribute holding it.
GROUPS = {
    "Image": "image",
    "Question": "question",
    "Last": "last",
    "True Option": "true_option",
    "False Option": "false_option",
    "Central Object": "central_object",
    "Question Without Options": "question_without_options",
    "Related Image Patches": "related_image_patches",
    "Other Image Patches": "other_image_patches",
    "Base View": "base_view",
    "High Resolution": "high_resolution",
    "Image Newlines": "image_newlines",
}

OFFICIAL_RULE = (
    "the official code's rule: a patch is related when it holds a pure red pixel after the boxes, painted red "
    "on a black image, went through the image processor (normalisation off); see flowlib.geometry"
)
COVERAGE_RULE = (
    "a patch is related when one of its processed pixels reads (nearest-neighbour) an original pixel "
    "whose centre lies inside a box of the question's objects; see flowlib.geometry"
)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Sequence positions (sorted int arrays) of each token group of one prepared input."""

    sample_id: str
    seq_len: int
    image: np.ndarray
    question: np.ndarray
    last: np.ndarray
    true_option: np.ndarray
    false_option: np.ndarray
    central_object: np.ndarray
    question_without_options: np.ndarray
    related_image_patches: np.ndarray
    other_image_patches: np.ndarray
    base_view: np.ndarray
    high_resolution: np.ndarray
    image_newlines: np.ndarray
    unmapped_boxes: tuple[Box, ...] = ()
    coverage_rule: str = COVERAGE_RULE
    #: Why a group is empty, by group name (e.g. an option the question does not contain, boxes that
    #: cover no patch): the sample is left out of the flows that need that group, with this reason.
    empty_reasons: dict = dataclasses.field(default_factory=dict)

    def group(self, name: str) -> np.ndarray:
        """Positions of the group called `name` (the paper's names, see `GROUPS`)."""
        if name not in GROUPS:
            raise KeyError(f"unknown token group {name!r}; valid groups: {', '.join(GROUPS)}")
        return getattr(self, GROUPS[name])

    def why_empty(self, name: str) -> str:
        """The recorded reason why group `name` is empty ("" when it is not, or none was recorded)."""
        return self.empty_reasons.get(name, "") if len(self.group(name)) == 0 else ""

    def sizes(self) -> dict[str, int]:
        return {name: len(self.group(name)) for name in GROUPS}


def _positions_overlapping(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Token positions whose character span overlaps [start, end)."""
    return np.nonzero((offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0]))[0]


#: Irregular forms the released questions use where the CSV names the object otherwise: plurals
#: ("men" for "man") and pronouns in the object case ("him" for ChooseRel's "he").
IRREGULAR_FORMS = {
    "he": "him",
    "she": "her",
    "they": "them",
    "man": "men",
    "woman": "women",
    "person": "people",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "mouse": "mice",
    "goose": "geese",
    "knife": "knives",
    "leaf": "leaves",
    "shelf": "shelves",
    "skis": "skis",
    "sheep": "sheep",
    "fish": "fish",
}
#: A word shorter than this is never matched inside a longer word ("he" must not match "the").
MIN_INFIX = 3


def _inflections(word: str) -> list[str]:
    """Other forms of `word` (its last word, for a phrase): plural, singular, object case; likeliest first."""
    head, _, last = word.rpartition(" ")
    forms = [IRREGULAR_FORMS.get(last.lower(), ""), last + "s", last + "es"]
    if last.endswith("y"):
        forms.append(last[:-1] + "ies")
    if last.endswith(("f", "fe")):
        forms.append(last.rstrip("e")[:-1] + "ves")
    if last.endswith("s"):  # the CSV may hold the plural where the question has the singular
        forms += [last[:-1], last[:-2] if last.endswith("es") else "", last[:-3] + "y" if last.endswith("ies") else ""]
    prefix = f"{head} " if head else ""
    return [prefix + form for form in dict.fromkeys(forms) if form and form.lower() != last.lower()]


def locate_word(text: str, word: str, last: bool = False) -> tuple[tuple[int, int] | None, str]:
    """Where `word` (an option or object name) occurs in `text`, and how it was found.

    The official code searches substrings and never fails; the released questions name many
    objects in another form than their CSV cell ("refrigerators" for "refrigerator", "necktie"
    for "tie"). So, case-insensitively and in this order: the whole word; a plural (or singular)
    form of it as a whole word; the word at the start or end of a longer word (at least
    `MIN_INFIX` characters, so that "he" never matches "the"). `last` picks the last match
    (options come at the end of a Choose question), else the first.

    Returns:
        ((start, end), how) with how one of "word", "inflection", "part of word"; or
        (None, reason) when it is nowhere in the text.
    """

    def search(pattern):
        found = list(re.finditer(pattern, text, flags=re.IGNORECASE))
        return None if not found else (found[-1] if last else found[0]).span()

    word = word.strip()
    if not word:
        return None, "is empty"
    span = search(rf"(?<!\w){re.escape(word)}(?!\w)")
    if span:
        return span, "word"
    for form in _inflections(word):
        span = search(rf"(?<!\w){re.escape(form)}(?!\w)")
        if span:
            return span, "inflection"
    if len(word) >= MIN_INFIX:
        span = search(rf"(?<!\w)\w*{re.escape(word)}(?!\w)|(?<!\w){re.escape(word)}\w*(?!\w)")
        if span:
            return span, "part of word"
    return None, f"{word!r} is not in the question, in any form"


def build_layout(
    *,
    sample: Sample,
    input_ids,
    tokenizer,
    prompt: str,
    question_start: int,
    geometry: ImageGeometry,
    image_size: tuple[int, int],
    painted: np.ndarray | None = None,
    image_token: str = cfg.IMAGE_PLACEHOLDER,
) -> TokenLayout:
    """Compute the token layout of one prepared input (see `LoadedModel.prepare`).

    `painted`: image-block offsets of the related patches under the official code's rule
    (`geometry.painted_patch_offsets`), used instead of the geometric coverage rule when given.
    `image_token`: the placeholder the processor expanded into the image block (the family adapter's;
    Qwen's `<|image_pad|>`, whose `<|vision_start|>` / `<|vision_end|>` markers are not image tokens).
    """
    sid = sample.question_id
    ids = np.asarray(input_ids)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    image_positions = np.nonzero(ids == image_id)[0]
    if len(image_positions) == 0:
        raise SampleError(f"sample {sid}: the prompt holds no {image_token} placeholder; add one")
    first = int(image_positions[0])
    if not np.array_equal(image_positions, np.arange(first, first + len(image_positions))):
        raise SampleError(f"sample {sid}: image tokens are not one contiguous block; use a single image")
    if len(image_positions) != geometry.num_tokens:
        raise SampleError(
            f"sample {sid}: the processor emitted {len(image_positions)} image tokens but the "
            f"{len(geometry.grids)}-grid geometry expects {geometry.num_tokens}; the processor config "
            "(num_additional_image_tokens, patch size, pinpoints) does not match the model"
        )

    # Character offsets of the expanded prompt, exactly as the processor tokenised it.
    extra = (len(image_positions) - 1) * len(image_token)
    expanded = prompt.replace(image_token, image_token * len(image_positions), 1)
    encoded = tokenizer(expanded, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids.tolist():
        raise SampleError(f"sample {sid}: re-tokenising the prompt does not reproduce the processor's input ids")
    offsets = np.asarray(encoded["offset_mapping"])
    q_start = question_start + extra
    q_end = q_start + len(sample.question)
    assert expanded[q_start:q_end] == sample.question
    question = _positions_overlapping(offsets, q_start, q_end)

    reasons: dict[str, str] = {}

    def text_group(word, last, group):
        if word is None:
            return np.zeros(0, dtype=np.int64)
        span, how = locate_word(sample.question, word, last)
        if span is None:
            reasons[group] = f"{group.lower()} {how}"
            return np.zeros(0, dtype=np.int64)
        return _positions_overlapping(offsets, q_start + span[0], q_start + span[1])

    true_option = text_group(sample.true_option, True, "True Option")
    false_option = text_group(sample.false_option, True, "False Option")
    central = text_group(sample.central_object, False, "Central Object")
    without_options = np.setdiff1d(question, np.union1d(true_option, false_option))

    width, height = image_size
    related_offsets, unmapped = [], []
    for box in sample.boxes:
        clipped = box.clip(width, height)
        if clipped is None:  # as painting it would: nothing of it lies on the image
            unmapped.append(box)
            warnings.warn(
                f"sample {sid}: box {box} lies outside the {width}x{height} image or has no area; "
                "it adds no related patch",
                stacklevel=3,
            )
            continue
        if clipped != box:
            warnings.warn(f"sample {sid}: box {box} extends beyond the {width}x{height} image; clipped", stacklevel=3)
        hit = geometry.box_offsets(clipped)
        if len(hit) == 0 and painted is None:
            unmapped.append(box)
            warnings.warn(
                f"sample {sid}: box {box} covers no image patch (too small, or cut away by the "
                "preprocessing, e.g. image_mode='crop'); it adds no related patch",
                stacklevel=3,
            )
        related_offsets.append(hit)
    related = np.unique(np.concatenate(related_offsets)) if related_offsets else np.zeros(0, dtype=np.int64)
    if painted is not None:
        related = np.asarray(painted, dtype=np.int64)
    patches = geometry.patch_offsets()
    other = np.setdiff1d(patches, related)
    if len(related) == 0:
        if not sample.boxes:
            reasons["Related Image Patches"] = "the sample has no box (its objects are absent from the scene)"
        elif all(box.clip(width, height) is None for box in sample.boxes):
            reasons["Related Image Patches"] = f"its boxes lie outside the {width}x{height} image"
        else:
            reasons["Related Image Patches"] = "no box of the question's objects covers an image patch"
    if len(other) == 0:
        reasons["Other Image Patches"] = "the related patches cover the whole image"
    grid_positions = {g.name: first + np.sort(g.token_offsets()) for g in geometry.grids}
    empty = np.zeros(0, dtype=np.int64)
    return TokenLayout(
        sample_id=sid,
        seq_len=len(ids),
        image=image_positions,
        question=question,
        last=np.array([len(ids) - 1]),
        true_option=true_option,
        false_option=false_option,
        central_object=central,
        question_without_options=without_options,
        related_image_patches=first + related,
        other_image_patches=first + other,
        base_view=grid_positions.get("base_view", empty),
        high_resolution=grid_positions.get("high_resolution", empty),
        image_newlines=first + geometry.newline_offsets,
        unmapped_boxes=tuple(unmapped),
        coverage_rule=COVERAGE_RULE if painted is None else OFFICIAL_RULE,
        empty_reasons=reasons,
    )
