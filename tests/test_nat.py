"""NAT / DiNAT / DiNAT_s timm models: official-checkpoint conformance, key lists, sizes, battery."""

import functools
import json
import re
from unittest import mock

import pytest
import timm
import timm.optim
import torch

import visattn  # noqa: F401  (registers the models)
from tests.model_battery import assert_paper_params, battery_names, meta_model, run_battery
from visattn.backbones import nat as nat_module
from visattn.backbones.nat import NAT, NeighborhoodAttention2D, checkpoint_filter_fn
from visattn.kernels import interpreter_enabled, neighborhood_attention

# Parameter counts (millions) of the papers' / official README tables (NAT.md, DiNAT.md), which round
# to whole millions. The 21k variants are sized with a 1000-class head to compare with the same rows.
PAPER_PARAMS_M = {
    "nat_mini": 20,
    "nat_tiny": 28,
    "nat_small": 51,
    "nat_base": 90,
    "dinat_mini": 20,
    "dinat_tiny": 28,
    "dinat_small": 51,
    "dinat_base": 90,
    "dinat_large": 200,
    "dinat_large_384": 200,
    "dinat_large_384_11x11": 200,
    "dinat_large_21k": 200,
    "dinat_large_21k_11x11": 200,
    "dinat_s_tiny": 28,
    "dinat_s_small": 50,
    "dinat_s_base": 88,
    "dinat_s_large": 197,
    "dinat_s_large_384": 197,
    "dinat_s_large_21k": 197,
}
NAMES = sorted(PAPER_PARAMS_M)

# Tiny battery config: stage grids 16/8/4/2 at 64 px; kernel 3 with dilation 2 in levels 0 and 2
# (level 2's 4x4 map and level 3's 2x2 map are smaller than the window, so the padding path runs).
TINY = dict(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3, drop_path_rate=0.1)
TINY_DILATIONS = [[1, 2], [1], [1, 2], [1]]
# torch.compile is checked once per distinct code path (NAT, NAT + layer scale, DiNAT_s layout).
COMPILE_CHECKED = {"nat_mini", "nat_small", "dinat_s_tiny"}
# inductor (slow) compiles one model of each family: NAT and DiNAT (dilated windows)
INDUCTOR_CHECKED = {"nat_mini", "dinat_mini"}


@pytest.mark.parametrize("name", battery_names(NAMES))
def test_battery(name):
    kwargs = dict(TINY)
    if name.startswith("dinat"):
        kwargs["dilations"] = TINY_DILATIONS
    run_battery(
        name,
        img_size=64,
        alt_img_size=56,
        compile_check=name in COMPILE_CHECKED,
        inductor_check=name in INDUCTOR_CHECKED,
        **kwargs,
    )


@pytest.mark.parametrize("name", NAMES)
def test_full_size_params_and_cfg(name):
    model = meta_model(name, **(dict(num_classes=1000) if "21k" in name else {}))
    # within 1%, or within the rounding of the table's whole-million figure
    assert_paper_params(model, name, PAPER_PARAMS_M[name], slack_millions=0.5)
    cfg = model.pretrained_cfg
    assert cfg["url"].startswith("https://shi-labs.com/projects/") and cfg["url"].endswith(".pth")
    size = 384 if "384" in name else 224
    assert cfg["input_size"] == (3, size, size)
    # DiNAT's dilated layers span the whole level-0 map of the training resolution (size/4 = 7 * dilation),
    # except the 11x11 models, which keep the 224 schedule.
    if name.startswith("dinat"):
        dilation = model.levels[0].blocks[1].attn.dilation
        assert dilation == (13 if size == 384 and "11x11" not in name else 8)
    else:
        assert all(b.attn.dilation == 1 for lvl in model.levels for b in lvl.blocks)
    if "21k" in name:
        assert timm.models.get_pretrained_cfg(name).num_classes == 21841


@pytest.mark.parametrize("fixture,arch", [("nat_r1", "nat_mini"), ("dinat_r1", "dinat_mini")])
@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_conformance_with_official(conformance_dir, fixture, arch, wrap):
    """Official weights through checkpoint_filter_fn reproduce the official logits and level features."""
    d = conformance_dir / "nat"
    config = json.loads((d / f"{fixture}_config.json").read_text())
    model = timm.create_model(arch, **config["constructor_kwargs"]).eval()
    official = torch.load(d / f"{fixture}_state_dict.pt", weights_only=True)
    checkpoint = official if wrap is None else {wrap: official, "epoch": 300}
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    x = torch.load(d / f"{fixture}_input.pt", weights_only=True)
    if wrap is not None:  # the loading path is all that differs: one forward pass suffices
        torch.testing.assert_close(model.state_dict()["head.weight"], official["head.weight"], rtol=0, atol=0)
        return

    captured = {}
    hooks = [model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("norm", o))]
    for idx, level in enumerate(model.levels):
        hooks.append(
            level.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(f"level{idx}", o))
        )
    with torch.no_grad():
        logits = model(x)
        final, inter = model.forward_intermediates(x, norm=True)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(
        logits, torch.load(d / f"{fixture}_logits.pt", weights_only=True), atol=1e-5, rtol=1e-4
    )
    features = torch.load(d / f"{fixture}_features.pt", weights_only=True)
    assert set(features) == set(captured)
    for key, ref in features.items():
        torch.testing.assert_close(
            captured[key], ref, atol=1e-4, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}"
        )
    # the last level has no downsampler: its intermediate (normed) is the official final-norm output
    torch.testing.assert_close(inter[-1].permute(0, 2, 3, 1), features["norm"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, features["norm"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["nat_mini", "dinat_mini"])
def test_full_size_official_keys_load(conformance_dir, arch):
    lines = (conformance_dir / "nat" / f"{arch}_keys.txt").read_text().split("\n")
    shapes = {}
    for line in filter(None, lines):
        key, dims = line.split(" ")
        shapes[key] = [int(s) for s in dims.strip("[]").split(",") if s]
    official = {k: torch.zeros(s) for k, s in shapes.items()}
    with torch.device("meta"):
        model = timm.create_model(arch)
    result = model.load_state_dict(checkpoint_filter_fn(official, model), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model.levels[0].blocks[0].attn.rpb.shape == (2, 13, 13)


@pytest.mark.parametrize("fixture,arch", [("nat_r1", "nat_mini"), ("dinat_r1", "dinat_mini")])
def test_official_file_missing_keys_are_named_exactly(conformance_dir, fixture, arch):
    """Keys map one by one: an official file lacking some keys or carrying a bogus one has load_state_dict
    name exactly those."""
    d = conformance_dir / "nat"
    config = json.loads((d / f"{fixture}_config.json").read_text())
    model = timm.create_model(arch, **config["constructor_kwargs"])
    official = torch.load(d / f"{fixture}_state_dict.pt", weights_only=True)
    dropped = ["head.weight", "levels.1.blocks.0.attn.qkv.bias", "patch_embed.proj.0.weight"]
    for key in dropped:
        del official[key]
    official["levels.0.blocks.0.attn.extra"] = torch.zeros(1)
    result = model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=False)
    assert sorted(result.missing_keys) == dropped
    assert result.unexpected_keys == ["levels.0.blocks.0.attn.extra"]


def test_official_layer_scale_and_dinat_s_names_missing_keys_are_named_exactly():
    """The renamed keys (DiNAT_s ``layers.i``, layer scales ``gamma1``/``gamma2``) are reported under this
    model's names when missing; a bogus key keeps its (renamed) name."""
    kwargs = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3, layer_scale=1e-5)
    model = timm.create_model("dinat_s_tiny", dilations=[[1]] * 4, **kwargs)
    official = {
        re.sub(r"\.ls([12])\.gamma$", r".gamma\1", k.replace("levels.", "layers.", 1)): v
        for k, v in model.state_dict().items()
    }
    assert "layers.0.blocks.0.gamma1" in official
    del official["layers.0.blocks.0.gamma1"], official["layers.1.downsample.reduction.weight"]
    official["layers.2.blocks.0.gamma3"] = torch.zeros(1)
    result = model.load_state_dict(checkpoint_filter_fn(official, model), strict=False)
    missing = ["levels.0.blocks.0.ls1.gamma", "levels.1.downsample.reduction.weight"]
    assert sorted(result.missing_keys) == missing
    assert result.unexpected_keys == ["levels.2.blocks.0.gamma3"]


def test_dinat_s_official_layer_names_and_rpb_resize():
    """DiNAT_s checkpoints name levels ``layers.i``; rpb tables of another kernel size are resized."""
    kwargs = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3)
    src = timm.create_model("dinat_s_tiny", dilations=[[1]] * 4, **kwargs).eval()
    official = {k.replace("levels.", "layers.", 1): v for k, v in src.state_dict().items()}
    dst = timm.create_model("dinat_s_tiny", dilations=[[1]] * 4, **kwargs).eval()
    dst.load_state_dict(checkpoint_filter_fn(official, dst), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)

    big = timm.create_model("dinat_s_tiny", dilations=[[1]] * 4, **dict(kwargs, kernel_size=5))
    table = (
        torch.arange(5.0)[None, :, None].expand(1, 5, 5).contiguous()
    )  # linear ramp along rows, 3x3 kernel
    sd = dict(official, **{"layers.0.blocks.0.attn.rpb": table})
    resized = checkpoint_filter_fn(sd, big)["levels.0.blocks.0.attn.rpb"]
    assert resized.shape == (1, 9, 9)
    # bicubic resizing keeps a constant-along-columns table constant along columns, monotone along rows
    torch.testing.assert_close(resized, resized[:, :, :1].expand_as(resized))
    assert (resized[0, 1:, 0] >= resized[0, :-1, 0]).all()


def test_attention_module_matches_dense_attention_with_padding():
    """A map smaller than the window is zero-padded like NATTEN 0.14: then NA with a window covering
    the padded map is dense softmax attention over it with bias rpb[dy + k - 1, dx + k - 1]."""
    torch.manual_seed(0)
    k, heads, dim = 5, 2, 8
    attn = NeighborhoodAttention2D(dim, heads, kernel_size=k).eval()
    with torch.no_grad():
        attn.rpb.normal_()
    x = torch.randn(2, 3, 4, dim)
    with torch.no_grad():
        out = attn(x)
        xp = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 2))  # to 5x5
        q, kk, v = attn.qkv(xp).reshape(2, 25, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        ys, xs = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
        dy = ys.flatten()[None, :] - ys.flatten()[:, None] + k - 1
        dx = xs.flatten()[None, :] - xs.flatten()[:, None] + k - 1
        bias = attn.rpb[:, dy, dx]  # heads, query, key
        dense = torch.softmax(q @ kk.transpose(-1, -2) * attn.scale + bias, dim=-1) @ v
        dense = dense.transpose(1, 2).reshape(2, 5, 5, dim)[:, :3, :4]
    torch.testing.assert_close(out, attn.proj(dense), atol=1e-5, rtol=1e-5)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="dilations"):
        NAT(embed_dim=16, depths=(1, 1), num_heads=(1, 2), dilations=[[1], [1, 2]])
    with pytest.raises(ValueError, match="num_heads"):
        NAT(embed_dim=16, depths=(1, 1), num_heads=(1,))
    with pytest.raises(ValueError, match="odd"):
        NeighborhoodAttention2D(8, 2, kernel_size=4)
    with pytest.raises(ValueError, match="layout"):
        NAT(embed_dim=16, depths=(1, 1), num_heads=(1, 2), layout="vit")


def test_grad_checkpointing_grads_and_rpb_without_weight_decay():
    model = timm.create_model("dinat_mini", dilations=TINY_DILATIONS, **dict(TINY, drop_path_rate=0.0))
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for (name, p), g in zip(model.named_parameters(), plain):
        torch.testing.assert_close(p.grad, g, msg=lambda m, name=name: f"{name}: {m}")

    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    rpbs = [p for n, p in model.named_parameters() if n.endswith(".rpb")]
    assert len(rpbs) == sum(TINY["depths"]) and not any(id(p) in decayed for p in rpbs)


def test_triton_backend_through_the_model():
    """The model on the op's Triton path (GPU, or the interpreter on CPU) matches the PyTorch reference,
    forward and backward, with dilation and the small-map padding in play."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreter_enabled():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    model = timm.create_model("dinat_mini", dilations=TINY_DILATIONS, **dict(TINY, drop_path_rate=0.0)).to(
        device
    )
    x = torch.randn(1, 3, 64, 64, device=device)
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        op = functools.partial(neighborhood_attention, backend=backend)
        with mock.patch.object(nat_module, "neighborhood_attention", op):
            out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_dinat_s_patch_merging_follows_the_official_layout():
    """DiNAT_s merges 2x2 patches as cat[(even row, even col), (odd, even), (even, odd), (odd, odd)]
    after zero-padding odd maps at the bottom/right, then LayerNorm(4C) and Linear(4C -> 2C)."""
    model = timm.create_model(
        "dinat_s_tiny", embed_dim=8, depths=(1, 1), num_heads=(1, 2), dilations=[[1], [1]]
    )
    merge = model.levels[0].downsample
    with torch.no_grad():
        merge.norm.weight.normal_()
        merge.norm.bias.normal_()
        x = torch.randn(2, 5, 7, 8)
        xp = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 1))
        parts = [xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]]
        expected = merge.reduction(merge.norm(torch.cat(parts, dim=-1)))
        torch.testing.assert_close(merge(x), expected)


def test_forward_intermediates_stop_early_and_output_fmt():
    """stop_early runs only the levels up to the last index (no trailing downsampler) and returns that
    level's map; NHWC intermediates are the NCHW ones permuted."""
    model = timm.create_model("dinat_mini", dilations=TINY_DILATIONS, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
        calls = []
        hook = model.levels[1].downsample.register_forward_hook(lambda *args: calls.append(1))
        final, (early,) = model.forward_intermediates(x, indices=[1], stop_early=True)
        hook.remove()
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    assert not calls
    torch.testing.assert_close(early, inter[1])
    torch.testing.assert_close(final, inter[1].permute(0, 2, 3, 1))
    for t, ref in zip(nhwc, inter):
        torch.testing.assert_close(t, ref.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


# ----------------------------------------------------------------------------- isotropic NAT / DiNAT

# DiNAT.md "Isotropic variants" table (whole millions).
ISO_PAPER_PARAMS_M = {
    "nat_isotropic_small": 22,
    "dinat_isotropic_small": 22,
    "nat_isotropic_base": 86,
    "dinat_isotropic_base": 86,
}
ISO_NAMES = sorted(ISO_PAPER_PARAMS_M)
# 64 px -> a 4x4 token map; DiNAT's dilated layers (kernel 3 x dilation 2 = 6) take the padding path.
ISO_TINY = dict(embed_dim=32, depth=3, num_heads=2, kernel_size=3, drop_path_rate=0.1)


@pytest.mark.parametrize("name", battery_names(ISO_NAMES))
def test_isotropic_battery(name):
    run_battery(name, img_size=64, alt_img_size=56, compile_check=name == "dinat_isotropic_small", **ISO_TINY)


@pytest.mark.parametrize("name", ISO_NAMES)
def test_isotropic_full_size_params_cfg_and_dilations(name):
    model = meta_model(name)
    assert_paper_params(model, name, ISO_PAPER_PARAMS_M[name])
    cfg = model.pretrained_cfg
    assert cfg["url"] == f"https://shi-labs.com/projects/dinat/checkpoints/isotropic/{name}_in1k_224.pth"
    assert cfg["input_size"] == (3, 224, 224) and cfg["first_conv"] == "patch_embed.proj"
    dilated = 2 if name.startswith("dinat") else 1
    assert [b.attn.dilation for b in model.layers] == [1, dilated] * 6
    assert {b.attn.kernel_size for b in model.layers} == {7}
    assert model.layers[0].attn.num_heads == (12 if "small" in name else 24)
    assert [f["reduction"] for f in model.feature_info] == [16] * 12


def _official_isotropic_keys(dim: int, depth: int, heads: int, kernel: int, classes: int) -> dict:
    """Key names and shapes of the official NATIsotropic (classification/isotropic.py): dinats.PatchEmbed
    (proj, norm), ``layers`` of dinats.NATransformerLayer (norm1, NATTEN NeighborhoodAttention2D qkv/rpb/proj,
    norm2, nat.Mlp fc1/fc2 with ratio 4), final norm, head."""
    shapes = {
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "patch_embed.norm.weight": (dim,),
        "patch_embed.norm.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
    }
    for i in range(depth):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.rpb": (heads, 2 * kernel - 1, 2 * kernel - 1),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (4 * dim, dim),
                p + "mlp.fc1.bias": (4 * dim,),
                p + "mlp.fc2.weight": (dim, 4 * dim),
                p + "mlp.fc2.bias": (dim,),
            }
        )
    return shapes


@pytest.mark.parametrize(
    "name,dim,heads", [("dinat_isotropic_small", 384, 12), ("nat_isotropic_base", 768, 24)]
)
def test_isotropic_official_keys_load_full_size(name, dim, heads):
    """A state_dict named and shaped as the official full-size checkpoint loads strict, unchanged."""
    official = {k: torch.zeros(s) for k, s in _official_isotropic_keys(dim, 12, heads, 7, 1000).items()}
    with torch.device("meta"):
        model = timm.create_model(name)
    filtered = checkpoint_filter_fn({"model": official}, model)
    assert filtered.keys() == official.keys()
    result = model.load_state_dict(filtered, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_isotropic_official_layout_forward():
    """Official-named random weights: the model is the official NATIsotropic computation, written out here
    with the NA op (patch conv -> LN -> layers with pre-norm NA / MLP residuals -> LN -> mean -> head)."""
    torch.manual_seed(0)
    shapes = _official_isotropic_keys(16, 2, 2, 3, 5)
    official = {k: torch.randn(s) * 0.2 for k, s in shapes.items()}
    model = timm.create_model("dinat_isotropic_small", embed_dim=16, depth=2, num_heads=2, kernel_size=3)
    model.reset_classifier(5)
    model.load_state_dict(checkpoint_filter_fn(official, model.eval()), strict=True)
    x = torch.randn(2, 3, 96, 96)  # 6x6 tokens: the dilated layer's window (3 x 2) fits exactly
    ln = torch.nn.functional.layer_norm
    w = official
    with torch.no_grad():
        t = torch.nn.functional.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=16)
        t = ln(t.permute(0, 2, 3, 1), (16,), w["patch_embed.norm.weight"], w["patch_embed.norm.bias"])
        for i, dilation in enumerate((1, 2)):
            p = f"layers.{i}."
            h = ln(t, (16,), w[p + "norm1.weight"], w[p + "norm1.bias"])
            q, k, v = (
                (h @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]).reshape(2, 6, 6, 3, 2, 8).unbind(3)
            )
            a = neighborhood_attention(q, k, v, 3, dilation=dilation, rpb=w[p + "attn.rpb"]).reshape(
                2, 6, 6, 16
            )
            t = t + a @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
            h = ln(t, (16,), w[p + "norm2.weight"], w[p + "norm2.bias"])
            h = torch.nn.functional.gelu(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
            t = t + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
        t = ln(t, (16,), w["norm.weight"], w["norm.bias"]).mean(dim=(1, 2))
        expected = t @ w["head.weight"].T + w["head.bias"]
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- transformers-format weights

HF_TINY = dict(embed_dim=16, depths=[2, 1, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=3, mlp_ratio=3.0)


def _hf_dinat(num_labels: int, layer_scale: float):
    """A random transformers DinatForImageClassification (natten is not installed: its backend check is
    skipped; nothing here runs natten)."""
    from transformers import DinatConfig
    from transformers.models.dinat import modeling_dinat

    config = DinatConfig(
        **HF_TINY, dilations=TINY_DILATIONS, layer_scale_init_value=layer_scale, num_labels=num_labels
    )
    torch.manual_seed(0)
    with mock.patch.object(modeling_dinat, "requires_backends", lambda *args, **kwargs: None):
        model = modeling_dinat.DinatForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model, modeling_dinat


def test_transformers_dinat_checkpoint_reproduces_its_logits():
    """A transformers DinatForImageClassification state_dict converts and loads strict, and our model then
    reproduces the transformers model's logits. transformers' own modules (embeddings, padding, layer scale,
    attention output, MLP, downsamplers, pooling, classifier) run unchanged; only the body of its
    NeighborhoodAttention (the natten calls) is replaced: its own query/key/value/rpb parameters feed the NA
    op in NATTEN's layout. So a wrong qkv order, gamma split or rpb placement in the conversion changes the
    logits. (natten2dqkrpb/natten2dav themselves are not patched: transformers 5.x feeds them
    ``view(...).transpose(1, 2)`` tensors, not the (B, heads, H, W, d) layout they take.)"""
    hf, modeling_dinat = _hf_dinat(num_labels=10, layer_scale=0.5)

    def natten_attention(self, hidden_states, output_attentions=False):
        B, H, W, C = hidden_states.shape
        shape = (B, H, W, self.num_attention_heads, self.attention_head_size)
        q, k, v = (proj(hidden_states).view(shape) for proj in (self.query, self.key, self.value))
        out = neighborhood_attention(q, k, v, self.kernel_size, dilation=self.dilation, rpb=self.rpb)
        return (out.reshape(B, H, W, C),)

    ours = timm.create_model(
        "dinat_mini",
        **dict(TINY, drop_path_rate=0.0),
        dilations=TINY_DILATIONS,
        layer_scale=1.0,
        num_classes=10,
    ).eval()
    sd = hf.state_dict()
    ours.load_state_dict(checkpoint_filter_fn(sd, ours), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with (
        torch.no_grad(),
        mock.patch.object(modeling_dinat.NeighborhoodAttention, "forward", natten_attention),
    ):
        expected = hf(pixel_values=x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4)

    block = ours.levels[2].blocks[1]
    src = "dinat.encoder.levels.2.layers.1."
    cat = torch.cat([sd[src + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
    torch.testing.assert_close(block.attn.qkv.weight, cat, rtol=0, atol=0)
    torch.testing.assert_close(block.ls2.gamma, sd[src + "layer_scale_parameters"][1], rtol=0, atol=0)
    torch.testing.assert_close(ours.head.weight, sd["classifier.weight"], rtol=0, atol=0)


def test_transformers_nat_and_bare_model_names_convert():
    """transformers' NatForImageClassification (transformers 4.x models/nat, same module names under a
    ``nat.`` prefix, no dilation) and the bare DinatModel (no prefix, no classifier) convert too."""
    hf, _ = _hf_dinat(num_labels=10, layer_scale=0.0)
    sd = hf.state_dict()
    nat_sd = {("nat." + k[len("dinat.") :] if k.startswith("dinat.") else k): v for k, v in sd.items()}
    ours = timm.create_model("nat_mini", **TINY, num_classes=10)
    ours.load_state_dict(checkpoint_filter_fn({"state_dict": nat_sd}, ours), strict=True)
    src = "dinat.encoder.levels.0.layers.0.attention."
    for name, part in zip(("query", "key", "value"), ours.levels[0].blocks[0].attn.qkv.bias.chunk(3)):
        torch.testing.assert_close(part, sd[src + f"self.{name}.bias"], rtol=0, atol=0)
    torch.testing.assert_close(ours.levels[0].blocks[0].attn.rpb, sd[src + "self.rpb"], rtol=0, atol=0)
    torch.testing.assert_close(ours.norm.bias, sd["dinat.layernorm.bias"], rtol=0, atol=0)
    torch.testing.assert_close(
        ours.patch_embed.proj[1].weight, sd["dinat.embeddings.patch_embeddings.projection.1.weight"]
    )

    bare = {k[len("dinat.") :]: v for k, v in sd.items() if k.startswith("dinat.")}
    headless = timm.create_model("dinat_mini", **TINY, dilations=TINY_DILATIONS, num_classes=0)
    headless.load_state_dict(checkpoint_filter_fn(bare, headless), strict=True)
    torch.testing.assert_close(headless.norm.weight, sd["dinat.layernorm.weight"], rtol=0, atol=0)


def test_transformers_file_missing_keys_are_named_exactly():
    """transformers keys map one by one: a bare DinatModel file without its patch-embedding projection
    (what whole-file detection rested on) and without one key projection reports exactly those as missing;
    the orphaned query/value projections and a bogus key come back unexpected."""
    hf, _ = _hf_dinat(num_labels=10, layer_scale=0.5)
    bare = {k[len("dinat.") :]: v for k, v in hf.state_dict().items() if k.startswith("dinat.")}
    bare = {k: v for k, v in bare.items() if not k.startswith("embeddings.patch_embeddings.")}
    del bare["encoder.levels.1.layers.0.attention.self.key.weight"]
    del bare["encoder.levels.2.layers.1.layer_scale_parameters"]
    bare["encoder.levels.0.layers.0.bogus"] = torch.zeros(1)
    model = timm.create_model("dinat_mini", **TINY, dilations=TINY_DILATIONS, layer_scale=1.0, num_classes=0)
    result = model.load_state_dict(checkpoint_filter_fn(bare, model), strict=False)
    assert sorted(result.missing_keys) == [
        "levels.1.blocks.0.attn.qkv.weight",
        "levels.2.blocks.1.ls1.gamma",
        "levels.2.blocks.1.ls2.gamma",
        "patch_embed.proj.0.bias",
        "patch_embed.proj.0.weight",
        "patch_embed.proj.1.bias",
        "patch_embed.proj.1.weight",
    ]
    assert sorted(result.unexpected_keys) == [
        "encoder.levels.1.layers.0.attention.self.query.weight",
        "encoder.levels.1.layers.0.attention.self.value.weight",
        "levels.0.blocks.0.bogus",
    ]
