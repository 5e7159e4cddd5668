"""The experiment runner: answer filter, tidy table, provenance, resume, refusal, and the command line."""

import dataclasses
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import flowlib.runner as runner
from flowlib import answers, run_plan
from flowlib.flows import FlowError
from flowlib.kernels import kernel_description
from flowlib.run_folder import RunMismatchError, load_results
from flowlib.runner import run_experiment
from flowlib.sample import Box, Sample
from flowlib.tiny import tiny_llava

FLOWS = ("Image->Question", "Question->Last", "Last->Last")
COLOURS = ("white", "red", "blue", "green", "black")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded():
    return tiny_llava("llava-1.5", layers=3)


def answered_sample(loaded, qid: str, task: str, colour: str, wrong: bool = False) -> Sample:
    """A star question on a plain `colour` image whose answer is the model's own greedy one (or a wrong one)."""
    s = Sample(
        qid,
        "is the star red or blue?",
        "?",
        task,
        image=Image.new("RGB", (160, 120), colour),
        true_option="red",
        false_option="blue",
        central_object="star",
        boxes=[Box(10, 20, 50, 60)],
    )
    greedy = answers.greedy_answer(loaded, loaded.prepare(s), max_new_tokens=3)
    return dataclasses.replace(s, answer="definitely wrong" if wrong else greedy)


@pytest.fixture(scope="module")
def samples(loaded):
    """Five samples over two tasks, answered "correctly" (by construction, in another case) except the third."""
    out = []
    for i, colour in enumerate(COLOURS):
        s = answered_sample(loaded, f"0{i}", "ChooseAttr" if i % 2 == 0 else "QueryAttr", colour, wrong=i == 2)
        out.append(s if i == 2 else dataclasses.replace(s, answer=f"  {s.answer.upper()} "))
    return out


def run(loaded, samples, output, **kwargs):
    kwargs = {"flows": FLOWS, "window": 3, "max_new_tokens": 3, "progress": False, **kwargs}
    return run_experiment(loaded, samples, output, **kwargs)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_writes_a_tidy_table_with_provenance(loaded, samples, tmp_path):
    summary = run(loaded, samples, tmp_path / "run")
    table = summary.table
    assert summary.count("analysed") == 4 and summary.count("wrong_answer") == 1
    assert len(table) == 4 * len(FLOWS) * loaded.num_layers
    assert "02" not in set(table.question_id)
    assert {
        "question_id",
        "task",
        "flow",
        "layer",
        "window",
        "window_layers",
        "base_prob",
        "blocked_prob",
        "relative_change",
        "answer_token",
        "model",
    } <= set(table.columns)
    assert list(table.flow[: loaded.num_layers]) == [FLOWS[0]] * loaded.num_layers
    assert (table.window == 3).all() and set(table.task) == {"ChooseAttr", "QueryAttr"}
    meta = json.loads(pq.read_schema(tmp_path / "run" / "results.parquet").metadata[b"flowlib"])
    assert meta["provenance"]["model"] == loaded.name and meta["provenance"]["dtype"] == "float32"
    assert meta["config"]["window"] == 3 and meta["config"]["flows"] == list(FLOWS) and meta["code_version"]
    assert meta["kernels"] == f"{torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["provenance"] == meta["provenance"]
    assert table.attrs["config"]["window"] == 3
    summary_file = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary_file["counts"]["wrong_answer"] == 1


def test_resumed_run_equals_uninterrupted_run(loaded, samples, tmp_path, monkeypatch):
    whole = run(loaded, samples, tmp_path / "whole").table

    real, calls = runner._analyse, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt  # the job is killed after three samples
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "_analyse", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(loaded, samples, tmp_path / "resumed")
    assert len(load_results(tmp_path / "resumed")) == 2 * len(FLOWS) * loaded.num_layers
    resumed = run(loaded, samples, tmp_path / "resumed").table
    pd.testing.assert_frame_equal(resumed, whole)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "resumed" / "results.parquet"), whole)


def test_resuming_with_other_kernels_warns(loaded, samples, tmp_path, caplog):
    out = tmp_path / "run"
    run(loaded, samples[:2], out)
    with caplog.at_level("WARNING", logger=runner.log.name):
        run(loaded, samples[:2], out)
    assert "CPU kernels" not in caplog.text
    stored = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**stored, "kernels": "AVX512 kernels, 8 threads"}))
    with caplog.at_level("WARNING", logger=runner.log.name):
        run(loaded, samples[:2], out)
    assert f"CPU kernels AVX512 kernels, 8 threads, now {kernel_description()}" in caplog.text


def test_refuses_to_resume_another_configuration(loaded, samples, tmp_path):
    out = tmp_path / "run"
    run(loaded, samples[:2], out)
    before = snapshot(out)
    with pytest.raises(RunMismatchError, match="settings.window: 3 -> 1"):
        run(loaded, samples[:2], out, window=1)
    with pytest.raises(RunMismatchError, match="samples added: 02, 03, 04"):
        run(loaded, samples, out)
    other_model = tiny_llava("llava-1.5", layers=4)
    with pytest.raises(RunMismatchError, match="model.num_layers: 3 -> 4"):
        run(other_model, samples[:2], out)
    with pytest.raises(RunMismatchError, match="resume=True"):
        run(loaded, samples[:2], out, resume=False)
    assert snapshot(out) == before  # nothing overwritten
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatchError, match="not empty"):
        run(loaded, samples, tmp_path / "junk")


def test_zero_base_probability_is_reported_and_excluded(loaded, samples, tmp_path, monkeypatch):
    real = runner.clean_pass

    def zero_for_first(loaded_, prepared):
        clean = real(loaded_, prepared)
        return dataclasses.replace(clean, base_prob=0.0) if prepared.sample.question_id == "00" else clean

    monkeypatch.setattr(runner, "clean_pass", zero_for_first)
    summary = run(loaded, samples, tmp_path / "run")
    assert summary.count("zero_base") == 1 and "00" not in set(summary.table.question_id)
    assert summary.table.relative_change.notna().all()
    excluded = json.loads((tmp_path / "run" / "summary.json").read_text())["excluded"]
    assert [e["question_id"] for e in excluded] == ["00"] and "base probability" in excluded[0]["reason"]


def test_bad_input_and_limits(loaded, samples, tmp_path):
    with pytest.raises(FlowError, match="unknown flow"):
        run(loaded, samples, tmp_path / "a", flows=["Image->Nowhere"])
    with pytest.raises(ValueError, match="does not fit"):
        run(loaded, samples, tmp_path / "b", window=loaded.num_layers + 1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="occurs twice"):
        run(loaded, [samples[0], samples[0]], tmp_path / "c")
    no_boxes = dataclasses.replace(samples[0], question_id="nobox", boxes=())
    with pytest.raises(runner.SampleExcluded, match="sample nobox: group 'Related Image Patches'.*no box"):
        run(loaded, [no_boxes], tmp_path / "d", flows=["Related Image Patches->Question"], strict=True)
    with pytest.raises(runner.NothingAnalysedError, match="no sample was analysed.*1 left out.*no box") as err:
        run(loaded, [no_boxes], tmp_path / "e", flows=["Related Image Patches->Question"])
    assert err.value.summary.count("excluded") == 1 and err.value.summary.table.empty
    limited = run(loaded, samples, tmp_path / "f", per_task=1)
    assert sorted(limited.table.question_id.unique()) == ["00", "01"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"window": 0}, r"window 0 does not fit a model of 3 layers; use 1..3 \(the default, when unset, is k=1\)"),
        ({"window": 2.0}, "window 2.0 does not fit"),
        ({"per_task": 0}, "per_task must be a whole number >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a whole number >= 1"),
        ({"max_batch": 0}, "max_batch must be a whole number >= 1"),
        ({"engine": "turbo"}, "unknown engine 'turbo'; use one of: reference, fast"),
        ({"flows": []}, "flows must be one or more distinct flows"),
    ],
)
def test_settings_are_checked_before_anything_is_written(loaded, samples, tmp_path, settings, message):
    with pytest.raises(run_plan.RunSettingsError, match=message):
        run(loaded, samples, tmp_path / "run", **settings)
    with pytest.raises(run_plan.NoSamplesError, match="no samples"):
        run(loaded, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_folder_of_an_older_format_is_refused(loaded, samples, tmp_path):
    out = tmp_path / "run"
    run(loaded, samples[:1], out)
    stored = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**stored, "format": 2}))
    with pytest.raises(RunMismatchError, match="written by another flowlib \\(run folder format 2, now 3\\)"):
        run(loaded, samples[:1], out)


def test_command_line_runs_and_resumes(loaded, tmp_path, monkeypatch):
    from flowlib import cli
    from flowlib.models import save_checkpoint

    save_checkpoint(loaded, tmp_path / "model")
    monkeypatch.setattr(cli, "load_samples", lambda args: (list(samples_for_cli(loaded)), "fake"))
    args = [
        "run",
        "--model",
        str(tmp_path / "model"),
        "--flows",
        "Question->Last",
        "--window",
        "1",
        "--max-new-tokens",
        "3",
        "--output",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # a second start resumes (here: finds everything done)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(table.flow) == {"Question->Last"} and len(table) == loaded.num_layers
    lens_args = [
        "lens",
        "--model",
        str(tmp_path / "model"),
        "--lenses",
        "normed",
        "raw",
        "--max-new-tokens",
        "3",
        "--output",
        str(tmp_path / "lens.parquet"),
        "--quiet",
    ]
    assert cli.main(lens_args) == 0
    assert set(pd.read_parquet(tmp_path / "lens.parquet").lens) == {"normed", "raw"}


def samples_for_cli(loaded):
    yield answered_sample(loaded, "cli", "ChooseAttr", "red")


def test_answer_filter_reuses_recorded_verdicts(monkeypatch):
    """With a verdict recorded, the filter trusts it and generates nothing."""
    from flowlib.tiny import tiny_llava
    from tests.conftest import white_sample

    loaded = tiny_llava("llava-1.5")
    samples = [white_sample(qid="a"), white_sample(qid="b")]
    verdicts = {}
    list(answers.correct_samples(loaded, samples, progress=False, verdicts=verdicts))
    assert set(verdicts) == {"a", "b"}
    monkeypatch.setattr(answers, "greedy_answer", lambda *a, **k: pytest.fail("answer generated twice"))
    verdicts["a"], verdicts["b"] = True, False
    assert [s.question_id for s in answers.correct_samples(loaded, samples, progress=False, verdicts=verdicts)] == ["a"]


@pytest.mark.slow
def test_command_line_on_a_llava_next_checkpoint(next_checkpoint, tmp_path):
    from flowlib import cli

    out = tmp_path / "out"
    args = [
        "run",
        "--model",
        next_checkpoint,
        "--data",
        "synthetic",
        "--synthetic-count",
        "4",
        "--tasks",
        "ChooseAttr",
        "--samples-per-task",
        "1",
        "--window",
        "3",
        "--flows",
        "Image->Question",
        "Related Image Patches->Question",
        "--output",
        str(out),
        "--quiet",
    ]
    assert cli.main(args) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert set(table.flow) == {"Image->Question", "Related Image Patches->Question"} and len(table) == 2 * 12
    assert '"family": "llava-next"' in (out / "run.json").read_text()
