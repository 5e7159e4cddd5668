"""Interactive explorers for the notebooks: vary window, flow, task and sample.

Widgets hold no science: they call the same `flowlib` functions as the
notebooks. On a small model `FlowExplorer` recomputes live with the fast sweep
engine; given a stored results table (a large model's run) it re-reads it.
Both work without a browser: set a control's value and the view recomputes and
redraws (`explorer.current` holds the plotted numbers, `explorer.draws` counts redraws).

Example:
    >>> explorer = FlowExplorer.live(loaded, prepared_by_task, flows=["Image->Question"])
    >>> explorer.widget  # display in a notebook
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from .plots import plot_flow_curves, plot_layout_overlay, summarise_curves
from .sweep import clean_pass, layer_sweep


class FlowExplorer:
    """Controls (window, flow, task, sample) over a layer-sweep view.

    Use `FlowExplorer.live(...)` for a model small enough to sweep interactively, or
    `FlowExplorer.stored(table)` to browse a results table written by the runner.
    """

    def __init__(
        self,
        *,
        flows: Sequence[str],
        tasks: Sequence[str],
        windows: Sequence[int],
        window: int,
        samples_per_task: dict[str, int],
        title: str,
        compute,
    ):
        self._compute = compute
        self.title = title
        self.draws = 0
        self.current: pd.DataFrame | None = None
        self.window = widgets.SelectionSlider(options=list(windows), value=window, description="window")
        self.flow = widgets.Dropdown(options=list(flows), description="flow")
        self.task = widgets.Dropdown(options=list(tasks), description="task")
        self.samples_per_task = samples_per_task
        self.sample = widgets.Dropdown(description="sample")
        self._set_sample_options()
        self.output = widgets.Output()
        self.task.observe(self._on_task, names="value")
        for control in (self.window, self.flow, self.sample):
            control.observe(lambda change: self.refresh(), names="value")
        self.widget = widgets.VBox(
            [widgets.HBox([self.window, self.flow]), widgets.HBox([self.task, self.sample]), self.output]
        )
        self.refresh()

    def _set_sample_options(self):
        count = self.samples_per_task.get(self.task.value, 0)
        self.sample.options = [("mean over samples", -1)] + [(f"#{i}", i) for i in range(count)]
        self.sample.value = -1

    def _on_task(self, change):
        with self.sample.hold_trait_notifications():
            self._set_sample_options()
        self.refresh()

    def refresh(self) -> pd.DataFrame:
        """Recompute for the current controls and redraw."""
        table = self._compute(self.task.value, self.flow.value, int(self.window.value), int(self.sample.value))
        self.current = summarise_curves(table)
        self.output.clear_output()
        with self.output:
            fig = plot_flow_curves(self.current, f"{self.title} | window {self.window.value}")
            display(fig)
            plt.close(fig)
        self.draws += 1
        return self.current

    @classmethod
    def live(cls, loaded, prepared_by_task: dict, *, flows: Sequence[str], window: int, title: str = ""):
        """Recompute sweeps with the fast engine on `loaded` (a model small enough for a CPU)."""
        cleans = {}

        def compute(task, flow, window, index):
            chosen = prepared_by_task[task] if index < 0 else [prepared_by_task[task][index]]
            frames = []
            for prepared in chosen:
                key = id(prepared)
                if key not in cleans:
                    cleans[key] = clean_pass(loaded, prepared)
                frame = layer_sweep(loaded, prepared, flow, window, engine="fast", clean=cleans[key]).to_frame()
                frames.append(frame.assign(task=task))
            return pd.concat(frames, ignore_index=True)

        windows = sorted(set(range(1, loaded.num_layers + 1, 2)) | {int(window)})
        return cls(
            flows=flows,
            tasks=list(prepared_by_task),
            windows=windows,
            window=window,
            samples_per_task={t: len(p) for t, p in prepared_by_task.items()},
            title=title or f"{loaded.name} (live)",
            compute=compute,
        )

    @classmethod
    def stored(cls, table: pd.DataFrame, *, title: str = ""):
        """Browse a results table (one row per sample x flow x layer, as the runner writes)."""
        ids = {
            task: sorted(table.loc[table["task"] == task, "question_id"].unique()) for task in table["task"].unique()
        }

        def compute(task, flow, window, index):
            rows = table[(table["task"] == task) & (table["flow"] == flow) & (table["window"] == window)]
            return rows if index < 0 else rows[rows["question_id"] == ids[task][index]]

        windows = sorted(int(w) for w in table["window"].unique())
        return cls(
            flows=list(table["flow"].unique()),
            tasks=list(ids),
            windows=windows,
            window=windows[0],
            samples_per_task={t: len(v) for t, v in ids.items()},
            title=title or f"{table['model'].iloc[0]} (stored results)",
            compute=compute,
        )


class SampleBrowser:
    """Pick a task and a sample; see the processed image with its related patches."""

    def __init__(self, prepared_by_task: dict, image_processor):
        self.prepared_by_task = prepared_by_task
        self.image_processor = image_processor
        self.draws = 0
        self.task = widgets.Dropdown(options=list(prepared_by_task), description="task")
        self.sample = widgets.IntSlider(
            min=0, max=max(0, len(prepared_by_task[self.task.value]) - 1), description="sample"
        )
        self.output = widgets.Output()
        self.task.observe(self._on_task, names="value")
        self.sample.observe(lambda change: self.refresh(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.task, self.sample]), self.output])
        self.refresh()

    def _on_task(self, change):
        self.sample.max = max(0, len(self.prepared_by_task[self.task.value]) - 1)
        self.sample.value = 0
        self.refresh()

    def refresh(self):
        prepared = self.prepared_by_task[self.task.value][self.sample.value]
        self.output.clear_output()
        with self.output:
            fig, ax = plt.subplots(figsize=(4, 4))
            plot_layout_overlay(prepared, self.image_processor, ax=ax)
            display(fig)
            plt.close(fig)
        self.draws += 1
        return prepared
