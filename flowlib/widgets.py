"""Interactive explorers for the notebooks: vary window, flow, task and sample.

Widgets hold no science: they call the same `flowlib` functions as the
notebooks. On a small model `FlowExplorer.live` recomputes sweeps with the fast
engine as the controls move; `FlowExplorer.stored` (a results table) and
`FlowExplorer.from_run` (a run folder) re-read stored results, so a large
model's run is browsed without loading the model.

Conventions:
- The window slider sends its value when it is released, not while it is dragged
  (`continuous_update=False`): a drag costs one sweep, never a queue of them.
- Per-sample sweeps are cached by (task, flow, window, sample), so the mean and any
  sample already seen redraw without recomputing.
- Bad input (a window the model cannot take, a task with no correctly answered
  samples, a flow the stored run does not hold) gives a message in the widget's
  message line instead of a traceback; the other controls keep working.
- Everything works without a browser: set a control's value and the view recomputes
  and redraws (`explorer.current` holds the plotted numbers, `explorer.draws` counts
  redraws, `explorer.message_text` the message shown, `explorer.seconds` the time of
  the last recompute and redraw).

Example:
    >>> explorer = FlowExplorer.live(loaded, prepared_by_task, flows=["Image->Question"], window=3)
    >>> explorer.widget  # display in a notebook
    >>> FlowExplorer.from_run("runs/llava15-7b").widget  # a stored run, no model loaded
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from .plots import plot_flow_curves, plot_layout_overlay, summarise_curves

#: Samples drawn side by side in the patch overlay while the mean over samples is shown.
OVERLAY_SAMPLES = 5
#: The explorer's plot in inches (one panel: the chosen task).
PLOT_SIZE = (6.0, 3.6)
#: The index the sample control uses for "mean over samples".
MEAN = -1


class ExplorerInputError(ValueError):
    """A choice of the controls that has nothing to show; its message is shown in the widget."""


class FlowExplorer:
    """Controls (window, flow, task, sample) over a layer-sweep view and, when live, a patch overlay.

    Use `FlowExplorer.live(...)` for a model small enough to sweep interactively, `FlowExplorer.stored(table)`
    to browse a results table written by the runner, or `FlowExplorer.from_run(folder)` to read one from disk.
    `compute(task, flow, window, index)` returns the rows to plot (index -1: every sample of the task) and
    raises `ExplorerInputError` for a choice with nothing to show; `overlay(task, index)` returns a figure.
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
        compute: Callable[[str, str, int, int], pd.DataFrame],
        overlay: Callable[[str, int], object] | None = None,
        window_note: str = "",
    ):
        self._compute = compute
        self._overlay = overlay
        self.title = title
        self.draws = 0
        self.seconds: float | None = None
        self.current: pd.DataFrame | None = None
        self.samples_per_task = samples_per_task
        windows = sorted(int(w) for w in windows)
        self.window = widgets.SelectionSlider(
            options=windows,
            value=window if window in windows else windows[-1],
            description="window",
            continuous_update=False,  # one sweep when the slider is released, not one per step dragged over
        )
        self.flow = widgets.Dropdown(options=list(flows), description="flow", layout=widgets.Layout(width="24em"))
        self.task = widgets.Dropdown(options=list(tasks), description="task")
        self.sample = widgets.Dropdown(description="sample")
        self._quiet = False
        self._set_sample_options()
        self._window_note = window_note
        self.message = widgets.HTML(layout=widgets.Layout(min_height="1.5em"))
        self.message_text = ""  # the message shown, as plain text
        self.status = widgets.HTML()
        self.output = widgets.Output(layout=widgets.Layout(flex="0 0 auto"))
        self.overlay_output = widgets.Output(layout=widgets.Layout(flex="0 0 auto"))
        self.task.observe(self._on_task, names="value")
        self.sample.observe(self._on_sample, names="value")
        for control in (self.window, self.flow):
            control.observe(lambda change: self.refresh(), names="value")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.window, self.flow]),
                widgets.HBox([self.task, self.sample]),
                self.message,
                # The overlay goes beside the plot where the page is wide enough, below it where not.
                widgets.HBox([self.output, self.overlay_output], layout=widgets.Layout(flex_flow="row wrap")),
                self.status,
            ]
        )
        # Class names the browser tests (and a page's own CSS) find each part by.
        self.widget.add_class("flowlib-explorer")
        for part, name in (
            (self.window, "window"),
            (self.flow, "flow"),
            (self.task, "task"),
            (self.sample, "sample"),
            (self.output, "plot"),
            (self.overlay_output, "overlay"),
        ):
            part.add_class(f"flowlib-{name}")
        self.refresh()
        self.draw_overlay()

    def _set_sample_options(self):
        count = self.samples_per_task.get(self.task.value, 0)
        self._quiet = True  # the new options reset the sample: one redraw for the task change, not two
        try:
            self.sample.options = [("mean over samples", MEAN)] + [(f"#{i}", i) for i in range(count)]
            self.sample.value = MEAN
        finally:
            self._quiet = False

    def _on_task(self, change):
        self._set_sample_options()
        self.refresh()
        self.draw_overlay()

    def _on_sample(self, change):
        if not self._quiet:
            self.refresh()
            self.draw_overlay()

    def _show_message(self, text: str, kind: str = "warning"):
        self.message_text = text
        color = {"warning": "#9a3412", "note": "#4b5563"}[kind]
        self.message.value = f'<span class="flowlib-message" style="color:{color}">{html.escape(text)}</span>'

    def refresh(self) -> pd.DataFrame | None:
        """Recompute for the current controls and redraw; None (and a message) when there is nothing to show."""
        start = time.perf_counter()
        task, flow, window, index = self.task.value, self.flow.value, int(self.window.value), int(self.sample.value)
        try:
            if not self.samples_per_task.get(task):
                raise ExplorerInputError(f"{task} has no correctly answered samples to explore; choose another task")
            table = self._compute(task, flow, window, index)
        except Exception as err:  # a widget callback's traceback would be lost in the kernel log: say it here
            self.current = None
            self.output.clear_output()
            reason = str(err) if isinstance(err, ExplorerInputError) else f"{type(err).__name__}: {err}"
            self._show_message(reason)
            self.status.value = ""
            return None
        note = table.attrs.get("note", "")
        self._show_message(" ".join(filter(None, [self._window_note, note])), "note")
        self._window_note = ""  # said once, at the first draw
        self.current = summarise_curves(table)
        self.output.clear_output(wait=True)  # the old plot stays until the new one is ready: no flicker
        with self.output:
            fig = plot_flow_curves(self.current, f"{self.title}\nwindow {window}")
            fig.set_size_inches(PLOT_SIZE)  # one task's panel, large enough to read and to fit its title
            fig.tight_layout()
            display(fig)
            plt.close(fig)
        self.draws += 1
        self.seconds = time.perf_counter() - start
        shown = "mean over samples" if index == MEAN else f"sample #{index}"
        self.status.value = (
            f'<small class="flowlib-status">{html.escape(f"{task}, {flow}, window {window}, {shown}")}: '
            f"draw {self.draws} in {self.seconds:.2f} s</small>"
        )
        return self.current

    def draw_overlay(self):
        """Redraw the patch overlay of the chosen task and sample (the related patches highlighted)."""
        if self._overlay is None:
            return
        self.overlay_output.clear_output(wait=True)
        if not self.samples_per_task.get(self.task.value):
            return
        with self.overlay_output:
            fig = self._overlay(self.task.value, int(self.sample.value))
            display(fig)
            plt.close(fig)

    @classmethod
    def live(
        cls,
        loaded,
        prepared_by_task: dict,
        *,
        flows: Sequence[str],
        window: int,
        title: str = "",
        image_processor=None,
        threads: int | None = 1,
    ):
        """Recompute sweeps with the fast engine on `loaded` (a model small enough for a CPU).

        `prepared_by_task` maps each task to its prepared inputs (correctly answered samples); a task with
        none is listed and says so when chosen. A `window` outside 1..layers shows the nearest one, with a note.
        `threads`: torch threads while sweeping (None: leave torch's setting). One by default: a small model's
        sweeps are small matrix products that a second thread barely speeds up, while on shared cores its
        waits slow them 5-20x (5 samples of the offline model: 0.2 s on one thread, 1.3-5.5 s on two, busy).
        """
        import torch

        from .sweep import clean_pass, layer_sweep

        cleans, sweeps = {}, {}

        def sweep(task, flow, window, index):
            key = (task, flow, window, index)
            if key not in sweeps:
                prepared = prepared_by_task[task][index]
                if id(prepared) not in cleans:
                    cleans[id(prepared)] = clean_pass(loaded, prepared)
                clean = cleans[id(prepared)]
                frame = layer_sweep(loaded, prepared, flow, window, engine="fast", clean=clean).to_frame()
                sweeps[key] = frame.assign(task=task)
            return sweeps[key]

        def compute(task, flow, window, index):
            before = torch.get_num_threads()
            torch.set_num_threads(threads or before)
            try:
                return sweep(task, flow, window, index) if index != MEAN else mean(task, flow, window)
            finally:
                torch.set_num_threads(before)

        def mean(task, flow, window):
            frames, left_out = [], []
            for i in range(len(prepared_by_task[task])):
                try:
                    frames.append(sweep(task, flow, window, i))
                except ValueError as err:  # an empty group or a zero base probability: this sample has no curve
                    left_out.append(f"#{i} ({err})")
            if not frames:
                raise ExplorerInputError(f"no sample of {task} can be swept for {flow}: {'; '.join(left_out)}")
            table = pd.concat(frames, ignore_index=True)
            if left_out:
                table.attrs["note"] = f"left out of the mean: {'; '.join(left_out)}"
            return table

        processor = image_processor or getattr(getattr(loaded, "processor", None), "image_processor", None)

        def overlay(task, index):
            chosen = (
                list(enumerate(prepared_by_task[task]))[:OVERLAY_SAMPLES]
                if index == MEAN
                else [(index, prepared_by_task[task][index])]
            )
            size = 3.2 if len(chosen) == 1 else 1.7
            fig, axes = plt.subplots(1, len(chosen), figsize=(size * len(chosen), size + 0.4), squeeze=False)
            for ax, (i, prepared) in zip(axes[0], chosen):
                short = None if len(chosen) == 1 else f"#{i}: {prepared.sample.answer}"
                plot_layout_overlay(prepared, processor, ax=ax, title=short)
            fig.suptitle("related image patches (purple)", fontsize=8)
            fig.tight_layout()
            return fig

        num_layers = loaded.num_layers
        valid = 1 <= int(window) <= num_layers
        windows = sorted(set(range(1, num_layers + 1, 2)) | ({int(window)} if valid else set()))
        note = (
            ""
            if valid
            else f"window {window} does not fit {loaded.name}'s {num_layers} layers (1..{num_layers}); "
            f"showing window {windows[-1]}"
        )
        return cls(
            flows=flows,
            tasks=list(prepared_by_task),
            windows=windows,
            window=int(window) if valid else windows[-1],
            samples_per_task={t: len(p) for t, p in prepared_by_task.items()},
            title=title or f"{loaded.name} (live)",
            compute=compute,
            overlay=overlay if processor is not None else None,
            window_note=note,
        )

    @classmethod
    def stored(
        cls, table: pd.DataFrame, *, flows: Sequence[str] | None = None, window: int | None = None, title: str = ""
    ):
        """Browse a results table (one row per sample x flow x layer, as the runner writes); no model is loaded.

        `flows` lists the flows to offer (default: those in the table); one the table lacks says so when chosen.
        """
        if table.empty:
            raise ExplorerInputError("the results table is empty: the run has analysed no sample yet")
        ids = {
            task: list(dict.fromkeys(table.loc[table["task"] == task, "question_id"]))
            for task in table["task"].unique()
        }
        held = list(dict.fromkeys(table["flow"]))

        def compute(task, flow, window, index):
            if flow not in held:
                raise ExplorerInputError(f"the stored run has no results for {flow}; it holds {', '.join(held)}")
            rows = table[(table["task"] == task) & (table["flow"] == flow) & (table["window"] == window)]
            rows = rows if index == MEAN else rows[rows["question_id"] == ids[task][index]]
            if rows.empty:
                raise ExplorerInputError(f"the stored run has no {flow} results for {task} at window {window}")
            return rows

        windows = sorted(int(w) for w in table["window"].unique())
        note = ""
        if window is not None and int(window) not in windows:
            note = f"the stored run has no window {window}; it holds {', '.join(map(str, windows))}"
        return cls(
            flows=list(flows) if flows else held,
            tasks=list(ids),
            windows=windows,
            window=int(window) if window is not None and int(window) in windows else windows[0],
            samples_per_task={t: len(v) for t, v in ids.items()},
            title=title or f"{table['model'].iloc[0]} (stored results)",
            compute=compute,
            window_note=note,
        )

    @classmethod
    def from_run(cls, folder, *, flows: Sequence[str] | None = None, title: str = ""):
        """Browse the results of a run folder (`flowlib run`, or a notebook's), without loading its model."""
        from .run_folder import load_results

        table = load_results(Path(folder))
        return cls.stored(table, flows=flows, title=title)


class SampleBrowser:
    """Pick a task and a sample; see the processed image with its related patches."""

    def __init__(self, prepared_by_task: dict, image_processor):
        self.prepared_by_task = prepared_by_task
        self.image_processor = image_processor
        self.draws = 0
        self.task = widgets.Dropdown(options=list(prepared_by_task), description="task")
        self.sample = widgets.IntSlider(
            min=0,
            max=max(0, len(prepared_by_task[self.task.value]) - 1),
            description="sample",
            continuous_update=False,
        )
        self.message = widgets.HTML()
        self.output = widgets.Output()
        self.task.observe(self._on_task, names="value")
        self.sample.observe(lambda change: self.refresh(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.task, self.sample]), self.message, self.output])
        self.widget.add_class("flowlib-sample-browser")
        self.refresh()

    def _on_task(self, change):
        with self.sample.hold_trait_notifications():
            self.sample.max = max(0, len(self.prepared_by_task[self.task.value]) - 1)
            self.sample.value = 0
        self.refresh()

    def refresh(self):
        """Redraw the chosen sample's overlay; None (and a message) when the task has no sample."""
        chosen = self.prepared_by_task[self.task.value]
        if not chosen:
            self.output.clear_output()
            self.message.value = html.escape(f"{self.task.value} has no correctly answered samples; choose another")
            return None
        prepared = chosen[min(self.sample.value, len(chosen) - 1)]
        self.message.value = ""
        self.output.clear_output(wait=True)
        with self.output:
            fig, ax = plt.subplots(figsize=(4, 4))
            plot_layout_overlay(prepared, self.image_processor, ax=ax)
            display(fig)
            plt.close(fig)
        self.draws += 1
        return prepared
