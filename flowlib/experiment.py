"""One experiment's settings, resolved once: what the notebooks (`Study`), the command line and the runner share.

`ExperimentSettings` holds every setting of a knockout experiment (model, data, tasks, sample counts,
window, flows, engine, device ...) with its default and the reason for it, and checks them when it is
made: a bad value raises `run_plan.RunSettingsError` naming it before any model is loaded. The one
setting that needs the model, the window's default and range, is resolved by `window_for` (the paper's
k for the model's depth). Everything downstream reads these values; no front door resolves its own.

The same settings name the same run folder (`run_dir`: model, data, window and the run's identity),
so a notebook and `flowlib run` given equal settings work in one folder and reuse each other's rows.

Example:
    >>> settings = ExperimentSettings(model="toy-llava", tasks=("ChooseAttr",), samples_per_task=20)
    >>> loaded = settings.load_model()
    >>> summary = settings.run(loaded, settings.all_samples())  # into settings.run_dir(...)
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import config as cfg
from .flows import PAPER_FLOWS, parse_flow
from .run_plan import RunSettingsError, count_setting, resolve_window
from .sample import TASKS, Sample, check_task

#: Data sources by name (`flowlib.data.sources`).
DATA_SOURCES = ("synthetic", "paper", "gqa")
ENGINES = ("fast", "reference")  # `sweep.ENGINES`, named here so that checking settings imports no torch kernels
DTYPES = ("float32", "float16", "bfloat16")


def slug(text: str) -> str:
    """A filesystem-safe name for `text`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """Every setting of a knockout experiment, with its default; checked when made (`RunSettingsError`)."""

    model: str = cfg.OFFLINE_MODEL  # hub id, checkpoint folder or short name; the offline toy runs anywhere
    data: str = "synthetic"  # "synthetic" (generated, offline), "paper" (released CSVs) or "gqa" (raw GQA)
    tasks: tuple[str, ...] = TASKS  # the paper's six tasks
    samples_per_task: int | None = 40  # correctly answered samples analysed per task (None: all candidates)
    candidates_per_task: int | None = None  # samples read per task to find them; None: 1.5 x samples_per_task + 2
    window: int | None = None  # k; None: the paper's k for the model's depth (checked with the model: `window_for`)
    flows: tuple[str, ...] = PAPER_FLOWS  # the paper's six flows, all computed in one run
    engine: str = "fast"  # "fast" or "reference": the same numbers, the fast one an order of magnitude sooner
    max_new_tokens: int = 10  # greedy answer length for the correctness filter (answers are a word or phrase)
    max_batch: int | None = None  # fast engine's windows per batch; None: as many as the free memory holds
    device: str = "cpu"  # "cuda", "cuda:1" ...; `flowlib run` under torchrun makes "cuda" cuda:LOCAL_RANK
    device_map: str | None = None  # e.g. "auto": one model across the visible GPUs (accelerate); overrides device
    dtype: str = "float32"  # float32 on a CPU; the paper ran float16 on GPUs
    image_mode: str | None = None  # None: the family's default (LLaVA-1.5 pads to a square, as the original)
    revision: str | None = None  # hub revision to pin
    seed: int = 0  # synthetic world seed
    split: str = "test"  # synthetic split; the toy model never trained on "test"
    csv_dir: str | None = None  # data "paper": the folder of the released task CSVs
    image_dir: str | None = None  # data "paper" or "gqa": the folder of GQA images
    questions: str | None = None  # data "gqa": GQA's questions JSON
    scene_graphs: str | None = None  # data "gqa": GQA's scene graphs JSON

    def __post_init__(self):
        tasks = self.tasks
        if isinstance(tasks, str):  # e.g. "ChooseAttr,QueryAttr" from `make figures TASKS=...`
            tasks = [task.strip() for task in tasks.split(",") if task.strip()]
        try:
            tasks = tuple(dict.fromkeys(check_task(task) for task in tasks))
        except ValueError as err:
            raise RunSettingsError(str(err)) from err
        if not tasks:
            raise RunSettingsError("tasks must name one or more tasks")
        flows = (self.flows,) if isinstance(self.flows, str) else tuple(self.flows)
        if not flows or len(set(flows)) != len(flows):
            raise RunSettingsError(f"flows must be one or more distinct flows, not {list(flows)}")
        for flow in flows:
            parse_flow(flow)  # FlowError names an unknown flow
        if self.data not in DATA_SOURCES:
            raise RunSettingsError(f"unknown data source {self.data!r}; use one of: {', '.join(DATA_SOURCES)}")
        if self.engine not in ENGINES:
            raise RunSettingsError(f"unknown engine {self.engine!r}; use one of: {', '.join(ENGINES)}")
        dtype = self.dtype if isinstance(self.dtype, str) else str(self.dtype).replace("torch.", "")
        if dtype not in DTYPES:
            raise RunSettingsError(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}")
        per_task = count_setting("samples_per_task", self.samples_per_task)
        candidates = count_setting("candidates_per_task", self.candidates_per_task)
        if per_task is not None and candidates is not None and candidates < per_task:
            raise RunSettingsError(
                f"candidates_per_task ({candidates}) must be at least samples_per_task ({per_task}): the "
                "candidates are the samples read to find that many correctly answered ones"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise RunSettingsError(f"seed must be a whole number, not {self.seed!r}")
        fields = {
            "tasks": tasks,
            "flows": flows,
            "samples_per_task": per_task,
            "candidates_per_task": candidates,
            "max_new_tokens": count_setting("max_new_tokens", self.max_new_tokens, allow_none=False),
            "max_batch": count_setting("max_batch", None if self.max_batch == "auto" else self.max_batch),
            "device": str(self.device),
            "dtype": dtype,
        }
        # Paths as strings, so that equal settings compare equal.
        for key in ("csv_dir", "image_dir", "questions", "scene_graphs"):
            value = getattr(self, key)
            fields[key] = None if value is None else str(value)
        for key, value in fields.items():
            object.__setattr__(self, key, value)

    @classmethod
    def build(cls, settings: ExperimentSettings | str | None = None, data: str | None = None, **changes):
        """Settings from an `ExperimentSettings` (or a model name, or None: the defaults) with `changes` applied.

        Unknown names raise `TypeError` listing the settings.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(sorted(names))}")
        if isinstance(settings, str):
            changes.setdefault("model", settings)
            settings = None
        if data is not None:
            changes["data"] = data
        return dataclasses.replace(settings or cls(), **changes)

    @classmethod
    def from_parameters(cls, namespace: Mapping, **changes) -> ExperimentSettings:
        """Settings from a notebook's parameters: the UPPER_CASE names of settings (MODEL, DATA, TASKS, WINDOW ...).

        Names that are not settings (WIDGETS ...) are ignored, and so is FLOWS: each notebook picks the
        flows it plots from the one run of all the paper's flows. Example:
            >>> study = Study.open(ExperimentSettings.from_parameters(globals()))
        """
        names = {f.name.upper(): f.name for f in dataclasses.fields(cls) if f.name != "flows"}
        found = {names[key]: value for key, value in namespace.items() if key in names}
        return cls.build(**{**found, **changes})

    # --- what the settings resolve to --------------------------------------------------------------------------------

    @property
    def candidates(self) -> int | None:
        """Samples read per task: `candidates_per_task`, else 1.5 x `samples_per_task` + 2 (None: all there are)."""
        if self.candidates_per_task is not None:
            return self.candidates_per_task
        return None if self.samples_per_task is None else int(self.samples_per_task * 1.5) + 2

    @property
    def data_name(self) -> str:
        """The data as figures and run folders name it."""
        if self.data == "synthetic":
            return f"synthetic world (seed {self.seed}, {self.split} split)"
        return f"{self.data} data"

    def window_for(self, num_layers: int) -> int:
        """The window k for a model of `num_layers` layers (`run_plan.resolve_window`: default and range)."""
        return resolve_window(self.window, num_layers)

    def experiment_flows(self, flows: Sequence[str] = ()) -> tuple[str, ...]:
        """The flows of the one knockout run: the settings' flows, then any other asked for."""
        return tuple(dict.fromkeys([*self.flows, *flows]))

    @property
    def engine_max_batch(self):
        """`max_batch` as the runner takes it: "auto" (sized to the free memory) or a number."""
        return "auto" if self.max_batch is None else self.max_batch

    # --- loading -----------------------------------------------------------------------------------------------------

    def load_model(self):
        """The model the settings name, on their device and in their dtype (`models.load_model`)."""
        from . import models

        kwargs = {"device_map": self.device_map} if self.device_map else {}
        return models.load_model(
            self.model,
            dtype=self.dtype,
            device=self.device,
            image_mode=self.image_mode,
            revision=self.revision,
            **kwargs,
        )

    def load_samples(self) -> dict[str, list[Sample]]:
        """The candidate samples by task, in task order (`candidates` of each; `data.sources.load_samples`)."""
        from .data.sources import load_samples

        return load_samples(
            self.data,
            tasks=self.tasks,
            per_task=self.candidates,
            seed=self.seed,
            split=self.split,
            csv_dir=self.csv_dir,
            image_dir=self.image_dir,
            questions=self.questions,
            scene_graphs=self.scene_graphs,
        )

    # --- the run -----------------------------------------------------------------------------------------------------

    def plan(self, loaded, samples, flows: Sequence[str] = ()):
        """The run over `samples`, checked and fingerprinted (`run_plan.plan_run`)."""
        from .run_plan import plan_run

        return plan_run(
            loaded,
            samples,
            flows=self.experiment_flows(flows),
            window=self.window,
            engine=self.engine,
            max_new_tokens=self.max_new_tokens,
            per_task=self.samples_per_task,
        )

    def run_dir(self, loaded, plan) -> Path:
        """The run's folder under `config.runs_dir()`: model / data / ``knockout-w<k>-<identity>``.

        The identity fingerprints the model's files, the samples and their images, the settings and the
        code, so a run with any of them changed gets a fresh folder (never stale numbers), and an
        unchanged one, from a notebook or the command line, finds and resumes its own.
        """
        name = loaded.name
        if name not in cfg.SHORT_NAMES and Path(name).expanduser().is_dir():
            name = Path(name).expanduser().resolve().name  # a checkpoint folder: its name, not the whole path
        folder = f"knockout-w{plan.config.window}-{plan.identity[:12]}"
        return cfg.runs_dir() / slug(name) / slug(self.data_name) / folder

    def run(
        self,
        loaded,
        samples,
        output=None,
        *,
        flows: Sequence[str] = (),
        plan=None,
        shard=None,
        strict: bool = False,
        progress: bool = True,
    ):
        """Run (or resume) the knockout experiment over `samples` into `output` (default: `run_dir`).

        `flows` adds flows to the settings' own (`experiment_flows`); `shard` runs only its part of the
        samples (`flowlib.shards`). Returns the `merge.RunSummary`.
        """
        from .runner import run_experiment

        samples = list(samples)
        plan = plan or self.plan(loaded, samples, flows)
        return run_experiment(
            loaded,
            samples,
            output if output is not None else self.run_dir(loaded, plan),
            plan=plan,
            data=self.data_name,
            max_batch=self.engine_max_batch,
            strict=strict,
            progress=progress,
            shard=shard,
        )
