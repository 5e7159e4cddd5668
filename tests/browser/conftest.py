"""Fixtures of the browser tier: notebooks prepared with small parameters, one JupyterLab, one Chromium.

The tier skips, saying why, where Chromium or Playwright is missing (`make test` then reports it in its
summary); with FLOWLIB_REQUIRE_BROWSER=1 (`make test-browser`, `.ci/run`, which installs Chromium) it fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.browser.lab import CHROMIUM, CHROMIUM_FLAGS, LabServer, chromium_missing

PROJECT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((PROJECT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
#: Screenshots of every notebook and explorer state, and the measured times, for a person to look at.
SHOTS = PROJECT / "build" / "browser"
#: The notebooks run with two tasks and five correct samples per task (papermill's parameter cell, as
#: `make figures` overrides them): the same cells and explorer as the defaults, in a minute instead of
#: several. WIDGETS keeps its notebook default, True: a person in JupyterLab gets the explorers.
PARAMETERS = {"TASKS": ["ChooseAttr", "QueryAttr"], "SAMPLES_PER_TASK": 5}
#: ... except where a notebook's analyses cost more per sample: 04 sweeps every paper flow and three random
#: controls per sample (400 s on the two busy cores here with five samples per task). Its explorer still
#: browses the samples `Study.explorer` picks.
NOTEBOOK_PARAMETERS = {"04_controls_and_variants": {"SAMPLES_PER_TASK": 2}}
KERNEL = "flowlib"  # `make venv` installs it into the .venv; python3 (this interpreter) where it is missing


@pytest.fixture(scope="session")
def browser_tier():
    """Skip the tier, saying why, where it cannot run; fail instead with FLOWLIB_REQUIRE_BROWSER=1."""
    reason = chromium_missing()
    if reason and os.environ.get("FLOWLIB_REQUIRE_BROWSER") == "1":  # make test-browser, CI
        pytest.fail(f"the browser tier cannot run: {reason}", pytrace=False)
    if reason:
        pytest.skip(f"browser tier skipped: {reason}")


@pytest.fixture(scope="session")
def browser_work(browser_tier, tmp_path_factory):
    import papermill
    from jupyter_client.kernelspec import KernelSpecManager

    work = tmp_path_factory.mktemp("browser")
    kernel = KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"
    (work / "notebooks").mkdir()
    for notebook in NOTEBOOKS:
        papermill.execute_notebook(
            str(notebook),
            str(work / "notebooks" / notebook.name),
            parameters={**PARAMETERS, **NOTEBOOK_PARAMETERS.get(notebook.stem, {})},
            prepare_only=True,  # inject the parameters only; JupyterLab runs the cells
            kernel_name=kernel,
            progress_bar=False,
        )
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    return work


@pytest.fixture(scope="session")
def lab(browser_work):
    """JupyterLab on the prepared notebooks; figures and knockout runs go to the test's own folders."""
    env = {
        "FLOWLIB_FIGURES": str(browser_work / "figures"),
        "FLOWLIB_RUNS": str(browser_work / "runs"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    server = LabServer(browser_work / "notebooks", browser_work / "jupyter", env, SHOTS / "jupyterlab.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chromium(browser_tier):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, lab):
    """A fresh page; the kernels it started are shut down after the test, so the next notebook has the cores."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
    yield page
    context.close()
    lab.shutdown_kernels()
