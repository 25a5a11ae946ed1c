"""The README and docs/ pages link only to files of the repository (relative links that resolve) and to
real outside pages; their commands name existing files and write to the user's folders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(match) for match in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)}


def _outside_code(text: str) -> str:
    return re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def test_slug_matches_githubs_rule():
    assert _slug("Accuracy, common to all backends") == "accuracy-common-to-all-backends"
    assert _slug("`m2d-train` on several devices") == "m2d-train-on-several-devices"
    assert _slug("Set-up: two commands") == "set-up-two-commands"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    targets = LINK.findall(_outside_code(text))
    for target in targets:
        if re.match(r"[a-z]+:", target):  # an outside page: never an invented home of this project
            assert target.startswith("https://"), f"{page.name}: {target}"
            assert not re.match(r"https://(github\.com|raw\.githubusercontent\.com)/m2d-kernels/", target), (
                f"{page.name}: {target} is an absolute address of a repository that does not exist: link relatively")
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved == ROOT or ROOT in resolved.parents, f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: {target} names no file of the repository"
        if anchor:
            assert resolved.suffix == ".md" and anchor in _anchors(resolved), f"{page.name}: no heading for {target}"
    assert "../shared" not in text, f"{page.name} points outside the repository (../shared)"
    assert "DESIGN.md" not in text, f"{page.name} cites DESIGN.md: the design is docs/design.md"
    assert not re.search(r"\bissues? #?\d+", text, flags=re.I), f"{page.name} cites an issue number"


def test_readme_is_a_front_door_linking_every_page():
    assert len(README.splitlines()) <= 300
    links = set(LINK.findall(README))
    for page in ("design", "backends", "loss-family", "training", "multi-device", "sentence-transformers",
                 "security", "deployment", "benchmarks"):
        assert f"docs/{page}.md" in links, page
    for page in PAGES[1:]:  # every page is reachable from the README
        assert any(link.partition("#")[0] == f"docs/{page.name}" for link in links), page.name


def test_design_notes_live_in_the_repository():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    for needle in ("S_m = Q[:, :d_m] K[:, :d_m]^T = S_{m-1} + Q[:, seg_m] K[:, seg_m]^T", "2 * L * B * N * D",
                   "H_s        = sum_{m >= s}", "logsumexp_j"):
        assert needle in design, needle


def test_license_and_package_metadata():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text.splitlines()) > 190
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # (tomllib needs Python 3.11)
    assert re.search(r'^readme = "README.md"$', pyproject, re.M)
    assert re.search(r"^license = .*Apache-2.0", pyproject, re.M)
    assert "include LICENSE" in (ROOT / "MANIFEST.in").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_commands_write_to_the_users_folders_and_name_existing_files(page):
    text = page.read_text(encoding="utf-8")
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ")
    for line in commands.splitlines():  # a user's run goes to the user's folders, never over the stored results
        assert "-o benchmarks/results" not in line and "--benchmark-json=benchmarks/results" not in line, line
        assert not ("--benchmark-save" in line and "--benchmark-storage=benchmarks" in line), line
    for script in set(re.findall(r"\b(python/\w+\.py|benchmarks/\w+\.(?:py|sh)|tests/\w+\.py)", text)):
        assert (ROOT / script).is_file(), f"{page.name}: {script}"


def test_readme_keeps_the_two_set_up_commands_and_the_benchmark_command():
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
    assert ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[train]" '
            "&& HF_HUB_OFFLINE=1 m2d-train") in commands
    test_command = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                    'pip install -e ".[dev,st,train]" && python -m pytest -q')
    assert test_command in commands and test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "--benchmark-json=runs/bench/cpu.json" in commands and "plot.py runs/bench/cpu.json" in commands
