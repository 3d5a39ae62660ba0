"""BiFormer models: official-checkpoint conformance, key lists, parameter counts, the shared battery."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the models)
from tests.model_battery import assert_paper_params, battery_names, meta_model, run_battery
from visattn.backbones.biformer import BiFormer, BiLevelRoutingAttention, checkpoint_filter_fn

TINY = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), n_win=2, num_classes=10)


def _fixture_model(conformance_dir) -> tuple[BiFormer, dict]:
    cfg = json.loads((conformance_dir / "biformer" / "biformer_r1_config.json").read_text())
    kw = cfg["constructor_kwargs"]
    model = timm.create_model(
        "biformer_t",
        depths=kw["depth"],
        embed_dims=kw["embed_dim"],
        mlp_ratios=kw["mlp_ratios"],
        n_win=kw["n_win"],
        topks=kw["topks"],
        qk_dims=kw["qk_dims"],
        head_dim=kw["head_dim"],
        side_dwconv=kw["side_dwconv"],
        before_attn_dwconv=kw["before_attn_dwconv"],
        num_classes=kw["num_classes"],
    )
    return model.eval(), cfg


def test_official_conformance(conformance_dir):
    d = conformance_dir / "biformer"
    model, _ = _fixture_model(conformance_dir)
    official = torch.load(d / "biformer_r1_state_dict.pt", weights_only=True)
    # Released checkpoints wrap the state_dict under 'model'.
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=True)
    x = torch.load(d / "biformer_r1_input.pt", weights_only=True)
    logits = torch.load(d / "biformer_r1_logits.pt", weights_only=True)
    feats = torch.load(d / "biformer_r1_features.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-4)
        final, inter = model.forward_intermediates(x)
    for i, t in enumerate(inter):
        torch.testing.assert_close(t, feats[f"stage{i}"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, feats["norm"], atol=1e-4, rtol=1e-4)


def _keys_state_dict(path) -> dict:
    sd = {}
    for line in path.read_text().splitlines():
        key, shape = line.split()
        dims = [int(s) for s in shape.strip("[]").split(",") if s]
        sd[key] = torch.zeros(
            dims, dtype=torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        )
    return sd


@pytest.mark.parametrize(
    "name,keys", [("biformer_t", "biformer_tiny_keys.txt"), ("biformer_s", "biformer_small_keys.txt")]
)
def test_full_size_official_keys_load_strict(conformance_dir, name, keys):
    with torch.device("meta"):
        model = timm.create_model(name)
    sd = _keys_state_dict(conformance_dir / "biformer" / keys)
    model.load_state_dict(checkpoint_filter_fn({"model": sd}, model), strict=True, assign=True)
    assert all(p.device.type == "cpu" and not p.detach().any() for p in model.parameters())


def test_official_file_missing_keys_are_named_exactly(conformance_dir):
    """Keys map one by one: an official file that lacks the stem conv (the key layout detection used to
    rest on) reports that key missing, not every key of the model."""
    with torch.device("meta"):
        model = timm.create_model("biformer_t")
    sd = _keys_state_dict(conformance_dir / "biformer" / "biformer_tiny_keys.txt")
    dropped = ["downsample_layers.0.0.weight", "stages.1.0.attn.qkv.qkv.bias", "head.weight"]
    for key in dropped:
        del sd[key]
    sd["stages.0.0.attn.extra"] = torch.zeros(1)
    result = model.load_state_dict(checkpoint_filter_fn(sd, model), strict=False, assign=True)
    assert sorted(result.missing_keys) == ["head.weight", "stages.1.blocks.0.attn.qkv.bias", "stem.0.weight"]
    assert result.unexpected_keys == ["stages.0.blocks.0.attn.extra"]


@pytest.mark.parametrize("name,millions", [("biformer_t", 13.1), ("biformer_s", 25.5), ("biformer_b", 56.8)])
def test_param_counts_match_paper(name, millions):
    assert_paper_params(meta_model(name), name, millions)


def test_long_names_are_aliases():
    with pytest.warns(UserWarning, match="deprecated"), torch.device("meta"):
        model = timm.create_model("biformer_small")
    assert isinstance(model, BiFormer) and len(model.stages[2].blocks) == 18
    assert "biformer_small" not in visattn.list_models()


def test_load_pretrained_from_official_file(tmp_path, monkeypatch):
    model = timm.create_model("biformer_t", **TINY).eval()
    official = {}
    for key, value in model.state_dict().items():  # write it back in the official layout
        key = key.replace("stem.", "downsample_layers.0.").replace("head.fc.", "head.")
        key = key.replace(".attn.qkv.", ".attn.qkv.qkv.") if ".attn.lepe" not in key else key
        official[key] = value
    for i in range(1, 4):
        official = {
            k.replace(f"stages.{i}.downsample.", f"downsample_layers.{i}."): v for k, v in official.items()
        }
    official = {
        k.replace(".blocks.", ".")
        .replace(".attn.proj.", ".attn.wo.")
        .replace(".mlp.fc1.", ".mlp.0.")
        .replace(".mlp.fc2.", ".mlp.3."): v
        for k, v in official.items()
    }
    path = tmp_path / "biformer.pth"
    torch.save({"model": official}, path)
    fresh = timm.create_model("biformer_t", **TINY).eval()
    fresh.load_pretrained(str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    other = timm.create_model("biformer_t", **dict(TINY, num_classes=3))
    other.load_pretrained(str(path))  # a head of another size is skipped, the rest loads
    torch.testing.assert_close(other.stem[0].weight, model.stem[0].weight)
    # pretrained=True: the cfg names the official URL with a per-variant cache file name.
    fetched = []

    def fake_download(url, **kwargs):
        fetched.append(url)
        return str(path)

    monkeypatch.setattr(timm.models._builder, "download_cached_file", fake_download)
    pretrained = timm.create_model("biformer_t", pretrained=True, **TINY).eval()
    assert fetched[0][0].startswith("https://api.onedrive.com/") and fetched[0][1] == "biformer_tiny_in1k.pth"
    with torch.no_grad():
        torch.testing.assert_close(pretrained(x), model(x), rtol=0, atol=0)
    # in_chans=1 from the official RGB file: the stem's input channels are summed, as timm's loader does
    gray = timm.create_model("biformer_t", pretrained=True, **dict(TINY, in_chans=1, num_classes=3))
    torch.testing.assert_close(gray.stem[0].weight, model.stem[0].weight.sum(1, keepdim=True))
    # A plain (unwrapped) official state_dict maps the same way.
    assert checkpoint_filter_fn(official, model).keys() == model.state_dict().keys()


def test_auto_pad_matches_unmasked_padding():
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(64, num_heads=2, n_win=3, topk=2).eval()
    x = torch.randn(2, 7, 8, 64)
    with torch.no_grad():
        masked = attn(x)
        attn.auto_pad = True
        padded = attn(x)
        attn.auto_pad = False
        manual = attn(F.pad(x, (0, 0, 0, 1, 0, 2)))[:, :7, :8]
    assert masked.shape == padded.shape == (2, 7, 8, 64)
    torch.testing.assert_close(padded, manual)
    assert not torch.allclose(masked, padded, atol=1e-4)


def test_default_model_runs_below_112_px():
    """At 64 px stage 3 is 4x4, smaller than the 7x7 region grid: the masked padding (the default,
    not auto_pad) routes the real one-token regions first and trains without NaN."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_s").train()
    assert not model.stages[2].blocks[0].attn.auto_pad
    out = model(torch.randn(1, 3, 64, 64))
    out.square().sum().backward()
    assert out.shape == (1, 1000) and out.isfinite().all()
    grad = model.stages[2].blocks[0].attn.qkv.weight.grad
    assert grad.isfinite().all() and grad.abs().sum() > 0
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_pruned_model_runs_every_forward():
    """After pruning to stage 2 the final BatchNorm (sized for stage 4) goes too, so forward_features
    and forward_intermediates(norm=True) still run; the kept stages' maps are unchanged."""
    model = timm.create_model("biformer_t", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
        assert model.prune_intermediate_layers([1]) == [1]
        (normed,) = model.forward_intermediates(x, indices=[1], norm=True, intermediates_only=True)
        features = model(x)  # head pruned as in timm: no pooling, no classifier
    torch.testing.assert_close(normed, inter[1])
    torch.testing.assert_close(features, inter[1])


@pytest.mark.parametrize("name", battery_names(["biformer_t", "biformer_s", "biformer_b"]))
def test_battery(name):
    run_battery(name, img_size=64, alt_img_size=80, inductor_check=name == "biformer_t", **TINY)


@pytest.mark.cuda
def test_triton_backend_matches_reference_in_the_model():
    torch.manual_seed(0)
    model = timm.create_model("biformer_t", num_classes=10).cuda().train()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    outputs, grads = [], []
    for backend in ("torch", "triton"):
        for m in model.modules():
            if isinstance(m, BiLevelRoutingAttention):
                m.backend = backend
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outputs.append(out)
        grads.append(model.stages[0].blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-3, rtol=1e-3)


def test_benchmark_official_style_model_computes_the_same_logits():
    """``visattn bench bra`` compares training steps of equal models: the official-style attention swap
    gives the reference model's logits and gradients."""
    from visattn.bench import bra

    torch.manual_seed(0)
    ref = bra._model("visattn torch", "cpu")
    official = bra._model("official-style gather", "cpu")
    official.load_state_dict(ref.state_dict())
    assert any(type(m).__name__ == "_OfficialStyleBRA" for m in official.modules())
    ref.eval()
    official.eval()
    x = torch.randn(1, 3, 112, 112)
    out, out_ref = official(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    weight = "stages.0.blocks.0.attn.qkv.weight"
    grads = {n: p.grad for n, p in official.named_parameters()}
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    torch.testing.assert_close(grads[weight], ref_grads[weight], rtol=1e-3, atol=1e-5)
