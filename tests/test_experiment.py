"""One experiment path: the notebooks' `Study` and `flowlib run` given the same settings resolve them the same
way, work in one run folder and reuse each other's rows."""

from __future__ import annotations

import pandas as pd
import pytest

from flowlib import cli, run_plan, runner
from flowlib.experiment import ExperimentSettings
from flowlib.flows import PAPER_FLOWS
from flowlib.study import Study
from tests.test_run_contract import FLOWS, make_paper_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, disk_model):
    # Study runs answer with up to 10 new tokens (the settings' default), so the data's answers are those.
    return make_paper_data(tmp_path_factory.mktemp("data"), disk_model, wrong=("q1",), max_new_tokens=10)


def notebook_parameters(checkpoint, csv_dir, image_dir) -> dict:
    """A notebook's parameters cell, as papermill would set it (WIDGETS is not a setting)."""
    return {
        "MODEL": str(checkpoint),
        "DATA": "paper",
        "CSV_DIR": str(csv_dir),
        "IMAGE_DIR": str(image_dir),
        "TASKS": ["QueryAttr"],
        "SAMPLES_PER_TASK": 2,
        "WINDOW": 1,
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "SEED": 0,
        "MAX_BATCH": None,
        "WIDGETS": False,
        "FLOWS": ["Image->Question"],  # a later cell's choice of what to plot, never a setting of the run
    }


def cli_args(checkpoint, csv_dir, image_dir, *extra) -> list[str]:
    """The command line equivalent to `notebook_parameters` (no --output: the settings name the folder)."""
    return [
        "run",
        *("--model", str(checkpoint), "--data", "paper", "--csv-dir", str(csv_dir), "--image-dir", str(image_dir)),
        *("--tasks", "QueryAttr", "--samples-per-task", "2", "--window", "1", "--quiet", *extra),
    ]


def test_the_notebook_and_the_command_line_build_equal_settings(checkpoint, data):
    from_notebook = ExperimentSettings.from_parameters(notebook_parameters(checkpoint, *data))
    from_cli = cli.settings_from_args(cli.build_parser().parse_args(cli_args(checkpoint, *data)))
    assert from_notebook == from_cli
    assert from_cli.flows == PAPER_FLOWS and from_cli.candidates == 5 and from_cli.max_batch is None
    # Study.open's keywords, its settings object, or both, are one and the same settings.
    by_keywords = ExperimentSettings.build(
        str(checkpoint),
        "paper",
        csv_dir=data[0],
        image_dir=data[1],
        tasks="QueryAttr",
        samples_per_task=2,
        window=1,
    )
    assert by_keywords == from_cli


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"samples_per_task": 0}, "samples_per_task must be a whole number >= 1"),
        ({"samples_per_task": 10, "candidates_per_task": 5}, r"candidates_per_task \(5\) must be at least"),
        ({"flows": ("Image->Question", "Image->Question")}, "flows must be one or more distinct flows"),
        ({"engine": "turbo"}, "unknown engine 'turbo'"),
        ({"data": "imagenet"}, "unknown data source 'imagenet'"),
        ({"tasks": ["Counting"]}, "unknown task 'Counting'"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ],
)
def test_bad_settings_are_refused_when_made(changes, message):
    with pytest.raises(run_plan.RunSettingsError, match=message):
        ExperimentSettings(**changes)
    with pytest.raises(TypeError, match="unknown setting.*windows.*the settings are: "):
        ExperimentSettings.build(windows=3)


@pytest.mark.parametrize("first", ["notebook", "command line"])
def test_a_notebook_and_the_command_line_share_one_run_folder(checkpoint, data, tmp_path, monkeypatch, capsys, first):
    """Whichever runs first, the other finds the same folder under runs/ and analyses nothing anew."""
    monkeypatch.setenv("FLOWLIB_RUNS", str(tmp_path / "runs"))
    parameters = notebook_parameters(checkpoint, *data)

    def notebook():
        study = Study.open(ExperimentSettings.from_parameters(parameters))
        return study.run_dir(), study.knockout(FLOWS, progress=False)

    def command_line():
        assert cli.main(cli_args(checkpoint, *data)) == 0
        (folder,) = [p.parent for p in (tmp_path / "runs").rglob("run.json")]
        return folder, pd.read_parquet(folder / "results.parquet")

    first_folder, first_table = notebook() if first == "notebook" else command_line()
    assert first_folder.is_relative_to(tmp_path / "runs") and first_folder.name.startswith("knockout-w1-")
    with monkeypatch.context() as patch:  # the second front door must find every sample done
        patch.setattr(runner, "_analyse", lambda *a, **k: pytest.fail("a sample was analysed anew"))
        second_folder, second_table = command_line() if first == "notebook" else notebook()
    assert second_folder == first_folder
    assert len(list((tmp_path / "runs").rglob("run.json"))) == 1
    whole = pd.read_parquet(first_folder / "results.parquet")
    assert set(whole.flow) <= set(PAPER_FLOWS) and set(whole.question_id) == {"q0", "q2"}  # q1 answered wrongly
    notebook_rows = first_table if first == "notebook" else second_table
    pd.testing.assert_frame_equal(notebook_rows, whole[whole.flow.isin(FLOWS)].reset_index(drop=True))
