"""A study: one model, one data source, one window — what every notebook opens first.

The notebooks stay thin by calling this: it loads the model and the samples
named by the notebook's parameters, runs the knockout experiments and the lens
into a results folder, and labels every figure with the model and data it
came from (the offline toy model is always labelled as such).

Example:
    >>> study = Study.open(model="toy-llava", data="synthetic", samples_per_task=40)
    >>> table = study.knockout("01_image_to_question", ["Image->Question", "Image->Last"])
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from . import config as cfg
from .data.sources import load_samples
from .models import LoadedModel, load_model
from .sample import TASKS, Sample

#: Models up to this size get a live explorer (sweeps recomputed on the CPU as the controls move);
#: larger ones browse the stored knockout table.
LIVE_EXPLORER_MAX_PARAMETERS = 50_000_000


def slug(text: str) -> str:
    """A filesystem-safe name for `text`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")


@dataclasses.dataclass
class Study:
    """A loaded model, samples by task, and the analysis settings shared by a notebook's cells."""

    loaded: LoadedModel
    samples: dict[str, list[Sample]]
    data_name: str
    samples_per_task: int
    window: int
    #: question id -> answered correctly (greedy); filled once, read by every later filter.
    verdicts: dict = dataclasses.field(default_factory=dict)
    #: question id -> first answer word with the image (`answers_with_image`), filled once.
    first_words: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def open(
        cls,
        model: str = cfg.OFFLINE_MODEL,
        data: str = "synthetic",
        *,
        tasks: Sequence[str] = TASKS,
        samples_per_task: int = 40,
        window: Optional[int] = None,
        device: str = "cpu",
        dtype: str = "float32",
        image_mode: Optional[str] = None,
        seed: int = 0,
        csv_dir: Optional[str] = None,
        image_dir: Optional[str] = None,
        questions: Optional[str] = None,
        scene_graphs: Optional[str] = None,
        candidates_per_task: Optional[int] = None,
    ) -> "Study":
        """Load the model and the samples the notebook parameters name.

        `samples_per_task` correctly answered samples are analysed per task; up to
        `candidates_per_task` (default 1.5x as many) are read to find them.
        """
        if isinstance(tasks, str):  # e.g. "ChooseAttr,QueryAttr" from `make figures TASKS=...`
            tasks = [task.strip() for task in tasks.split(",") if task.strip()]
        loaded = load_model(model, dtype=dtype, device=device, image_mode=image_mode)
        candidates = candidates_per_task or int(samples_per_task * 1.5) + 2
        samples = load_samples(data, tasks=tasks, per_task=candidates, seed=seed, csv_dir=csv_dir,
                               image_dir=image_dir, questions=questions, scene_graphs=scene_graphs)
        data_name = f"synthetic world (seed {seed}, test split)" if data == "synthetic" else f"{data} data"
        window = int(window or cfg.default_window(loaded.num_layers))
        return cls(loaded, samples, data_name, samples_per_task, window)

    @property
    def is_offline_toy(self) -> bool:
        return self.loaded.name == cfg.OFFLINE_MODEL

    @property
    def label(self) -> str:
        """Model and data, as every figure names them."""
        model = f"{self.loaded.name} (offline toy model, not the paper's)" if self.is_offline_toy else self.loaded.name
        return f"{model} on {self.data_name}"

    def title(self, what: str) -> str:
        return f"{what}\n{self.label}, window k={self.window}"

    def all_samples(self) -> list[Sample]:
        return [s for task in self.samples for s in self.samples[task]]

    def run_dir(self, name: str) -> Path:
        return cfg.runs_dir() / slug(self.loaded.name) / slug(self.data_name) / f"{name}-w{self.window}"

    def knockout(self, name: str, flows: Sequence[str], *, progress: bool = True) -> pd.DataFrame:
        """Run (or resume) the layer sweeps of `flows` over the study's samples; the tidy table.

        A sample with an empty group (e.g. a LogicalObj question whose objects are all absent has no
        related patches) is recorded as skipped in the run folder and left out, as in the paper.
        """
        from .runner import run_experiment

        summary = run_experiment(self.loaded, self.all_samples(), self.run_dir(name), flows=list(flows),
                                 window=self.window, per_task=self.samples_per_task, data=self.data_name,
                                 skip_empty_groups=True, progress=progress)
        if summary.table.empty:
            raise ValueError(f"no sample was analysed ({summary.count('wrong_answer')} answered wrongly, "
                             f"{summary.count('zero_base')} with a zero base probability); see {summary.output}")
        return summary.table

    def accuracy(self) -> pd.DataFrame:
        """Accuracy per task (first generated word) with the image and with a blank image, and chance."""
        from .evaluate import CHANCE, evaluate, score

        samples = self.all_samples()
        seen, blank = score(samples, self.answers_with_image()), evaluate(self.loaded, samples, blank=True)
        return pd.DataFrame([{"task": task, "n": seen["n"][task], "accuracy": seen["per_task"][task],
                              "blank_accuracy": blank["per_task"][task], "chance": CHANCE[task]}
                             for task in seen["per_task"]])

    def accuracy_by_answer(self) -> pd.DataFrame:
        """Accuracy with the image per task and correct answer (`evaluate.score_by_answer`)."""
        from .evaluate import score_by_answer

        return pd.DataFrame(score_by_answer(self.all_samples(), self.answers_with_image()))

    def answers_with_image(self) -> list[str]:
        """The first answer word to each of `all_samples()`, evaluated once and then read from `first_words`."""
        from .evaluate import evaluate

        missing = [s for s in self.all_samples() if s.question_id not in self.first_words]
        if missing:
            answers = evaluate(self.loaded, missing, return_answers=True)["answers"]
            self.first_words.update({s.question_id: a for s, a in zip(missing, answers)})
        return [self.first_words[s.question_id] for s in self.all_samples()]

    def correct(self, per_task: Optional[int] = None) -> dict[str, list[Sample]]:
        """The samples the model answers correctly (greedy), at most `per_task` per task."""
        from .runner import correct_samples

        per_task = per_task or self.samples_per_task
        kept: dict[str, list[Sample]] = {task: [] for task in self.samples}
        for sample in correct_samples(self.loaded, self.all_samples(), per_task, progress=False,
                                      verdicts=self.verdicts):
            kept[sample.task].append(sample)
        if not any(kept.values()):
            raise ValueError(f"{self.loaded.name} answers none of the {len(self.all_samples())} samples correctly, so "
                             "there is nothing to analyse; check the model, its prompt style and the data")
        return kept

    def lens(self, lenses: Sequence[str] = ("normed", "raw")) -> pd.DataFrame:
        """The answer lens over the correctly answered samples, both lenses labelled."""
        from .lens import lens_table

        chosen = [s for samples in self.correct().values() for s in samples]
        return lens_table(self.loaded, chosen, lenses=lenses)

    def prepared_examples(self, per_task: int = 1) -> dict:
        """Prepared inputs of the first `per_task` correctly answered samples of each task."""
        return {task: [self.loaded.prepare(s) for s in samples]
                for task, samples in self.correct(per_task).items() if samples}

    def explorer(self, flows: Sequence[str], table: Optional[pd.DataFrame] = None, per_task: int = 5):
        """A `FlowExplorer`: live on a model small enough for the CPU, else over the stored `table`."""
        from .widgets import FlowExplorer

        if self.loaded.model.num_parameters() <= LIVE_EXPLORER_MAX_PARAMETERS or table is None:
            return FlowExplorer.live(self.loaded, self.prepared_examples(per_task), flows=list(flows),
                                     window=self.window, title=self.label)
        return FlowExplorer.stored(table, title=self.label)
