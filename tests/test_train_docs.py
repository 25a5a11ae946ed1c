"""The README works as a package index's long description and from a clean clone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
REPOSITORY = "m2d-kernels/m2d-kernels"
URL_PREFIXES = (f"https://github.com/{REPOSITORY}/blob/main/", f"https://raw.githubusercontent.com/{REPOSITORY}/main/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_every_link_and_image_is_absolute_and_points_into_the_repository():
    targets = LINK.findall(README)
    assert len(targets) >= 5
    for target in targets:
        assert target.startswith("https://"), f"relative link {target!r} breaks on a package index"
        for prefix in URL_PREFIXES:
            if target.startswith(prefix):
                assert (ROOT / target[len(prefix):]).is_file(), f"{target} names no file of the repository"
    assert "../shared" not in re.sub(r"`[^`]*`", "", README)  # outside code spans: no pointer out of the repo
    assert "DESIGN.md" not in README and f"{URL_PREFIXES[0]}docs/design.md" in README


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


def test_readme_commands_write_to_the_users_folders_and_name_existing_files():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    commands = "\n".join(blocks)
    assert "--benchmark-save" not in commands and "-o benchmarks/results" not in commands
    assert "--benchmark-json=runs/bench/cpu.json" in commands and "plot.py runs/bench/cpu.json" in commands
    for script in set(re.findall(r"\b(python/\w+\.py|benchmarks/\w+\.(?:py|sh))", README)):
        assert (ROOT / script).is_file(), script
