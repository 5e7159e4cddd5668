"""Statistics per window: bootstrap intervals, paired sign-flip tests, effect sizes, corrections across windows.

Everything is numpy and seeded, so a figure's bands and marks are the same on every machine:

- `bootstrap_ci`: percentile bootstrap interval of the mean over samples.
- `sign_flip_test`: the paired permutation test. Under the null hypothesis that a flow and its control
  (or two flows) have the same effect on each sample, each sample's difference is as likely to have
  either sign; the p-value is the share of sign assignments whose mean difference is at least as far
  from 0 as the observed one (exact enumeration up to `EXACT_MAX` samples, Monte Carlo beyond). It
  assumes nothing about the shape of the differences, which knockout changes (bounded at -100%, often
  skewed) do not satisfy for a t-test.
- `cohens_dz`: the paired effect size, mean difference over its standard deviation.
- `holm`, `benjamini_hochberg`: adjusted p-values across the windows of one curve (Holm controls the
  family-wise error, the default; BH the false discovery rate).

`flow_vs_control` and `flow_vs_flow` turn a tidy table of sweeps into one row per task, flow and
window with all of these (the columns every figure and verdict of notebook 04 reads).

Example:
    >>> stats = flow_vs_control(table)  # table from controls.control_table
    >>> stats[stats["significant"]][["task", "flow", "layer", "diff", "p_adjusted", "effect_size"]]
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

#: Bootstrap resamples and Monte Carlo sign flips: the 95% bounds then move by ~1% of their width between seeds.
RESAMPLES = 10_000
#: Up to this many samples the sign-flip test enumerates all 2^n assignments (65,536) instead of drawing.
EXACT_MAX = 16
LEVEL = 0.95
ALPHA = 0.05
CORRECTIONS = ("holm", "bh", "none")


def bootstrap_ci(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaN, NaN for no values)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def sign_flip_test(differences, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip (permutation) test that the mean difference is 0.

    Exact for up to `EXACT_MAX` samples; beyond, `resamples` random sign assignments with the usual
    +1 correction ``(1 + hits) / (1 + resamples)``, which never gives 0. NaN for no samples.
    """
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n == 0:
        return float("nan")
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))  # ties count as "at least as far"
    if n <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d) / n >= observed - tolerance))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(resamples, n))
    hits = int(np.sum(np.abs(signs @ d) / n >= observed - tolerance))
    return (1 + hits) / (1 + resamples)


def cohens_dz(differences) -> float:
    """Paired effect size: mean difference / its standard deviation (ddof 1); +-inf if all differences are equal."""
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        return float("nan")
    mean, sd = d.mean(), d.std(ddof=1)
    if sd == 0:
        return 0.0 if mean == 0 else float(np.sign(mean) * np.inf)
    return float(mean / sd)


def _ranked(p_values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The p-values as floats, an all-NaN result to fill, and the non-NaN ones' indices from smallest p up.

    The corrections share this so that they agree on what counts: NaNs stay NaN and are not tests, and
    ties keep their input order (a stable sort).
    """
    p = np.asarray(p_values, dtype=np.float64)
    keep = np.flatnonzero(~np.isnan(p))
    return p, np.full(p.shape, np.nan), keep[np.argsort(p[keep], kind="stable")]


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error); NaNs stay NaN and do not count."""
    p, out, order = _ranked(p_values)
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    return out


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate); NaNs stay NaN and do not count."""
    p, out, order = _ranked(p_values)
    m = len(order)
    scaled = p[order] * m / np.arange(1, m + 1)
    out[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return out


def adjust(p_values, correction: str = "holm") -> np.ndarray:
    """Adjusted p-values by `correction` ("holm", "bh" or "none")."""
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; use one of {', '.join(CORRECTIONS)}")
    if correction == "holm":
        return holm(p_values)
    if correction == "bh":
        return benjamini_hochberg(p_values)
    return np.asarray(p_values, dtype=np.float64)


def paired_summary(a, b, seed: int = 0, level: float = LEVEL, resamples: int = RESAMPLES) -> dict:
    """Means, bootstrap intervals, the sign-flip p-value and dz of paired values `a` and `b` (a - b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    a_low, a_high = bootstrap_ci(a, level, resamples, seed)
    b_low, b_high = bootstrap_ci(b, level, resamples, seed)
    d_low, d_high = bootstrap_ci(d, level, resamples, seed)
    return {
        "n": len(d),
        "mean_a": float(a.mean()) if len(a) else np.nan,
        "a_low": a_low,
        "a_high": a_high,
        "mean_b": float(b.mean()) if len(b) else np.nan,
        "b_low": b_low,
        "b_high": b_high,
        "diff": float(d.mean()) if len(d) else np.nan,
        "diff_low": d_low,
        "diff_high": d_high,
        "p": sign_flip_test(d, resamples, seed),
        "effect_size": cohens_dz(d),
    }


def _per_window(pairs: pd.DataFrame, keys: list[str], correction: str, alpha: float, seed: int) -> pd.DataFrame:
    """`paired_summary` per keys + layer of a table with columns a, b; p adjusted across each curve's windows."""
    rows = []
    for group, frame in pairs.groupby([*keys, "layer"], sort=True):
        rows.append({**dict(zip([*keys, "layer"], group)), **paired_summary(frame["a"], frame["b"], seed)})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    if keys:
        out["p_adjusted"] = out.groupby(keys)["p"].transform(lambda p: adjust(p.to_numpy(), correction))
    else:
        out["p_adjusted"] = adjust(out["p"].to_numpy(), correction)
    out["correction"] = correction
    out["significant"] = out["p_adjusted"] < alpha
    return out


def flow_vs_control(
    table: pd.DataFrame,
    value: str = "relative_change",
    correction: str = "holm",
    alpha: float = ALPHA,
    seed: int = 0,
) -> pd.DataFrame:
    """Each flow against its matched random controls, per task and window (layer).

    Each sample's control value is the mean over its draws (seeds), so samples stay the unit of the
    test. Columns: task, flow, layer, n, flow_mean with flow_low/flow_high (bootstrap), control_mean with
    control_low/control_high, control_min/control_max (the spread of the draws' means over samples),
    diff (flow - control) with diff_low/diff_high, p (sign flip), p_adjusted (across the curve's windows),
    effect_size (dz), correction, significant.
    """
    keys = [k for k in ("task", "flow") if k in table]
    flows = table[table["kind"] == "flow"].set_index(["question_id", "flow", "layer"])[value]
    controls = table[table["kind"] == "control"]
    control = controls.groupby(["question_id", "flow", "layer"])[value].mean()
    pairs = pd.DataFrame({"a": flows, "b": control.reindex(flows.index)}).dropna().reset_index()
    if "task" in table:
        pairs["task"] = pairs["question_id"].map(table.drop_duplicates("question_id").set_index("question_id")["task"])
    out = _per_window(pairs, keys, correction, alpha, seed)
    spread = controls.groupby([*keys, "layer", "seed"])[value].mean().groupby([*keys, "layer"])
    out = out.merge(spread.min().rename("control_min").reset_index(), on=[*keys, "layer"])
    out = out.merge(spread.max().rename("control_max").reset_index(), on=[*keys, "layer"])
    names = {"mean_a": "flow_mean", "a_low": "flow_low", "a_high": "flow_high"}
    names |= {"mean_b": "control_mean", "b_low": "control_low", "b_high": "control_high"}
    return out.rename(columns=names)


def flow_vs_flow(
    table: pd.DataFrame,
    flow_a: str,
    flow_b: str,
    value: str = "relative_change",
    correction: str = "holm",
    alpha: float = ALPHA,
    seed: int = 0,
) -> pd.DataFrame:
    """Two flows paired by sample (e.g. Related against Other patches), per task and window.

    Reads the rows of `table` whose `kind` is "flow" when the column exists (a `control_table`),
    else every row (a knockout table). Columns as `flow_vs_control`'s with a/b for the two flows
    (mean_a, a_low, ..., mean_b, ...), and `flows` naming them.
    """
    if "kind" in table:
        table = table[table["kind"] == "flow"]
    keys = ["task"] if "task" in table else []
    wide = table[table["flow"].isin([flow_a, flow_b])].pivot_table(
        index=[*keys, "question_id", "layer"], columns="flow", values=value
    )
    missing = {flow_a, flow_b} - set(wide.columns)
    if missing:
        raise KeyError(f"the table has no rows for {sorted(missing)}")
    pairs = wide.rename(columns={flow_a: "a", flow_b: "b"}).dropna().reset_index()
    out = _per_window(pairs, keys, correction, alpha, seed)
    out.insert(len(keys), "flows", f"{flow_a} vs {flow_b}")
    return out
