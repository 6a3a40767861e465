"""Imports point one way: cli -> stages -> {artifacts, quant, models, eval, export}.

Every module of the package is parsed with `ast` (nothing is imported), every import in it, at any
depth (functions, TYPE_CHECKING blocks), becomes an edge, and each edge is checked against the
rules below. A failure names the edge and the rule it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "diffquant"

# Modules of diffquant/stages/ that are parts of a stage rather than stages: any stage may use them.
STAGE_PARTS = {"diffquant.stages.capture", "diffquant.stages.ranks", "diffquant.stages.statistics"}
# Front ends beside the command line: the Python API and the Quark-shaped entry point drive stages.
FRONT_ENDS = ("diffquant.cli", "diffquant.api", "diffquant.compat")
# The one stage whose job is to run others: a sweep quantizes and evaluates every recipe.
COMPOSITE_STAGES = {"diffquant.stages.sweep"}

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports: `from a.b import c` is `a.b.c` when that is a module, else `a.b`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def wrong_way(importer: str, imported: str) -> str | None:
    """Why the edge importer -> imported points the wrong way, or None when it is allowed."""
    if imported == "click" or imported.startswith("click."):
        return None if in_package(importer, "diffquant.cli") else "click is imported only inside diffquant.cli"
    if not in_package(imported, "diffquant"):
        return None
    if in_package(imported, "diffquant.cli") and not in_package(importer, "diffquant.cli") and importer != "diffquant.__main__":
        return "only the command line imports diffquant.cli"
    if in_package(importer, "diffquant.quant") and not in_package(imported, "diffquant.quant") and imported != "diffquant":
        return "diffquant.quant imports nothing outside diffquant.quant"
    if any(in_package(imported, front) for front in FRONT_ENDS[1:]) and not any(in_package(importer, front) for front in FRONT_ENDS):
        return "only front ends import the Python API and compat entry points"
    if in_package(imported, "diffquant.stages") and imported != "diffquant.stages":
        if not in_package(importer, "diffquant.stages") and not any(in_package(importer, front) for front in FRONT_ENDS):
            return "only the front ends (command line, Python API, compat) and the stages import diffquant.stages"
        if in_package(importer, "diffquant.stages"):
            if importer in STAGE_PARTS and imported not in STAGE_PARTS:
                return "a part of a stage imports no stage"
            if imported not in STAGE_PARTS and importer not in COMPOSITE_STAGES:
                return "no stage imports another stage"
    # Models (loading a checkpoint into a pipe) read artifacts; artifacts, the on-disk formats, never
    # reach up into the models, so the two cannot form a cycle.
    if in_package(importer, "diffquant.artifacts") and in_package(imported, "diffquant.models"):
        return "diffquant.artifacts imports nothing from diffquant.models"
    return None


def import_edges() -> set[tuple[str, str]]:
    modules = package_modules()
    known = set(modules)
    return {(name, imported) for name, path in modules.items() for imported in imported_modules(name, path, known) if imported != name}


def test_imports_point_one_way():
    wrong = sorted(
        f"{importer} -> {imported}: {reason}"
        for importer, imported in import_edges()
        if (reason := wrong_way(importer, imported)) is not None
    )
    assert not wrong, "wrong-way imports:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("importer", "imported", "reason"),
    [
        ("diffquant.quant.spec", "diffquant.errors", "diffquant.quant imports nothing outside diffquant.quant"),
        ("diffquant.errors", "click", "click is imported only inside diffquant.cli"),
        ("diffquant.stages.evaluate", "diffquant.stages.quantize", "no stage imports another stage"),
        ("diffquant.artifacts.calibration_reader", "diffquant.models.fingerprint", "diffquant.artifacts imports nothing from diffquant.models"),
        ("diffquant.eval.measure", "diffquant.stages.quantize", "only the front ends (command line, Python API, compat) and the stages import diffquant.stages"),
        ("diffquant.stages.calibrate", "diffquant.api", "only front ends import the Python API and compat entry points"),
        ("diffquant.stages.quantize", "diffquant.cli.params", "only the command line imports diffquant.cli"),
        ("diffquant.stages.capture", "diffquant.stages.calibrate", "a part of a stage imports no stage"),
    ],
)
def test_rules_name_the_wrong_way_edges(importer, imported, reason):
    assert wrong_way(importer, imported) == reason


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("diffquant.cli.quantize", "diffquant.stages.quantize"),
        ("diffquant.api", "diffquant.stages.calibrate"),
        ("diffquant.compat.quark", "diffquant.api"),
        ("diffquant.stages.calibrate", "diffquant.stages.capture"),
        ("diffquant.stages.sweep", "diffquant.stages.quantize"),
        ("diffquant.stages.quantize", "diffquant.quant.quantizer"),
        ("diffquant.quant.recipe", "diffquant.quant.errors"),
        ("diffquant.errors", "diffquant.quant.errors"),
        ("diffquant.eval.measure", "diffquant.models.placement"),
        ("diffquant.quant.formats.fp8", "torch"),
    ],
)
def test_rules_allow_the_right_way_edges(importer, imported):
    assert wrong_way(importer, imported) is None


def test_edges_are_read_from_the_source():
    edges = import_edges()
    assert ("diffquant.stages.quantize", "diffquant.eval.measure") in edges
    assert ("diffquant.cli", "click") in edges
    assert ("diffquant.stages.calibrate", "diffquant.stages.capture") in edges
