"""Agent-DeiT / Agent-PVT / Agent-Swin: official conformance, checkpoint keys, parameter counts, battery."""

import json

import pytest
import timm
import torch

import visattn  # noqa: F401  (registers the models)
from tests.model_battery import (
    assert_paper_params,
    battery_names,
    checkpoint_filter_for,
    meta_model,
    run_battery,
)
from visattn.backbones.agent_family import AgentAttentionBase

# Official constructor kwargs that are defaults of ours (or spelled differently) and are not passed on.
_OFFICIAL_ONLY = {
    "qk_scale": None,
    "ape": False,
    "patch_norm": True,
    "use_checkpoint": False,
    "in_chans": 3,
    "norm_layer": "partial(nn.LayerNorm, eps=1e-6)",
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
}
_FIXTURES = {
    "agent_deit_r1": "agent_deit_tiny",
    "agent_pvt_r1": "agent_pvt_tiny",
    "agent_swin_r1": "agent_swin_tiny",
}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _model_kwargs(config: dict) -> dict:
    kwargs = {}
    for key, value in config["constructor_kwargs"].items():
        if key in _OFFICIAL_ONLY:
            assert value == _OFFICIAL_ONLY[key], f"{key}={value!r} is not what our model hard-codes"
        else:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


def _stage_features(name: str, model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our features in the fixture's layout (tokens ``[B, N, C]``)."""
    final, inter = model.forward_intermediates(x)
    tokens = [t.flatten(2).transpose(1, 2) for t in inter]
    if name == "agent_deit_r1":  # fixtures keep the class token: compare the patch tokens
        return {f"block{i}": t for i, t in enumerate(tokens)} | {"norm": final}
    if name == "agent_pvt_r1":
        return {f"block{i + 1}": t for i, t in enumerate(tokens)}
    feats = {}  # swin: fixture layers include the PatchMerging at the stage end
    for i, t in enumerate(inter):
        stage_out = t.permute(0, 2, 3, 1)
        if model.layers[i].downsample is not None:
            stage_out = model.layers[i].downsample(stage_out)
        feats[f"layer{i}"] = stage_out.flatten(1, 2)
    feats["norm"] = final.flatten(1, 2)
    return feats


@pytest.mark.parametrize("fixture", sorted(_FIXTURES))
def test_official_conformance(fixture, conformance_dir):
    folder = conformance_dir / "agent"
    config = json.loads((folder / f"{fixture}_config.json").read_text())
    model = timm.create_model(_FIXTURES[fixture], **_model_kwargs(config)).eval()
    official = {"model": _load(folder / f"{fixture}_state_dict.pt"), "epoch": 300}  # as the repo saves them
    model.load_state_dict(checkpoint_filter_for(_FIXTURES[fixture])(official, model), strict=True)
    x = _load(folder / f"{fixture}_input.pt")
    expected = _load(folder / f"{fixture}_features.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(x), _load(folder / f"{fixture}_logits.pt"), atol=1e-5, rtol=1e-4)
        ours = _stage_features(fixture, model, x)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        if fixture == "agent_deit_r1" and key != "norm":
            value = value[:, 1:]
        torch.testing.assert_close(ours[key], value, atol=1e-4, rtol=1e-4, msg=f"{fixture} feature {key}")


@pytest.mark.parametrize("variant", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny"])
def test_full_size_official_keys_load(variant, conformance_dir):
    lines = (conformance_dir / "agent" / f"{variant}_keys.txt").read_text().splitlines()
    with torch.device("meta"):
        model = timm.create_model(variant)
        state = {}
        for line in lines:
            key, shape = line.split(" ")
            dtype = torch.long if key.endswith("relative_position_index") else torch.float32
            state[key] = torch.zeros(json.loads(shape), dtype=dtype)
    filtered = checkpoint_filter_for(variant)({"model": state}, model)
    model.load_state_dict(filtered, strict=True)
    assert len(filtered) == len(lines) - sum(k.endswith("relative_position_index") for k in state)


# Paper / official README parameter counts (millions).
PAPER_PARAMS = {
    "agent_deit_tiny": 6.0,
    "agent_deit_small": 22.7,
    "agent_deit_small_448": 23.1,
    "agent_deit_base": 87.2,
    "agent_pvt_tiny": 11.6,
    "agent_pvt_small": 20.6,
    "agent_pvt_medium": 35.9,
    "agent_pvt_medium_256": 36.1,
    "agent_pvt_large": 48.7,
    "agent_swin_tiny": 29.0,
    "agent_swin_small": 50.0,
    "agent_swin_small_288": 50.0,
    "agent_swin_base": 88.0,
    "agent_swin_base_384": 88.0,
}


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS))
def test_param_count_matches_paper(variant):
    assert_paper_params(meta_model(variant), variant, PAPER_PARAMS[variant])


def test_registered_variants_are_the_paper_ones():
    assert set(visattn.list_models("agent_*")) == set(PAPER_PARAMS)


_SWIN = dict(img_size=64, embed_dim=16, num_heads=(1, 2, 2, 4), agent_num=(4, 4, 4, 4), num_classes=5)
_PVT = dict(
    img_size=64,
    embed_dims=(16, 32, 48, 64),
    num_heads=(1, 2, 2, 4),
    depths=(1, 1, 1, 1),
    agent_num=(4, 4, 4, 4),
    num_classes=5,
)
_DEIT = dict(
    img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2, agent_num=(4, 4, 4, 4), num_classes=5
)
TINY = {
    # window 8 < stage-1 grid 16: agent attention in 4 windows, block 1 cyclically shifted
    "agent_swin_tiny": dict(_SWIN, depths=(2, 1, 1, 1), window_size=8),
    "agent_swin_small": dict(_SWIN, depths=(1, 1, 2, 1), window_size=16),  # AABB
    "agent_swin_small_288": dict(_SWIN, depths=(1, 1, 1, 1), window_size=16),
    "agent_swin_base": dict(_SWIN, depths=(1, 1, 3, 1), window_size=16),  # AAMB2: stage 3 mixes A and B
    "agent_swin_base_384": dict(_SWIN, depths=(1, 1, 2, 1), window_size=16),
    "agent_pvt_tiny": dict(_PVT, agent_sr_ratios="2111"),  # agent keys/values spatially reduced in stage 1
    "agent_pvt_small": dict(_PVT, attn_type="AABB"),  # PVT spatial-reduction attention in stages 3-4
    "agent_pvt_medium": _PVT,
    "agent_pvt_medium_256": _PVT,
    "agent_pvt_large": _PVT,
    "agent_deit_tiny": _DEIT,
    "agent_deit_small": _DEIT,
    "agent_deit_small_448": _DEIT,
    "agent_deit_base": dict(_DEIT, agent_layer=2, agent_num=(9, 9, 9, 9)),  # block 2 is a plain DeiT block
}


# torch.compile is slow on CPU: traced (dynamo and inductor) once per model class (the other variants
# share the code path).
COMPILE_CHECKED = {"agent_swin_base", "agent_pvt_small", "agent_deit_base"}


@pytest.mark.parametrize("name", battery_names(sorted(TINY)))
def test_battery(name):
    kwargs = dict(TINY[name])
    size = kwargs.pop("img_size")  # through the pretrained cfg, so the battery feeds that size too
    run_battery(
        name,
        compile_check=name in COMPILE_CHECKED,
        inductor_check=name in COMPILE_CHECKED,
        pretrained_cfg_overlay=dict(input_size=(3, size, size)),
        **kwargs,
    )


@pytest.mark.parametrize(
    "name, small, large, extra",
    [
        ("agent_swin_tiny", 64, 96, dict(window_size=16)),  # windows 16 -> 24, Swin table 3x3 -> 5x5
        ("agent_pvt_tiny", 64, 96, {}),
        ("agent_deit_tiny", 32, 48, {}),
    ],
)
def test_checkpoint_from_another_resolution(name, small, large, extra):
    """Fine-tuning at a new size (official load_pretrained): biases and embeddings are interpolated."""
    kwargs = {k: v for k, v in TINY[name].items() if k not in ("img_size", "window_size")} | extra
    source = timm.create_model(name, img_size=small, **kwargs)
    if "window_size" in extra:
        kwargs["window_size"] = extra["window_size"] * large // small
    target = timm.create_model(name, img_size=large, **kwargs).eval()
    filtered = checkpoint_filter_for(name)({"model": source.state_dict()}, target)
    target.load_state_dict(filtered, strict=True)
    key = next(k for k in filtered if k.endswith("ah_bias"))
    old = source.state_dict()[key]  # (1, heads, agents, h, 1): official resize = linear over h
    expected = torch.nn.functional.interpolate(old[0, ..., 0], size=filtered[key].shape[3], mode="linear")
    torch.testing.assert_close(filtered[key], expected[None, ..., None])
    with torch.no_grad():
        assert torch.isfinite(target(torch.randn(1, 3, large, large))).all()


@pytest.mark.parametrize("name", ["agent_swin_small", "agent_pvt_tiny", "agent_deit_base"])
def test_models_on_the_triton_backend(name):
    """The layouts the models hand to the op (fused-projection views, broadcast biases) run on Triton."""
    kwargs = dict(TINY[name])
    size = kwargs.pop("img_size")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton under the interpreter on CPU
    model = timm.create_model(name, img_size=size, **kwargs).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    layers = [m for m in model.modules() if isinstance(m, AgentAttentionBase)]
    for layer in layers:
        layer.backend = "torch"
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for layer in layers:
        layer.backend = "triton"
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for g, g_ref in zip(torch.autograd.grad(out.square().sum(), list(model.parameters())), ref_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", ["agent_swin_small", "agent_pvt_tiny", "agent_deit_base"])
def test_autocast_bfloat16(name):
    """Mixed precision: float32 bias parameters meet bfloat16 activations inside the agent layers."""
    kwargs = dict(TINY[name])
    size = kwargs.pop("img_size")
    model = timm.create_model(name, img_size=size, **kwargs)
    x = torch.randn(2, 3, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), atol=0.05, rtol=0.05)


def test_config_errors_and_attn_type_strings():
    from visattn.backbones.agent_swin import parse_attn_type

    assert parse_attn_type("AAMB2", (2, 2, 4, 2)) == [
        ["A", "A"],
        ["A", "A"],
        ["A", "A", "B", "B"],
        ["B", "B"],
    ]
    with pytest.raises(ValueError, match="attn_type"):
        parse_attn_type("AAXB", (2, 2, 2, 2))
    with pytest.raises(ValueError, match="perfect square"):
        timm.create_model("agent_swin_tiny", **dict(TINY["agent_swin_tiny"], agent_num=(10, 4, 4, 4)))
    with pytest.raises(ValueError, match="attn_type"):
        timm.create_model("agent_pvt_tiny", **dict(TINY["agent_pvt_tiny"], attn_type="AAA"))


def check_intermediates_and_prune(name: str, size: int, **kwargs) -> None:
    """timm's forward_intermediates index forms and stop_early, and prune_intermediate_layers, give the
    same maps as the full model (the shared battery only covers the default and ``indices=1``)."""
    from timm.models._features import feature_take_indices

    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    count = len(model.feature_info)
    with torch.no_grad():
        _, full = model.forward_intermediates(x)
        for indices in ([0, count - 2], [-1], 2):
            take, _ = feature_take_indices(count, indices)
            for stop_early in (False, True):
                _, got = model.forward_intermediates(x, indices=indices, stop_early=stop_early)
                assert len(got) == len(take), f"{name} indices={indices}"
                for t, i in zip(got, take):
                    torch.testing.assert_close(t, full[i], rtol=0, atol=0)
        pruned = timm.create_model(name, **kwargs).eval()
        pruned.load_state_dict(model.state_dict())
        take = pruned.prune_intermediate_layers([0, count - 2])
        assert take == [0, count - 2]
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
        got = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        assert len(got) == 2
        for t, i in zip(got, take):
            torch.testing.assert_close(t, full[i], rtol=0, atol=0)
        assert torch.isfinite(pruned(x)).all()  # the truncated model still runs end to end


@pytest.mark.parametrize("name", ["agent_swin_base", "agent_pvt_small", "agent_deit_base"])
def test_intermediate_indices_and_prune(name):
    kwargs = dict(TINY[name])
    size = kwargs.pop("img_size")
    check_intermediates_and_prune(name, size, img_size=size, **kwargs)


# Per family: official keys dropped from the fixture state_dict (our key names are the official ones).
_DROPPED = {
    "agent_deit_r1": ["blocks.0.attn.ah_bias", "blocks.3.attn.qkv.weight", "head.weight"],
    "agent_pvt_r1": ["pos_embed2", "block1.1.attn.wa_bias", "patch_embed1.proj.weight"],
    "agent_swin_r1": [
        "layers.0.blocks.1.attn.an_bias",
        "layers.3.blocks.1.attn.relative_position_bias_table",
    ],
}
_BOGUS = {  # an unknown key, and (Swin) a rebuilt-buffer name on a module the model does not have
    "agent_deit_r1": ["blocks.1.attn.extra"],
    "agent_pvt_r1": ["block5.0.attn.q.weight"],
    "agent_swin_r1": ["layers.2.blocks.0.attn.extra", "layers.7.blocks.0.attn.relative_position_index"],
}


@pytest.mark.parametrize("fixture", sorted(_FIXTURES))
def test_official_file_missing_keys_are_named_exactly(fixture, conformance_dir):
    """Keys map one by one: ``load_state_dict`` names exactly what an official file lacks or adds."""
    folder = conformance_dir / "agent"
    config = json.loads((folder / f"{fixture}_config.json").read_text())
    with torch.device("meta"):
        model = timm.create_model(_FIXTURES[fixture], **_model_kwargs(config))
    state = _load(folder / f"{fixture}_state_dict.pt")
    for key in _DROPPED[fixture]:
        del state[key]
    for key in _BOGUS[fixture]:
        state[key] = torch.zeros(1)
    filtered = checkpoint_filter_for(_FIXTURES[fixture])({"model": state, "epoch": 300}, model)
    result = model.load_state_dict(filtered, strict=False, assign=True)
    assert sorted(result.missing_keys) == sorted(_DROPPED[fixture])
    assert sorted(result.unexpected_keys) == sorted(_BOGUS[fixture])
