"""The paper's six tasks built from raw GQA: its question file and its scene graphs.

GQA's question file maps a question id to `{imageId, question, answer, types: {detailed,
...}, semantic: [{operation, argument, dependencies}], ...}`; its scene-graph file maps an
image id to `{width, height, objects: {objId: {name, x, y, w, h, attributes, relations}}}`.
A question belongs to a task when its detailed type is one of the task's in docs/protocol.md's
table. Its boxes are those of the objects its program names (`select` arguments read
`name (objId)`, `choose rel` ones `subject,rel1|rel2,s (objId)`; `(-)` is an absent
object), in program order, taken from the scene graph; the options of Choose questions
come from the `choose` operation's `a|b` argument. The result is the same `Sample`s as
the paper's CSVs give (`gqa_tasks`).

    >>> samples = load_raw_gqa("val_balanced_questions.json", "val_sceneGraphs.json", image_dir="images")
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from flowlib.sample import TASKS, Box, LoadNotes, Sample, SampleError, check_task

log = logging.getLogger(__name__)

#: GQA detailed question types of each task (docs/protocol.md, "Data").
DETAILED_TYPES = {
    "ChooseAttr": ("chooseAttr", "materialChoose", "typeChoose", "activityChoose"),
    "ChooseCat": ("objThisChoose", "categoryThatChoose", "categoryThisChoose"),
    "ChooseRel": ("relChooser",),
    "CompareAttr": ("twoCommon",),
    "LogicalObj": ("existThatOr", "existThatOrC"),
    "QueryAttr": ("positionQuery",),
}
TASK_OF_TYPE = {t: task for task, types in DETAILED_TYPES.items() for t in types}
_QUESTION_KEYS = ("imageId", "question", "answer", "types", "semantic")
_OBJECT_KEYS = ("name", "x", "y", "w", "h")
_REFERENCE = re.compile(r"\((\d+|-)\)\s*$")  # "name (objId)" or "name (-)" at an argument's end
_SINGLE_OBJECT = ("ChooseAttr", "ChooseCat", "QueryAttr")


def _read_json(path, what: str) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise SampleError(f"{path}: malformed {what} JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(data, dict):
        raise SampleError(f"{path}: the {what} file must hold a JSON object keyed by id, not {type(data).__name__}")
    return data


def load_questions(path) -> dict:
    """Read a GQA question file, checking each question's keys (errors name the question id)."""
    questions = _read_json(path, "question")
    for qid, q in questions.items():
        if not isinstance(q, dict):
            raise SampleError(f"{path}: question {qid!r} is not an object")
        missing = [k for k in _QUESTION_KEYS if k not in q]
        if missing or "detailed" not in (q.get("types") or {}):
            raise SampleError(f"{path}: question {qid!r} lacks key(s) {missing or ['types.detailed']}")
    return questions


def load_scene_graphs(path) -> dict:
    """Read a GQA scene-graph file, checking sizes and object keys (errors name the image and object)."""
    graphs = _read_json(path, "scene-graph")
    for image_id, graph in graphs.items():
        if not isinstance(graph, dict) or any(k not in graph for k in ("width", "height", "objects")):
            raise SampleError(f"{path}: scene graph {image_id!r} needs 'width', 'height' and 'objects'")
        for obj_id, obj in graph["objects"].items():
            missing = [k for k in _OBJECT_KEYS if k not in obj]
            if missing:
                raise SampleError(f"{path}: object {obj_id!r} of image {image_id!r} lacks key(s) {missing}")
    return graphs


def program_objects(program: list) -> list[tuple[str, str]]:
    """(name, objId or '-') of every object a GQA program names, in program order.

    A name repeated by a later operation counts again, as in the paper's CSVs (a few
    ChooseRel questions compare an object with itself and carry its box twice).
    """
    refs = []
    for op in program:
        argument = str(op.get("argument", ""))
        match = _REFERENCE.search(argument)
        if match:
            name = argument[: match.start()].strip()
            name = name.split(",")[0].strip() if "," in name else name  # "surfer,left|right,s" -> "surfer"
            refs.append((name, match[1]))
    return refs


def choose_options(program: list, answer: str) -> tuple[str | None, str | None]:
    """True and false option from a program's `choose` operation, or (None, None) if unreadable.

    Relation options lose "to the"/"in"/"of" ("to the left of" -> "left"), as GQA's answers do.
    """
    for op in program:
        if not str(op.get("operation", "")).startswith("choose"):
            continue
        argument = str(op.get("argument", ""))
        if op["operation"] == "choose rel":  # "subject,to the left of|to the right of,s (id)"
            parts = argument.split(",")
            argument = parts[1] if len(parts) >= 3 else ""
        options = [re.sub(r"^(to the |in )|( of)$", "", o.strip()).strip() for o in argument.split("|")]
        if len(options) == 2 and answer in options:
            return answer, options[1 - options.index(answer)]
    return None, None


def build_tasks(
    questions: dict,
    scene_graphs: dict,
    image_dir=None,
    tasks=TASKS,
    on_missing_image: str = "error",
    image_ext: str = ".jpg",
) -> list[Sample]:
    """Turn loaded GQA questions and scene graphs into `Sample`s of `tasks` (question-file order).

    Args:
        questions: as returned by `load_questions`.
        scene_graphs: as returned by `load_scene_graphs`.
        image_dir: folder of `<imageId><image_ext>`; None leaves `Sample.image` as the file name.
        tasks: which of the six tasks to keep; other questions are ignored.
        on_missing_image: "error" raises `FileNotFoundError` naming the path; "skip" drops it, warning with the count.
        image_ext: the image files' extension.

    Raises:
        SampleError: unknown task name; a question whose image has no scene graph, or whose
            program names an object id the scene graph lacks (the message names both keys).
    """
    notes = LoadNotes(on_missing_image)
    wanted = {check_task(t) for t in tasks}
    samples = []
    for qid, q in questions.items():
        task = TASK_OF_TYPE.get(q["types"]["detailed"])
        if task not in wanted:
            continue
        image_id = str(q["imageId"])
        graph = scene_graphs.get(image_id)
        if graph is None:
            raise SampleError(
                f"question {qid!r}: image {image_id!r} has no scene graph; pass the matching split's file"
            )
        image = notes.image(image_id + image_ext, image_dir, f"question {qid}")
        if image is None:
            continue
        refs = program_objects(q["semantic"])
        boxes = []
        for name, obj_id in refs:
            if obj_id == "-":
                continue  # an object the question names but the scene lacks (LogicalObj)
            obj = graph["objects"].get(obj_id)
            if obj is None:
                raise SampleError(f"question {qid!r}: object {obj_id!r} ({name}) is not in scene graph {image_id!r}")
            box = Box(float(obj["x"]), float(obj["y"]), float(obj["w"]), float(obj["h"]), obj["name"])
            boxes.append(notes.clip(box, graph["width"], graph["height"], qid))
        true, false = choose_options(q["semantic"], q["answer"]) if task.startswith("Choose") else (None, None)
        central = (refs[-1] if task in _SINGLE_OBJECT else refs[0])[0] if refs else None
        samples.append(
            Sample(
                question_id=qid,
                question=q["question"],
                answer=q["answer"],
                task=task,
                image=image,
                type_detailed=q["types"]["detailed"],
                true_option=true,
                false_option=false,
                central_object=central,
                boxes=tuple(boxes),
                source="gqa-raw",
                image_size=(int(graph["width"]), int(graph["height"])),
            )
        )
    notes.warn(log, what="question")
    return samples


def load_raw_gqa(
    questions_path, scene_graphs_path, image_dir=None, tasks=TASKS, on_missing_image: str = "error"
) -> list[Sample]:
    """Read GQA's question and scene-graph files and build the six tasks (see `build_tasks`)."""
    return build_tasks(
        load_questions(questions_path), load_scene_graphs(scene_graphs_path), image_dir, tasks, on_missing_image
    )
