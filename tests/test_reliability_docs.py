"""The docstring examples of the reliability modules run."""

from __future__ import annotations

import doctest

import pytest

from diffquant.artifacts import fingerprint, location, locking, replace, verification
from diffquant.quant import activation_stats


@pytest.mark.parametrize("module", [location, locking, replace, verification, fingerprint, activation_stats], ids=lambda m: m.__name__)
def test_docstring_examples_run(module) -> None:
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0 and tried > 0, module.__name__
