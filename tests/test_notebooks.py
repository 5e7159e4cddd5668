"""Smoke test: every notebook runs through papermill with tiny parameters and writes its figures.

Also checks the notebooks are committed clean (no outputs) and thin (no function or class
definitions: logic lives in flowlib, where it is tested).
"""

import base64
import json
from pathlib import Path

import pandas as pd
import pytest
from papermill.translators import PythonTranslator

from flowlib.notebook_check import dirty_cells

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURES = {
    "00_model_and_data": ["00_accuracy", "00_token_groups"],
    "01_general_image_flow": ["01_image_to_question"],
    "02_object_specific_flow": ["02_related_vs_other_patches"],
    "03_last_position": ["03_last_position", "03_answer_lens", "03_answer_lens_raw"],
    "04_controls_and_variants": ["04_flow_vs_control", "04_window_variants", "04_scores_and_modes"],
}


def test_every_finding_has_its_notebook():
    assert [nb.stem for nb in NOTEBOOKS] == list(FIGURES)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_thin(notebook):
    assert dirty_cells(str(notebook)) == []
    cells = json.loads(notebook.read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown" and "Figures:" in "".join(cells[0]["source"])
    assert "parameters" in cells[1]["metadata"].get("tags", [])
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert not any(line.lstrip().startswith(("def ", "class ")) for src in code for line in src.splitlines())
    # Batch runs pass WIDGETS=False: papermill can deadlock on a cell that opens widgets (nbclient #312).
    assert "WIDGETS = True" in "".join(cells[1]["source"]) and code[-1].endswith("if WIDGETS else None")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(notebook):
    # `papermill --help-notebook` lists what it can parse; a comment holding `=` hides its line.
    source = "".join(json.loads(notebook.read_text())["cells"][1]["source"])
    assigned = [line.split("=")[0].strip() for line in source.splitlines() if line[:1].isupper() and " = " in line]
    assert [p.name for p in PythonTranslator.inspect({"source": source})] == assigned


def run_notebook(notebook, output, parameters):
    import papermill

    return papermill.execute_notebook(
        str(notebook),
        str(output),
        parameters={**parameters, "WIDGETS": False},
        kernel_name="python3",  # ipykernel's native kernel: this very interpreter
        execution_timeout=600,  # a cell that hangs fails the test instead of stalling CI (cells take seconds)
        cwd=str(notebook.parent),
        progress_bar=False,
    )


def snapshot(folder):
    return {
        p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava-1.5", "llava-next"])
def test_every_notebook_runs_shows_and_writes_its_figures_from_one_shared_run(family, tmp_path, monkeypatch, request):
    pytest.importorskip("papermill")
    model = "toy-llava" if family == "llava-1.5" else request.getfixturevalue("next_checkpoint")
    monkeypatch.setenv("FLOWLIB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("FLOWLIB_RUNS", str(tmp_path / "runs"))
    parameters = {"MODEL": model, "TASKS": ["ChooseAttr", "QueryAttr"], "SAMPLES_PER_TASK": 2}
    for notebook in NOTEBOOKS:
        executed = run_notebook(notebook, tmp_path / notebook.name, parameters)
        for name in FIGURES[notebook.stem]:
            for ext in ("png", "pdf", "csv"):
                assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 0
            numbers = pd.read_csv(tmp_path / "figures" / f"{name}.csv")
            assert len(numbers) > 0
            if "task" in numbers:
                assert set(numbers["task"]) <= {"ChooseAttr", "QueryAttr"}
        # The notebook shows every figure it saves, as the very image it wrote.
        outputs = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
        shown = [
            base64.b64decode(output["data"]["image/png"]) for output in outputs if "image/png" in output.get("data", {})
        ]
        assert shown == [(tmp_path / "figures" / f"{name}.png").read_bytes() for name in FIGURES[notebook.stem]]
        verdicts = [output["data"]["text/markdown"] for output in outputs if "text/markdown" in output.get("data", {})]
        assert len(verdicts) == {"00": 0, "01": 1, "02": 1, "03": 2, "04": 1}[notebook.stem[:2]]
        assert all(v.startswith("**Finding") for v in verdicts)
    # Notebooks 01-03 shared one knockout run (one answer filter and clean pass per sample) ...
    (run,) = (tmp_path / "runs").rglob("run.json")
    accuracy = pd.read_csv(tmp_path / "figures" / "00_accuracy.csv")
    assert set(accuracy.columns) >= {"n", "correct", "accuracy", "blank_accuracy"}
    # ... and a rerun with nothing changed resumes it: not a byte of it is rewritten but the merged table.
    before = snapshot(run.parent)
    run_notebook(NOTEBOOKS[1], tmp_path / "again.ipynb", parameters)
    after = snapshot(run.parent)
    assert {k for k in after if after[k] != before.get(k)} <= {Path("results.parquet"), Path("summary.json")}
