"""The checks every visattn timm model must pass (shared by each family's test file).

A family test file does::

    @pytest.mark.parametrize("name", battery_names(["nat_mini", ...]))
    def test_battery(name):
        run_battery(name, **TINY_KWARGS)

``battery_names`` records the names so that ``test_model_battery.py`` can assert
that every registered visattn model is covered.
"""

from __future__ import annotations

import fnmatch
import sys
import tempfile
from pathlib import Path

import timm
import torch

COVERED: set[str] = set()

REQUIRED_CFG_FIELDS = (
    "num_classes",
    "input_size",
    "mean",
    "std",
    "crop_pct",
    "interpolation",
    "first_conv",
    "classifier",
)


def battery_names(names: list[str]) -> list[str]:
    """Return ``names`` and mark them as covered by the battery."""
    COVERED.update(names)
    return names


def checkpoint_filter_for(name: str):
    """The ``checkpoint_filter_fn`` of the module that registers ``name``."""
    return sys.modules[timm.models.model_entrypoint(name).__module__].checkpoint_filter_fn


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """The full-size ``name`` built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def assert_paper_params(
    model: torch.nn.Module, name: str, paper_millions: float, slack_millions: float = 0.0
) -> None:
    """``model`` has the parameter count of the paper's table within 1% (or within ``slack_millions``
    when that is looser: tables that round to whole millions)."""
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    tolerance = max(0.01 * paper_millions, slack_millions)
    assert abs(millions - paper_millions) <= tolerance, f"{name}: {millions:.2f}M vs paper {paper_millions}M"


def _check_pretrained_from_file(name: str, sd: dict, cfg, size: int, kwargs: dict) -> None:
    """``pretrained=True`` with a local file, as timm users load downloaded weights: timm's loader must
    find the cfg's ``classifier`` (dropped for another class count) and ``first_conv`` (adapted to
    ``in_chans=1`` by summing its input channels); everything else loads unchanged."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pth"
        torch.save(sd, path)
        taken = (kwargs.get("num_classes"), cfg["num_classes"])
        classes = 3 if 3 not in taken else 7  # differs from the file's head and the cfg's
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=str(path))
        overrides = dict(kwargs, num_classes=classes, in_chans=1, pretrained_cfg_overlay=overlay)
        model = timm.create_model(name, pretrained=True, **overrides).eval()
    classifiers = (cfg["classifier"],) if isinstance(cfg["classifier"], str) else tuple(cfg["classifier"])
    first_conv = cfg["first_conv"] + ".weight"
    own = model.state_dict()
    assert first_conv in own, f"{name}: first_conv {cfg['first_conv']!r} names no conv"
    torch.testing.assert_close(own[first_conv], sd[first_conv].sum(1, keepdim=True))
    for key, value in sd.items():
        if key != first_conv and not key.startswith(tuple(c + "." for c in classifiers)):
            assert torch.equal(own[key], value), f"{name}: {key} not loaded from the file"
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, classes)


def _get_submodule(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return model.get_submodule(dotted)


def run_battery(
    name: str,
    img_size: int | None = None,
    alt_img_size: int | None = None,
    compile_check: bool = True,
    inductor_check: bool = False,
    **kwargs,
) -> None:
    """Run the whole battery on ``timm.create_model(name, **kwargs)``.

    ``img_size`` defaults to the pretrained cfg's input size; ``alt_img_size`` is
    a second size the model must accept (skipped when None). ``compile_check`` traces the model as one
    graph (dynamo, ``backend="eager"``); ``inductor_check`` also compiles it with inductor
    (``fullgraph=True``, slow: one model per family) and compares the logits with eager.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    cfg = model.pretrained_cfg
    for field in REQUIRED_CFG_FIELDS:
        assert field in cfg and cfg[field] is not None, f"{name}: pretrained cfg lacks {field}"
    first_conv = cfg["first_conv"]
    assert isinstance(_get_submodule(model, first_conv), torch.nn.Conv2d), f"{name}: first_conv {first_conv}"
    classifier = cfg["classifier"]
    _get_submodule(model, classifier)
    num_classes = model.num_classes
    size = img_size or cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size)

    # forward / backward
    model.train()
    out = model(x)
    assert out.shape == (2, num_classes)
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    model.eval()

    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features), f"{name}: pre_logits {tuple(pre.shape)}"
        torch.testing.assert_close(model.forward_head(feats), logits)
        if alt_img_size:
            alt = model(torch.randn(1, 3, alt_img_size, alt_img_size))
            assert alt.shape == (1, num_classes) and torch.isfinite(alt).all()

        # forward_intermediates vs feature_info
        info = model.feature_info
        final, inter = model.forward_intermediates(x)
        assert len(inter) == len(info), f"{name}: {len(inter)} intermediates for {len(info)} feature_info"
        for t, fi in zip(inter, info):
            assert t.shape == (2, fi["num_chs"], size // fi["reduction"], size // fi["reduction"]), (
                f"{name}: intermediate {tuple(t.shape)} vs feature_info {fi}"
            )
        torch.testing.assert_close(final, feats)
        last_only = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last_only) == 1
        torch.testing.assert_close(last_only[0], inter[-1])
        # timm's index forms: a list with negative entries; stop_early; norm keeps the shapes (hierarchical
        # models norm the last map only, ViTs every map, as in timm)
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert len(picked) == 2
        torch.testing.assert_close(picked[0], inter[0])
        torch.testing.assert_close(picked[1], inter[-1])
        (early,) = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early, inter[0])
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        assert [t.shape for t in normed] == [t.shape for t in inter]

    # prune_intermediate_layers: a model cut after an early stage still yields that stage's map
    if len(info) > 1:
        pruned = timm.create_model(name, **kwargs).eval()
        pruned.load_state_dict(model.state_dict())
        assert list(pruned.prune_intermediate_layers([0, 1])) == [0, 1]
        with torch.no_grad():
            kept = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert len(kept) == 2
        torch.testing.assert_close(kept[0], inter[0])
        torch.testing.assert_close(kept[1], inter[1])

    # grad checkpointing keeps the numbers, forward and backward
    grads = {}
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enabled)
        out = model(x)
        torch.testing.assert_close(out, logits)
        out.float().pow(2).mean().backward()
        grads[enabled] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.set_grad_checkpointing(False)
    model.zero_grad(set_to_none=True)
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], msg=f"{name}: checkpointed grad of {n}")

    # features_only at every out index
    for idx in range(len(info)):
        fm = timm.create_model(name, features_only=True, out_indices=(idx,), **kwargs).eval()
        with torch.no_grad():
            (f,) = fm(x)
        fi = info[idx]
        assert f.shape == (2, fi["num_chs"], size // fi["reduction"], size // fi["reduction"])
        assert fm.feature_info.channels() == [fi["num_chs"]]

    # group_matcher / no_weight_decay name real things
    gm = model.group_matcher()
    assert "stem" in gm and "blocks" in gm, f"{name}: group_matcher keys {list(gm)}"
    param_names = {n for n, _ in model.named_parameters()}
    for nwd in model.no_weight_decay():
        # timm's optimizer factory matches these against full parameter names with fnmatch
        assert any(fnmatch.fnmatchcase(n, nwd) for n in param_names), (
            f"{name}: no_weight_decay entry {nwd!r} matches no parameter name (timm matches full names)"
        )

    # state_dict round trip through checkpoint_filter_fn
    sd = model.state_dict()
    fresh = timm.create_model(name, **kwargs).eval()
    fresh.load_state_dict(checkpoint_filter_for(name)(sd, fresh), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), logits, rtol=0, atol=0)
    _check_pretrained_from_file(name, sd, cfg, x.shape[-1], kwargs)

    # reset_classifier
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    # no pooling: the head classifies every location (token) of the unpooled features
    model.reset_classifier(7, "")
    with torch.no_grad():
        unpooled, dense = model.forward_features(x), model(x)
    changed = [d for d in range(unpooled.ndim) if unpooled.shape[d] != dense.shape[d]]
    assert dense.ndim == unpooled.ndim and len(changed) == 1, f"{name}: {tuple(dense.shape)}"
    channel = changed[0]
    assert (unpooled.shape[channel], dense.shape[channel]) == (model.num_features, 7)
    per_location = model.get_classifier()(unpooled.movedim(channel, -1)).movedim(-1, channel)
    torch.testing.assert_close(dense, per_location)

    # the whole model traces with torch.compile as a single graph
    if compile_check:
        torch._dynamo.reset()
        compiled = torch.compile(fresh, backend="eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), logits, rtol=1e-5, atol=1e-5)
    if inductor_check:
        torch._dynamo.reset()
        compiled = torch.compile(fresh, backend="inductor", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), logits, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()
