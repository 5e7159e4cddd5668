"""`python -m flowlib.figure_check [--against REV] [--tolerance T]`: are the committed figures current?

After `make figures`, compares the numbers beside every figure written (`figures/*.csv`, or the folder
`FLOWLIB_FIGURES` names) with `figures/` as committed at REV (default HEAD): text columns must match
exactly, numeric columns within the tolerance (default 1e-6). Prints the largest difference per file
and exits 1 on any mismatch, so `make figures-check` shows whether the committed figures are what the
code now draws.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from . import config as cfg


def committed_csv(name: str, revision: str) -> pd.DataFrame | None:
    """`figures/<name>` as committed at `revision`, or None where it was not committed."""
    shown = subprocess.run(
        ["git", "show", f"{revision}:figures/{name}"], cwd=cfg.PROJECT_DIR, capture_output=True, text=True
    )
    return pd.read_csv(io.StringIO(shown.stdout)) if shown.returncode == 0 else None


def compare(written: pd.DataFrame, committed: pd.DataFrame, tolerance: float) -> tuple[float, str]:
    """The largest numeric difference, and what fails ("" when the tables agree)."""
    if list(written.columns) != list(committed.columns):
        return float("nan"), f"columns {list(written.columns)} != committed {list(committed.columns)}"
    if len(written) != len(committed):
        return float("nan"), f"{len(written)} rows != committed {len(committed)}"
    numeric = [
        c
        for c in written.columns
        if pd.api.types.is_numeric_dtype(written[c]) and pd.api.types.is_numeric_dtype(committed[c])
    ]
    for column in written.columns.difference(numeric):
        if not written[column].astype(str).equals(committed[column].astype(str)):
            return float("nan"), f"column {column!r} differs"
    a, b = written[numeric].to_numpy(float), committed[numeric].to_numpy(float)
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("nan"), "missing values differ"
    largest = float(np.nanmax(np.abs(a - b), initial=0.0))
    return largest, "" if largest <= tolerance else f"differs by {largest:.3g} > {tolerance:g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="git revision holding the committed figures")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest allowed numeric difference")
    parser.add_argument(
        "--figures",
        type=Path,
        default=cfg.figures_dir(),
        help="folder of the written figures (default: FLOWLIB_FIGURES or figures/)",
    )
    args = parser.parse_args(argv)
    paths = sorted(args.figures.glob("*.csv"))
    if not paths:
        print(f"no figure numbers (*.csv) in {args.figures}: run `make figures` first")
        return 1
    failed = False
    for path in paths:
        committed = committed_csv(path.name, args.against)
        if committed is None:
            failed, largest, problem = True, float("nan"), f"not committed at {args.against}"
        else:
            largest, problem = compare(pd.read_csv(path), committed, args.tolerance)
            failed |= bool(problem)
        print(f"{path.name}: max |difference| {largest:.3g}" + (f"  FAIL: {problem}" if problem else "  ok"))
    print(
        "figures differ from the committed ones"
        if failed
        else f"every figure's numbers equal the committed ones within {args.tolerance:g}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
