"""A run's plan: its settings checked, its samples indexed, and everything that decides its numbers fingerprinted.

`plan_run` is the check every run passes before anything is written: a bad setting raises `RunSettingsError`
naming it and its range, no samples raise `NoSamplesError`. The `RunPlan` it returns holds the settings
(`RunConfig`), each sample with its stable `sample_index` (`TASK_STRIDE`), and the run's identity: the
fingerprints (`flowlib.fingerprint`) of model files, samples and images, settings and code, which the run
folder records and checks on resume. `resolve_window` and `count_setting` are the one place those settings
are resolved and checked: `flowlib.experiment` (the notebooks' and the command line's settings) calls them too.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Sequence

from . import fingerprint
from .config import default_window
from .flows import PAPER_FLOWS, parse_flow
from .sample import TASKS, check_task
from .sweep import ENGINES

#: `sample_index` = the task's place in TASKS x TASK_STRIDE + the sample's place among its task's samples:
#: unique across tasks, and the same for a question whichever other tasks a run selects.
TASK_STRIDE = 10**8


class RunSettingsError(ValueError):
    """A run setting is out of range (window, counts, engine, flows): the message names it and its range."""


class NoSamplesError(ValueError):
    """There is nothing to run on: no samples were given (e.g. every data file was empty)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The analysis settings that decide a run's numbers (besides model, data and code; all checked on resume)."""

    flows: tuple[str, ...] = PAPER_FLOWS  # the paper's six flows
    window: int | None = None  # k; None: config.default_window(num_layers), e.g. 7 for 32 layers
    engine: str = "fast"  # "fast" or "reference": same numbers, the fast one an order of magnitude sooner
    max_new_tokens: int = 10  # greedy answer length for the correctness filter (answers are a word or phrase)
    per_task: int | None = None  # stop after this many analysed samples per task; None: all


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A checked run before it starts: its settings, its indexed samples and its identity."""

    config: RunConfig
    samples: list  # (sample_index, Sample) pairs, in the given order
    fingerprint: dict  # the four parts (fingerprint.PARTS)
    records: list  # one per sample (fingerprint.data_fingerprint), stored as data.json
    identity: str


def count_setting(name: str, value, allow_none: bool = True) -> int | None:
    """`value` as a count >= 1 (None passes when `allow_none`), else `RunSettingsError` naming `name`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise RunSettingsError(
            f"{name} must be a whole number >= 1{' (or None for no limit)' if allow_none else ''}, not {value!r}"
        )
    return int(value)


def resolve_window(window, num_layers: int) -> int:
    """The window k: None gives the paper's default for this depth (`config.default_window`); else 1..num_layers.

    The one place a window is resolved and checked: the command line, the notebooks' `Study` and the
    runner all call it, so `0` is refused everywhere rather than read as "default".
    """
    default = default_window(num_layers)
    if window is None:
        return default
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or not 1 <= window <= num_layers:
        raise RunSettingsError(
            f"window {window!r} does not fit a model of {num_layers} layers; use 1..{num_layers} "
            f"(the default, when unset, is k={default})"
        )
    return int(window)


def index_samples(samples: Iterable) -> list:
    """(sample_index, sample) pairs (see `TASK_STRIDE`); a repeated question id or an unknown task raises."""
    out, seen, positions = [], set(), {}
    for sample in samples:
        if sample.question_id in seen:
            raise ValueError(f"sample id {sample.question_id!r} occurs twice; question ids must be unique")
        seen.add(sample.question_id)
        position = positions.get(check_task(sample.task), 0)
        positions[sample.task] = position + 1
        out.append((TASKS.index(sample.task) * TASK_STRIDE + position, sample))
    return out


def plan_run(
    loaded,
    samples: Iterable,
    *,
    flows: Sequence[str] = PAPER_FLOWS,
    window: int | None = None,
    engine: str = "fast",
    max_new_tokens: int = 10,
    per_task: int | None = None,
) -> RunPlan:
    """Check a run's settings and samples, and fingerprint it (see `run_experiment` for the arguments).

    Raises:
        RunSettingsError: a window outside 1..depth, a count below 1, an unknown engine, no or repeated flows.
        FlowError: an unknown flow. NoSamplesError: no samples.
    """
    flows = tuple(flows)
    if not flows or len(set(flows)) != len(flows):
        raise RunSettingsError(f"flows must be one or more distinct flows, not {list(flows)}")
    for flow in flows:
        parse_flow(flow)
    if engine not in ENGINES:
        raise RunSettingsError(f"unknown engine {engine!r}; use one of: {', '.join(ENGINES)}")
    config = RunConfig(
        flows,
        resolve_window(window, loaded.num_layers),
        engine,
        count_setting("max_new_tokens", max_new_tokens, allow_none=False),
        count_setting("per_task", per_task),
    )
    indexed = index_samples(samples)
    if not indexed:
        raise NoSamplesError("no samples to run on: the data selected holds none")
    data, records = fingerprint.data_fingerprint(indexed)
    settings = dataclasses.asdict(config) | {"flows": list(flows)}
    parts = {
        "model": fingerprint.model_fingerprint(loaded),
        "data": data,
        "settings": settings,
        "code": fingerprint.code_fingerprint(),
    }
    return RunPlan(config, indexed, parts, records, fingerprint.identity(parts))
