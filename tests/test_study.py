"""Study: the notebooks' shared state, here on the offline model (loads in seconds)."""

import pandas as pd
import pytest

from flowlib import study as study_module
from flowlib.study import Study


@pytest.fixture(scope="module")
def study():
    return Study.open(tasks="ChooseAttr,QueryAttr", samples_per_task=2)


def test_open_reads_the_tasks_and_scales_the_window(study):
    assert list(study.samples) == ["ChooseAttr", "QueryAttr"] and study.window == 3  # 12 layers
    assert "offline toy model, not the paper's" in study.label


def test_explorer_is_live_on_a_small_model(study):
    explorer = study.explorer(["Image->Question", "Image->Last"], per_task=1)
    assert explorer.draws == 1 and set(explorer.current["flow"]) == {"Image->Question"}
    assert len(explorer.current) == study.loaded.num_layers
    explorer.flow.value = "Image->Last"
    assert explorer.draws == 2 and set(explorer.current["flow"]) == {"Image->Last"}


def test_explorer_rereads_the_stored_table_on_a_large_model(study, monkeypatch):
    monkeypatch.setattr(study_module, "LIVE_EXPLORER_MAX_PARAMETERS", 1_000)
    rows = [dict(task="ChooseAttr", flow="Image->Question", window=3, question_id=str(q), layer=layer, model="m",
                 relative_change=float(10 * layer + q)) for q in (1, 3) for layer in range(4)]
    explorer = study.explorer(["Image->Question"], pd.DataFrame(rows))
    assert explorer.current["mean"].tolist() == [2.0, 12.0, 22.0, 32.0]
