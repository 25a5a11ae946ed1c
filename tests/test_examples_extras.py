"""Every example of python/ says which extras it needs, and those extras install everything it imports.

The check is pip's view: the requirements of m2d-kernels with the stated extras, and transitively those of each
installed distribution they name (with the extras named there, e.g. sentence-transformers[train] -> datasets),
must include the distribution of every non-standard-library module the example imports anywhere (ast, so
imports inside functions count). Distributions not installed here end the walk (their requirements are unknown).
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest

requirements = pytest.importorskip("packaging.requirements")
tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "python").glob("*.py"))
INSTALL_LINE = re.compile(r'Install: ``pip install -e (?:\.|"\.\[([a-z,-]+)\]")``')


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def stated_extras(path: Path) -> list[str]:
    match = INSTALL_LINE.search(ast.get_docstring(ast.parse(path.read_text())) or "")
    assert match, f"{path.name}: its docstring has no 'Install: ``pip install -e ...``' line"
    return match.group(1).split(",") if match.group(1) else []


def imported_distributions(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"m2d_kernels", "__future__"}
    owners = metadata.packages_distributions()
    missing = sorted(module for module in modules if module not in owners)
    assert not missing, f"{path.name} imports {missing}, which no installed distribution provides"
    return {_name(owners[module][0]) for module in modules}


def installed_closure(extras: list[str]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = [requirements.Requirement(text) for text in project["dependencies"]]
    for extra in extras:
        pending += [requirements.Requirement(text) for text in project["optional-dependencies"][extra]]
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = (_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            child = requirements.Requirement(text)
            wanted = child.marker is None or any(child.marker.evaluate({"extra": extra})
                                                 for extra in ("", *requirement.extras))
            if wanted:
                child.marker = None
                pending.append(child)
    return names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_the_stated_extras_install_what_the_example_imports(path):
    extras = stated_extras(path)
    missing = imported_distributions(path) - installed_closure(extras)
    hint = f'pip install -e ".[{",".join(extras)}]"' if extras else "pip install -e ."
    assert not missing, f"{path.name} imports {sorted(missing)}, which `{hint}` does not install"


def test_the_check_sees_a_missing_extra():
    """Without extras, sentence-transformers' trainer example misses what it imports (the check can fail)."""
    example = ROOT / "python" / "sentence_transformers_trainer.py"
    assert {"datasets", "sentence-transformers"} <= imported_distributions(example) - installed_closure([])
