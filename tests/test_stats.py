"""Statistics on fixed numbers, checked against exact enumeration and textbook (R `p.adjust`) values."""

import itertools

import numpy as np
import pandas as pd
import pytest

from flowlib.stats import (
    adjust,
    benjamini_hochberg,
    bootstrap_ci,
    cohens_dz,
    flow_vs_control,
    flow_vs_flow,
    holm,
    sign_flip_test,
)


def test_bootstrap_matches_the_exact_resampling_distribution():
    values = np.array([0.0, 1.0, 5.0])
    # All 27 equally likely resamples of three values: the exact distribution of the resampled mean.
    exact = np.sort([np.mean(r) for r in itertools.product(values, repeat=3)])
    low, high = bootstrap_ci(values, level=0.8, resamples=200_000, seed=1)
    assert low == pytest.approx(np.percentile(exact, 10), abs=0.2)
    assert high == pytest.approx(np.percentile(exact, 90), abs=0.2)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)  # seeded
    assert bootstrap_ci([2.5] * 7) == (2.5, 2.5)
    assert all(np.isnan(bootstrap_ci([])))


def test_bootstrap_of_a_large_normal_sample_is_the_normal_interval():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=2000)
    low, high = bootstrap_ci(x, resamples=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.2 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.2 * half)


def brute_force_sign_flip(d):
    """Every sign assignment, written out the plain way."""
    observed = abs(sum(d) / len(d))
    flips = [abs(sum(s * x for s, x in zip(signs, d)) / len(d)) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def test_sign_flip_exact_cases():
    assert sign_flip_test([1, 2, 3, 4, 5]) == 2 / 32  # only all-positive and all-negative are as extreme
    assert sign_flip_test([1, -1]) == 1.0
    assert sign_flip_test([0, 0, 0]) == 1.0
    d = [0.3, -1.2, 2.5, 0.7, 1.1, -0.4, 0.9, 1.8]
    assert sign_flip_test(d) == pytest.approx(brute_force_sign_flip(d), abs=1e-12)
    assert np.isnan(sign_flip_test([]))


def test_sign_flip_monte_carlo_agrees_with_enumeration():
    d = np.random.default_rng(2).normal(0.35, 1.0, size=18)  # 18 > EXACT_MAX: drawn
    exact = brute_force_sign_flip(list(d))
    drawn = sign_flip_test(d, resamples=40_000, seed=0)
    assert drawn == pytest.approx(exact, abs=0.01)
    assert sign_flip_test(d, seed=5) == sign_flip_test(d, seed=5)
    assert sign_flip_test(np.full(40, 3.0), resamples=999) == 1 / 1000  # never 0


def test_effect_size():
    assert cohens_dz([1, 2, 3]) == 2.0
    assert cohens_dz([-1, -2, -3]) == -2.0
    assert cohens_dz([2, 2, 2]) == np.inf and cohens_dz([0, 0]) == 0.0
    assert np.isnan(cohens_dz([1]))


def test_corrections_match_r_p_adjust():
    p = [0.01, 0.02, 0.03, 0.04, 0.05]
    np.testing.assert_allclose(holm(p), [0.05, 0.08, 0.09, 0.09, 0.09])  # p.adjust(p, "holm")
    np.testing.assert_allclose(benjamini_hochberg(p), [0.05] * 5)  # p.adjust(p, "BH")
    q = [0.04, 0.005, 0.03, 0.01]
    np.testing.assert_allclose(holm(q), [0.06, 0.02, 0.06, 0.03])
    np.testing.assert_allclose(benjamini_hochberg(q), [0.04, 0.02, 0.04, 0.02])
    np.testing.assert_allclose(holm([0.5, np.nan, 0.01]), [0.5, np.nan, 0.02])  # NaN neither counted nor changed
    np.testing.assert_allclose(adjust([0.3, 0.4], "none"), [0.3, 0.4])
    with pytest.raises(ValueError, match="unknown correction"):
        adjust([0.1], "bonferroni-ish")


def sweep_table(flow_effect, control_effect, n=12, layers=4, seeds=(0, 1), noise=1.0):
    """A control_table-shaped table: the flow drops by `flow_effect[layer]`, its controls by `control_effect`."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for layer in range(layers):
            rows.append(("flow", -1, i, layer, flow_effect[layer] + rng.normal(0, noise)))
            rows += [("control", s, i, layer, control_effect + rng.normal(0, noise)) for s in seeds]
    frame = pd.DataFrame(rows, columns=["kind", "seed", "sample", "layer", "relative_change"])
    frame["question_id"] = "q" + frame["sample"].astype(str)
    frame["task"], frame["flow"] = "ChooseAttr", "Image->Question"
    return frame


def test_flow_vs_control_finds_the_window_where_the_flow_matters():
    table = sweep_table(flow_effect=[-40.0, -1.0, -1.0, -1.0], control_effect=-1.0)
    stats = flow_vs_control(table)
    assert list(stats["layer"]) == [0, 1, 2, 3] and (stats["n"] == 12).all()
    assert list(stats["significant"]) == [True, False, False, False]
    first = stats.iloc[0]
    assert first["diff"] < -30 and first["diff_low"] <= first["diff"] <= first["diff_high"] < 0
    assert first["effect_size"] < -5 and first["p"] <= first["p_adjusted"] <= 4 * first["p"]
    # the control value of a sample is the mean over its draws
    seed_means = table[table["kind"] == "control"].groupby("layer")["relative_change"].mean()
    np.testing.assert_allclose(stats["control_mean"], seed_means)
    assert (stats["control_min"] <= stats["control_max"]).all()


def test_flow_vs_flow_pairs_by_sample():
    a = sweep_table([-20.0, 0, 0, 0], 0).assign(flow="Related Image Patches->Question")
    b = sweep_table([0.0, 0, 0, -20], 0).assign(flow="Other Image Patches->Question")
    b["relative_change"] += 0.0
    stats = flow_vs_flow(
        pd.concat([a, b]), "Related Image Patches->Question", "Other Image Patches->Question", correction="bh"
    )
    assert list(stats["significant"]) == [True, False, False, True]
    assert stats["diff"].iloc[0] < 0 < stats["diff"].iloc[3]
    with pytest.raises(KeyError, match="no rows"):
        flow_vs_flow(a, "Related Image Patches->Question", "Image->Last")


def test_verdict_against_controls_looks_where_the_paper_places_the_flow():
    from flowlib.verdicts import against_controls

    lower = sweep_table([-40.0, -1.0, -1.0, -1.0, -1.0, -1.0], -1.0, layers=6)
    upper = sweep_table([-1.0, -1.0, -1.0, -1.0, -1.0, -40.0], -1.0, layers=6).assign(flow="Question->Last")
    late = sweep_table([-1.0, -1.0, -1.0, -1.0, -40.0, -1.0], -1.0, layers=6).assign(
        flow="Related Image Patches->Question"
    )
    stats = flow_vs_control(pd.concat([lower, upper, late]).drop(columns="task"))
    verdict = against_controls(stats, num_layers=6)
    assert {flow: meets for flow, (meets, _) in verdict.per_task.items()} == {
        "Image->Question": True,  # lower third: layers 0-1
        "Question->Last": True,  # middle or upper
        "Related Image Patches->Question": False,  # its gap lies in the upper third, not the middle
    }
    assert verdict.supported == "partly" and verdict._repr_markdown_().startswith("**Finding")
    assert (
        "2 of 3 flows" in str(verdict)
        and "not distinguishable" in verdict.per_task["Related Image Patches->Question"][1]
    )
    per_task = against_controls(flow_vs_control(lower), num_layers=6)
    assert list(per_task.per_task) == ["ChooseAttr · Image->Question"]


def test_figures_save_the_statistics_they_draw(tmp_path):
    from flowlib import plots

    stats = flow_vs_control(sweep_table([-40.0, -1.0, -1.0, -1.0], -1.0).drop(columns="task"))
    saved = plots.save_figure(plots.plot_flow_vs_control(stats, "t"), "controls", stats, directory=tmp_path)
    numbers = pd.read_csv(saved["csv"])
    np.testing.assert_allclose(numbers["flow_mean"], stats["flow_mean"])
    assert list(numbers["significant"]) == [True, False, False, False]
    table = sweep_table([-40.0, -1.0, -1.0, -1.0], -1.0).assign(window_kind="inverse")
    summary = plots.summarise_curves(table, by=("window_kind", "flow", "layer"))
    saved = plots.save_figure(plots.plot_variant_curves(summary, "t"), "variants", summary, directory=tmp_path)
    assert saved["png"].stat().st_size > 0
