"""The docs name only files that are in the repository.

Checked in README.md and docs/*.md: every relative Markdown link, and every backticked
path that starts at the repository root (its first part is a top-level file or
directory, like `node/cli/root.py` or `tests/procs.py`) or names another Markdown page
(`cluster.md`, resolved from the page's directory). Code blocks are skipped: they show
commands and output, where paths belong to the reader's machine.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name in (".ci",)}
TOP -= {"cairn.egg-info", "build", "dist"}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE = re.compile(r"`([^`\n]+)`")
_PATHLIKE = re.compile(r"[\w.@-]+(/[\w.@-]*)*")


def _prose(page: Path) -> str:
    return _FENCE.sub("", page.read_text(encoding="utf-8"))


def _inside_repo(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def _broken_links(page: Path) -> list[str]:
    bad = []
    for target in _LINK.findall(_prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not _inside_repo(path) or not path.exists():
            bad.append(f"{page.relative_to(ROOT)}: link ({target})")
    return bad


def repo_paths(text: str) -> list[str]:
    """Backticked strings that name a path in the repository (see the module docstring)."""
    found = []
    for code in _CODE.findall(text):
        token = code.split("::", 1)[0].rstrip("/")
        if not _PATHLIKE.fullmatch(token):
            continue
        first = token.split("/", 1)[0]
        if ("/" in token and first in TOP) or token in TOP or token.endswith(".md"):
            found.append(token)
    return found


def _broken_paths(page: Path) -> list[str]:
    bad = []
    for token in repo_paths(_prose(page)):
        candidates = [ROOT / token]
        if token.endswith(".md") and "/" not in token:
            candidates.append(page.parent / token)
        if not any(_inside_repo(c) and c.exists() for c in candidates):
            bad.append(f"{page.relative_to(ROOT)}: `{token}`")
    return bad


def test_every_relative_link_names_a_file_in_the_repository() -> None:
    assert [b for page in PAGES for b in _broken_links(page)] == []


def test_every_backticked_repository_path_exists() -> None:
    assert [b for page in PAGES for b in _broken_paths(page)] == []


def test_the_checks_see_what_they_should() -> None:
    text = (
        "`node/cli/root.py` and `tests/procs.py::test_x` and `README.md`, `cluster.md`, "
        "`../shared/NOTES.md`; not `component.toml`, `data/n1`, `CAIRN_TARGET` or "
        "`cairn deploy ./x`."
    )
    assert repo_paths(text) == [
        "node/cli/root.py", "tests/procs.py", "README.md", "cluster.md", "../shared/NOTES.md",
    ]  # fmt: skip
    assert len(PAGES) > 5
