"""Smoke test: every notebook runs through papermill with tiny parameters and writes its figures.

Also checks the notebooks are committed clean (no outputs) and thin (no function or class
definitions: logic lives in flowlib, where it is tested).
"""

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


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_writes_its_figures(notebook, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("FLOWLIB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("FLOWLIB_RUNS", str(tmp_path / "runs"))
    papermill.execute_notebook(
        str(notebook),
        str(tmp_path / notebook.name),
        parameters={"TASKS": ["ChooseAttr", "QueryAttr"], "SAMPLES_PER_TASK": 2, "WIDGETS": False},
        kernel_name="python3",  # ipykernel's native kernel: this very interpreter
        execution_timeout=600,  # a cell that hangs fails the test instead of stalling CI (cells take seconds)
        cwd=str(notebook.parent),
        progress_bar=False,
    )
    for name in FIGURES[notebook.stem]:
        for ext in ("png", "pdf", "csv"):
            assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 0
        numbers = pd.read_csv(tmp_path / "figures" / f"{name}.csv")
        assert len(numbers) > 0
        if "task" in numbers:
            assert set(numbers["task"]) <= {"ChooseAttr", "QueryAttr"}
