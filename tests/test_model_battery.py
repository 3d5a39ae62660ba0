"""Every model visattn registers is covered by the shared battery in some family test file."""

import importlib
import pkgutil
from pathlib import Path

import visattn
from tests.model_battery import COVERED


def test_every_registered_model_runs_the_battery():
    # Import every test module so their battery_names(...) calls have run, even
    # when this file is collected alone.
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("test_"):
            importlib.import_module(f"tests.{info.name}")
    missing = sorted(set(visattn.list_models()) - COVERED)
    assert not missing, f"models without a battery test: {missing}"
