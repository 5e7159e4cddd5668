"""Widget callbacks recompute and redraw without a browser; bad input gives a message, not a traceback."""

import dataclasses

import numpy as np
import pandas as pd
import torch

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


def prepared_examples(loaded, count=2, task="ChooseAttr"):
    return [loaded.prepare(make_sample(seed=s, task=task, question_id=f"{task}-{s}")) for s in range(count)]


def test_the_window_slider_recomputes_once_per_release_not_per_step(tiny15):
    threads = torch.get_num_threads()
    explorer = FlowExplorer.live(tiny15, {"ChooseAttr": prepared_examples(tiny15)}, flows=["Image->Question"], window=1)
    assert explorer.window.continuous_update is False and explorer.sample.value == -1
    explorer.window.value = 3
    assert explorer.draws == 2 and explorer.seconds > 0 and "draw 2" in explorer.status.value
    assert torch.get_num_threads() == threads  # one thread while sweeping, the caller's setting after


def test_a_task_change_redraws_once_and_the_mean_and_a_seen_sample_come_from_the_cache(tiny15):
    prepared = {"ChooseAttr": prepared_examples(tiny15), "QueryAttr": prepared_examples(tiny15, task="QueryAttr")}
    explorer = FlowExplorer.live(tiny15, prepared, flows=["Image->Question"], window=1)
    explorer.sample.value = 1
    explorer.task.value = "QueryAttr"
    assert explorer.draws == 3 and explorer.sample.value == -1 and set(explorer.current["task"]) == {"QueryAttr"}
    explorer.task.value = "ChooseAttr"  # both samples of ChooseAttr were swept at window 1: nothing recomputed
    assert explorer.seconds < 1.0


def test_the_overlay_marks_exactly_the_related_patches_of_the_chosen_sample(tiny15):
    prepared = {"ChooseAttr": prepared_examples(tiny15, count=3)}
    explorer = FlowExplorer.live(tiny15, prepared, flows=["Image->Question"], window=1)
    fig = explorer._overlay("ChooseAttr", 1)
    (ax,) = fig.axes
    purple = [p for p in ax.patches if p.get_fill()]
    assert len(purple) == len(prepared["ChooseAttr"][1].layout.related_image_patches) > 0
    assert len(explorer._overlay("ChooseAttr", -1).axes) == 3  # the mean: every sample side by side
    drawn, overlay = [], explorer._overlay
    explorer._overlay = lambda task, index: drawn.append(index) or overlay(task, index)
    explorer.sample.value = 2
    explorer.window.value = 3  # the overlay depends on the sample only: a window move leaves it
    assert drawn == [2]


def test_a_window_larger_than_the_model_says_so_and_shows_the_largest(tiny15):
    explorer = FlowExplorer.live(tiny15, {"ChooseAttr": prepared_examples(tiny15)}, flows=["Image->Question"], window=9)
    assert f"window 9 does not fit {tiny15.name}'s 4 layers" in explorer.message_text
    assert explorer.window.value == 3 and explorer.current is not None
    explorer.window.value = 1  # the other controls keep working; the note was said once
    assert explorer.draws == 2 and explorer.message_text.count("does not fit") == 0


def test_a_task_without_correct_samples_says_so_and_the_others_keep_working(tiny15):
    prepared = {"ChooseAttr": prepared_examples(tiny15), "ChooseRel": []}
    explorer = FlowExplorer.live(tiny15, prepared, flows=["Image->Question", "Question->Last"], window=1)
    explorer.task.value = "ChooseRel"
    assert explorer.current is None and "ChooseRel has no correctly answered samples" in explorer.message_text
    assert explorer.sample.options == (("mean over samples", -1),)
    explorer.flow.value = "Question->Last"  # still a message, never a traceback
    assert explorer.current is None
    explorer.task.value = "ChooseAttr"
    assert explorer.current is not None and set(explorer.current["flow"]) == {"Question->Last"}
    assert "no correctly answered" not in explorer.message_text


def test_a_failing_recompute_is_a_message_not_a_traceback():
    def compute(task, flow, window, index):
        if flow == "B->C":
            raise RuntimeError("out of memory")
        return pd.DataFrame({"task": task, "flow": flow, "layer": [0, 1], "relative_change": [1.0, 2.0]})

    explorer = FlowExplorer(
        flows=["A->C", "B->C"],
        tasks=["ChooseAttr"],
        windows=[1],
        window=1,
        samples_per_task={"ChooseAttr": 1},
        title="t",
        compute=compute,
    )
    explorer.flow.value = "B->C"
    assert explorer.current is None and "RuntimeError: out of memory" in explorer.message_text
    explorer.flow.value = "A->C"
    assert explorer.current["mean"].tolist() == [1.0, 2.0] and explorer.message_text.count("memory") == 0


def test_a_stored_run_without_the_chosen_flow_says_so_and_the_others_keep_working(tiny15, tmp_path):
    from flowlib.answers import greedy_answer
    from flowlib.runner import run_experiment

    samples = []
    for s in range(2):
        sample = make_sample(seed=s, question_id=f"q{s}")
        samples.append(dataclasses.replace(sample, answer=greedy_answer(tiny15, tiny15.prepare(sample), 3)))
    run_experiment(
        tiny15, samples, tmp_path / "run", flows=["Image->Question"], window=1, max_new_tokens=3, progress=False
    )
    explorer = FlowExplorer.from_run(tmp_path / "run", flows=["Image->Question", "Question->Last"])
    assert explorer.current is not None and explorer.current["n"].max() == 2
    assert explorer._overlay is None  # stored results: no model inputs, no overlay
    explorer.flow.value = "Question->Last"
    assert explorer.current is None and "no results for Question->Last" in explorer.message_text
    explorer.sample.value = 1
    assert explorer.current is None
    explorer.flow.value = "Image->Question"
    assert explorer.current["n"].max() == 1 and "no results" not in explorer.message_text


def test_a_stored_table_without_the_asked_window_names_the_windows_it_holds():
    rows = [
        dict(task="ChooseAttr", flow="A->C", window=3, question_id="1", layer=l, model="m", relative_change=1.0)
        for l in range(3)
    ]
    explorer = FlowExplorer.stored(pd.DataFrame(rows), window=7)
    assert "no window 7; it holds 3" in explorer.message_text and explorer.window.value == 3


def test_sample_browser_says_when_a_task_has_no_samples(tiny15):
    prepared = {"ChooseAttr": prepared_examples(tiny15), "ChooseRel": []}
    browser = SampleBrowser(prepared, tiny15.processor.image_processor)
    assert browser.sample.continuous_update is False
    browser.task.value = "ChooseRel"
    assert "ChooseRel has no correctly answered samples" in browser.message.value
    browser.task.value = "ChooseAttr"
    assert browser.message.value == "" and browser.refresh() is prepared["ChooseAttr"][0]
