"""The benchmark scripts (``benchmarks/*.py``, not a package) imported from tests."""

import contextlib
import importlib
import sys
from pathlib import Path


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmarks_importable():
    """``benchmarks/`` on ``sys.path`` inside the block (and their own imports of each other with it)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield
    finally:
        sys.path.remove(str(BENCHMARKS))


def bench_modules(*names: str):
    """A module-scoped fixture's body: yields the modules ``benchmarks/<name>.py`` with ``benchmarks/`` importable
    until the fixture is torn down."""
    with benchmarks_importable():
        yield tuple(importlib.import_module(name) for name in names)


def bench_module(name: str):
    """``benchmarks/<name>.py`` imported as a module."""
    with benchmarks_importable():
        return importlib.import_module(name)
