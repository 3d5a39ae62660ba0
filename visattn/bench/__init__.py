"""Benchmarks run by ``visattn bench NAME``.

Each public module here is one benchmark: its docstring is the help text, and it
defines ``add_arguments(parser)`` and ``run(args)``. The CLI discovers them with :func:`described`,
which imports none of them, and imports only the one a command line names.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType


def available() -> dict[str, ModuleType]:
    """Benchmark name -> module, for every public module of this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            found[info.name] = importlib.import_module(f"{__name__}.{info.name}")
    return found


def described() -> dict[str, str]:
    """Benchmark name -> its module docstring, read from the source file without importing the module
    (they import torch: ``visattn --help`` must not)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            source = Path(info.module_finder.find_spec(info.name).origin).read_text(encoding="utf-8")
            found[info.name] = ast.get_docstring(ast.parse(source)) or info.name
    return found
