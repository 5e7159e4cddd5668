"""`flowlib run` as torchrun / accelerate ranks and as SLURM-style shards, in real processes on the CPU: the ranks
(RANK, WORLD_SIZE, LOCAL_RANK set as the launchers set them; no process group is needed) and the shards write one
run folder whose table equals a single process's, and a rank killed with SIGKILL is redone by rerunning it alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from flowlib import cli
from flowlib.shards import shard_of
from tests.test_run_contract import FLOWS, make_paper_data

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
COLOURS = ("red", "blue", "green", "white", "black", "yellow", "purple", "orange")

#: `flowlib run` that kills itself (SIGKILL, as the OOM killer or a cancelled job would) on its second sample.
KILLED_WORKER = textwrap.dedent("""
    import os, signal, sys
    from flowlib import cli, runner
    real, calls = runner._analyse, []
    def analyse(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    runner._analyse = analyse
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory, disk_model):
    return make_paper_data(tmp_path_factory.mktemp("data"), disk_model, colours=COLOURS, wrong=("q1", "q5"))


def args(checkpoint, csv_dir, image_dir, output, *extra) -> list[str]:
    return [
        "run",
        *("--model", str(checkpoint), "--data", "paper", "--csv-dir", str(csv_dir), "--image-dir", str(image_dir)),
        *("--tasks", "QueryAttr", "--flows", *FLOWS, "--window", "1", "--max-new-tokens", "3"),
        *("--samples-per-task", "4", "--candidates-per-task", "8", "--output", str(output), "--quiet", *extra),
    ]


def launch(command: list[str], script: str | None = None, **env) -> subprocess.Popen:
    """`python -m flowlib <command>` (or `python -c script <command>`) with extra environment variables."""
    program = ["-c", script, *command] if script else ["-m", "flowlib", *command]
    return subprocess.Popen(
        [sys.executable, *program],
        env={**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def torchrun(command: list[str], ranks: int) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node <ranks> -m flowlib <command>`: the launcher itself, on the CPU."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return subprocess.Popen(
        [*launcher, "-m", "flowlib", *command],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append((process.returncode, out, err))
    return results


def ranks(world: int) -> list[dict]:
    return [{"RANK": r, "WORLD_SIZE": world, "LOCAL_RANK": r, "LOCAL_WORLD_SIZE": world} for r in range(world)]


def test_torchrun_ranks_and_shards_give_the_single_process_table(checkpoint, data, tmp_path):
    assert cli.main(args(checkpoint, *data, tmp_path / "one")) == 0
    one = pd.read_parquet(tmp_path / "one" / "results.parquet")
    assert one.question_id.nunique() == 4  # the first 4 answered correctly of 8 candidates (q1, q5 wrong)

    torchrun = finish([launch(args(checkpoint, *data, tmp_path / "ranks"), **env) for env in ranks(2)])
    shards = finish([launch(args(checkpoint, *data, tmp_path / "shards", "--shard", f"{k}/2")) for k in range(2)])
    for (code, out, err), label in zip(torchrun + shards, ["rank 0/2", "rank 1/2", "shard 0/2", "shard 1/2"]):
        assert code == 0, err
        assert f"{label}: " in out and "s per sample" in out  # each process's end summary, labelled
    for folder in ("ranks", "shards"):
        table = pd.read_parquet(tmp_path / folder / "results.parquet")
        pd.testing.assert_frame_equal(table, one)  # already in sample order: equal without sorting
        assert sorted(p.stem for p in (tmp_path / folder / "shards").glob("*.json")) == ["0-of-2", "1-of-2"]


def test_the_torchrun_launcher_gives_the_single_process_table(checkpoint, data, tmp_path):
    assert cli.main(args(checkpoint, *data, tmp_path / "one")) == 0
    ((code, out, err),) = finish([torchrun(args(checkpoint, *data, tmp_path / "torchrun"), ranks=2)])
    assert code == 0, err
    assert "rank 0/2: " in out and "rank 1/2: " in out
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "torchrun" / "results.parquet"),
        pd.read_parquet(tmp_path / "one" / "results.parquet"),
    )


def test_a_rank_killed_mid_run_is_redone_alone_to_the_same_table(checkpoint, data, tmp_path):
    owned = [f"q{i}" for i in range(len(COLOURS)) if shard_of(f"q{i}", 2) == 1]
    assert len(owned) >= 2  # rank 1 has a second sample to be killed at
    assert cli.main(args(checkpoint, *data, tmp_path / "one", "--samples-per-task", "all")) == 0
    out = tmp_path / "run"
    command = args(checkpoint, *data, out, "--samples-per-task", "all")
    survivor, killed = finish([launch(command, **ranks(2)[0]), launch(command, KILLED_WORKER, **ranks(2)[1])])
    assert killed[0] == -signal.SIGKILL and survivor[0] == 0, survivor[2]
    assert "the run still misses" in survivor[1] and not (out / "results.parquet").exists()
    assert cli.main(["status", str(out), "--shards", "2"]) == cli.EXIT_INCOMPLETE
    ((code, printed, err),) = finish([launch(command, **ranks(2)[1])])  # only the killed rank, rerun
    assert code == 0, err
    assert f"rank 1/2: {len(owned) - 1} samples" in printed  # its first sample was written before the kill
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "results.parquet"), pd.read_parquet(tmp_path / "one" / "results.parquet")
    )
