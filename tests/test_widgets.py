"""Widget callbacks recompute and redraw without a browser."""

import numpy as np
import pandas as pd

from flowlib.widgets import FlowExplorer, SampleBrowser
from tests.conftest import make_sample


def test_live_explorer_recomputes_when_window_or_flow_changes(tiny15):
    prepared = {"ChooseAttr": [tiny15.prepare(make_sample(seed=s)) for s in range(2)]}
    explorer = FlowExplorer.live(tiny15, prepared, flows=["Image->Question", "Question->Last"], window=1)
    first = explorer.current.copy()
    assert explorer.draws == 1 and len(first) == tiny15.num_layers
    explorer.window.value = 3
    assert explorer.draws == 2
    assert not np.allclose(explorer.current["mean"], first["mean"])
    explorer.flow.value = "Question->Last"
    assert explorer.draws == 3 and set(explorer.current["flow"]) == {"Question->Last"}
    explorer.sample.value = 1
    assert explorer.current["n"].max() == 1


def test_stored_explorer_rereads_the_table():
    rows = [
        dict(
            task="ChooseAttr",
            flow=f,
            window=w,
            question_id=q,
            layer=l,
            model="m",
            relative_change=float(l * w * (2 if f == "B->C" else 1) + int(q)),
        )
        for f in ("A->C", "B->C")
        for w in (1, 3)
        for q in ("1", "2")
        for l in range(3)
    ]
    explorer = FlowExplorer.stored(pd.DataFrame(rows))
    assert explorer.current["mean"].tolist() == [1.5, 2.5, 3.5]
    explorer.window.value = 3
    assert explorer.current["mean"].tolist() == [1.5, 4.5, 7.5]
    explorer.flow.value = "B->C"
    assert explorer.current["mean"].tolist() == [1.5, 7.5, 13.5] and explorer.draws == 3


def test_sample_browser_redraws(tiny15):
    prepared = {"ChooseAttr": [tiny15.prepare(make_sample(seed=s)) for s in range(2)]}
    browser = SampleBrowser(prepared, tiny15.processor.image_processor)
    assert browser.refresh() is prepared["ChooseAttr"][0]
    browser.sample.value = 1
    assert browser.draws == 3
