"""The ``>>>`` examples in our docstrings run and hold (autoquant, its strategies and adapters)."""

import doctest
import importlib
import pkgutil

import pytest

# strategies/ and adapters/ install as subpackages from other folders (package-dir), so each
# package is listed from its own __path__.
PACKAGES = ["autoquant", "autoquant.strategies", "autoquant.adapters", "autoquant.examples"]
MODULES = sorted({*PACKAGES, *(info.name for package in PACKAGES
                               for info in pkgutil.iter_modules(importlib.import_module(package).__path__,
                                                                package + "."))})


def test_the_walk_sees_strategies_and_adapters():
    assert {"autoquant.strategies.random", "autoquant.adapters.onnx", "autoquant.criterion"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} example(s) in {name} failed (output above)"
