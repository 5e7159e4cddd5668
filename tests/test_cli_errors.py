"""Bad inputs at the command line: each gives one or two lines naming the setting or file and what to do, the
right exit code, and either nothing written or the bad sample excluded with its reason while the rest runs."""

from __future__ import annotations

import inspect
import json
import shutil
import struct
import time

import pandas as pd
import pytest
from PIL import Image

from flowlib import cli, models, run_plan, runner
from flowlib.data import gqa_tasks
from flowlib.run_folder import load_statuses, read_run
from flowlib.sample import Sample
from tests.test_run_contract import (
    FLOWS,
    answer_as_model,
    make_paper_data,
    query_row,
    snapshot,
    write_image,
    write_task_csv,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CSV_NAME = gqa_tasks.TASK_FILES["QueryAttr"]


def data_args(command, checkpoint, csv_dir, image_dir, output, *extra) -> list[str]:
    """`flowlib <command>` on the paper's QueryAttr CSV: the options `run` and `lens` share."""
    return [
        command,
        "--model",
        str(checkpoint),
        "--data",
        "paper",
        "--csv-dir",
        str(csv_dir),
        "--image-dir",
        str(image_dir),
        "--tasks",
        "QueryAttr",
        "--max-new-tokens",
        "3",
        "--output",
        str(output),
        "--quiet",
        *extra,
    ]


def run_args(checkpoint, csv_dir, image_dir, output, *extra) -> list[str]:
    """`flowlib run` of FLOWS with windows of one layer; `extra` comes last, so it overrides."""
    return data_args("run", checkpoint, csv_dir, image_dir, output, "--flows", *FLOWS, "--window", "1", *extra)


def error_lines(capsys) -> list[str]:
    """The command's own lines on stderr (logging and Python warnings left out)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("flowlib run:", "flowlib lens:", "  ("))]
    assert 1 <= len(lines) <= 2, err
    return lines


@pytest.fixture(scope="module")
def data(tmp_path_factory, disk_model):
    return make_paper_data(tmp_path_factory.mktemp("data"), disk_model)


# --- settings: exit 2, nothing written ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--window", "0"], "flowlib run: error: argument --window: must be a whole number >= 1, not '0'"),
        (["--samples-per-task", "0"], "argument --samples-per-task: must be a whole number >= 1, not '0'"),
        (["--max-batch", "-2"], "argument --max-batch: must be a whole number >= 1, not '-2'"),
        (
            ["--window", "9"],
            "flowlib run: error: window 9 does not fit a model of 3 layers; use 1..3 (the default, when unset, is k=1)",
        ),
        (["--flows", "Image->Nowhere"], "flowlib run: error: unknown flow 'Image->Nowhere'"),
        (["--flows", "Image->Question", "Image->Question"], "flows must be one or more distinct flows"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(checkpoint, data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert cli.main(run_args(checkpoint, *data, out, *extra)) == 2
    assert message in error_lines(capsys)[0]
    assert not out.exists()


# --- data: exit 1 naming the file, nothing written -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty (not even a header row); use the released file of QueryAttr"),
        (",".join(gqa_tasks.required_columns("QueryAttr")) + "\n", "holds no rows (only a header)"),
    ],
)
def test_an_empty_csv_is_named(checkpoint, tmp_path, capsys, content, message):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / CSV_NAME).write_text(content)
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    assert cli.main(run_args(checkpoint, tmp_path / "csv", tmp_path / "images", out)) == 1
    line = error_lines(capsys)[0]
    assert str(tmp_path / "csv" / CSV_NAME) in line and message in line
    assert not out.exists()


def test_missing_data_folders_and_files_are_named(checkpoint, data, tmp_path, capsys):
    csv_dir, image_dir = data
    assert cli.main(run_args(checkpoint, tmp_path / "nowhere", image_dir, tmp_path / "out")) == 1
    assert f"--csv-dir {tmp_path / 'nowhere'}: no such folder" in error_lines(capsys)[0]
    assert cli.main(run_args(checkpoint, csv_dir, tmp_path / "noimages", tmp_path / "out")) == 1
    assert f"--image-dir {tmp_path / 'noimages'}: no such folder" in error_lines(capsys)[0]
    assert cli.main(run_args(checkpoint, csv_dir, image_dir, tmp_path / "out", "--tasks", "ChooseAttr")) == 1
    assert "no file for GQA_val_correct_question_with_choose_ChooseAttr.csv" in error_lines(capsys)[0]
    assert not (tmp_path / "out").exists()


# --- the model argument ----------------------------------------------------------------------------------------------


def test_a_model_path_that_does_not_exist_says_so(data, tmp_path, capsys):
    assert cli.main(run_args(tmp_path / "models" / "llava", *data, tmp_path / "out")) == 1
    assert f"--model {tmp_path / 'models' / 'llava'}: no such folder" in error_lines(capsys)[0]
    assert cli.main(run_args("./llava-7b/", *data, tmp_path / "out")) == 1
    assert "--model ./llava-7b/: no such folder" in error_lines(capsys)[0]
    (tmp_path / "empty").mkdir()
    assert cli.main(run_args(tmp_path / "empty", *data, tmp_path / "out")) == 1
    assert "the folder holds no config.json" in error_lines(capsys)[0]


def test_an_unknown_name_fails_at_once_offline_or_when_the_hub_is_unreachable(data, tmp_path, capsys, monkeypatch):
    started = time.monotonic()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(run_args("llava-unknown", *data, tmp_path / "out")) == 1
    line = error_lines(capsys)[0]
    assert "--model llava-unknown: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in line
    assert "give a local checkpoint folder or a short name (toy-llava)" in line
    for variable in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert cli.main(run_args("someone/llava-unknown", *data, tmp_path / "out")) == 1
    line = error_lines(capsys)[0]
    assert "the hub cannot be reached" in line and "set HF_HUB_OFFLINE=1" in line and "local checkpoint folder" in line
    assert time.monotonic() - started < 10
    assert not (tmp_path / "out").exists()


@pytest.mark.xfail(
    "output_loading_info" not in inspect.getsource(models.load_model),
    strict=True,
    reason="needs flowlib.models.load_model to refuse missing or unexpected weights (requested)",
)
def test_a_checkpoint_whose_weights_do_not_match_its_config_is_refused(checkpoint, data, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 5  # the weights hold 3
    (broken / "config.json").write_text(json.dumps(config))
    assert cli.main(run_args(broken, *data, tmp_path / "out")) == 1
    line = error_lines(capsys)[0]
    assert str(broken) in line and "missing" in line and "layers.3" in line
    assert not (tmp_path / "out").exists()


# --- samples that cannot be analysed: excluded with the file named, the rest runs ----------------------------------


@pytest.fixture
def bad_images(disk_model, tmp_path):
    """q0 and q1 answerable; q2 a file that is no image, q3 another size than the CSV states, q4 too many pixels."""
    csv_dir, image_dir = tmp_path / "csv", tmp_path / "images"
    good = [query_row("q0", "img0"), query_row("q1", "img1")]
    write_image(image_dir, "img0", colour="red")
    write_image(image_dir, "img1", colour="blue")
    good = answer_as_model(disk_model, csv_dir, image_dir, good)
    (image_dir / "img2.jpg").write_bytes(b"not an image at all")
    write_image(image_dir, "img3", size=(200, 100))
    write_image(image_dir, "img4", size=(400, 300))
    write_task_csv(
        csv_dir,
        good + [query_row("q2", "img2"), query_row("q3", "img3"), query_row("q4", "img4", width=400, height=300)],
    )
    return csv_dir, image_dir


def test_bad_images_are_excluded_naming_the_file_and_the_rest_completes(
    checkpoint, bad_images, tmp_path, capsys, monkeypatch
):
    csv_dir, image_dir = bad_images
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # img4 (120,000 pixels) is then a decompression bomb
    out = tmp_path / "out"
    assert cli.main(run_args(checkpoint, csv_dir, image_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "2 samples analysed (0 answered wrongly, 0 zero base, 3 excluded)" in printed
    reasons = {s["question_id"]: s.get("reason", "") for s in load_statuses(out)}
    assert f"image file '{image_dir / 'img2.jpg'}' cannot be read" in reasons["q2"]
    assert f"image file '{image_dir / 'img3.jpg'}' is 200x100 but the data gives 160x120" in reasons["q3"]
    assert f"image file '{image_dir / 'img4.jpg'}' cannot be read" in reasons["q4"] and "decompression" in reasons["q4"]
    for qid in ("q2", "q3", "q4"):
        assert f"left out 1 x: {reasons[qid].split(': ', 1)[1]}" in printed
    assert set(pd.read_parquet(out / "results.parquet").question_id) == {"q0", "q1"}


def test_any_decoding_error_names_the_file(disk_model, tmp_path, monkeypatch):
    from flowlib import sample as sample_module

    path = write_image(tmp_path, "img0")
    real_open = sample_module.Image.open

    def broken_open(fp, *args, **kwargs):
        if str(fp) == str(path):
            raise struct.error("unpack requires a buffer of 4 bytes")  # as PIL raises on some damaged files
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(sample_module.Image, "open", broken_open)
    s = Sample("q0", "is the star red or blue?", "red", "QueryAttr", image=path)
    with pytest.raises(runner.NothingAnalysedError):
        runner.run_experiment(disk_model, [s], tmp_path / "run", flows=FLOWS, window=1, progress=False)
    [status] = load_statuses(tmp_path / "run")
    assert status["status"] == "excluded"
    assert f"image file '{path}' cannot be decoded (error: unpack" in status["reason"]


def test_strict_stops_at_the_first_bad_sample(checkpoint, bad_images, tmp_path, capsys):
    csv_dir, image_dir = bad_images
    out = tmp_path / "out"
    assert cli.main(run_args(checkpoint, csv_dir, image_dir, out, "--strict")) == 1
    first, hint = error_lines(capsys)
    assert f"sample q2: image file '{image_dir / 'img2.jpg'}' cannot be read" in first and "strict run" in first
    assert "without --strict such samples are recorded as excluded" in hint
    assert {s["question_id"] for s in load_statuses(out)} == {"q0", "q1"}


def test_nothing_answered_correctly_is_an_error_saying_so(checkpoint, disk_model, tmp_path, capsys):
    csv_dir, image_dir = make_paper_data(tmp_path, disk_model, colours=("red", "blue"), wrong=("q0", "q1"))
    assert cli.main(run_args(checkpoint, csv_dir, image_dir, tmp_path / "out")) == 1
    line = error_lines(capsys)[0]
    assert "no sample was analysed: the model answered none of the 2 samples it saw correctly" in line
    lens = data_args("lens", checkpoint, csv_dir, image_dir, tmp_path / "lens.parquet")
    assert cli.main(lens) == 1
    assert f"{checkpoint} answers none of the 2 samples correctly" in error_lines(capsys)[0]
    assert not (tmp_path / "lens.parquet").exists()


# --- resume, Ctrl-C, debug ------------------------------------------------------------------------------------------


def test_a_changed_csv_on_resume_is_refused_and_nothing_written(checkpoint, disk_model, tmp_path, capsys):
    csv_dir, image_dir = make_paper_data(tmp_path, disk_model)
    out = tmp_path / "out"
    assert cli.main(run_args(checkpoint, csv_dir, image_dir, out)) == 0
    before = snapshot(out)
    text = (csv_dir / CSV_NAME).read_text()
    (csv_dir / CSV_NAME).write_text(text.replace("is the star red or blue?", "is the star blue or red?", 1))
    assert cli.main(run_args(checkpoint, csv_dir, image_dir, out)) == 1
    line = error_lines(capsys)[0]
    assert f"{out} holds another run: sample q0 (QueryAttr, paper-csv:{CSV_NAME}): question:" in line
    assert "Nothing was written; use another output folder" in line
    assert snapshot(out) == before


def test_ctrl_c_says_where_the_run_stopped_and_the_same_command_resumes(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    whole = tmp_path / "whole"
    assert cli.main(run_args(checkpoint, *data, whole)) == 0
    real, calls = runner._analyse, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(runner, "_analyse", interrupted)
        assert cli.main(run_args(checkpoint, *data, out)) == 130
    line = error_lines(capsys)[0]
    assert (
        line == f"flowlib run: interrupted: 2 samples done (1 analysed) in {out}; run the same command again to "
        "resume from there"
    )
    assert cli.main(run_args(checkpoint, *data, out)) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), pd.read_parquet(whole / "results.parquet"))


def test_ctrl_c_before_the_run_says_nothing_was_written(checkpoint, data, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    assert cli.main(run_args(checkpoint, *data, tmp_path / "out")) == 130
    assert error_lines(capsys) == ["flowlib run: interrupted while loading the model; nothing was written"]
    assert read_run(tmp_path / "out") is None


def test_debug_shows_the_traceback_and_an_unexpected_error_asks_for_it(checkpoint, data, tmp_path, capsys, monkeypatch):
    with pytest.raises(run_plan.RunSettingsError, match="window 9"):
        cli.main(run_args(checkpoint, *data, tmp_path / "out", "--window", "9", "--debug"))

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(runner, "run_experiment", boom)
    assert cli.main(run_args(checkpoint, *data, tmp_path / "out")) == 1
    assert error_lines(capsys) == [
        "flowlib run: error: unexpected RuntimeError: boom",
        "  (this is a bug: rerun with --debug and report the traceback)",
    ]
