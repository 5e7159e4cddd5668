"""The one sample record every part of flowlib passes around.

A `Sample` is a visual question with everything the paper's analyses need:
the image (loaded lazily), the question and its answer, the task, the options
of Choose questions, the central object's name, and the boxes (original image
pixels) of the objects the question is about. The synthetic world, the paper's
task CSVs and raw GQA all produce these records; the token layout and the
experiment runner consume them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

#: The paper's six GQA task families, in the order its figures use.
TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")


class SampleError(ValueError):
    """Bad sample content: the message names the sample and the fix."""


def check_task(task: str) -> str:
    """Return `task` if it is one of the six task names, else raise listing them."""
    if task not in TASKS:
        raise SampleError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")
    return task


@dataclasses.dataclass(frozen=True)
class Box:
    """An axis-aligned box in original image pixels: top-left corner (x, y), width w, height h."""

    x: float
    y: float
    w: float
    h: float
    label: str = ""

    @property
    def x1(self) -> float:
        return self.x + self.w

    @property
    def y1(self) -> float:
        return self.y + self.h

    def clip(self, width: int, height: int) -> Box | None:
        """The part of this box on a `width` x `height` image (as painting it would cover), None if nothing."""
        x0, y0 = max(self.x, 0.0), max(self.y, 0.0)
        x1, y1 = min(self.x1, float(width)), min(self.y1, float(height))
        if not (self.w > 0 and self.h > 0) or x1 <= x0 or y1 <= y0:
            return None
        if (x0, y0, x1, y1) == (self.x, self.y, self.x1, self.y1):
            return self
        return Box(x0, y0, x1 - x0, y1 - y0, self.label)

    def validated(self, width: int, height: int, sample_id: str = "?") -> Box:
        """Check this box against an image of `width` x `height` pixels.

        A box with non-positive size, or wholly outside the image, raises `SampleError`.
        A box partly outside is clipped to the image with a warning.
        """
        import warnings

        if not (self.w > 0 and self.h > 0):
            raise SampleError(
                f"sample {sample_id}: box {self} has non-positive size; boxes are (x, y, w, h) with w, h > 0"
            )
        x0, y0 = max(self.x, 0.0), max(self.y, 0.0)
        x1, y1 = min(self.x1, float(width)), min(self.y1, float(height))
        if x1 <= x0 or y1 <= y0:
            raise SampleError(
                f"sample {sample_id}: box {self} lies outside the {width}x{height} image; "
                "check that boxes are in original image pixels (x, y = top-left corner)"
            )
        if (x0, y0, x1, y1) != (self.x, self.y, self.x1, self.y1):
            warnings.warn(
                f"sample {sample_id}: box {self} extends beyond the {width}x{height} image; clipped",
                stacklevel=2,
            )
            return Box(x0, y0, x1 - x0, y1 - y0, self.label)
        return self


def clip_box(box: Box, width: int, height: int, sample_id: str, notes: list[str]) -> Box:
    """`box` clipped to a `width` x `height` image, noting each change in `notes` (for one summary warning).

    A box with nothing on the image is kept as it is, noted: it covers no patch, and the token
    layout then records why the sample's related patches are empty (as painting it would paint nothing).
    """
    clipped = box.clip(width, height)
    if clipped is None:
        notes.append(f"sample {sample_id}: box {box} has no area on the {width}x{height} image; it covers no patch")
        return box
    if clipped != box:
        notes.append(f"sample {sample_id}: box {box} extends beyond the {width}x{height} image; clipped")
    return clipped


class LoadNotes:
    """What a dataset loader clipped or skipped, told once at the end: one warning of each, every note logged.

    Example:
        >>> notes = LoadNotes(on_missing_image="skip")  # raises ValueError for anything but "error" or "skip"
        >>> image = notes.image("1.jpg", image_dir, "question 7")  # None: the file is missing, drop the sample
        >>> box = notes.clip(box, width, height, "7")
        >>> notes.warn(log)
    """

    def __init__(self, on_missing_image: str = "error"):
        if on_missing_image not in ("error", "skip"):
            raise ValueError(f"on_missing_image must be 'error' or 'skip', not {on_missing_image!r}")
        self.on_missing_image = on_missing_image
        self.clipped: list[str] = []
        self.skipped: list[str] = []

    def image(self, name: str, image_dir, where: str):
        """A sample's image: the file name `name` alone without `image_dir`, else its path there.

        A missing file raises `FileNotFoundError` naming `where` (the sample) or, with
        `on_missing_image="skip"`, is noted and gives None: the loader drops the sample.
        """
        if image_dir is None:
            return name
        image = Path(image_dir) / name
        if image.exists():
            return image
        if self.on_missing_image == "skip":
            self.skipped.append(str(image))
            return None
        raise FileNotFoundError(f"{where}: image {image} does not exist")

    def clip(self, box: Box, width: int, height: int, sample_id: str) -> Box:
        """`clip_box`, noted here."""
        return clip_box(box, width, height, sample_id, self.clipped)

    def warn(self, log, *, prefix: str = "", what: str = "sample") -> None:
        """Warn once about the clipped boxes and once about the skipped `what`s; `log` gets every note.

        The warnings point at the loader's caller, who can act on them.
        """
        if self.clipped:
            notes = self.clipped
            message = f"{prefix}{len(notes)} box(es) beyond their image, clipped or left out (first: {notes[0]})"
            warnings.warn(message, stacklevel=3)
            log.info(message + "; all: " + " | ".join(notes))
        if self.skipped:
            message = f"{prefix}skipped {len(self.skipped)} {what}(s) whose image is missing (first: {self.skipped[0]})"
            warnings.warn(message, stacklevel=3)
            log.info(message)


@dataclasses.dataclass
class Sample:
    """One visual question with the ground truth the analyses need.

    `image` may be a PIL image, a path, or a zero-argument callable returning one;
    `load_image()` resolves it, raising a clear error naming the file if it cannot.
    """

    question_id: str
    question: str
    answer: str
    task: str
    image: object = None
    type_detailed: str = ""
    true_option: str | None = None
    false_option: str | None = None
    central_object: str | None = None
    boxes: tuple[Box, ...] = ()
    source: str = ""
    #: (width, height) the dataset states for the image, which its boxes are measured in; checked on load.
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.question_id = str(self.question_id)
        self.boxes = tuple(self.boxes)
        if self.image_size is not None:
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    @property
    def has_options(self) -> bool:
        return self.true_option is not None and self.false_option is not None

    def load_image(self) -> Image.Image:
        """Return the RGB image: a file is read on every call (never cached), a callable's result is kept."""
        image = self.image
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if image is None:
            raise SampleError(f"sample {self.question_id}: has no image; give a PIL image or a path")
        if callable(image):
            loaded = image()
        elif isinstance(image, (str, os.PathLike)):
            if not os.path.exists(image):
                raise SampleError(
                    f"sample {self.question_id}: image file {os.fspath(image)!r} does not exist; "
                    "check the image folder you passed"
                )
            try:
                with Image.open(image) as opened:
                    loaded = opened.convert("RGB")
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
                raise SampleError(
                    f"sample {self.question_id}: image file {os.fspath(image)!r} cannot be read ({err}); "
                    "replace the file or drop the sample"
                ) from err
        else:
            raise SampleError(f"sample {self.question_id}: unsupported image value of type {type(image).__name__}")
        if self.image_size is not None and loaded.size != self.image_size:
            where = f"image file {os.fspath(image)!r}" if isinstance(image, (str, os.PathLike)) else "its image"
            raise SampleError(
                f"sample {self.question_id}: {where} is {loaded.width}x{loaded.height} but the data gives "
                f"{self.image_size[0]}x{self.image_size[1]}, the size its boxes are measured in; "
                "use the dataset's original images"
            )
        loaded = loaded.convert("RGB")
        if not isinstance(image, (str, os.PathLike)):
            self.image = loaded  # generated in memory: keep it, it cannot be read back
        # A file is decoded again on every use: thousands of cached GQA images would hold gigabytes.
        return loaded

    def validated_boxes(self, width: int, height: int) -> tuple[Box, ...]:
        """The boxes checked against the image size (see `Box.validated`)."""
        return tuple(box.validated(width, height, self.question_id) for box in self.boxes)
