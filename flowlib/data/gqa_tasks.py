"""The paper's six released GQA task files (CSV) as `Sample`s.

The official repository ships one CSV per task under `datasets/`, named
`GQA_val_correct_question_with_<types>_<Task>.csv`; the task is the last part of the
name. Rows carry the question, answer, options and the boxes (x, y, w, h in original
pixels) of the objects involved; images are GQA's `<img_id>.jpg`. The files are read
as CSV with every cell a string: question ids keep their leading zeros and caption
cells may span lines. A `-` marks an absent object (LogicalObj's object2): it gets no box.

Get the files with `fetch_paper_tasks(dest)` when online, or point `load_paper_tasks`
at any local copy:

    >>> samples = load_paper_tasks("path/to/datasets", image_dir="path/to/gqa/images")
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd

from flowlib.sample import TASKS, Box, LoadNotes, Sample, SampleError, check_task

log = logging.getLogger(__name__)

#: The released file of each task, as named in the official repository's datasets/ folder.
TASK_FILES = {
    "ChooseAttr": "GQA_val_correct_question_with_choose_ChooseAttr.csv",
    "ChooseCat": "GQA_val_correct_question_with_categoryThatThisChoose_objThisChoose_ChooseCat.csv",
    "ChooseRel": "GQA_val_correct_question_with_relChooser_ChooseRel.csv",
    "CompareAttr": "GQA_val_correct_question_with_twoCommon_CompareAttr.csv",
    "LogicalObj": "GQA_val_correct_question_with_existThatOr_LogicalObj.csv",
    "QueryAttr": "GQA_val_correct_question_with_positionQuery_QueryAttr.csv",
}
OFFICIAL_URL = "https://raw.githubusercontent.com/FightingFighting/cross-modal-information-flow-in-MLLM/main/datasets/"
ABSENT = "-"

_BASE_COLUMNS = ("question_id", "img_id", "question", "answer", "type_detailed", "image_w", "image_h")
#: Objects whose boxes each task's file carries (columns "<prefix> x/y/w/h").
BOX_PREFIXES = {
    "ChooseAttr": ("central object",),
    "ChooseCat": ("central object",),
    "QueryAttr": ("central object",),
    "ChooseRel": ("object1", "object2"),
    "CompareAttr": ("object1", "object2"),
    "LogicalObj": ("object1", "object2"),
}
_CHOOSE = ("ChooseAttr", "ChooseCat", "ChooseRel")


def task_from_filename(path) -> str:
    """The task named by a released file's name (its last `_` part), checked against the six."""
    return check_task(Path(path).stem.rsplit("_", 1)[-1])


def required_columns(task: str) -> list[str]:
    """The columns `load_task_csv` needs in the file of `task`."""
    columns = list(_BASE_COLUMNS)
    columns += ["true option", "false option"] if task in _CHOOSE else []
    columns += (
        ["central object name"] if BOX_PREFIXES[task] == ("central object",) else ["object1 name", "object2 name"]
    )
    for prefix in BOX_PREFIXES[task]:
        columns += [f"{prefix} {c}" for c in ("x", "y", "w", "h")]
    return columns


def _box(row: dict, prefix: str, label: str, sample_id: str) -> Box | None:
    values = [row[f"{prefix} {c}"].strip() for c in ("x", "y", "w", "h")]
    if all(v in (ABSENT, "") for v in values):
        return None  # the object is absent from the scene
    try:
        x, y, w, h = (float(v) for v in values)
    except ValueError as err:
        raise SampleError(f"sample {sample_id}: box columns of {prefix!r} hold {values}, not numbers") from err
    return Box(x, y, w, h, label)


def load_task_csv(path, image_dir=None, on_missing_image: str = "error", image_ext: str = ".jpg") -> list[Sample]:
    """Read one released task CSV into `Sample`s.

    Args:
        path: the CSV; its name gives the task (`..._<Task>.csv`).
        image_dir: folder of GQA images `<img_id><image_ext>`. None skips the image check and
            leaves `Sample.image` as the would-be file name, for work on the text alone.
        on_missing_image: "error" raises `FileNotFoundError` naming the path; "skip" drops the
            sample and warns with the count.
        image_ext: the image files' extension.

    Boxes partly outside the image are clipped with a warning; a box wholly outside it is kept
    as it is, with a warning: it covers no patch, so its sample is left out of the flows that need
    related patches, with that reason (the released QueryAttr row 1594913 has x=503 in a 500-px image).

    Raises:
        SampleError: unknown task in the name, missing columns (all listed), bad box values.
    """
    path = Path(path)
    task = task_from_filename(path)
    notes = LoadNotes(on_missing_image)
    # Every cell as a string: ids keep leading zeros and "-" or "NA" stay what they are.
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise SampleError(f"{path} is empty (not even a header row); use the released file of {task}") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise SampleError(f"{path} is not a readable CSV ({str(err).splitlines()[0]})") from err
    missing = [c for c in required_columns(task) if c not in table.columns]
    if missing:
        raise SampleError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} for task {task}")
    samples = []
    for row in table.to_dict("records"):
        qid = row["question_id"]
        name = row["img_id"] + image_ext
        image = notes.image(name, image_dir, f"sample {qid} in {path.name}")
        if image is None:
            continue
        try:
            width, height = int(float(row["image_w"])), int(float(row["image_h"]))
        except ValueError as err:
            raise SampleError(f"sample {qid} in {path}: image_w/image_h are not numbers") from err
        names = (
            ["central object name"] if BOX_PREFIXES[task] == ("central object",) else ["object1 name", "object2 name"]
        )
        boxes = [_box(row, prefix, row[label].strip(), qid) for prefix, label in zip(BOX_PREFIXES[task], names)]
        boxes = [notes.clip(b, width, height, qid) for b in boxes if b is not None]
        samples.append(
            Sample(
                question_id=qid,
                question=row["question"],
                answer=row["answer"],
                task=task,
                image=image,
                type_detailed=row["type_detailed"],
                true_option=row.get("true option") if task in _CHOOSE else None,
                false_option=row.get("false option") if task in _CHOOSE else None,
                central_object=row[names[0]].strip(),
                boxes=tuple(boxes),
                source=f"paper-csv:{path.name}",
                image_size=(width, height),
            )
        )
    notes.warn(log, prefix=f"{path.name}: ")
    return samples


def find_task_files(csv_dir, tasks=TASKS) -> dict[str, Path]:
    """Map each task to its CSV in `csv_dir` (any file ending `_<Task>.csv`); raise naming those missing."""
    csv_dir = Path(csv_dir)
    found, missing = {}, []
    for task in tasks:
        matches = sorted(csv_dir.glob(f"*_{check_task(task)}.csv"))
        if matches:
            found[task] = matches[0]
        else:
            missing.append(TASK_FILES[task])
    if missing:
        raise FileNotFoundError(f"{csv_dir}: no file for {', '.join(missing)}; fetch them with fetch_paper_tasks")
    return found


def load_paper_tasks(csv_dir, image_dir=None, tasks=TASKS, on_missing_image: str = "error") -> list[Sample]:
    """Load the released CSVs of `tasks` from `csv_dir` (see `load_task_csv`), in task order."""
    samples: list[Sample] = []
    for path in find_task_files(csv_dir, tasks).values():
        samples += load_task_csv(path, image_dir, on_missing_image)
    return samples


def fetch_paper_tasks(dest, tasks=TASKS, overwrite: bool = False, timeout: float = 60.0) -> dict[str, Path]:
    """Download the released CSVs of `tasks` from the official repository into `dest`.

    Each file is written to a temporary name and renamed when complete. Files already in
    `dest` are kept unless `overwrite`. Needs network access; offline, it raises
    `ConnectionError` saying where to get the files by hand.

    Example:
        >>> fetch_paper_tasks(config.data_dir() / "gqa")  # then load_paper_tasks(that folder)
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in tasks:
        name = TASK_FILES[check_task(task)]
        target = dest / name
        if target.exists() and not overwrite:
            paths[task] = target
            continue
        tmp = dest / f".{name}.part-{os.getpid()}"
        try:
            with urllib.request.urlopen(OFFICIAL_URL + name, timeout=timeout) as response:
                tmp.write_bytes(response.read())
            os.replace(tmp, target)
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            tmp.unlink(missing_ok=True)
            raise ConnectionError(
                f"could not download {OFFICIAL_URL + name} ({err}); when offline, copy the file by hand "
                f"into {dest} and pass that folder to load_paper_tasks"
            ) from err
        paths[task] = target
    return paths
