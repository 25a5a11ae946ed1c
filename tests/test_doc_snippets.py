"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one namespace, as a reader pastes them one after the other into one
session (a later block may use an earlier block's ``queries``). A block that cannot run here (it needs a GPU,
torchrun, a model or data on disk) is marked on the line just above its fence, visibly in the Markdown source::

    <!-- snippet: not run: needs torchrun (several processes) -->

and is reported as skipped with that reason. A block without a marker that raises fails this test with the file
and line of the block. The blocks run in a temporary folder (what they write stays out of the repository), offline.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*snippet:\s*not run:\s*(?P<reason>.+?)\s*-->")


@dataclass(frozen=True)
class Snippet:
    """One ```python block: the file, the line of its opening fence (1-based), its code, and why it is not run."""

    path: Path
    line: int
    code: str
    skip_reason: str | None


def snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of a Markdown file, with the not-run marker of the line above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index
            index += 1
            body = []
            while index < len(lines) and lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            above = lines[start - 1] if start else ""
            marker = MARKER.search(above)
            found.append(Snippet(path, start + 1, "\n".join(body) + "\n", marker["reason"] if marker else None))
        index += 1
    return found


def documents() -> list[Path]:
    return [path for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if path.is_file()]


def run_file(path: Path, root: Path = ROOT) -> list[str]:
    """Run the blocks of ``path`` in order; the reasons of the skipped ones (places relative to ``root``)."""
    namespace: dict = {"__name__": "__snippet__"}
    skipped = []
    for snippet in snippets(path):
        where = f"{path.relative_to(root)}:{snippet.line}"
        if snippet.skip_reason is not None:
            skipped.append(f"{where}: {snippet.skip_reason}")
            continue
        try:
            exec(compile(snippet.code, where, "exec"), namespace)  # noqa: S102 (our own documentation)
        except Exception as error:
            raise AssertionError(f"the ```python block at {where} fails as written: "
                                 f"{type(error).__name__}: {error}") from error
    return skipped


@pytest.mark.parametrize("path", documents(), ids=lambda path: str(path.relative_to(ROOT)))
def test_python_blocks_run_as_written(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    skipped = run_file(path)
    for reason in skipped:  # visible in the test report, not silently dropped
        warnings.warn(f"not run: {reason}", stacklevel=1)


def test_a_failing_block_is_reported_with_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- snippet: not run: needs a GPU -->\n```python\n"
                    "raise SystemError\n```\n\n```python\ny = x + undefined_name\n```\n")
    found = snippets(page)
    assert [(s.line, s.skip_reason) for s in found] == [(3, None), (8, "needs a GPU"), (12, None)]
    with pytest.raises(AssertionError, match=r"page.md:12 fails as written: NameError"):
        run_file(page, root=tmp_path)
