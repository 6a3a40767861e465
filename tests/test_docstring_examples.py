"""Every docstring example of the package runs: an example that is not run is not documentation.

One test per module: its doctests (module, class and function docstrings, found by
`doctest.DocTestFinder`) run in the module's own namespace, with `...` matching anything
(`doctest.ELLIPSIS`), in an empty working directory that they must leave empty. A failure prints
the example, what it expected and what it got.
"""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "diffquant"

def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def run_examples(name: str) -> tuple[int, int, str]:
    """(failed, attempted, report) of the doctests of module `name`."""
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test, out=report.write)
    results = runner.summarize(verbose=False)
    return results.failed, results.attempted, report.getvalue()


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    failed, _, report = run_examples(name)
    assert failed == 0, report
    assert not list(tmp_path.iterdir()), "an example left files in the working directory; write to a temporary one"


def test_the_finder_sees_examples() -> None:
    failed, attempted, _ = run_examples("diffquant.quant.formats.pack")
    assert failed == 0 and attempted >= 4
