"""One entry point from a data-source name to samples grouped by task.

Notebooks and the command line name their data the same way ("synthetic",
"paper" for the released task CSVs, "gqa" for raw GQA), so both call this.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from flowlib.sample import TASKS, Sample, check_task

SOURCES = ("synthetic", "paper", "gqa")


def group_by_task(samples, tasks: Sequence[str], per_task: int | None) -> dict[str, list[Sample]]:
    """Samples grouped by task in `tasks` order, keeping the first `per_task` of each (all when None)."""
    grouped: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.task in tasks and (per_task is None or len(grouped[sample.task]) < per_task):
            grouped[sample.task].append(sample)
    return {task: grouped[task] for task in tasks if grouped[task]}


def load_samples(
    source: str = "synthetic",
    *,
    tasks: Sequence[str] = TASKS,
    per_task: int | None = None,
    seed: int = 0,
    split: str = "test",
    csv_dir: str | None = None,
    image_dir: str | None = None,
    questions: str | None = None,
    scene_graphs: str | None = None,
    on_missing_image: str = "error",
) -> dict[str, list[Sample]]:
    """Samples of `tasks` from a named source, grouped by task.

    Args:
        source: "synthetic" (generated, deterministic in `seed` and `split`), "paper" (the released
            task CSVs in `csv_dir` with GQA images in `image_dir`) or "gqa" (raw GQA `questions` and
            `scene_graphs` JSON files with images in `image_dir`).
        per_task: how many samples of each task to keep (the first ones; synthetic generates exactly these).
    """
    tasks = [check_task(task) for task in tasks]
    if source == "synthetic":
        from flowlib.data.synthetic import generate_split, iter_samples

        count = per_task if per_task is not None else 100
        return group_by_task(iter_samples(generate_split(count, seed=seed, split=split, tasks=tasks)), tasks, None)
    if source == "paper":
        if not csv_dir:
            raise ValueError(
                "data source 'paper' needs csv_dir: the folder holding the six released task CSVs "
                "(get them with flowlib.data.fetch_paper_tasks(dest) when online)"
            )
        from flowlib.data.gqa_tasks import load_paper_tasks

        samples = load_paper_tasks(csv_dir, image_dir=image_dir, tasks=tasks, on_missing_image=on_missing_image)
        return group_by_task(samples, tasks, per_task)
    if source == "gqa":
        if not (questions and scene_graphs):
            raise ValueError("data source 'gqa' needs questions= and scene_graphs= (GQA's JSON files)")
        from flowlib.data.gqa_raw import load_raw_gqa

        samples = load_raw_gqa(
            questions, scene_graphs, image_dir=image_dir, tasks=tasks, on_missing_image=on_missing_image
        )
        return group_by_task(samples, tasks, per_task)
    raise ValueError(f"unknown data source {source!r}; use one of: {', '.join(SOURCES)}")
