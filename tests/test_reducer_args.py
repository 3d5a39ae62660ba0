"""Reducers built from text arguments (visattn/integrations/reducer_args.py): the registry follows
``visattn.mllm_tokens``' exports, values are typed from the constructors' signatures."""

import pytest

import visattn.mllm_tokens as mllm_tokens
from visattn.integrations.reducer_args import build_reducer, reducer_class, reducers
from visattn.mllm_tokens import DART, VAR, DyVTE, FastV, PyramidDrop, Reducer, SparseVLM, VisionZip


def test_registry_is_every_exported_reducer_and_follows_new_exports(monkeypatch):
    exported = {n for n in mllm_tokens.__all__ if isinstance(getattr(mllm_tokens, n), type)}
    expected = {n for n in exported if issubclass(getattr(mllm_tokens, n), Reducer) and n != "Reducer"}
    assert set(reducers()) == expected
    assert {"FastV", "VTCCLS", "VAR", "DyVTE", "DivPrune", "DART", "VisionZip"} <= expected

    class Newcomer(Reducer):  # what another module of mllm_tokens would add to __all__
        def __init__(self, keep: int = 3):
            self.keep = keep

    monkeypatch.setattr(mllm_tokens, "Newcomer", Newcomer, raising=False)
    monkeypatch.setattr(mllm_tokens, "__all__", [*mllm_tokens.__all__, "Newcomer"])
    assert build_reducer("newcomer", {"keep": "7"}).keep == 7


def test_values_are_typed_from_the_signature():
    fastv = build_reducer("fastv", {"layer": "3", "keep": "0.25", "scoring": "all"})
    assert isinstance(fastv, FastV) and (fastv.layer, fastv.keep, fastv.scoring) == (3, 0.25, "all")
    assert build_reducer("FastV", {"keep": 64}).keep == 64  # int | float: an int stays a count
    assert build_reducer("FastV", {"keep": 1.0}).keep == 1.0  # ... and a float a fraction
    pyramid = build_reducer("PyramidDrop", {"layers": "[2,4]", "ratio": "[0.5,0.25]"})
    assert isinstance(pyramid, PyramidDrop) and pyramid.layers == (2, 4) and pyramid.ratio == (0.5, 0.25)
    assert build_reducer("PyramidDrop", {"ratio": 0.5}).ratio == 0.5
    var = build_reducer("VAR", {"sink_dims": "[1415,2533]", "tau": 10})
    assert isinstance(var, VAR) and var.sink_dims == (1415, 2533) and var.tau == 10.0
    assert build_reducer("VAR", {"sink_dims": "qwen2-7b"}).sink_dims == "qwen2-7b"
    sparse = build_reducer("SparseVLM", {"tokens": 64, "rank_rule": "true", "recycle": False})
    assert isinstance(sparse, SparseVLM) and sparse.rank_rule == (0.8, 0.0) and sparse.recycle is False
    assert build_reducer("SparseVLM", {"rank_rule": "[13.5,0]"}).rank_rule == (13.5, 0.0)
    zip_ = build_reducer("visionzip", {"dominant": 54, "contextual": 10})
    assert isinstance(zip_, VisionZip) and (zip_.dominant, zip_.contextual) == (54, 10)
    dyvte = build_reducer("DyVTE", {"exit_layer": "2", "hypernet": "none"})
    assert isinstance(dyvte, DyVTE) and dyvte.hypernet is None and dyvte.exit_layer == 2
    assert isinstance(build_reducer("DART", {}), DART)


def test_bad_input_names_the_problem_and_the_choices():
    listed = r"unknown reducer 'nope'; valid reducers: CDPruner, DART, .*FastV.*VisionZip"
    with pytest.raises(ValueError, match=listed):
        reducer_class("nope")
    with pytest.raises(ValueError, match=r"FastV takes no argument kep; its arguments: layer: int = 2, keep"):
        build_reducer("FastV", {"kep": 1})
    with pytest.raises(ValueError, match=r"FastV: keep='many' is not of type int \| float"):
        build_reducer("FastV", {"keep": "many"})
    with pytest.raises(ValueError, match=r"FastV: layer=True is not of type int"):
        build_reducer("FastV", {"layer": True})
    with pytest.raises(ValueError, match=r"layers='\[2,x\]' is not of type Sequence\[int \| float\]"):
        build_reducer("PyramidDrop", {"layers": "[2,x]"})
    with pytest.raises(ValueError, match=r"rank_rule='\[1\]' is not of type tuple\[float, float\] \| bool"):
        build_reducer("SparseVLM", {"rank_rule": "[1]"})
    with pytest.raises(ValueError, match="FastV: scoring must be one of"):  # the reducer's own check
        build_reducer("FastV", {"scoring": "first"})
