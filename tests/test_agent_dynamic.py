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
]


def _kwargs(name: str, extra: dict) -> dict:
    return {k: v for k, v in TINY[name].items() if k != "img_size"} | extra


def _fixed_at(name: str, kwargs: dict, size: tuple[int, int], source: torch.nn.Module) -> torch.nn.Module:
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
    reductions = model.feature_info.reduction()
    for hw in others:
        with torch.no_grad():
            feats = model(torch.randn(1, 3, *hw))
        assert [f.shape[-2:] for f in feats] == [(hw[0] // r, hw[1] // r) for r in reductions]
