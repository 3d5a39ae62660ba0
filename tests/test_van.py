"""VAN backbones: official-model conformance, full-size key loading, parameter counts, the shared battery."""

import argparse
import json

import pytest
import timm
import torch

import visattn  # noqa: F401  (registers the models)
from tests.model_battery import assert_paper_params, battery_names, meta_model, run_battery
from tests.test_agent_models import check_intermediates_and_prune
from visattn.backbones.van import VAN, checkpoint_filter_fn

VARIANTS = ["van_b0", "van_b1", "van_b2", "van_b3", "van_b4", "van_b5", "van_b6"]
TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), num_classes=5)

# Paper (arXiv 2202.09741, ImageNet tables) parameter counts in millions.
PAPER_PARAMS_M = {
    "van_b0": 4.1,
    "van_b1": 13.9,
    "van_b2": 26.6,
    "van_b3": 44.8,
    "van_b4": 60.3,
    "van_b5": 90.0,
    "van_b6": 200.0,
}


@pytest.mark.parametrize("name", battery_names(VARIANTS))
def test_battery(name):
    # with TINY every variant builds the same network: the (slow) torch.compile checks run once
    checked = name == "van_b0"
    run_battery(name, img_size=64, alt_img_size=96, compile_check=checked, inductor_check=checked, **TINY)


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_paper(name):
    assert_paper_params(meta_model(name), name, PAPER_PARAMS_M[name])


def _official_r1(conformance_dir):
    folder = conformance_dir / "van"
    config = json.loads((folder / "van_r1_config.json").read_text())
    kwargs = {
        k: config["constructor_kwargs"][k] for k in ("embed_dims", "depths", "mlp_ratios", "num_classes")
    }
    model = timm.create_model("van_b0", **kwargs).eval()
    state_dict = torch.load(folder / "van_r1_state_dict.pt", weights_only=True)
    # released checkpoints wrap the weights under 'state_dict'
    model.load_state_dict(checkpoint_filter_fn({"state_dict": state_dict}, model), strict=True)
    load = lambda name: torch.load(folder / f"van_r1_{name}.pt", weights_only=True)  # noqa: E731
    return model, load("input"), load("logits"), load("features")


def test_conformance_logits_and_features(conformance_dir):
    model, x, logits, features = _official_r1(conformance_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-4)
        _, stages = model.forward_intermediates(x)
        for i, stage in enumerate(stages):
            # official normI features are tokens (B, H*W, C); ours are the same values as NCHW
            torch.testing.assert_close(
                stage.flatten(2).transpose(1, 2), features[f"norm{i + 1}"], atol=1e-4, rtol=1e-4
            )
        # the last block of each stage, before the stage norm
        captured = {}
        for i in range(4):
            blocks = getattr(model, f"block{i + 1}")
            blocks[-1].register_forward_hook(
                lambda m, a, out, i=i: captured.__setitem__(f"block{i + 1}_last", out)
            )
        model(x)
    for name, value in captured.items():
        torch.testing.assert_close(value, features[name], atol=1e-4, rtol=1e-4)
    assert len(captured) == 4


def test_conformance_with_triton_lka(conformance_dir):
    model, x, logits, _ = _official_r1(conformance_dir)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "triton"
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-4)


def test_full_size_keys_load_strict(conformance_dir):
    lines = (conformance_dir / "van" / "van_b0_keys.txt").read_text().split("\n")
    shapes = {}
    for line in filter(None, lines):
        key, dims = line.split(" ")
        shapes[key] = [int(d) for d in dims.strip("[]").split(",") if d]
    official = {
        k: torch.zeros(s, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
        for k, s in shapes.items()
    }
    with torch.device("meta"):
        model = timm.create_model("van_b0")
    mapped = checkpoint_filter_fn({"state_dict": official}, model)
    assert len(mapped) == len(official) and set(mapped) == set(model.state_dict())
    model.load_state_dict(mapped, strict=True, assign=True)
    # an unwrapped state_dict loads as well, and a state_dict of this model maps onto itself
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True, assign=True)
    assert set(checkpoint_filter_fn(model.state_dict(), model)) == set(model.state_dict())


def test_official_file_missing_keys_are_named_exactly(conformance_dir):
    """Keys map one by one: a file lacking some official keys (a layer scale among them) or carrying a
    bogus one has load_state_dict name exactly those, under this model's names."""
    model, *_ = _official_r1(conformance_dir)
    official = torch.load(conformance_dir / "van" / "van_r1_state_dict.pt", weights_only=True)
    for key in ("block1.0.layer_scale_1", "block2.0.attn.spatial_gating_unit.conv0.weight", "head.bias"):
        del official[key]
    official["block3.0.layer_scale_3"] = torch.zeros(1)
    result = model.load_state_dict(checkpoint_filter_fn({"state_dict": official}, model), strict=False)
    assert sorted(result.missing_keys) == [
        "block1.0.ls1.gamma",
        "block2.0.attn.spatial_gating_unit.conv0.weight",
        "head.bias",
    ]
    assert result.unexpected_keys == ["block3.0.layer_scale_3"]


def test_pretrained_loads_a_train_script_checkpoint_file(tmp_path):
    # what timm 0.4.12's train.py writes: the weights under 'state_dict' next to the run's argparse args
    torch.manual_seed(1)
    source = timm.create_model("van_b0", **TINY).eval()
    path = tmp_path / "van_tiny.pth.tar"
    args = argparse.Namespace(model="van_b0", lr=1e-3)
    torch.save({"state_dict": source.state_dict(), "args": args, "epoch": 3}, path)
    model = timm.create_model(
        "van_b0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **TINY
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_pretrained_cfgs_point_at_official_weights():
    for name in VARIANTS[:4]:
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert cfg.url.startswith("https://huggingface.co/Visual-Attention-Network/"), cfg.url
        assert cfg.mean == (0.5, 0.5, 0.5) and cfg.crop_pct == 0.9


def test_autocast_forward_backward():
    model = timm.create_model("van_b0", **TINY).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    out.float().pow(2).mean().backward()
    assert model.block1[0].attn.spatial_gating_unit.conv0.weight.grad is not None


def test_features_only_and_prune():
    model = timm.create_model("van_b0", features_only=True, out_indices=(1, 2), **TINY).eval()
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 8, 8), (1, 24, 4, 4)]
    assert model.feature_info.reduction() == [8, 16]
    check_intermediates_and_prune("van_b0", 64, **TINY)


def test_bad_configs():
    with pytest.raises(ValueError, match="one entry per stage"):
        VAN(embed_dims=(8, 16), depths=(1, 1, 1), mlp_ratios=(2, 2))
    with pytest.raises(ValueError, match="global_pool"):
        VAN(global_pool="median", **{k: v for k, v in TINY.items() if k != "num_classes"})


def test_any_timm_pooling():
    model = VAN(global_pool="avgmax", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, 0.5 * (feats.mean((2, 3)) + feats.amax((2, 3))))
    model.reset_classifier(3, "catavgmax")
    assert model.head_hidden_size == 2 * model.num_features and model(x).shape == (2, 3)
