"""Tests of the loader of the paper's released GQA task CSVs: the real files when the shared
folder has them, and small hand-written files for every kind of bad input."""

from __future__ import annotations

import csv
import warnings
from collections import Counter

import pytest
from PIL import Image

from flowlib.config import PROJECT_DIR
from flowlib.data import gqa_tasks
from flowlib.sample import TASKS, Box, SampleError

SHARED_GQA = PROJECT_DIR.parent / "shared" / "gqa"


@pytest.fixture(scope="module")
def paper_samples():
    if not (SHARED_GQA / gqa_tasks.TASK_FILES["ChooseAttr"]).exists():
        pytest.skip(f"the released task CSVs are not in {SHARED_GQA}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the released boxes overhang their images ~100 times
        return gqa_tasks.load_paper_tasks(SHARED_GQA)


def test_real_files_counts_and_boxes(paper_samples):
    assert len(paper_samples) == 5525
    assert Counter(s.task for s in paper_samples) == {
        "ChooseAttr": 1000,
        "ChooseCat": 1000,
        "ChooseRel": 964,
        "CompareAttr": 570,
        "LogicalObj": 991,
        "QueryAttr": 1000,
    }
    boxes = Counter((s.task, len(s.boxes)) for s in paper_samples)
    assert boxes[("LogicalObj", 1)] == 910 and boxes[("LogicalObj", 2)] == 81  # object2 "-" -> no box
    assert boxes[("ChooseRel", 2)] == 964 and boxes[("CompareAttr", 2)] == 570
    # The one box wholly outside its image (x=503 in a 500-px image) is kept: it covers no patch.
    assert [s.question_id for s in paper_samples if any(b.clip(*s.image_size) is None for b in s.boxes)] == ["1594913"]
    by_id = {s.question_id: s for s in paper_samples}
    first = by_id["171031170"]
    assert (first.question, first.answer, first.true_option, first.false_option) == (
        "Is the jar full or empty?",
        "empty",
        "empty",
        "full",
    )
    assert first.boxes == (Box(253.0, 291.0, 60.0, 105.0, "jar"),) and first.image == "2390560.jpg"
    assert "00556075" in by_id and by_id["00556075"].central_object == "this"  # leading zeros kept
    grass = by_id["12824169"]
    assert grass.task == "LogicalObj" and grass.boxes == (Box(32.0, 312.0, 214.0, 147.0, "grass"),)
    assert all(s.has_options == (s.task in ("ChooseAttr", "ChooseCat", "ChooseRel")) for s in paper_samples)


HEADER = gqa_tasks.required_columns("LogicalObj") + ["captions"]


def _row(qid="0042", img="img1", x2="-", captions="a dog.\nsecond line, with comma", **over):
    row = {c: "" for c in HEADER}
    row.update(
        {
            "question_id": qid,
            "img_id": img,
            "question": "Is there either a dog or a cat that is brown?",
            "answer": "yes",
            "type_detailed": "existThatOr",
            "image_w": "100",
            "image_h": "80",
            "object1 name": "dog",
            "object1 x": "10",
            "object1 y": "5",
            "object1 w": "20",
            "object1 h": "30",
            "object2 name": "cat",
            "object2 x": x2,
            "object2 y": "-" if x2 == "-" else "0",
            "object2 w": "-" if x2 == "-" else "10",
            "object2 h": "-" if x2 == "-" else "10",
            "captions": captions,
        }
    )
    row.update(over)
    return row


def _write(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_small_file_ids_multiline_absent_object_and_images(tmp_path):
    path = _write(tmp_path / "x_existThatOr_LogicalObj.csv", [_row(), _row(qid="007", img="img2", x2="50")])
    (tmp_path / "images").mkdir()
    for name in ("img1", "img2"):
        Image.new("RGB", (100, 80), "red").save(tmp_path / "images" / f"{name}.jpg")
    samples = gqa_tasks.load_task_csv(path, image_dir=tmp_path / "images")
    assert [s.question_id for s in samples] == ["0042", "007"]  # two rows despite the multi-line captions
    assert samples[0].boxes == (Box(10.0, 5.0, 20.0, 30.0, "dog"),)
    assert samples[1].boxes == (Box(10.0, 5.0, 20.0, 30.0, "dog"), Box(50.0, 0.0, 10.0, 10.0, "cat"))
    assert samples[0].task == "LogicalObj" and samples[0].central_object == "dog"
    assert samples[0].true_option is None and samples[1].load_image().size == (100, 80)


def test_missing_columns_are_listed_with_the_file(tmp_path):
    header = [c for c in HEADER if c not in ("object2 x", "answer")]
    path = _write(tmp_path / "bad_existThatOr_LogicalObj.csv", [_row()], header)
    with pytest.raises(SampleError) as err:
        gqa_tasks.load_task_csv(path)
    assert "'answer'" in str(err.value) and "'object2 x'" in str(err.value) and str(path) in str(err.value)


def test_missing_image_raises_or_skips_with_count(tmp_path):
    path = _write(tmp_path / "x_existThatOr_LogicalObj.csv", [_row(), _row(qid="2", img="img2"), _row(qid="3")])
    (tmp_path / "images").mkdir()
    Image.new("RGB", (100, 80)).save(tmp_path / "images" / "img1.jpg")
    with pytest.raises(FileNotFoundError, match="img2.jpg"):
        gqa_tasks.load_task_csv(path, image_dir=tmp_path / "images")
    with pytest.warns(UserWarning, match="skipped 1 sample"):
        samples = gqa_tasks.load_task_csv(path, image_dir=tmp_path / "images", on_missing_image="skip")
    assert [s.question_id for s in samples] == ["0042", "3"]


def test_box_outside_image_is_clipped_with_warning(tmp_path):
    path = _write(tmp_path / "x_existThatOr_LogicalObj.csv", [_row(**{"object1 w": "95"})])
    with pytest.warns(UserWarning, match="1 box"):
        (sample,) = gqa_tasks.load_task_csv(path)
    assert sample.boxes == (Box(10.0, 5.0, 90.0, 30.0, "dog"),)


def test_unknown_task_lists_the_six(tmp_path):
    path = _write(tmp_path / "x_existThatOr_CountObj.csv", [_row()])
    with pytest.raises(SampleError) as err:
        gqa_tasks.load_task_csv(path)
    assert all(task in str(err.value) for task in TASKS) and "CountObj" in str(err.value)


def test_missing_task_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ChooseRel"):
        gqa_tasks.find_task_files(tmp_path, tasks=("ChooseRel",))


def test_fetch_keeps_existing_files_without_network(tmp_path):
    target = tmp_path / gqa_tasks.TASK_FILES["QueryAttr"]
    target.write_text("kept")
    assert gqa_tasks.fetch_paper_tasks(tmp_path, tasks=("QueryAttr",)) == {"QueryAttr": target}
    assert target.read_text() == "kept"


def test_fetch_offline_gives_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(gqa_tasks.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="copy the file by hand"):
        gqa_tasks.fetch_paper_tasks(tmp_path, tasks=("ChooseRel",))
    assert list(tmp_path.iterdir()) == []
