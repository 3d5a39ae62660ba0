"""``dynamic_img_size=True`` on Agent-DeiT / Agent-PVT / Agent-Swin.

At the configured size the dynamic model is the fixed one; at other sizes it equals a fixed-size model built
for that size whose weights went through ``checkpoint_filter_fn`` (the resize a checkpoint of another
resolution gets), so the per-forward interpolation of position embeddings and agent biases is the same one.
"""

import pytest
import timm
import torch

import visattn  # noqa: F401  (registers the models)
from tests.model_battery import checkpoint_filter_for
from tests.test_agent_models import TINY

# (name, extra kwargs, configured size, other sizes (h, w)): one larger, one smaller, one non-square
CASES = [
    ("agent_deit_tiny", {}, 32, [(48, 48), (24, 24), (40, 24)]),
    ("agent_deit_base", {}, 32, [(48, 48), (16, 16), (24, 40)]),  # a plain DeiT block after the agent ones
    ("agent_pvt_tiny", {}, 64, [(96, 96), (32, 32), (64, 96)]),  # agent keys/values reduced 2x in stage 1
    ("agent_pvt_small", {}, 64, [(128, 128), (32, 32), (96, 64)]),  # PVT spatial-reduction stages 3-4
    # every window covers its stage at 64, as in the released Agent-Swin models (window = stage-1 grid)
    ("agent_swin_tiny", dict(window_size=16), 64, [(96, 96), (32, 32), (96, 64)]),
    ("agent_swin_base", dict(window_size=16), 64, [(96, 96), (32, 32), (64, 96)]),  # AAMB2
    # window 8 < stage-1 grid 16: local shifted agent windows, zero-padded at 48x40 (12x10 grid)
    ("agent_swin_tiny", {}, 64, [(48, 48), (48, 40), (32, 32)]),
    # stage-1 Swin window 7 on a 16 grid: padded to 21 and shift-masked at 64, 28 at 96
    ("agent_swin_tiny", dict(window_size=56, attn_type="BAAB"), 64, [(96, 96), (32, 32), (64, 96)]),
]


def _kwargs(name: str, extra: dict) -> dict:
    return {k: v for k, v in TINY[name].items() if k != "img_size"} | extra


def _fixed_at(name: str, kwargs: dict, size: tuple[int, int], source: torch.nn.Module) -> torch.nn.Module:
    if kwargs.get("window_size") == 16:  # the window follows the size (as 56 at 224, 96 at 384)
        kwargs = dict(kwargs, window_size=max(size) // 4)
    model = timm.create_model(name, img_size=size, **kwargs).eval()
    sd = checkpoint_filter_for(name)({"model": source.state_dict()}, model)
    model.load_state_dict(sd, strict=True)
    return model


def _pair(name: str, extra: dict, size: int):
    torch.manual_seed(0)
    kwargs = _kwargs(name, extra)
    fixed = timm.create_model(name, img_size=size, **kwargs).eval()
    dynamic = timm.create_model(name, img_size=size, dynamic_img_size=True, **kwargs).eval()
    dynamic.load_state_dict(fixed.state_dict(), strict=True)
    return kwargs, fixed, dynamic


@pytest.mark.parametrize("name, extra, size, others", CASES)
def test_dynamic_matches_fixed_models(name, extra, size, others):
    kwargs, fixed, dynamic = _pair(name, extra, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), rtol=0, atol=1e-6)
        for hw in others:
            ref = _fixed_at(name, kwargs, hw, fixed)
            x = torch.randn(2, 3, *hw)
            torch.testing.assert_close(dynamic(x), ref(x), rtol=1e-5, atol=1e-5, msg=f"{name} at {hw}")
            torch.testing.assert_close(
                dynamic.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5
            )
            got, want = dynamic.forward_intermediates(x)[1], ref.forward_intermediates(x)[1]
            assert len(got) == len(want)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises((AssertionError, ValueError), match=str(size)):  # timm's PatchEmbed check, as before
        fixed(torch.randn(1, 3, *others[0]))


@pytest.mark.parametrize("name, extra, size, others", CASES)
def test_dynamic_features_only(name, extra, size, others):
    kwargs = _kwargs(name, extra)
    model = timm.create_model(name, img_size=size, dynamic_img_size=True, features_only=True, **kwargs).eval()
    plain = timm.create_model(name, img_size=size, dynamic_img_size=True, **kwargs).eval()
    result = model.model.load_state_dict(plain.state_dict(), strict=False)  # same weights; no head there
    assert not result.missing_keys and all(k.startswith(("head.", "norm.")) for k in result.unexpected_keys)
    for hw in others:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            feats, want = model(x), plain.forward_intermediates(x, intermediates_only=True)
        assert len(feats) == len(model.feature_info) and len(feats) <= len(want)
        for f, i in zip(feats, model.feature_info.out_indices):
            torch.testing.assert_close(f, want[i], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["agent_deit_base", "agent_pvt_tiny", "agent_swin_base"])
def test_dynamic_training_step_with_grad_checkpointing(name):
    """Off the configured size: every parameter gets a gradient, the same one with grad checkpointing."""
    _, _, model = _pair(name, {}, TINY[name]["img_size"])
    x = torch.randn(2, 3, 64, 96)  # PVT's stride-32 stages need multiples of 32
    grads = []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enabled)
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == {n for n, _ in model.named_parameters()}
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


def _suggested_sizes(message: str) -> list[tuple[int, int]]:
    """The ``HxW`` sizes after "e.g." in a size error."""
    import re

    return [(int(h), int(w)) for h, w in re.findall(r"(\d+)x(\d+)", message.partition("e.g.")[2])]


# (name, extra kwargs, configured size, sides the dynamic model takes multiples of)
SIZE_RULES = [
    ("agent_deit_tiny", {}, 32, 8),  # the patch size (8 in TINY)
    ("agent_swin_tiny", {}, 64, 4),  # the patch size: PatchMerging pads odd grids
    ("agent_pvt_tiny", {}, 64, 32),  # patch 4, then three stride-2 patch embeddings
]


@pytest.mark.parametrize("name, extra, size, multiple", SIZE_RULES)
def test_a_wrong_input_size_names_the_fix(name, extra, size, multiple):
    """A fixed-size model fed another size says dynamic_img_size=True where that takes the input, and
    which sizes work where it does not; the sizes a message suggests do run (e.g. Agent-PVT at 200x256
    reported 'Input height (25) should be divisible by patch size (2)', 25 being a stage-3 grid)."""
    kwargs = _kwargs(name, extra)
    fixed = timm.create_model(name, img_size=size, **kwargs).eval()
    dynamic = timm.create_model(name, img_size=size, dynamic_img_size=True, **kwargs).eval()
    other = size + multiple  # a size the dynamic model takes
    with pytest.raises(
        ValueError, match=rf"input {other}x{other}, .*built for {size}x{size}.*dynamic_img_size=True"
    ):
        fixed(torch.randn(1, 3, other, other))
    bad = (size + multiple // 2 + 1, size + 2 * multiple)  # the height is no multiple
    with pytest.raises(ValueError) as info:
        fixed(torch.randn(1, 3, *bad))
    assert f"input {bad[0]}x{bad[1]}, " in str(info.value) and f"resize the input to {size}x{size}" in str(
        info.value
    )
    assert f"multiples of {multiple}" in str(info.value)
    with pytest.raises(ValueError) as info:
        dynamic(torch.randn(1, 3, *bad))
    message = str(info.value)
    assert message.startswith(f"input {bad[0]}x{bad[1]}: ") and f"multiples of {multiple}" in message
    suggested = _suggested_sizes(message)
    assert suggested and all(h % multiple == 0 and w % multiple == 0 for h, w in suggested)
    with torch.no_grad():
        for hw in suggested + [(other, other)]:
            assert dynamic(torch.randn(1, 3, *hw)).shape == (1, kwargs.get("num_classes", 1000))
