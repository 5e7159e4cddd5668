"""The check that the committed figures' numbers equal what `make figures` writes."""

import subprocess

import pandas as pd

from flowlib import config as cfg
from flowlib.figure_check import compare, main

COMMITTED = "01_image_to_question.csv"


def test_numbers_within_the_tolerance_pass_and_larger_differences_fail():
    table = pd.DataFrame({"task": ["ChooseAttr", "ChooseRel"], "layer": [0, 1], "mean": [-12.5, 3.25]})
    assert compare(table, table.copy(), 1e-6) == (0.0, "")
    nudged = table.assign(mean=table["mean"] + [5e-7, -2e-7])
    largest, problem = compare(nudged, table, 1e-6)
    assert abs(largest - 5e-7) < 1e-12 and problem == ""
    largest, problem = compare(table.assign(mean=[-12.5, 3.5]), table, 1e-6)
    assert largest == 0.25 and problem == "differs by 0.25 > 1e-06"


def test_text_columns_rows_and_missing_values_must_match_exactly():
    table = pd.DataFrame({"task": ["ChooseAttr", "ChooseRel"], "mean": [1.0, float("nan")]})
    assert compare(table.assign(task=["ChooseAttr", "ChooseCat"]), table, 1e-6)[1] == "column 'task' differs"
    assert compare(table.iloc[:1], table, 1e-6)[1] == "1 rows != committed 2"
    assert compare(table.assign(mean=[1.0, 2.0]), table, 1e-6)[1] == "missing values differ"
    assert compare(table.rename(columns={"mean": "avg"}), table, 1e-6)[1].startswith("columns ['task', 'avg']")


def test_the_command_compares_a_folder_with_the_committed_figures(tmp_path, capsys):
    # the committed bytes, not the working tree's: a `make figures` not yet committed must not fail this test
    (tmp_path / COMMITTED).write_bytes(
        subprocess.run(
            ["git", "show", f"HEAD:figures/{COMMITTED}"], check=True, cwd=cfg.PROJECT_DIR, capture_output=True
        ).stdout
    )
    assert main(["--figures", str(tmp_path)]) == 0
    assert f"{COMMITTED}: max |difference| 0  ok" in capsys.readouterr().out

    drifted = pd.read_csv(tmp_path / COMMITTED)
    drifted.loc[3, "mean"] += 1e-3
    drifted.to_csv(tmp_path / COMMITTED, index=False)
    assert main(["--figures", str(tmp_path)]) == 1
    assert "FAIL: differs by 0.001 > 1e-06" in capsys.readouterr().out

    (tmp_path / COMMITTED).unlink()
    pd.DataFrame({"layer": [0]}).to_csv(tmp_path / "99_new.csv", index=False)
    assert main(["--figures", str(tmp_path)]) == 1
    assert "99_new.csv: max |difference| nan  FAIL: not committed at HEAD" in capsys.readouterr().out


def test_an_empty_folder_says_to_run_make_figures(tmp_path, capsys):
    assert main(["--figures", str(tmp_path)]) == 1
    assert "run `make figures` first" in capsys.readouterr().out
