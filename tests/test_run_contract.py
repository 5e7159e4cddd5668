"""A run's identity is its content: fingerprints, refused resumes that name the change, sample indices
that do not depend on the task selection, notebook run folders picked by identity, the folder lock, and
a stress test of concurrent runs into one folder.

The helpers at the top build a small copy of the paper's data (task CSVs and images) whose answers are
what a saved tiny model answers, so that runs analyse samples; tests/test_cli_errors.py uses them too.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock
from PIL import Image

from flowlib import fingerprint, runner
from flowlib.answers import greedy_answer
from flowlib.data import gqa_tasks
from flowlib.models import load_model
from flowlib.run_folder import LOCK_FILE, RunMismatchError
from flowlib.run_plan import RunSettingsError, index_samples
from flowlib.tiny import tiny_llava

pytestmark = pytest.mark.usefixtures("one_thread")

FLOWS = ("Image->Question", "Related Image Patches->Question")
QUESTION = "is the star red or blue?"  # words the tiny tokenizer knows
#: Row 1594913 of the released QueryAttr file, as released: its box starts at x=503 in a 500-px-wide image.
ROW_1594913 = {
    "question_id": "1594913",
    "img_id": "2389006",
    "question": "Which side of the photo is the pillow on?",
    "answer": "right",
    "type_detailed": "positionQuery",
    "image_w": "500",
    "image_h": "375",
    "central object name": "pillow",
    "central object x": "503",
    "central object y": "91",
    "central object w": "163",
    "central object h": "72",
}


def query_row(
    qid: str,
    img: str,
    width: int = 160,
    height: int = 120,
    box=(10, 20, 50, 60),
    answer: str = "?",
    question: str = QUESTION,
) -> dict:
    """One row of a QueryAttr task CSV."""
    x, y, w, h = box
    return {
        "question_id": qid,
        "img_id": img,
        "question": question,
        "answer": answer,
        "type_detailed": "positionQuery",
        "image_w": str(width),
        "image_h": str(height),
        "central object name": "star",
        "central object x": str(x),
        "central object y": str(y),
        "central object w": str(w),
        "central object h": str(h),
    }


def write_task_csv(csv_dir: Path, rows: list[dict], task: str = "QueryAttr") -> Path:
    """Write `rows` as the released file of `task` in `csv_dir` (every required column, in file order)."""
    csv_dir.mkdir(parents=True, exist_ok=True)
    path = csv_dir / gqa_tasks.TASK_FILES[task]
    columns = gqa_tasks.required_columns(task)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{c: row.get(c, "") for c in columns} for row in rows])
    return path


def write_image(image_dir: Path, name: str, size=(160, 120), colour="red") -> Path:
    image_dir.mkdir(parents=True, exist_ok=True)
    path = image_dir / f"{name}.jpg"
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def answer_as_model(
    loaded, csv_dir: Path, image_dir: Path, rows: list[dict], wrong=(), task: str = "QueryAttr", max_new_tokens: int = 3
):
    """Rewrite the CSV so that each row's answer is the model's greedy answer (except the ids in `wrong`)."""
    write_task_csv(csv_dir, rows, task)
    samples = gqa_tasks.load_task_csv(csv_dir / gqa_tasks.TASK_FILES[task], image_dir)
    answers = {s.question_id: greedy_answer(loaded, loaded.prepare(s), max_new_tokens) for s in samples}
    rows = [
        {**row, "answer": "definitely wrong" if row["question_id"] in wrong else answers[row["question_id"]]}
        for row in rows
    ]
    write_task_csv(csv_dir, rows, task)
    return rows


COLOURS = ("red", "blue", "green", "white")


def make_paper_data(root: Path, loaded, colours=COLOURS, wrong=("q1",), max_new_tokens: int = 3) -> tuple[Path, Path]:
    """A QueryAttr CSV of one sample per colour (q0, q1, ...; `wrong` answered wrongly) and its images."""
    csv_dir, image_dir = root / "csv", root / "images"
    for i, colour in enumerate(colours):
        write_image(image_dir, f"img{i}", colour=colour)
    rows = [query_row(f"q{i}", f"img{i}") for i in range(len(colours))]
    answer_as_model(loaded, csv_dir, image_dir, rows, wrong, max_new_tokens=max_new_tokens)
    return csv_dir, image_dir


def paper_samples(csv_dir, image_dir, task="QueryAttr"):
    return gqa_tasks.load_task_csv(csv_dir / gqa_tasks.TASK_FILES[task], image_dir)


def run(loaded, samples, output, **kwargs):
    kwargs = {"flows": FLOWS, "window": 1, "max_new_tokens": 3, "progress": False, **kwargs}
    return runner.run_experiment(loaded, samples, output, **kwargs)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the identity ---------------------------------------------------------------------------------------------------


def test_changed_data_under_the_same_names_is_refused_naming_the_change(disk_model, tmp_path):
    csv_dir, image_dir = make_paper_data(tmp_path, disk_model)
    out = tmp_path / "run"
    first = run(disk_model, paper_samples(csv_dir, image_dir), out)
    assert first.count("analysed") == 3 and first.count("wrong_answer") == 1
    before = snapshot(out)
    csv_file = gqa_tasks.TASK_FILES["QueryAttr"]

    # The CSV: one answer edited in place.
    rows = list(csv.DictReader(open(csv_dir / csv_file)))
    write_task_csv(csv_dir, [{**r, "answer": "blue"} if r["question_id"] == "q2" else r for r in rows])
    with pytest.raises(RunMismatchError, match=rf"sample q2 \(QueryAttr, paper-csv:{csv_file}\): answer: .* -> 'blue'"):
        run(disk_model, paper_samples(csv_dir, image_dir), out)
    write_task_csv(csv_dir, rows)
    # A box moved.
    write_task_csv(csv_dir, [{**r, "central object x": "11"} if r["question_id"] == "q0" else r for r in rows])
    with pytest.raises(RunMismatchError, match=r"sample q0 .*boxes: "):
        run(disk_model, paper_samples(csv_dir, image_dir), out)
    write_task_csv(csv_dir, rows)
    # An image file rewritten in place, same name and size.
    image = image_dir / "img3.jpg"
    original = image.read_bytes()
    Image.new("RGB", (160, 120), "black").save(image, quality=95)
    with pytest.raises(RunMismatchError, match=rf"sample q3 .*image {image} changed \(\d+ bytes, sha256 \w+… ->"):
        run(disk_model, paper_samples(csv_dir, image_dir), out)
    image.write_bytes(original)
    # Another image folder whose files have the same names but other pictures.
    other = tmp_path / "other_images"
    for i, colour in enumerate(reversed(COLOURS)):
        write_image(other, f"img{i}", colour=colour)
    with pytest.raises(RunMismatchError, match=rf"image {other / 'img0.jpg'} changed.*and 1 more samples changed"):
        run(disk_model, paper_samples(csv_dir, other), out)
    assert snapshot(out) == before  # every refusal came before any write

    # The same pictures in another folder are the same data: resumed, not refused.
    moved = tmp_path / "moved_images"
    moved.mkdir()
    for path in image_dir.iterdir():
        (moved / path.name).write_bytes(path.read_bytes())
    again = run(disk_model, paper_samples(csv_dir, moved), out)
    pd.testing.assert_frame_equal(again.table, first.table)


def test_changed_weights_settings_or_code_are_refused(checkpoint, disk_model, tmp_path, monkeypatch):
    csv_dir, image_dir = make_paper_data(tmp_path / "data", disk_model)
    samples = paper_samples(csv_dir, image_dir)
    folder = tmp_path / "model"
    folder.mkdir()
    for path in checkpoint.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "run"
    mine = load_model(str(folder))
    run(mine, samples, out)

    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    tiny_llava("llava-1.5", layers=3, seed=1).model.save_pretrained(folder)  # same shapes: the file keeps its size
    with pytest.raises(
        RunMismatchError,
        match=r"model file model\.safetensors changed \((\d+) bytes, sha256 \w+… -> "
        r"\1 bytes",
    ):
        run(load_model(str(folder)), samples, out)
    weights.write_bytes(original)
    with pytest.raises(
        RunMismatchError,
        match=r"holds another run: settings\.flows: \['Image->Question', 'Related "
        r"Image Patches->Question'\] -> \['Image->Question'\]\. Nothing",
    ):
        run(mine, samples, out, flows=["Image->Question"])
    with pytest.raises(RunMismatchError, match=r"holds another run: settings\.per_task: None -> 1\. Nothing"):
        run(mine, samples, out, per_task=1)
    code = fingerprint.code_fingerprint()
    edited = {**code, "sources": {**code["sources"], "knockout.py": "0" * 64}}
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: edited)
    with pytest.raises(RunMismatchError, match=r"another run: code: flowlib/knockout\.py changed since the run began"):
        run(mine, samples, out)
    monkeypatch.undo()
    assert run(mine, samples, out).count("analysed") == 3  # all restored: resumed


def test_large_files_are_fingerprinted_by_size_and_sampled_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "WHOLE_FILE_LIMIT", 2**20)
    monkeypatch.setattr(fingerprint, "EDGE_BYTES", 2**14)
    monkeypatch.setattr(fingerprint, "BLOCK_BYTES", 2**10)
    path = tmp_path / "weights.bin"
    data = bytearray(os.urandom(3 * 2**20))
    path.write_bytes(bytes(data))
    digest = fingerprint.file_digest(path)
    assert digest["bytes"] == len(data) and digest["hashed"] == "sampled"
    data[5] ^= 1  # within the first EDGE_BYTES
    path.write_bytes(bytes(data))
    assert fingerprint.file_digest(path)["sha256"] != digest["sha256"]
    small = tmp_path / "config.json"
    small.write_text("{}")
    assert fingerprint.file_digest(small) == {"bytes": 2, "sha256": fingerprint._sha256(b"{}")}


def test_a_hub_model_is_identified_by_its_resolved_commit(monkeypatch):
    loaded = tiny_llava("llava-1.5", layers=3)
    monkeypatch.setattr(loaded.model, "name_or_path", "llava-hf/llava-1.5-7b-hf")
    monkeypatch.setattr(fingerprint, "hub_commit", lambda repo, revision=None: f"{repo}@abc123")
    record = fingerprint.model_fingerprint(loaded)
    assert record["hub_commit"] == "llava-hf/llava-1.5-7b-hf@abc123" and "parameters" not in record
    monkeypatch.setattr(fingerprint, "hub_commit", lambda repo, revision=None: None)  # not in the cache
    assert "parameters" in fingerprint.model_fingerprint(loaded)


def test_sample_index_does_not_depend_on_the_task_selection(disk_model, tmp_path):
    csv_dir, image_dir = make_paper_data(tmp_path, disk_model, colours=("red", "blue"), wrong=())
    choose = [{**query_row(f"c{i}", f"img{i}"), "true option": "red", "false option": "blue"} for i in range(2)]
    write_task_csv(csv_dir, choose, "ChooseAttr")
    both = index_samples(gqa_tasks.load_paper_tasks(csv_dir, image_dir, tasks=["ChooseAttr", "QueryAttr"]))
    alone = index_samples(gqa_tasks.load_paper_tasks(csv_dir, image_dir, tasks=["QueryAttr"]))
    reordered = index_samples(gqa_tasks.load_paper_tasks(csv_dir, image_dir, tasks=["QueryAttr", "ChooseAttr"]))
    by_id = {s.question_id: i for i, s in both}
    assert {s.question_id: i for i, s in alone} == {"q0": by_id["q0"], "q1": by_id["q1"]}
    assert {s.question_id: i for i, s in reordered} == by_id
    assert len(set(by_id.values())) == 4  # unique across tasks
    table = run(disk_model, [s for _, s in alone], tmp_path / "run").table
    assert dict(zip(table.question_id, table.sample_index)) == {"q0": by_id["q0"], "q1": by_id["q1"]}


def test_the_row_with_a_box_beyond_its_image_runs_with_a_warning(disk_model, tmp_path):
    """Row 1594913 (QueryAttr): the run completes; the box is noted with a warning and, covering no patch,
    leaves the sample out of the related-patches flow only, with that reason."""
    image_dir, csv_dir = tmp_path / "images", tmp_path / "csv"
    write_image(image_dir, ROW_1594913["img_id"], size=(500, 375), colour="white")
    write_image(image_dir, "img0")
    with pytest.warns(UserWarning, match="1594913"):
        answer_as_model(disk_model, csv_dir, image_dir, [ROW_1594913, query_row("q0", "img0")])
    with pytest.warns(UserWarning, match=r"1 box\(es\) beyond their image.*sample 1594913: box .*x=503"):
        samples = paper_samples(csv_dir, image_dir)
    with pytest.warns(UserWarning, match="sample 1594913: box .* it adds no related patch"):
        summary = run(disk_model, samples, tmp_path / "run")
    assert summary.count("analysed") == 2
    status = {s["question_id"]: s for s in summary.statuses}["1594913"]
    assert list(status["excluded_flows"]) == ["Related Image Patches->Question"]
    assert "Related Image Patches" in status["excluded_flows"]["Related Image Patches->Question"]
    flows = summary.table.groupby("question_id").flow.unique().map(set)
    assert flows["1594913"] == {"Image->Question"} and flows["q0"] == set(FLOWS)
    reasons = json.loads((tmp_path / "run" / "summary.json").read_text())["exclusion_reasons"]
    assert len(reasons) == 1 and next(iter(reasons)).startswith("Related Image Patches->Question: ")


def test_the_row_fixture_matches_the_released_file(shared_dir):
    with open(shared_dir / "gqa" / gqa_tasks.TASK_FILES["QueryAttr"], newline="") as f:
        released = next(r for r in csv.DictReader(f) if r["question_id"] == ROW_1594913["question_id"])
    assert {k: released[k] for k in ROW_1594913} == ROW_1594913


# --- notebooks ------------------------------------------------------------------------------------------------------


def test_a_notebook_rerun_with_new_data_draws_new_numbers(checkpoint, disk_model, tmp_path, monkeypatch):
    from flowlib.study import Study

    monkeypatch.setenv("FLOWLIB_RUNS", str(tmp_path / "runs"))
    # Study runs answer with up to 10 new tokens (the runner's default).
    first_csv, first_images = make_paper_data(tmp_path / "a", disk_model, wrong=(), max_new_tokens=10)
    second_csv, second_images = make_paper_data(
        tmp_path / "b", disk_model, colours=("black", "white", "blue", "red"), wrong=(), max_new_tokens=10
    )

    def knockout(csv_dir, image_dir):
        study = Study.open(
            str(checkpoint),
            "paper",
            tasks=["QueryAttr"],
            samples_per_task=4,
            window=1,
            csv_dir=str(csv_dir),
            image_dir=str(image_dir),
        )
        return study.run_dir(FLOWS), study.knockout(FLOWS, progress=False)

    folder_a, table_a = knockout(first_csv, first_images)
    folder_b, table_b = knockout(second_csv, second_images)
    assert folder_a != folder_b and folder_a.parent == folder_b.parent  # same notebook, same data name
    assert not table_a.relative_change.equals(table_b.relative_change)
    folder_again, table_again = knockout(first_csv, first_images)  # back to the first data: its own folder, resumed
    assert folder_again == folder_a
    pd.testing.assert_frame_equal(table_again, table_a)
    with pytest.raises(RunSettingsError, match="window 0 does not fit"):
        Study.open(
            str(checkpoint), "paper", tasks=["QueryAttr"], window=0, csv_dir=str(first_csv), image_dir=str(first_images)
        )


# --- concurrency ----------------------------------------------------------------------------------------------------


def test_a_second_process_waits_for_the_same_run_and_another_run_is_refused_at_once(disk_model, tmp_path, caplog):
    csv_dir, image_dir = make_paper_data(tmp_path, disk_model)
    samples = paper_samples(csv_dir, image_dir)
    out = tmp_path / "run"
    first = run(disk_model, samples, out)
    holder = FileLock(out / LOCK_FILE)  # as another process mid-run holds it
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(RunMismatchError, match="settings.window: 1 -> 2"):
            run(disk_model, samples, out, window=2)
        assert time.monotonic() - started < 5  # refused at once, not after the other run

        result = {}
        waiting = threading.Thread(target=lambda: result.update(summary=run(disk_model, samples, out)))
        with caplog.at_level("WARNING", logger="flowlib.run_folder"):
            waiting.start()
            time.sleep(1.0)
            assert waiting.is_alive() and "in use by another process; waiting" in caplog.text
    finally:
        holder.release()
    waiting.join(30)
    pd.testing.assert_frame_equal(result["summary"].table, first.table)


STRESS_WORKER = textwrap.dedent("""
    import dataclasses, json, os, sys
    import torch
    torch.set_num_threads(1)
    from PIL import Image
    from flowlib import runner
    from flowlib.answers import greedy_answer
    from flowlib.run_folder import RunMismatchError
    from flowlib.sample import Box, Sample
    from flowlib.tiny import tiny_llava

    loaded = tiny_llava("llava-1.5", layers=3)
    samples = []
    for i, colour in enumerate(("white", "red", "blue")):
        s = Sample(f"s{i}", "is the star red or blue?", "?", "ChooseAttr", image=Image.new("RGB", (160, 120), colour),
                   true_option="red", false_option="blue", central_object="star", boxes=[Box(10, 20, 50, 60)])
        samples.append(dataclasses.replace(s, answer=greedy_answer(loaded, loaded.prepare(s), 3)))
    print("ready", flush=True)
    for line in sys.stdin:
        order = json.loads(line)
        try:
            summary = runner.run_experiment(loaded, samples, order["output"], flows=["Image->Question", "Last->Last"],
                                            window=order["window"], max_new_tokens=3, progress=False)
            print(json.dumps({"ok": True, "rows": len(summary.table)}), flush=True)
        except RunMismatchError as err:
            print(json.dumps({"ok": False, "error": str(err)}), flush=True)
""")


@pytest.mark.slow
def test_concurrent_runs_into_one_folder_never_mix(tmp_path):
    """Pairs of processes start runs into one fresh folder, with equal and with different windows, many
    times: the same run is done once (the other waits and resumes), another run is refused, and every
    folder's table is exactly one run's, matching its run.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", STRESS_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready", "ready"]
        reference: dict[int, pd.DataFrame] = {}
        tries = 20
        for i in range(tries):
            windows = (1, 1) if i % 2 == 0 else ((1, 3) if i % 4 == 1 else (3, 1))
            output = tmp_path / f"try{i}"
            for worker, window in zip(workers, windows):
                worker.stdin.write(json.dumps({"output": str(output), "window": window}) + "\n")
                worker.stdin.flush()
            results = [json.loads(w.stdout.readline()) for w in workers]
            run_json = json.loads((output / "run.json").read_text())
            window = run_json["config"]["window"]
            table = pd.read_parquet(output / "results.parquet")
            parts = pd.concat([pd.read_parquet(p) for p in sorted((output / "parts").glob("*.parquet"))])
            assert set(table.window) == set(parts.window) == {window}  # no row of another run
            assert len(table) == len(parts) == len(table.drop_duplicates(["question_id", "flow", "layer"]))
            if windows[0] == windows[1]:
                assert all(r["ok"] for r in results), results
            else:
                assert sorted(r["ok"] for r in results) == [False, True]
                loser = next(r for r in results if not r["ok"])
                assert "holds another run: settings.window" in loser["error"]
                assert windows[[r["ok"] for r in results].index(True)] == window
            if window in reference:
                pd.testing.assert_frame_equal(table, reference[window])
            reference[window] = table
        assert set(reference) == {1, 3}
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait(30)
