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

    def group(self, name: str) -> np.ndarray:
        """Positions of the group called `name` (the paper's names, see `GROUPS`)."""
        if name not in GROUPS:
            raise KeyError(f"unknown token group {name!r}; valid groups: {', '.join(GROUPS)}")
        return getattr(self, GROUPS[name])

    def sizes(self) -> dict[str, int]:
        return {name: len(self.group(name)) for name in GROUPS}


def _positions_overlapping(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Token positions whose character span overlaps [start, end)."""
    return np.nonzero((offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0]))[0]


def _find_word(text: str, word: str, last: bool, sample_id: str, what: str) -> tuple[int, int]:
    matches = list(re.finditer(rf"(?<![\w]){re.escape(word)}(?![\w])", text, flags=re.IGNORECASE))
    if not matches:
        raise SampleError(
            f"sample {sample_id}: {what} {word!r} not found in the question {text!r}; "
            f"fix the sample's {what} or its question"
        )
    match = matches[-1] if last else matches[0]
    return match.start(), match.end()


def build_layout(
    *,
    sample: Sample,
    input_ids,
    tokenizer,
    prompt: str,
    question_start: int,
    geometry: ImageGeometry,
    image_size: tuple[int, int],
) -> TokenLayout:
    """Compute the token layout of one prepared input (see `LoadedModel.prepare`)."""
    sid = sample.question_id
    ids = np.asarray(input_ids)
    image_id = tokenizer.convert_tokens_to_ids(cfg.IMAGE_PLACEHOLDER)
    image_positions = np.nonzero(ids == image_id)[0]
    if len(image_positions) == 0:
        raise SampleError(f"sample {sid}: the prompt holds no {cfg.IMAGE_PLACEHOLDER} placeholder; add one")
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
    extra = (len(image_positions) - 1) * len(cfg.IMAGE_PLACEHOLDER)
    expanded = prompt.replace(cfg.IMAGE_PLACEHOLDER, cfg.IMAGE_PLACEHOLDER * len(image_positions), 1)
    encoded = tokenizer(expanded, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids.tolist():
        raise SampleError(f"sample {sid}: re-tokenising the prompt does not reproduce the processor's input ids")
    offsets = np.asarray(encoded["offset_mapping"])
    q_start = question_start + extra
    q_end = q_start + len(sample.question)
    assert expanded[q_start:q_end] == sample.question
    question = _positions_overlapping(offsets, q_start, q_end)

    def text_group(word, last, what):
        if word is None:
            return np.zeros(0, dtype=np.int64)
        start, end = _find_word(sample.question, word, last, sid, what)
        return _positions_overlapping(offsets, q_start + start, q_start + end)

    true_option = text_group(sample.true_option, True, "true option")
    false_option = text_group(sample.false_option, True, "false option")
    central = text_group(sample.central_object, False, "central object name")
    without_options = np.setdiff1d(question, np.union1d(true_option, false_option))

    width, height = image_size
    related_offsets, unmapped = [], []
    for box in sample.validated_boxes(width, height):
        hit = geometry.box_offsets(box)
        if len(hit) == 0:
            unmapped.append(box)
            warnings.warn(
                f"sample {sid}: box {box} covers no image patch (too small, or cut away by the "
                "preprocessing, e.g. image_mode='crop'); it adds no related patch",
                stacklevel=3,
            )
        related_offsets.append(hit)
    related = np.unique(np.concatenate(related_offsets)) if related_offsets else np.zeros(0, dtype=np.int64)
    patches = geometry.patch_offsets()
    other = np.setdiff1d(patches, related)
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
    )
