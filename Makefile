# Two commands do everything on a fresh machine: `make figures` and `make test`.
# Each builds the .venv (standard-library venv + pip, exact pins) when it is missing.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
BUILD       ?= build
# Portable CPU kernels (flowlib/kernels.py), which drew the committed figures: numbers that do not depend
# on the processor's instruction sets, for 1.5x the time of `make figures PORTABLE=0` (the processor's own
# kernels, whose numbers differed from the committed ones by up to 3.4e-5 percentage points on AVX2).
PORTABLE    ?= 1
# figures-check: largest difference allowed between regenerated and committed figure numbers.
TOLERANCE   ?= 1e-6
LAUNCH      := $(if $(filter 1,$(PORTABLE)),$(PY) -m flowlib.kernels)
NOTEBOOKS   := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
KERNEL      := flowlib

# Notebook parameters that can be overridden, e.g. `make figures MODEL=llava-hf/llava-1.5-7b-hf DEVICE=cuda`.
# Knockout tables go to $(BUILD)/runs, one folder per run identity (model files, data, settings, code):
# a stopped `make figures` resumes where it stopped, and any change gets a fresh folder, never stale numbers.
# Batch runs leave out the widget cells (WIDGETS=False): papermill can hang on a cell that opens widgets
# (nbclient issue #312); in JupyterLab they run as usual.
PARAMS := $(if $(MODEL),-p MODEL "$(MODEL)") $(if $(DATA),-p DATA "$(DATA)") \
          $(if $(DEVICE),-p DEVICE "$(DEVICE)") $(if $(DTYPE),-p DTYPE "$(DTYPE)") \
          $(if $(SAMPLES),-p SAMPLES_PER_TASK $(SAMPLES)) $(if $(WINDOW),-p WINDOW $(WINDOW)) \
          $(if $(CSV_DIR),-p CSV_DIR "$(CSV_DIR)") $(if $(IMAGE_DIR),-p IMAGE_DIR "$(IMAGE_DIR)") \
          $(if $(TASKS),-p TASKS "$(TASKS)") $(if $(MAX_BATCH),-p MAX_BATCH $(MAX_BATCH))

.PHONY: help venv test test-fast test-browser figures figures-check lab lint clean clean-venv

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/:\t/'

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (flowlib)" >/dev/null
	touch $@

venv: $(STAMP)  ## create the .venv with the pinned stack (done automatically by the other targets)

test: lint  ## lint, then run the whole test suite offline (what CI runs)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)  ## the unit tests without the slow tier
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The browser tier (tests/browser, also part of `make test`, which skips it, saying why, without Chromium):
# every notebook run in JupyterLab in headless Chromium, figures and explorers checked; screenshots and
# timings in $(BUILD)/browser/. Here a missing Chromium or Playwright fails instead of skipping.
test-browser: $(STAMP)  ## JupyterLab in headless Chromium: every notebook, its figures, its explorer (needs chromium)
	FLOWLIB_REQUIRE_BROWSER=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
	  $(PY) -m pytest -q -m browser tests/browser

figures: $(STAMP)  ## run every notebook with papermill into figures/ (portable CPU kernels; PORTABLE=0: native)
	@mkdir -p $(BUILD)/notebooks
	@for nb in $(NOTEBOOKS); do \
	  echo "papermill $$nb"; \
	  FLOWLIB_RUNS=$(abspath $(BUILD))/runs $(LAUNCH) $(PY) -m papermill --kernel $(KERNEL) --cwd notebooks \
	    $$nb $(BUILD)/$$nb $(PARAMS) -p WIDGETS False || exit 1; \
	done
	@echo "figures in $${FLOWLIB_FIGURES:-figures/}, executed notebooks in $(BUILD)/notebooks/"

figures-check: $(STAMP)  ## regenerate the figures from scratch, compare their numbers with the committed ones (TOLERANCE=1e-6)
	rm -rf $(BUILD)/runs
	$(MAKE) figures
	$(PY) -m flowlib.figure_check --tolerance $(TOLERANCE)

lab: $(STAMP)  ## open JupyterLab with the project's kernel
	$(LAUNCH) $(VENV)/bin/jupyter lab notebooks/

lint: $(STAMP)  ## ruff (rules and format in pyproject.toml); notebooks committed without outputs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m flowlib.notebook_check $(NOTEBOOKS)

clean:  ## remove executed notebooks and caches (keeps the .venv)
	rm -rf $(BUILD) .pytest_cache

clean-venv:  ## remove the .venv
	rm -rf $(VENV)
