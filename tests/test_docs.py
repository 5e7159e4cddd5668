"""The README and docs/ are a front door and its rooms: every relative link resolves inside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
#: Markdown links and images: [text](target) and ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
#: Files that lie beside the repository, not in it: a reader of a clone never has them.
OUTSIDE = ("../shared", "PAPER.md", "TECH-NOTES.md", "STYLE.md")


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(page.read_text())
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    links = relative_links(page)
    missing = [t for t in links if not (page.parent / t).exists()]
    outside = [t for t in links if ROOT not in (page.parent / t).resolve().parents]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"
    assert not outside, f"{page.name} links outside the repository: {outside}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_names_a_file_outside_the_repository(page):
    text = page.read_text()
    assert not [name for name in OUTSIDE if name in text]


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "see [the method](docs/method.md), ![fig](missing.png) and [the paper](https://arxiv.org/abs/2411.18620)"
    )
    assert relative_links(page) == ["docs/method.md", "missing.png"]


def test_the_readme_api_example_runs_as_written():
    """The README's Python block, run on the offline model: the knockout cuts exactly the layers it names."""
    (code,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    removed = scope["ko"].removed_edges()
    assert all(n > 0 for n in removed[:3]) and not any(removed[3:])
