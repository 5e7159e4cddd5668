"""Many processes, one run: the split by question id, the per-task selection rule under any number of shards,
run.json checked by every shard, the merged table written once by whoever completes the run, status and merge
at the command line, and bad shard specifications."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from flowlib import cli, runner
from flowlib.run_folder import RunMismatchError
from flowlib.shards import Shard, ShardSpecError, parse_shard, resolve_shard, shard_of
from flowlib.tiny import tiny_llava
from tests.test_runner import answered_sample

pytestmark = pytest.mark.usefixtures("one_thread")

FLOWS = ("Image->Question", "Last->Last")
COLOURS = ("white", "red", "blue", "green", "black", "yellow", "purple", "orange", "gray")


@pytest.fixture(scope="module")
def loaded():
    return tiny_llava("llava-1.5", layers=3)


@pytest.fixture(scope="module")
def samples(loaded):
    """Nine samples over two tasks, answered as the model does except every third (answered wrongly)."""
    return [
        answered_sample(loaded, f"s{i}", "ChooseAttr" if i % 2 == 0 else "QueryAttr", colour, wrong=i % 3 == 2)
        for i, colour in enumerate(COLOURS)
    ]


def run(loaded, samples, output, shard=None, **kwargs):
    kwargs = {"flows": FLOWS, "window": 1, "max_new_tokens": 3, "per_task": 2, "progress": False, **kwargs}
    return runner.run_experiment(loaded, samples, output, shard=shard, **kwargs)


def counting_analyse(monkeypatch) -> list[str]:
    """Record the question id of every sample analysed from now on."""
    seen, real = [], runner._analyse

    def analyse(loaded, sample, *args, **kwargs):
        seen.append(sample.question_id)
        return real(loaded, sample, *args, **kwargs)

    monkeypatch.setattr(runner, "_analyse", analyse)
    return seen


# --- the split --------------------------------------------------------------------------------------------------------


def test_the_split_depends_on_the_question_id_alone():
    ids = [f"q{i}" for i in range(300)]
    for count in (1, 2, 3, 7):
        parts = [{q for q in ids if Shard(k, count).owns(q)} for k in range(count)]
        assert set().union(*parts) == set(ids) and sum(map(len, parts)) == len(ids)  # a partition
        assert all(len(p) > len(ids) / count / 2 for p in parts)  # and a fair one
    assert shard_of("1594913", 8) == int(hashlib.sha256(b"1594913").hexdigest()[:16], 16) % 8  # any machine, any run


@pytest.mark.parametrize(
    "spec, message",
    [
        ("3/2", r"shard '3/2': K must be 0..1"),
        ("0/0", r"shard '0/0': N must be at least 1"),
        ("a/b", r"shard 'a/b': K must be a whole number, not 'a'"),
        ("1", r"shard '1': use K/N"),
        ("-1/2", r"K must be 0..1"),
        ("slurm", r"--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT"),
    ],
)
def test_bad_shard_specifications_are_named(spec, message):
    with pytest.raises(ShardSpecError, match=message):
        parse_shard(spec, env={})


def test_slurm_arrays_and_torchrun_ranks():
    shard = parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"})
    assert (shard.index, shard.count) == (3, 8)
    one_based = parse_shard(
        "slurm", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    )
    assert (one_based.index, one_based.count) == (3, 4)
    ranks = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert (resolve_shard(None, ranks).index, resolve_shard(None, ranks).count) == (1, 2)
    assert resolve_shard(None, ranks).label == "rank 1/2"
    both = resolve_shard("2/3", ranks)  # array task 2 of 3, each running torchrun with 2 ranks
    assert (both.index, both.count) == (5, 6)
    assert resolve_shard(None, {}).count == 1
    with pytest.raises(ShardSpecError, match="RANK 2 of WORLD_SIZE 2"):
        resolve_shard(None, {"RANK": "2", "WORLD_SIZE": "2"})


def test_under_torchrun_cuda_means_this_ranks_gpu(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    parse = cli.build_parser().parse_args
    assert cli.settings_from_args(parse(["run", "--device", "cuda"])).device == "cuda:1"
    assert cli.settings_from_args(parse(["run", "--device", "cuda:0"])).device == "cuda:0"  # named: kept
    assert cli.settings_from_args(parse(["run"])).device == "cpu"


def test_cli_refuses_a_bad_shard_with_exit_2_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "--shard", "3/2", "--output", str(out), "--quiet"]) == 2
    assert "flowlib run: error: shard '3/2': K must be 0..1 (shards are numbered from 0)" in capsys.readouterr().err
    assert not out.exists()


# --- the table is the same for any number of shards -------------------------------------------------------------------


def test_merged_tables_equal_one_process_for_1_2_and_3_shards(loaded, samples, tmp_path, monkeypatch):
    whole = run(loaded, samples, tmp_path / "one")
    assert whole.complete and set(whole.table.question_id) == {"s0", "s1", "s4", "s3"}  # 2 per task, s2 wrong
    for count in (2, 3):
        out = tmp_path / f"shards{count}"
        for k in range(count):
            summary = run(loaded, samples, out, Shard(k, count))
            last = k == count - 1
            assert summary.complete == last and (out / "results.parquet").exists() == last  # written once, at the end
            assert json.loads((out / "shards" / f"{k}-of-{count}.json").read_text())["samples"] == len(
                summary.process.statuses
            )
        pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), whole.table)
        pd.testing.assert_frame_equal(summary.table, whole.table)
        one, merged = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "one", out))
        assert merged["counts"] == one["counts"] and merged["rows"] == one["rows"]


def test_another_number_of_shards_on_resume_redoes_nothing(loaded, samples, tmp_path, monkeypatch):
    whole = run(loaded, samples, tmp_path / "one", per_task=None).table
    out = tmp_path / "run"
    first = run(loaded, samples, out, Shard(0, 2), per_task=None)
    done = {s["question_id"] for s in first.process.statuses}
    assert done == {s.question_id for s in samples if Shard(0, 2).owns(s.question_id)}
    seen = counting_analyse(monkeypatch)
    for k in range(3):
        run(loaded, samples, out, Shard(k, 3), per_task=None)
    assert sorted(seen) == sorted(s.question_id for s in samples if s.question_id not in done)  # each once
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), whole)
    seen.clear()
    assert run(loaded, samples, out, per_task=None).complete and seen == []  # one process afterwards: all done


def test_a_shard_with_other_settings_is_refused_before_writing(loaded, samples, tmp_path):
    out = tmp_path / "run"
    run(loaded, samples, out, Shard(0, 2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunMismatchError, match=r"holds another run: settings\.window: 1 -> 3"):
        run(loaded, samples, out, Shard(1, 2), window=3)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_shard_killed_mid_run_is_redone_from_where_it_stopped(loaded, samples, tmp_path, monkeypatch):
    whole = run(loaded, samples, tmp_path / "one").table
    out = tmp_path / "run"
    real, calls = runner._analyse, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a killed job: the first sample written, the second not
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "_analyse", killed)
        with pytest.raises(KeyboardInterrupt):
            run(loaded, samples, out, Shard(0, 2))
    assert run(loaded, samples, out, Shard(1, 2)).complete is False  # the other shard finishes its own
    assert not (out / "results.parquet").exists()
    assert run(loaded, samples, out, Shard(0, 2)).complete  # rerun: only its missing samples, then the merge
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), whole)


# --- status and merge ------------------------------------------------------------------------------------------------


def test_status_names_missing_shards_and_merge_waits_for_them(loaded, samples, tmp_path, capsys):
    out = tmp_path / "run"
    run(loaded, samples, out, Shard(1, 3), per_task=None)
    assert cli.main(["status", str(out), "--shards", "3"]) == cli.EXIT_INCOMPLETE
    printed = capsys.readouterr().out
    missing = [s.question_id for s in samples if not Shard(1, 3).owns(s.question_id)]
    assert f"{len(samples)} candidates: {len(samples) - len(missing)} done" in printed
    assert "shards of 3: 1 complete (1)" in printed and f"{len(missing)} missing" in printed
    assert "shard 1/3 (1-of-3):" in printed and "s per sample" in printed
    assert cli.main(["merge", str(out)]) == 1
    assert f"{len(missing)} samples are not done yet" in capsys.readouterr().err
    for k in (0, 2):
        run(loaded, samples, out, Shard(k, 3), per_task=None)
    (out / "results.parquet").unlink()
    assert cli.main(["status", str(out)]) == 0
    assert "complete; merge it: flowlib merge" in capsys.readouterr().out
    assert cli.main(["merge", str(out)]) == 0
    table = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(table, run(loaded, samples, tmp_path / "one", per_task=None).table)
    assert cli.main(["status", str(tmp_path / "nothing")]) == 1
    assert "holds no run" in capsys.readouterr().err
