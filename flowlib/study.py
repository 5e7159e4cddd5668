"""A study: one model, one data source, one window — what every notebook opens first.

The notebooks stay thin by calling this: it loads the model and the samples
named by the notebook's parameters, runs the knockout experiments and the lens
into a results folder, and labels every figure with the model and data it
came from (the offline toy model is always labelled as such).

Its settings are an `ExperimentSettings` (`flowlib.experiment`), the same object the command line
builds from its flags, so a notebook and `flowlib run` with equal settings share one run folder.

Example:
    >>> study = Study.open(ExperimentSettings(model="toy-llava", samples_per_task=40))
    >>> study = Study.open("toy-llava", "synthetic", samples_per_task=40)  # the same, by keywords
    >>> table = study.knockout(["Image->Question", "Image->Last"])  # from one run of all six paper flows
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from . import config as cfg
from .experiment import ExperimentSettings
from .models import LoadedModel
from .sample import Sample

#: Models up to this size get a live explorer (sweeps recomputed on the CPU as the controls move);
#: larger ones browse the stored knockout table.
LIVE_EXPLORER_MAX_PARAMETERS = 50_000_000


@dataclasses.dataclass
class Study:
    """The experiment's settings, its loaded model and samples by task: what a notebook's cells share."""

    settings: ExperimentSettings
    loaded: LoadedModel
    samples: dict[str, list[Sample]]
    window: int  # the settings' window resolved for this model (`ExperimentSettings.window_for`)
    #: question id -> answered correctly (greedy, with the image, the knockout filter's rule); filled once,
    #: read by every later filter and by the accuracy table.
    verdicts: dict = dataclasses.field(default_factory=dict)
    #: question id -> the greedy answer to a blank image is correct (`accuracy`); filled once.
    blank_verdicts: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, settings: ExperimentSettings | str | None = None, data: str | None = None, **changes) -> Study:
        """Load the model and the samples the settings name.

        Args:
            settings: an `ExperimentSettings` (e.g. `ExperimentSettings.from_parameters(globals())` in a
                notebook), or a model name, or None for the defaults.
            data: the data source ("synthetic", "paper", "gqa"), as a shortcut for ``data=``.
            changes: any setting by name (`ExperimentSettings`: tasks, samples_per_task, window, device,
                dtype, seed, csv_dir, image_dir, candidates_per_task, max_batch ...), applied on top.

        `samples_per_task` correctly answered samples are analysed per task; `candidates` are read to
        find them. Bad settings raise `run_plan.RunSettingsError` before the model loads; a window that
        does not fit the model raises once it has loaded.
        """
        settings = ExperimentSettings.build(settings, data, **changes)
        loaded = settings.load_model()
        window = settings.window_for(loaded.num_layers)  # None: the default; 0 or > depth: refused
        return cls(settings, loaded, settings.load_samples(), window)

    @property
    def data_name(self) -> str:
        return self.settings.data_name

    @property
    def samples_per_task(self) -> int | None:
        return self.settings.samples_per_task

    @property
    def max_batch(self) -> int | None:
        return self.settings.max_batch

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

    def experiment_flows(self, flows: Sequence[str] = ()) -> list[str]:
        """The flows of the study's one knockout run: the settings' (the paper's six), then any other asked for."""
        return list(self.settings.experiment_flows(flows))

    def plan(self, flows: Sequence[str] = ()):
        """The study's knockout run, checked and fingerprinted (`run_plan.plan_run`)."""
        return self.settings.plan(self.loaded, self.all_samples(), flows)

    def run_dir(self, flows: Sequence[str] = (), plan=None) -> Path:
        """The folder of the study's knockout run (`ExperimentSettings.run_dir`), named by the run's identity.

        The identity fingerprints the model's files, the samples and their images, the settings and the
        code, so a notebook rerun with any of them changed gets a fresh folder (never stale numbers),
        and an unchanged rerun, from this notebook, another one or `flowlib run` with the same settings,
        finds and resumes its own.
        """
        return self.settings.run_dir(self.loaded, plan or self.plan(flows))

    def knockout(self, flows: Sequence[str], *, progress: bool = True) -> pd.DataFrame:
        """The layer sweeps of `flows` over the study's samples, as a tidy table.

        Every notebook's flows come from one run of all the paper's flows (`experiment_flows`) in one
        folder per model, data and settings: the answer filter and the clean pass of each sample run
        once for all notebooks, and a rerun resumes instead of recomputing. A sample whose group is empty
        for a flow (e.g. a box outside its image) is left out of that flow, with its reason recorded in
        the run folder. Raises `runner.NothingAnalysedError`, saying why, when no sample was analysed.
        """
        from .answers import normalise_answer

        summary = self.settings.run(self.loaded, self.all_samples(), flows=flows, progress=progress)
        for status in summary.statuses:  # the run's greedy answers spare later filters (the lens) a generation
            if "greedy_answer" in status:
                self.verdicts[status["question_id"]] = normalise_answer(status["greedy_answer"]) == normalise_answer(
                    status["answer"]
                )
        table = summary.table
        return table[table["flow"].isin(list(flows))].reset_index(drop=True)

    def accuracy(self) -> pd.DataFrame:
        """Accuracy per task with the image and with a blank image, against chance.

        Columns: task, n, correct (count, with the image), accuracy, blank_accuracy, chance. A sample is
        correct when its greedy answer, generated to the end, equals the dataset's answer (both normalised):
        the knockout filter's rule and verdicts (`correct`), so `correct` counts the samples the analyses can
        keep. Each answer is generated once per study.
        """
        from .evaluate import CHANCE, score

        samples = self.all_samples()
        seen, blank = score(samples, self.verdicts_with_image()), score(samples, self.verdicts_with_blank_image())
        return pd.DataFrame(
            [
                {
                    "task": task,
                    "n": seen["n"][task],
                    "correct": seen["correct"][task],
                    "accuracy": seen["per_task"][task],
                    "blank_accuracy": blank["per_task"][task],
                    "chance": CHANCE[task],
                }
                for task in seen["per_task"]
            ]
        )

    def accuracy_by_answer(self) -> pd.DataFrame:
        """Accuracy with the image per task and correct answer (`evaluate.score_by_answer`), as `accuracy` counts."""
        from .evaluate import score_by_answer

        return pd.DataFrame(score_by_answer(self.all_samples(), self.verdicts_with_image()))

    def verdicts_with_image(self) -> list[bool]:
        """Whether the model answers each of `all_samples()` correctly, from `verdicts` (filled where missing)."""
        from .answers import correct_samples

        # With no per-task limit the filter sees, and records a verdict for, every sample.
        list(correct_samples(self.loaded, self.all_samples(), progress=False, verdicts=self.verdicts))
        return [self.verdicts[s.question_id] for s in self.all_samples()]

    def verdicts_with_blank_image(self) -> list[bool]:
        """Whether the greedy answer to a blank image is correct, per sample of `all_samples()` (`blank_verdicts`)."""
        from .evaluate import answer_verdicts, evaluate

        missing = [s for s in self.all_samples() if s.question_id not in self.blank_verdicts]
        if missing:
            answers = evaluate(self.loaded, missing, blank=True, return_answers=True)["answers"]
            self.blank_verdicts.update({s.question_id: v for s, v in zip(missing, answer_verdicts(missing, answers))})
        return [self.blank_verdicts[s.question_id] for s in self.all_samples()]

    def correct(self, per_task: int | None = None) -> dict[str, list[Sample]]:
        """The samples the model answers correctly (greedy), at most `per_task` per task."""
        from .answers import correct_samples

        per_task = per_task or self.samples_per_task
        kept: dict[str, list[Sample]] = {task: [] for task in self.samples}
        for sample in correct_samples(
            self.loaded, self.all_samples(), per_task, progress=False, verdicts=self.verdicts
        ):
            kept[sample.task].append(sample)
        if not any(kept.values()):
            raise ValueError(
                f"{self.loaded.name} answers none of the {len(self.all_samples())} samples correctly, so "
                "there is nothing to analyse; check the model, its prompt style and the data"
            )
        return kept

    def lens(self, lenses: Sequence[str] = ("normed", "raw")) -> pd.DataFrame:
        """The answer lens over the correctly answered samples, both lenses labelled."""
        from .lens import lens_table

        chosen = [s for samples in self.correct().values() for s in samples]
        return lens_table(self.loaded, chosen, lenses=lenses)

    def prepared_examples(self, per_task: int = 1) -> dict:
        """Prepared inputs of the first `per_task` correctly answered samples of each task."""
        return {
            task: [self.loaded.prepare(s) for s in samples]
            for task, samples in self.correct(per_task).items()
            if samples
        }

    def explorer(self, flows: Sequence[str], table: pd.DataFrame | None = None, per_task: int = 5):
        """A `FlowExplorer`: live on a model small enough for the CPU, else over the stored `table`."""
        from .widgets import FlowExplorer

        if self.loaded.model.num_parameters() <= LIVE_EXPLORER_MAX_PARAMETERS or table is None:
            return FlowExplorer.live(
                self.loaded, self.prepared_examples(per_task), flows=list(flows), window=self.window, title=self.label
            )
        return FlowExplorer.stored(table, title=self.label)
