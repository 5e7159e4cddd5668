"""The notebooks in JupyterLab, in headless Chromium: run all cells, see every figure, turn the explorers.

For each numbered notebook: open it in JupyterLab, run all cells with the widgets on (the notebooks'
default) on the offline model, then check the rendered page: every cell ran, no error output, every
figure the notebook saved is shown as that very image, the explorer's controls are there. In the
explorers of notebooks 01-03: drag the window slider three times, change the flow, the task and the
sample, and check that each redraws the plot with other content within `REDRAW_LIMIT_S`; a slider drag
over several steps recomputes once (the slider sends its value on release). A stored run without the
chosen flow says so in the widget, and the other controls keep working.

Screenshots of each notebook and explorer state, the measured times (`timings.json`) and JupyterLab's
log go to build/browser/.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time

import nbformat
import pytest

from tests.browser.conftest import NOTEBOOKS, SHOTS
from tests.browser.lab import CELL_OUTPUTS, open_notebook, png_sources, run_all_cells, screenshot_whole_notebook
from tests.test_notebooks import FIGURES

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: A notebook's cells must all finish within this (about 40 s each here with the tier's parameters).
RUN_TIMEOUT_S = 600
#: Each redraw must show within this after the control is released (on two busy cores; typical: ~1 s).
REDRAW_LIMIT_S = 10
#: The median redraw after a window-slider move, the explorer's promise of "about a second" with slack
#: for a shared two-core machine.
MEDIAN_LIMIT_S = 2.5
EXPLORER = ".flowlib-explorer"
STATUS = re.compile(r"draw (\d+) in ([\d.]+) s")
TIMINGS: dict[str, dict] = {}
#: The explorer's own measure of each redraw (recompute and plot, in the kernel), in the order made.
KERNEL_SECONDS: list[float] = []


@pytest.fixture(scope="module", autouse=True)
def write_timings():
    yield
    if not TIMINGS:  # the tier was skipped
        return
    slider = [t for timings in TIMINGS.values() for what, t in timings.items() if what.startswith("window")]
    summary = {"redraw_seconds": TIMINGS, "kernel_seconds": KERNEL_SECONDS}
    if slider:
        summary["median_slider_redraw_seconds"] = statistics.median(slider)
    (SHOTS / "timings.json").write_text(json.dumps(summary, indent=2))


def src(page, selector: str) -> str | None:
    return page.evaluate("s => { const i = document.querySelector(s); return i && i.getAttribute('src'); }", selector)


def draws(page) -> int:
    match = STATUS.search(page.inner_text(f"{EXPLORER} .flowlib-status") or "")
    return int(match.group(1)) if match else 0


REDRAWN = """([selector, before, statusSelector, draws]) => {
    const img = document.querySelector(selector);
    const status = document.querySelector(statusSelector);
    const match = status && status.textContent.match(/draw (\\d+) in/);
    return img && img.complete && img.naturalWidth > 0 && img.getAttribute('src') !== before
        && match && Number(match[1]) >= draws;
}"""


def redraw_seconds(page, act, part: str = "plot") -> float:
    """Do `act` (which returns the moment the control was released); the seconds until the new plot shows."""
    selector = f"{EXPLORER} .flowlib-{part} img"
    before, count = src(page, selector), draws(page)
    released = act()
    page.wait_for_function(
        REDRAWN,
        arg=[selector, before, f"{EXPLORER} .flowlib-status", count + 1],
        timeout=REDRAW_LIMIT_S * 1000,
        polling="raf",
    )
    seconds = time.monotonic() - released
    assert src(page, selector) != before  # other content: the image bytes changed
    KERNEL_SECONDS.append(float(STATUS.search(page.inner_text(f"{EXPLORER} .flowlib-status")).group(2)))
    return seconds


def drag_window_slider(page, index: int):
    """Drag the window slider's handle over several steps to option `index`, as a person would."""
    slider = f"{EXPLORER} .flowlib-window"
    handle = page.locator(f"{slider} .noUi-handle")
    count = int(float(handle.get_attribute("aria-valuemax"))) + 1
    track, grip = page.locator(f"{slider} .noUi-target").bounding_box(), handle.bounding_box()
    y = grip["y"] + grip["height"] / 2
    page.mouse.move(grip["x"] + grip["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * index / (count - 1), y, steps=15)
    released = time.monotonic()
    page.mouse.up()
    return released


def select(page, part: str, index: int):
    def act():
        released = time.monotonic()
        page.locator(f"{EXPLORER} .flowlib-{part} select").select_option(index=index)
        return released

    return act


def written_figures(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} if folder.is_dir() else {}


def check_notebook_page(page, notebook, browser_work, before: dict):
    """Every cell ran without an error, and every figure the notebook saved (`before`: the figure folder's
    PNGs and times before it ran) is shown as that very image."""
    cells = page.evaluate(CELL_OUTPUTS)
    assert [c["index"] for c in cells if c["count"] is None] == [], "cells that did not run"
    outputs = [o for c in cells for o in c["outputs"]]
    errors = [f"{o['ename']}: {o['evalue']}" for o in outputs if o["output_type"] == "error"]
    assert errors == []
    tracebacks = [o["text"] for o in outputs if o.get("name") == "stderr" and "Traceback" in o["text"]]
    assert tracebacks == []
    for broken in ("Error displaying widget", "Error rendering output", "Failed to load model class"):
        assert page.get_by_text(broken).count() == 0, broken
    shown = png_sources(page, ".jp-Cell-outputArea .jp-OutputArea-output[data-mime-type='image/png'] img")
    figures = browser_work / "figures"
    saved = sorted(name for name, time in written_figures(figures).items() if before.get(name) != time)
    assert set(saved) >= {f"{name}.png" for name in FIGURES[notebook.stem]}
    for name in saved:
        assert (figures / name).read_bytes() in shown, f"{name} is saved but not shown"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_shows_its_figures_and_explorer(page, lab, browser_work, notebook):
    open_notebook(page, lab, notebook.name)
    before = written_figures(browser_work / "figures")
    TIMINGS.setdefault(notebook.stem, {})["run_all_cells"] = run_all_cells(page, RUN_TIMEOUT_S)
    root = EXPLORER if notebook.stem != "00_model_and_data" else ".flowlib-sample-browser"
    page.locator(f"{root} img").first.wait_for(state="attached", timeout=60_000)
    screenshot_whole_notebook(
        page, SHOTS / f"{notebook.stem}.png", check=lambda: check_notebook_page(page, notebook, browser_work, before)
    )
    if root != EXPLORER:
        assert page.locator(f"{root} select").count() == 1 and page.locator(f"{root} .noUi-handle").count() == 1
        return
    for part in ("window .noUi-handle", "flow select", "task select", "sample select", "plot img", "overlay img"):
        assert page.locator(f"{EXPLORER} .flowlib-{part}").count() == 1, part
    page.locator(EXPLORER).scroll_into_view_if_needed()
    timings = TIMINGS[notebook.stem]
    readout = page.locator(f"{EXPLORER} .flowlib-window .widget-readout")
    for step, index in enumerate((3, 5, 0)):  # windows 7, 11, 1 of 1, 3, ..., 11: each one a fresh sweep
        before = draws(page)
        timings[f"window_move_{step + 1}"] = redraw_seconds(page, lambda i=index: drag_window_slider(page, i))
        assert readout.inner_text().strip() == str(2 * index + 1)
        page.wait_for_timeout(1000)  # a drag over several steps recomputed once, and nothing more is queued
        assert draws(page) == before + 1
        page.locator(EXPLORER).screenshot(path=SHOTS / f"{notebook.stem}_explorer_{step + 1}_window.png")
    for step, (part, index) in enumerate((("flow", 1), ("task", 1), ("sample", 1)), start=4):
        overlay = src(page, f"{EXPLORER} .flowlib-overlay img")
        timings[part] = redraw_seconds(page, select(page, part, index))
        if part in ("task", "sample"):  # the overlay follows the sample: its related patches
            page.wait_for_function(
                "([s, b]) => { const i = document.querySelector(s); return i && i.getAttribute('src') !== b; }",
                arg=[f"{EXPLORER} .flowlib-overlay img", overlay],
                timeout=REDRAW_LIMIT_S * 1000,
            )
        page.locator(EXPLORER).screenshot(path=SHOTS / f"{notebook.stem}_explorer_{step}_{part}.png")
    assert max(timings[k] for k in timings if k != "run_all_cells") < REDRAW_LIMIT_S
    assert statistics.median(timings[f"window_move_{i}"] for i in (1, 2, 3)) < MEDIAN_LIMIT_S, timings


STORED_CELLS = [
    "import sys\nfrom flowlib.widgets import FlowExplorer\n\nRUN = {run!r}",
    'explorer = FlowExplorer.from_run(RUN, flows=["Image->Question", "Question->Last", "Image->Last"])\n'
    'print("model code loaded:", "flowlib.models" in sys.modules or "torch" in sys.modules)\n'
    "explorer.widget",
]


def test_stored_explorer_says_a_flow_is_missing_and_keeps_working(page, lab, browser_work):
    run = browser_work / "stored-run"
    command = [sys.executable, "-m", "flowlib", "run", "--tasks", "ChooseAttr", "QueryAttr", "--samples-per-task"]
    command += ["2", "--flows", "Image->Question", "Question->Last", "--window", "3", "--output", str(run), "--quiet"]
    subprocess.run(command, check=True, timeout=600, env=lab.env, capture_output=True)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.format(run=str(run))) for c in STORED_CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, lab.root / "stored_explorer.ipynb")
    open_notebook(page, lab, "stored_explorer.ipynb")
    run_all_cells(page, RUN_TIMEOUT_S)
    page.locator(f"{EXPLORER} .flowlib-plot img").wait_for(timeout=60_000)
    assert page.get_by_text("model code loaded: False").count() == 1  # stored results: no model, not even torch
    message, plot = page.locator(f"{EXPLORER} .flowlib-message"), page.locator(f"{EXPLORER} .flowlib-plot img")
    page.locator(f"{EXPLORER} .flowlib-flow select").select_option("Image->Last")
    page.wait_for_function(
        "s => document.querySelector(s).textContent.includes('no results for Image->Last')",
        arg=f"{EXPLORER} .flowlib-message",
        timeout=REDRAW_LIMIT_S * 1000,
    )
    assert plot.count() == 0 and page.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0
    page.locator(EXPLORER).screenshot(path=SHOTS / "stored_explorer_missing_flow.png")
    page.locator(f"{EXPLORER} .flowlib-task select").select_option("QueryAttr")  # still says why, no traceback
    page.wait_for_timeout(500)
    assert "no results for Image->Last" in message.inner_text() and plot.count() == 0
    page.locator(f"{EXPLORER} .flowlib-flow select").select_option("Question->Last")  # the other controls work
    plot.wait_for(timeout=REDRAW_LIMIT_S * 1000)
    assert "no results" not in message.inner_text() and "QueryAttr, Question->Last" in draws_text(page)
    page.locator(EXPLORER).screenshot(path=SHOTS / "stored_explorer_recovered.png")


def draws_text(page) -> str:
    return page.inner_text(f"{EXPLORER} .flowlib-status")
