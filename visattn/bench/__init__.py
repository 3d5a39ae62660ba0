"""Benchmarks run by ``visattn bench NAME``.

Each public module here is one benchmark: its docstring is the help text, and it
defines ``add_arguments(parser)`` and ``run(args)``. The CLI discovers them.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def available() -> dict[str, ModuleType]:
    """Benchmark name -> module, for every public module of this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            found[info.name] = importlib.import_module(f"{__name__}.{info.name}")
    return found
