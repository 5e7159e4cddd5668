"""Does a run support the paper's claim? One verdict per finding, computed from the plotted numbers.

Each notebook ends with the verdict on its finding, so that the judgement is made by tested code from
the very numbers in the figure, never by prose that can go stale. A verdict reads the per-task curve
summaries (`plots.summarise_curves`) and places each task's largest drop (the window where blocking
hurts the answer most) in the lower, middle or upper third of the layers; a drop smaller than
`MIN_DROP` percent counts as no effect. The rules, per finding (docs/protocol.md):

1. Image->Question: the largest drop lies in the lower third.
2. Related Image Patches->Question: the largest drop lies in the middle third (and Other Image
   Patches->Question's in the lower third).
3. Question->Last: a large drop (at least `LARGE_DROP`) in the middle or upper thirds; Image->Last and
   Last->Last stay small (under `LARGE_DROP` and `MIN_DROP`).
4. Answer lens: the lowercase answer reaches `APPEARS` probability at an earlier layer than the
   capitalised one (which the model emits, so it always peaks at the last layer).

A finding is "supported" when every task meets its rule, "partly" when some do, "not supported" when
none does. The thresholds are parameters: the verdict is a summary of the figure, not a test of
significance.

Example:
    >>> verdict = image_to_question(plots.summarise_curves(table), num_layers=32)
    >>> verdict.supported, verdict.tasks_meeting
"""

from __future__ import annotations

import dataclasses

import pandas as pd

#: Mean relative changes smaller than this (in percent) count as no effect.
MIN_DROP = 5.0
#: Question->Last must remove at least this much of the answer's probability to "collapse" it.
LARGE_DROP = 50.0
#: The answer lens counts a form as "appeared" at the first layer where its probability reaches this.
APPEARS = 0.05
THIRDS = ("lower", "middle", "upper")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a run's figure supports one of the paper's findings, task by task."""

    finding: str
    rule: str
    per_task: dict  # task -> (meets the rule, what was seen)
    #: What the keys of `per_task` are, as the summary line counts them.
    unit: str = "tasks"

    @property
    def tasks_meeting(self) -> list[str]:
        return [task for task, (meets, _) in self.per_task.items() if meets]

    @property
    def supported(self) -> str:
        met = len(self.tasks_meeting)
        return "supported" if met == len(self.per_task) and met else "partly" if met else "not supported"

    def __str__(self) -> str:
        lines = [
            f"{self.finding}: {self.supported.upper()} ({len(self.tasks_meeting)} of {len(self.per_task)} "
            f"{self.unit}). Rule: {self.rule}."
        ]
        lines += [f"  {'yes' if meets else 'no ':3} {task}: {seen}" for task, (meets, seen) in self.per_task.items()]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        rows = "\n".join(
            f"| {task} | {'yes' if meets else 'no'} | {seen} |" for task, (meets, seen) in self.per_task.items()
        )
        return (
            f"**{self.finding}: {self.supported}** ({len(self.tasks_meeting)} of {len(self.per_task)} {self.unit})  \n"
            f"Rule: {self.rule}.\n\n| {self.unit.rstrip('s')} | meets the rule | seen |\n|---|---|---|\n{rows}\n"
        )


def third(layer: int, num_layers: int) -> str:
    """ "lower", "middle" or "upper": which third of `num_layers` layers `layer` lies in."""
    return THIRDS[min(2, 3 * int(layer) // int(num_layers))]


def largest_drop(summary: pd.DataFrame, task: str, flow: str) -> tuple[float, int]:
    """(mean relative change, layer) where blocking `flow` hurts `task`'s answer most."""
    rows = summary[(summary["task"] == task) & (summary["flow"] == flow)]
    if rows.empty:
        raise KeyError(f"the summary has no curve for task {task!r} and flow {flow!r}")
    worst = rows.loc[rows["mean"].idxmin()]
    return float(worst["mean"]), int(worst["layer"])


def _describe(change: float, layer: int, num_layers: int) -> str:
    if -change < MIN_DROP:
        return f"no drop over {MIN_DROP:g}% (largest {change:.1f}%)"
    return f"largest drop {change:.1f}% at layer {layer} ({third(layer, num_layers)} third)"


def _peak_in(summary, task, flow, num_layers, wanted) -> tuple[bool, str]:
    change, layer = largest_drop(summary, task, flow)
    return -change >= MIN_DROP and third(layer, num_layers) in wanted, _describe(change, layer, num_layers)


def _tasks(summary: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(summary["task"]))


def image_to_question(summary: pd.DataFrame, num_layers: int) -> Verdict:
    """Finding 1: the whole image reaches the question in the lower layers."""
    return Verdict(
        "Finding 1, general image information flows into the question in the lower layers",
        f"Image->Question's largest drop (at least {MIN_DROP:g}%) lies in the lower third",
        {t: _peak_in(summary, t, "Image->Question", num_layers, ("lower",)) for t in _tasks(summary)},
    )


def related_vs_other(summary: pd.DataFrame, num_layers: int) -> Verdict:
    """Finding 2: the question's object patches reach the question in the middle layers."""
    per_task = {}
    for task in _tasks(summary):
        related, seen_related = _peak_in(summary, task, "Related Image Patches->Question", num_layers, ("middle",))
        other, seen_other = _peak_in(summary, task, "Other Image Patches->Question", num_layers, ("lower",))
        per_task[task] = (related and other, f"related: {seen_related}; other: {seen_other}")
    return Verdict(
        "Finding 2, object-specific image information flows into the question in the middle layers",
        f"Related Image Patches->Question's largest drop (at least {MIN_DROP:g}%) lies in the middle "
        "third and Other Image Patches->Question's in the lower third",
        per_task,
    )


def last_position(summary: pd.DataFrame, num_layers: int) -> Verdict:
    """Finding 3: the question reaches the last position in the middle-to-upper layers; the image does not."""
    per_task = {}
    for task in _tasks(summary):
        q_change, q_layer = largest_drop(summary, task, "Question->Last")
        i_change, i_layer = largest_drop(summary, task, "Image->Last")
        l_change, _ = largest_drop(summary, task, "Last->Last")
        meets = (
            -q_change >= LARGE_DROP
            and third(q_layer, num_layers) != "lower"
            and -i_change < LARGE_DROP
            and -l_change < MIN_DROP
        )
        per_task[task] = (
            meets,
            f"question: {_describe(q_change, q_layer, num_layers)}; image: largest drop "
            f"{i_change:.1f}% at layer {i_layer}; last->last {l_change:.1f}%",
        )
    return Verdict(
        "Finding 3, the question reaches the last position in the middle-to-higher layers",
        f"Question->Last removes at least {LARGE_DROP:g}% outside the lower third, Image->Last removes "
        f"less than {LARGE_DROP:g}% everywhere and Last->Last less than {MIN_DROP:g}%",
        per_task,
    )


def answer_lens(lens_summary: pd.DataFrame) -> Verdict:
    """Finding 4: at the last position the answer appears lowercase first, capitalised later."""
    per_task = {}
    for task in _tasks(lens_summary):
        rows = lens_summary[lens_summary["task"] == task]
        curves = {
            form: rows[rows["form"] == form].set_index("layer")["mean"].sort_index() for form in ("answer", "Answer")
        }
        first = {form: next((int(l) for l, p in curve.items() if p >= APPEARS), None) for form, curve in curves.items()}
        lower, upper = first["answer"], first["Answer"]
        meets = lower is not None and (upper is None or lower < upper)
        seen = []
        for form, name in (("answer", "lowercase"), ("Answer", "capitalised")):
            when = f"never reaches {APPEARS:g}" if first[form] is None else f"from layer {first[form]}"
            seen.append(f"{name} {when} (peak {curves[form].max():.2f})")
        per_task[task] = (meets, ", ".join(seen))
    return Verdict(
        "Finding 4, the answer appears at the last position lowercase first",
        f"the lowercase answer's probability reaches {APPEARS:g} at an earlier layer than the capitalised answer's",
        per_task,
    )


#: Where the paper places each flow's effect: the thirds in which `against_controls` looks for it.
PAPER_PLACES = {
    "Image->Question": ("lower",),
    "Related Image Patches->Question": ("middle",),
    "Other Image Patches->Question": ("lower",),
    "Question->Last": ("middle", "upper"),
}


def against_controls(stats: pd.DataFrame, num_layers: int, places: dict | None = None) -> Verdict:
    """Findings 1-3 against matched random controls: does each flow hurt more than edges of its size?

    `stats` from `stats.flow_vs_control` (one row per flow and window, optionally per task too). A flow
    (per task, if the table has tasks) meets the rule when, in at least one window of the thirds where
    the paper places its effect (`PAPER_PLACES`), its mean change lies below its control's and the
    paired test's adjusted p-value is under the table's alpha (its `significant` column).
    """
    places = PAPER_PLACES if places is None else places
    per_flow, keys = {}, [k for k in ("task", "flow") if k in stats]
    for key, rows in stats[stats["flow"].isin(list(places))].groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        flow = key[-1]
        inside = rows[[third(l, num_layers) in places[flow] for l in rows["layer"]]]
        hits = inside[inside["significant"] & (inside["diff"] < 0)]
        where = " and ".join(places[flow])
        if len(hits):
            best = hits.loc[hits["diff"].idxmin()]
            seen = (
                f"below its control in {len(hits)} of {len(inside)} {where}-third windows (largest gap "
                f"{best['diff']:.1f} pp at layer {int(best['layer'])}, dz {best['effect_size']:.2f}, "
                f"adjusted p {best['p_adjusted']:.3g}, n={int(best['n'])})"
            )
        else:
            closest = inside.loc[inside["p_adjusted"].idxmin()] if len(inside) else None
            seen = f"not distinguishable from its control in the {where} third" + (
                f" (smallest adjusted p {closest['p_adjusted']:.3g} at layer {int(closest['layer'])}, "
                f"gap {closest['diff']:.1f} pp)"
                if closest is not None
                else ""
            )
        per_flow[" · ".join(key)] = (len(hits) > 0, seen)
    correction = stats["correction"].iloc[0] if "correction" in stats and len(stats) else "holm"
    return Verdict(
        "Findings 1-3 against matched random controls",
        "the flow lowers the answer's probability more than random edges of the same number in the same "
        f"query rows and layers (paired sign-flip test, {correction}-adjusted across windows, p < 0.05) in at "
        "least one window of the third(s) where the paper places its effect",
        per_flow,
        unit="flows" if keys == ["flow"] else "task-flows",
    )
