"""`python -m flowlib.notebook_check NB...`: fail if a notebook is committed with outputs.

Executed copies live in the git-ignored build folder; the committed notebooks
stay clean so that diffs show code, not results.
"""

from __future__ import annotations

import json
import sys


def dirty_cells(path: str) -> list[int]:
    """Indices of code cells that carry outputs or execution counts."""
    with open(path, encoding="utf-8") as handle:
        notebook = json.load(handle)
    return [
        i
        for i, cell in enumerate(notebook.get("cells", []))
        if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]


def main(paths: list[str]) -> int:
    failed = False
    for path in paths:
        cells = dirty_cells(path)
        if cells:
            failed = True
            print(f"{path}: cells {cells} carry outputs; clear them (`nbstripout {path}`)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
