"""Tests of the raw-GQA builder: a small GQA-format fixture covering all six tasks, bad files,
and (when the shared folder has them) the paper CSVs' programs read back into ids and options."""

from __future__ import annotations

import ast
import json
from collections import Counter

import pandas as pd
import pytest
from PIL import Image

from flowlib.config import PROJECT_DIR
from flowlib.data import gqa_raw, gqa_tasks
from flowlib.sample import TASKS, Box, SampleError

FIXTURES = PROJECT_DIR / "tests" / "fixtures" / "gqa_raw"
QUESTIONS, GRAPHS = FIXTURES / "questions.json", FIXTURES / "scene_graphs.json"
SHARED_GQA = PROJECT_DIR.parent / "shared" / "gqa"


def test_fixture_builds_all_six_tasks():
    samples = {s.question_id: s for s in gqa_raw.load_raw_gqa(QUESTIONS, GRAPHS)}
    assert "05550000" not in samples  # verifyAttr belongs to no task
    assert Counter(s.task for s in samples.values()) == {t: 2 if t == "LogicalObj" else 1 for t in TASKS}
    jar = samples["0171031170"]  # leading zero kept
    assert (jar.task, jar.true_option, jar.false_option, jar.central_object) == ("ChooseAttr", "empty", "full", "jar")
    assert jar.boxes == (Box(20.0, 30.0, 60.0, 90.0, "jar"),) and jar.image == "2390560.jpg"
    cat = samples["19817684"]
    assert (cat.task, cat.true_option, cat.false_option, cat.central_object) == ("ChooseCat", "bird", "cat", "animal")
    rel = samples["13515212"]
    assert (rel.task, rel.true_option, rel.false_option) == ("ChooseRel", "right", "left")
    assert [b.label for b in rel.boxes] == ["surfboard", "surfer"] and rel.central_object == "surfboard"
    common = samples["16552528"]
    assert common.task == "CompareAttr" and [b.label for b in common.boxes] == ["jar", "bird"]
    assert not common.has_options
    absent = samples["09195303"]  # bookcase (-): no box
    assert absent.boxes == (Box(10.0, 200.0, 150.0, 100.0, "table"),) and absent.answer == "yes"
    assert [b.label for b in samples["12824169"].boxes] == ["table", "curtain"]
    side = samples["02452198"]
    assert (side.task, side.answer, side.boxes) == ("QueryAttr", "right", (Box(200.0, 10.0, 90.0, 250.0, "curtain"),))


def test_same_records_as_the_csv_loader(tmp_path):
    # The QueryAttr fixture question written as a released CSV row loads to the same record.
    row = {c: "" for c in gqa_tasks.required_columns("QueryAttr")}
    row.update(
        {
            "question_id": "02452198",
            "img_id": "2366627",
            "question": "On which side of the photo is the curtain?",
            "answer": "right",
            "type_detailed": "positionQuery",
            "image_w": "300",
            "image_h": "400",
            "central object name": "curtain",
            "central object x": "200",
            "central object y": "10",
            "central object w": "90",
            "central object h": "250",
        }
    )
    path = tmp_path / "x_positionQuery_QueryAttr.csv"
    pd.DataFrame([row]).to_csv(path, index=False)
    (from_csv,) = gqa_tasks.load_task_csv(path)
    (from_raw,) = gqa_raw.load_raw_gqa(QUESTIONS, GRAPHS, tasks=("QueryAttr",))
    fields = ("question_id", "question", "answer", "task", "image", "type_detailed", "central_object", "boxes")
    assert [getattr(from_csv, f) for f in fields] == [getattr(from_raw, f) for f in fields]


def test_images_found_missing_or_skipped(tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "2390560.jpg")
    with pytest.raises(FileNotFoundError, match="2366627.jpg"):
        gqa_raw.load_raw_gqa(QUESTIONS, GRAPHS, image_dir=tmp_path)
    with pytest.warns(UserWarning, match="skipped 3 question"):
        samples = gqa_raw.load_raw_gqa(QUESTIONS, GRAPHS, image_dir=tmp_path, on_missing_image="skip")
    assert len(samples) == 4 and samples[0].load_image().size == (400, 300)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_malformed_files_name_line_or_key(tmp_path):
    broken = _write(tmp_path, "q.json", '{\n  "1": {"imageId": "2"},\n  "2": oops\n}')
    with pytest.raises(SampleError, match="line 3"):
        gqa_raw.load_questions(broken)
    questions = json.loads(QUESTIONS.read_text())
    del questions["19817684"]["semantic"]
    with pytest.raises(SampleError, match="19817684.*semantic"):
        gqa_raw.load_questions(_write(tmp_path, "q2.json", questions))
    graphs = json.loads(GRAPHS.read_text())
    del graphs["2366627"]["objects"]["21"]["w"]
    with pytest.raises(SampleError, match="'21'.*'2366627'.*'w'"):
        gqa_raw.load_scene_graphs(_write(tmp_path, "g.json", graphs))
    with pytest.raises(SampleError, match="keyed by id"):
        gqa_raw.load_questions(_write(tmp_path, "list.json", "[1, 2]"))


def test_inconsistent_inputs_and_clipping():
    questions = json.loads(QUESTIONS.read_text())
    graphs = gqa_raw.load_scene_graphs(GRAPHS)
    with pytest.raises(SampleError, match="2366627"):
        gqa_raw.build_tasks(questions, {"2390560": graphs["2390560"]})
    questions["02452198"]["semantic"][0]["argument"] = "curtain (99)"
    with pytest.raises(SampleError, match="'99'"):
        gqa_raw.build_tasks(questions, graphs, tasks=("QueryAttr",))
    questions["02452198"]["semantic"][0]["argument"] = "curtain (21)"
    graphs["2366627"]["objects"]["21"]["w"] = 150
    with pytest.warns(UserWarning, match="clipped"):
        (side,) = gqa_raw.build_tasks(questions, graphs, tasks=("QueryAttr",))
    assert side.boxes == (Box(200.0, 10.0, 100.0, 250.0, "curtain"),)
    with pytest.raises(SampleError, match="ChooseAttr, ChooseCat"):
        gqa_raw.build_tasks(questions, graphs, tasks=("Counting",))


def test_paper_programs_give_the_csv_ids_and_options():
    files = gqa_tasks.find_task_files(SHARED_GQA) if SHARED_GQA.exists() else None
    if not files:
        pytest.skip(f"the released task CSVs are not in {SHARED_GQA}")
    checked = 0
    for task, path in files.items():
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        id_columns = ["central object id"] if "central object id" in table else ["object1 id", "object2 id"]
        for row in table.to_dict("records"):
            program = ast.literal_eval(row["operations"])
            ids = [obj_id for _, obj_id in gqa_raw.program_objects(program)]
            assert ids == [row[c].strip() for c in id_columns], (task, row["question_id"])
            if task.startswith("Choose"):
                assert gqa_raw.choose_options(program, row["answer"]) == (row["true option"], row["false option"])
            checked += 1
    assert checked == 5525
