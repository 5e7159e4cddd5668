"""Study: the notebooks' shared state, here on the offline model (loads in seconds)."""

import pandas as pd
import pytest

from flowlib import evaluate as evaluate_module
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
    rows = [
        dict(
            task="ChooseAttr",
            flow="Image->Question",
            window=3,
            question_id=str(q),
            layer=layer,
            model="m",
            relative_change=float(10 * layer + q),
        )
        for q in (1, 3)
        for layer in range(4)
    ]
    explorer = study.explorer(["Image->Question"], pd.DataFrame(rows))
    assert explorer.current["mean"].tolist() == [2.0, 12.0, 22.0, 32.0]


def test_score_by_answer_splits_each_task_by_its_correct_answer():
    from flowlib.evaluate import answer_verdicts, score_by_answer
    from flowlib.sample import Sample

    def sample(i, task, answer):
        return Sample(f"q{i}", "is there either a star or a circle that is red?", answer, task, image=None)

    samples = [
        sample(0, "LogicalObj", "yes"),
        sample(1, "LogicalObj", "No"),
        sample(2, "LogicalObj", "no"),
        sample(3, "ChooseAttr", "red"),
    ]
    rows = score_by_answer(samples, answer_verdicts(samples, ["yes", "yes", "No ", "blue"]))
    assert rows == [
        {"task": "ChooseAttr", "answer": "red", "n": 1, "correct": 0, "accuracy": 0.0},
        {"task": "LogicalObj", "answer": "no", "n": 2, "correct": 1, "accuracy": 0.5},
        {"task": "LogicalObj", "answer": "yes", "n": 1, "correct": 1, "accuracy": 1.0},
    ]


def test_accuracy_counts_what_the_knockout_filter_keeps_generating_each_answer_once(study, monkeypatch):
    from flowlib import answers

    study.verdicts.clear()
    study.blank_verdicts.clear()
    by_task = study.accuracy().set_index("task")
    assert list(by_task.columns) == ["n", "correct", "accuracy", "blank_accuracy", "chance"]
    # The correct counts are the filter's, run afresh on the same samples.
    kept = [s.task for s in answers.correct_samples(study.loaded, study.all_samples(), progress=False)]
    assert by_task["correct"].to_dict() == {task: kept.count(task) for task in by_task.index}
    assert (by_task["accuracy"] == by_task["correct"] / by_task["n"]).all()
    by_answer = study.accuracy_by_answer()
    assert set(by_answer["task"]) == set(by_task.index)
    for task, rows in by_answer.groupby("task"):
        assert rows["n"].sum() == by_task.loc[task, "n"] and rows["correct"].sum() == by_task.loc[task, "correct"]
    # Every answer, with the image or blank, was generated once: no later table or filter generates again.
    monkeypatch.setattr(answers, "greedy_answer", lambda *a, **k: pytest.fail("an answer generated twice"))
    monkeypatch.setattr(evaluate_module, "greedy_answer", lambda *a, **k: pytest.fail("an answer generated twice"))
    assert study.accuracy_by_answer().equals(by_answer)
    assert study.accuracy().equals(by_task.reset_index())
    assert sum(len(samples) for samples in study.correct(per_task=100).values()) == by_task["correct"].sum()
