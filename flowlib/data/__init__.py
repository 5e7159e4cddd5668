"""Data: the synthetic world, the paper's GQA task files, raw GQA, and a sample preview.

Every loader yields `flowlib.sample.Sample` records:

    >>> world = load_or_generate_world(n_per_task=1000, seed=0)   # synthetic, cached
    >>> samples = to_samples(world["test"])
    >>> paper = load_paper_tasks("path/to/datasets", image_dir="path/to/gqa/images")
    >>> raw = load_raw_gqa("questions.json", "sceneGraphs.json", image_dir="path/to/gqa/images")
"""

from flowlib.data.gqa_raw import (
    DETAILED_TYPES,
    build_tasks,
    choose_options,
    load_questions,
    load_raw_gqa,
    load_scene_graphs,
    program_objects,
)
from flowlib.data.gqa_tasks import (
    TASK_FILES,
    fetch_paper_tasks,
    find_task_files,
    load_paper_tasks,
    load_task_csv,
    task_from_filename,
)
from flowlib.data.preview import preview
from flowlib.data.scenes import SMALLEST_OBJECT_PROCESSED_PX, SYNTHETIC_PUNCTUATION, split_words, synthetic_vocabulary
from flowlib.data.sources import SOURCES, group_by_task, load_samples
from flowlib.data.synthetic import (
    generate_split,
    generate_world,
    iter_samples,
    load_or_generate_world,
    save_world,
    to_samples,
)

__all__ = [
    "DETAILED_TYPES",
    "SOURCES",
    "group_by_task",
    "load_samples",
    "SMALLEST_OBJECT_PROCESSED_PX",
    "SYNTHETIC_PUNCTUATION",
    "TASK_FILES",
    "build_tasks",
    "choose_options",
    "fetch_paper_tasks",
    "find_task_files",
    "generate_split",
    "generate_world",
    "iter_samples",
    "load_or_generate_world",
    "load_paper_tasks",
    "load_questions",
    "load_raw_gqa",
    "load_scene_graphs",
    "load_task_csv",
    "preview",
    "program_objects",
    "save_world",
    "split_words",
    "synthetic_vocabulary",
    "task_from_filename",
    "to_samples",
]
