"""Verdicts on the paper's findings, from curve summaries built to meet or miss each rule."""

import pandas as pd
import pytest

from flowlib import verdicts


def curves(shapes: dict, num_layers: int = 12) -> pd.DataFrame:
    """A summary table: (task, flow) -> (layer of the largest drop, its size in percent)."""
    rows = []
    for (task, flow), (layer, drop) in shapes.items():
        for l in range(num_layers):
            rows.append({"task": task, "flow": flow, "layer": l, "mean": -drop if l == layer else -0.5, "n": 10})
    return pd.DataFrame(rows)


def test_image_to_question_needs_a_real_drop_in_the_lower_third():
    summary = curves(
        {("A", "Image->Question"): (1, 40.0), ("B", "Image->Question"): (6, 40.0), ("C", "Image->Question"): (0, 2.0)}
    )
    verdict = verdicts.image_to_question(summary, 12)
    assert verdict.tasks_meeting == ["A"] and verdict.supported == "partly"
    assert "no drop over 5%" in verdict.per_task["C"][1] and "middle third" in verdict.per_task["B"][1]
    assert verdicts.image_to_question(summary[summary.task == "A"], 12).supported == "supported"
    assert verdicts.image_to_question(summary[summary.task == "B"], 12).supported == "not supported"
    assert "PARTLY (1 of 3 tasks)" in str(verdict) and "| A | yes |" in verdict._repr_markdown_()


def test_related_in_the_middle_other_in_the_lower_layers():
    related, other = "Related Image Patches->Question", "Other Image Patches->Question"
    summary = curves(
        {("A", related): (5, 20.0), ("A", other): (1, 30.0), ("B", related): (1, 20.0), ("B", other): (1, 30.0)}
    )
    assert verdicts.related_vs_other(summary, 12).tasks_meeting == ["A"]


def test_last_position_wants_the_question_late_and_the_image_and_itself_small():
    def shapes(task, question, image):
        return {(task, "Question->Last"): question, (task, "Image->Last"): image, (task, "Last->Last"): (3, 1.0)}

    good, image_matters, early = (
        shapes("A", (7, 90.0), (2, 10.0)),
        shapes("B", (7, 90.0), (2, 99.0)),
        shapes("C", (1, 90.0), (2, 10.0)),
    )
    assert verdicts.last_position(curves({**good, **image_matters, **early}), 12).tasks_meeting == ["A"]


def test_answer_lens_lowercase_must_appear_first():
    rows = []
    cases = (("A", [0, 0.1, 0.2, 0.1], [0, 0, 0.3, 0.9]), ("B", [0, 0, 0.01, 0.02], [0.1, 0.2, 0.5, 0.9]))
    for task, lower, upper in cases:
        for form, probs in (("answer", lower), ("Answer", upper)):
            rows += [{"task": task, "form": form, "layer": l, "mean": p} for l, p in enumerate(probs)]
    verdict = verdicts.answer_lens(pd.DataFrame(rows))
    assert verdict.tasks_meeting == ["A"]
    assert verdict.per_task["B"][1].startswith("lowercase never reaches 0.05")


@pytest.mark.parametrize(
    "layer, third", [(0, "lower"), (3, "lower"), (4, "middle"), (7, "middle"), (8, "upper"), (11, "upper")]
)
def test_thirds_of_twelve_layers(layer, third):
    assert verdicts.third(layer, 12) == third
