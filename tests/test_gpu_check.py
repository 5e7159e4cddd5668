"""The prepared GPU check runs end to end on the CPU (`--dry-run`), so it is ready whenever a GPU is lent: the
model shapes, and the toy model as one torchrun rank against one plain process."""

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_model_shape(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    results_before = gpu_check.RESULTS.read_text()
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| llava-hf/", "| Qwen/"))]
    assert [row.split(" | ")[0] for row in rows] == [
        "| llava-hf/llava-1.5-7b-hf",
        "| llava-hf/llama3-llava-next-8b-hf",
        "| Qwen/Qwen2.5-VL-7B-Instruct",
        "| llava-hf/llava-onevision-qwen2-7b-ov-hf",
    ]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "2" and cells[2] == "float32"
        assert float(cells[6]) < 1e-6  # fast equals reference in float32
        assert float(cells[4]) > 0 and float(cells[7]) > 0
        measured, estimated = cells[5].rstrip(")").split(" (")
        assert measured == "nan" and 0 < float(estimated) < 1  # no device peak on a CPU; tiny width: < 1 GiB
    assert rows[1].split(" | ")[3] == "2340"  # 640x480 under anyres: 576 + 36 x (48 + 1)
    assert rows[2].split(" | ")[3] == "391"  # 640x480 resized to 644x476: 23 x 17 merged tokens
    assert rows[3].split(" | ")[3] == "2929"  # 640x480 under anyres-max-9 (the processor's own count)
    toy = re.search(r"Toy model, one torchrun rank on `cpu`.*?: (\d+) samples, (\d+) rows; .*?tables (\S+) pp", out)
    assert toy and int(toy[1]) == 1 and int(toy[2]) > 0  # one ChooseAttr sample, every flow and layer
    assert float(toy[3]) == 0  # the same device and code: torchrun changes nothing in the numbers
    assert "The rank's summary: `all samples: 1 samples in" in out  # one rank is the whole run
    assert gpu_check.RESULTS.read_text() == results_before  # a dry run records nothing
