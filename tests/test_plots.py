"""Figures: the plotted numbers are what the table says, and files are written whole and stably."""

import numpy as np
import pandas as pd
import pytest

from flowlib.plots import plot_flow_curves, plot_layout_overlay, save_figure, summarise_curves


def _table():
    rng = np.random.default_rng(0)
    rows = []
    for task in ("ChooseAttr", "QueryAttr"):
        for flow in ("Image->Question", "Question->Last"):
            for qid in range(5):
                for layer in range(4):
                    rows.append(
                        dict(
                            task=task,
                            flow=flow,
                            question_id=str(qid),
                            layer=layer,
                            relative_change=float(rng.normal(-10 * layer, 3)),
                        )
                    )
    return pd.DataFrame(rows)


def test_summary_has_mean_and_95_band():
    table = _table()
    summary = summarise_curves(table)
    one = table[(table.task == "QueryAttr") & (table.flow == "Question->Last") & (table.layer == 2)]
    row = summary[(summary.task == "QueryAttr") & (summary.flow == "Question->Last") & (summary.layer == 2)].iloc[0]
    assert row["n"] == 5
    assert row["mean"] == pytest.approx(one.relative_change.mean())
    half = 1.96 * one.relative_change.std() / np.sqrt(5)
    assert row["high"] - row["mean"] == pytest.approx(half) and row["mean"] - row["low"] == pytest.approx(half)


def test_save_figure_writes_png_pdf_and_numbers(tmp_path):
    summary = summarise_curves(_table())
    fig = plot_flow_curves(summary, "test model on test data")
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_visible()][0] == "Change in probability (%)"
    paths = save_figure(fig, "curves", summary, directory=tmp_path, caption="toy")
    assert {p.suffix for p in paths.values()} == {".png", ".pdf", ".csv"}
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and paths["pdf"].read_bytes()[:4] == b"%PDF"
    back = pd.read_csv(paths["csv"])
    assert np.allclose(back["mean"], summary["mean"], atol=1e-9, rtol=0)
    first_pdf = paths["pdf"].read_bytes()
    save_figure(
        plot_flow_curves(summary, "test model on test data"), "curves", summary, directory=tmp_path, caption="toy"
    )
    assert paths["pdf"].read_bytes() == first_pdf, "no timestamps: regenerating gives identical files"


def test_overlay_highlights_exactly_the_related_patches(tiny15):
    from tests.conftest import make_sample

    prepared = tiny15.prepare(make_sample())
    ax = plot_layout_overlay(prepared, tiny15.processor.image_processor)
    highlighted = [p for p in ax.patches if p.get_fill()]
    assert len(highlighted) == len(prepared.layout.related_image_patches) > 0
