"""visattn.integrations.handles: the one way integrations keep the handle they installed on a model."""

import gc

import pytest
from torch import nn

from visattn.integrations.handles import HandleRegistry


def test_records_one_handle_per_model_and_forgets_only_that_one():
    registry, model, handle, other = HandleRegistry("apply_thing"), nn.Linear(2, 2), object(), object()
    assert registry.get(model) is None
    registry.record(model, handle)
    registry.record(model, handle)  # the same handle again is fine
    assert registry.get(model) is handle and not vars(model).get("_visattn_handle")
    with pytest.raises(ValueError, match="apply_thing: this Linear already has one installed"):
        registry.record(model, other)
    assert registry.forget(model, other) is False and registry.get(model) is handle
    assert registry.forget(model, handle) is True and registry.get(model) is None


def test_entries_do_not_keep_models_alive():
    registry, model = HandleRegistry("apply_thing"), nn.Linear(2, 2)
    registry.record(model, object())
    del model
    gc.collect()
    assert len(registry._handles) == 0
