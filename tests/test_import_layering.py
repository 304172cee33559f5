"""Imports flow downhill: loadtests -> server -> pruning -> measures -> corpus -> engine, with training beside
pruning. A package may import only the packages below it, so none of them can form a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib

import pytest

from engine.paths import SOURCE_ROOT

# Each package and the project packages it may import (the table is the layering; a new package goes in it).
MAY_IMPORT: dict[str, set[str]] = {
    "engine": set(),
    "corpus": {"engine"},
    "measures": {"corpus", "engine"},
    "pruning": {"measures", "corpus", "engine"},
    "training": {"measures", "corpus", "engine"},
    "server": {"pruning", "measures", "corpus", "engine"},
    "loadtests": {"server", "pruning", "measures", "corpus", "engine"},
}


def project_imports(package: str) -> dict[str, set[str]]:
    """The other project packages a package's modules import (function-level imports included), each with
    the files that import it."""
    found: dict[str, set[str]] = {}
    for path in sorted((SOURCE_ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in MAY_IMPORT and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(SOURCE_ROOT)))
    return found


def test_the_layering_names_every_installed_package() -> None:
    project = tomllib.loads((SOURCE_ROOT / "pyproject.toml").read_text())
    assert set(MAY_IMPORT) == set(project["tool"]["setuptools"]["packages"])


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    uphill = {name: files for name, files in project_imports(package).items() if name not in MAY_IMPORT[package]}
    assert uphill == {}, f"{package} imports packages above it"


def test_measures_imports_neither_pruning_nor_training() -> None:
    assert not {"pruning", "training"} & set(project_imports("measures"))


def test_request_schemas_and_pruning_settings_do_not_load_the_engine_hub() -> None:
    """server/protocol.py needs names only and pruning/serving.py needs device helpers: neither may pull in the
    engine loop (engine/llm_engine.py) and everything it imports."""
    probe = "import sys, server.protocol, pruning.serving; print('engine.llm_engine' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"
