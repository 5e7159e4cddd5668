"""The named data sources give samples grouped by task, and bad names get clear errors."""

import pytest

from flowlib.data import load_samples
from flowlib.sample import SampleError


def test_synthetic_source_groups_by_task_deterministically():
    first = load_samples("synthetic", tasks=["ChooseAttr", "QueryAttr"], per_task=3, seed=5)
    again = load_samples("synthetic", tasks=["ChooseAttr", "QueryAttr"], per_task=3, seed=5)
    assert list(first) == ["ChooseAttr", "QueryAttr"]
    assert [len(v) for v in first.values()] == [3, 3]
    assert [s.question for s in first["QueryAttr"]] == [s.question for s in again["QueryAttr"]]
    assert all(s.task == "QueryAttr" for s in first["QueryAttr"])


def test_paper_source_reads_the_released_csvs(shared_dir):
    grouped = load_samples("paper", csv_dir=str(shared_dir / "gqa"), tasks=["CompareAttr"], per_task=7)
    assert list(grouped) == ["CompareAttr"] and len(grouped["CompareAttr"]) == 7


def test_bad_source_names_are_explained():
    with pytest.raises(ValueError, match="use one of: synthetic, paper, gqa"):
        load_samples("imagenet")
    with pytest.raises(ValueError, match="needs csv_dir"):
        load_samples("paper")
    with pytest.raises(SampleError, match="the tasks are"):
        load_samples("synthetic", tasks=["Counting"])
