"""Figures in the paper's style, saved with the numbers they plot.

Plotting never runs a model: every function takes tables (pandas) or a
prepared input and draws. `save_figure` is the one way figures leave the
process: PNG and PDF with stable metadata, and the plotted numbers beside them
as CSV, so tests and readers can check numbers without reading pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import config as cfg

Y_LABEL = "Change in probability (%)"
#: 95% band: mean +- 1.96 standard errors (normal approximation, as seaborn's "se" band scaled to 95%).
Z95 = 1.96
FLOW_COLORS = {
    "Image->Question": "#1f77b4",
    "Image->Last": "#2ca02c",
    "Question->Last": "#d62728",
    "Last->Last": "#7f7f7f",
    "Related Image Patches->Question": "#9467bd",
    "Other Image Patches->Question": "#ff7f0e",
}


def summarise_curves(
    table: pd.DataFrame, by: Sequence[str] = ("task", "flow", "layer"), value: str = "relative_change"
) -> pd.DataFrame:
    """Mean, 95% band and sample count of `value` per group (the numbers a curve figure plots)."""
    grouped = table.groupby(list(by), sort=True)[value]
    summary = grouped.agg(mean="mean", std="std", n="count").reset_index()
    sem = summary["std"].fillna(0.0) / np.sqrt(summary["n"])
    summary["low"] = summary["mean"] - Z95 * sem
    summary["high"] = summary["mean"] + Z95 * sem
    return summary.drop(columns="std")


def _panel_grid(count: int, width: float = 3.6, height: float = 2.8):
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _band_line(ax, rows: pd.DataFrame, label: str, color) -> None:
    """One summarised curve: the mean per layer and its 95% band."""
    ax.plot(rows["layer"], rows["mean"], label=label, color=color, linewidth=1.6)
    ax.fill_between(rows["layer"], rows["low"], rows["high"], color=color, alpha=0.2, linewidth=0)


def _curve_panels(
    summary: pd.DataFrame,
    key: str,
    styles: dict,
    title: str,
    ylabel: str,
    legend_loc: str,
    zero_line: bool = False,
    count_in_title: bool = False,
):
    """One panel per task, a banded line per value of `key`; `styles` maps each value to (label, colour)."""
    sns.set_theme(style="whitegrid", context="paper")
    tasks = list(dict.fromkeys(summary["task"]))
    fig, axes = _panel_grid(len(tasks))
    for ax, task in zip(axes, tasks):
        for value, (label, color) in styles.items():
            rows = summary[(summary["task"] == task) & (summary[key] == value)].sort_values("layer")
            if not rows.empty:
                _band_line(ax, rows, label, color)
        if count_in_title:
            ax.set_title(f"{task} (n={int(summary[summary['task'] == task]['n'].max())})")
        else:
            ax.set_title(task)
        if zero_line:
            ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("Layer")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7, loc=legend_loc)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_flow_curves(summary: pd.DataFrame, title: str, flows: Sequence[str] | None = None):
    """One panel per task; a line per flow with its 95% band; layer on x, change in probability on y."""
    flows = list(flows or dict.fromkeys(summary["flow"]))
    return _curve_panels(
        summary,
        "flow",
        {flow: (flow, FLOW_COLORS.get(flow)) for flow in flows},
        title,
        Y_LABEL,
        "lower left",
        zero_line=True,
        count_in_title=True,
    )


#: Legend labels of the lens forms: the case is the point, so say it in words.
FORM_LABELS = {
    "answer": "answer (lowercase)",
    "Answer": "Answer (capitalised)",
    "false option": "false option (lowercase)",
    "False option": "False option (capitalised)",
}


def plot_lens_curves(summary: pd.DataFrame, title: str, value_label: str = "Probability"):
    """Answer-lens curves: one panel per task, a line per token form (e.g. lowercase / capitalised answer)."""
    forms = dict.fromkeys(summary["form"])
    styles = {form: (FORM_LABELS.get(form, form), color) for form, color in zip(forms, sns.color_palette("tab10"))}
    return _curve_panels(summary, "form", styles, title, value_label, "upper left")


def denormalised_image(prepared, image_processor) -> np.ndarray:
    """The processed (base-view) image the model sees, as an H x W x 3 array in [0, 1]."""
    pixels = prepared.inputs["pixel_values"][0].detach().float().cpu()
    if pixels.ndim == 4:  # LLaVA-NeXT: the first crop is the base view
        pixels = pixels[0]
    mean = np.asarray(image_processor.image_mean).reshape(3, 1, 1)
    std = np.asarray(image_processor.image_std).reshape(3, 1, 1)
    return np.clip(pixels.numpy() * std + mean, 0, 1).transpose(1, 2, 0)


def plot_layout_overlay(prepared, image_processor, ax=None, title: str | None = None):
    """The processed image with the patch grid, related patches highlighted (base view for LLaVA-NeXT)."""
    layout = prepared.layout
    grid_positions = layout.base_view if layout.base_view.size else layout.image
    side = int(round(math.sqrt(len(grid_positions))))
    first = int(grid_positions[0])
    related = set((layout.related_image_patches - first).tolist())
    image = denormalised_image(prepared, image_processor)
    cell = image.shape[0] / side
    if ax is None:
        _, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.imshow(image, interpolation="nearest")
    for offset in range(side * side):
        row, col = divmod(offset, side)
        if offset in related:
            ax.add_patch(
                plt.Rectangle(
                    (col * cell, row * cell),
                    cell,
                    cell,
                    fill=True,
                    alpha=0.35,
                    facecolor="#9467bd",
                    edgecolor="#9467bd",
                    linewidth=0.8,
                )
            )
    for k in range(side + 1):
        ax.axhline(k * cell - 0.5, color="white", linewidth=0.3, alpha=0.6)
        ax.axvline(k * cell - 0.5, color="white", linewidth=0.3, alpha=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    sample = prepared.sample
    ax.set_title(title or f"{sample.task}: {sample.question}\nanswer: {sample.answer}", fontsize=7)
    return ax


def plot_examples(prepared_by_task: dict, image_processor, title: str):
    """One overlay per task (the first prepared input of each), related patches highlighted."""
    tasks = list(prepared_by_task)
    fig, axes = _panel_grid(len(tasks), width=3.4, height=3.6)
    for ax, task in zip(axes, tasks):
        plot_layout_overlay(prepared_by_task[task][0], image_processor, ax=ax)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def example_group_sizes(prepared_by_task: dict) -> pd.DataFrame:
    """The numbers behind `plot_examples`: each example's token-group sizes."""
    rows = []
    for task, prepared in prepared_by_task.items():
        for p in prepared:
            rows.append(
                {
                    "task": task,
                    "question_id": p.sample.question_id,
                    "question": p.sample.question,
                    "answer": p.sample.answer,
                    **p.layout.sizes(),
                }
            )
    return pd.DataFrame(rows)


def plot_accuracy(accuracy: pd.DataFrame, title: str):
    """Accuracy per task with the image and with a blank image, against chance."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(accuracy))
    ax.bar(x - 0.2, 100 * accuracy["accuracy"], width=0.4, label="with the image")
    ax.bar(x + 0.2, 100 * accuracy["blank_accuracy"], width=0.4, label="blank image")
    ax.scatter(x, 100 * accuracy["chance"], marker="_", s=400, color="black", label="chance", zorder=3)
    ax.set_xticks(x, accuracy["task"], fontsize=8)
    ax.set_ylabel("Accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


class SavedFigure(dict):
    """The paths a figure was saved to (keys "png", "pdf", "csv"), displayed as the saved PNG in Jupyter.

    A notebook cell ending in `save_figure(...)` therefore shows exactly the image that was written,
    although the matplotlib figure itself is closed (an open figure per cell would pile up in memory).
    """

    def _repr_png_(self) -> bytes:
        return Path(self["png"]).read_bytes()


def save_figure(fig, name: str, numbers: pd.DataFrame, directory: Path | None = None, caption: str = "") -> SavedFigure:
    """Write `name`.png, `name`.pdf and the plotted numbers `name`.csv into `directory` (default figures/).

    Metadata carry no timestamps, so regenerating a figure changes its files only
    when its content changes. Returns the paths written, as a `SavedFigure` that Jupyter displays.
    """
    directory = Path(directory) if directory is not None else cfg.figures_dir()
    directory.mkdir(parents=True, exist_ok=True)
    paths = SavedFigure({ext: directory / f"{name}.{ext}" for ext in ("png", "pdf", "csv")})
    meta = {"Title": name, "Description": caption} if caption else {"Title": name}
    fig.savefig(paths["png"], dpi=150, metadata={**meta, "Software": None})
    fig.savefig(
        paths["pdf"],
        metadata={"Title": name, "Subject": caption, "CreationDate": None, "Creator": None, "Producer": None},
    )
    tmp = paths["csv"].with_suffix(".csv.tmp")
    numbers.to_csv(tmp, index=False)
    tmp.replace(paths["csv"])
    plt.close(fig)
    return paths


CONTROL_COLOR = "#555555"


def plot_flow_vs_control(stats: pd.DataFrame, title: str, flows: Sequence[str] | None = None):
    """One panel per flow: the flow's mean change (bootstrap 95% band), its matched random control's mean
    (dashed, band: the spread of the draws' means), and a mark on each window where the two differ after
    correction (`stats.flow_vs_control`'s columns)."""
    sns.set_theme(style="whitegrid", context="paper")
    flows = list(flows or dict.fromkeys(stats["flow"]))
    fig, axes = _panel_grid(len(flows))
    for ax, flow in zip(axes, flows):
        rows = stats[stats["flow"] == flow].sort_values("layer")
        color = FLOW_COLORS.get(flow)
        ax.plot(rows["layer"], rows["flow_mean"], color=color, linewidth=1.6, label="flow")
        ax.fill_between(rows["layer"], rows["flow_low"], rows["flow_high"], color=color, alpha=0.2, linewidth=0)
        ax.plot(
            rows["layer"],
            rows["control_mean"],
            color=CONTROL_COLOR,
            linewidth=1.2,
            linestyle="--",
            label="matched random control",
        )
        ax.fill_between(
            rows["layer"], rows["control_min"], rows["control_max"], color=CONTROL_COLOR, alpha=0.15, linewidth=0
        )
        marked = rows[rows["significant"]]
        ax.scatter(
            marked["layer"],
            marked["flow_mean"],
            marker="o",
            s=14,
            color="black",
            zorder=3,
            label=f"differs ({rows['correction'].iloc[0]}-adjusted p < 0.05)",
        )
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"{flow} (n={int(rows['n'].max())})", fontsize=8)
        ax.set_xlabel("Layer")
        ax.set_ylabel(Y_LABEL)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_variant_curves(
    summary: pd.DataFrame, title: str, value_label: str = Y_LABEL, panel: str = "window_kind", line: str = "flow"
):
    """One panel per value of `panel` (e.g. window kind), a banded line per value of `line` (e.g. mask);
    `summary` from `summarise_curves(table, by=(panel, line, "layer"))`."""
    sns.set_theme(style="whitegrid", context="paper")
    panels = list(dict.fromkeys(summary[panel]))
    lines = list(dict.fromkeys(summary[line]))
    palette = dict(zip(lines, sns.color_palette("tab10")))
    fig, axes = _panel_grid(len(panels))
    for ax, name in zip(axes, panels):
        for value in lines:
            rows = summary[(summary[panel] == name) & (summary[line] == value)].sort_values("layer")
            if not rows.empty:
                _band_line(ax, rows, str(value), FLOW_COLORS.get(value, palette[value]))
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(str(name), fontsize=8)
        ax.set_xlabel("Layer")
        ax.set_ylabel(value_label, fontsize=7)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
