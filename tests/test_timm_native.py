"""What timm's own test-suite asks of a model, on a tiny config of every family: TorchScript, FX tracing
(timm's notrace leaves), features_only through FX and FeatureGetterNet, device/dtype construction. The
full timm ``tests/test_models.py`` runs on the full-size models in ``.ci/timm_suite.sh``."""

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import visattn  # noqa: F401  (registers the models and torch.ops.visattn.*)
from tests.test_agent_models import TINY as AGENT_TINY
from tests.test_biformer import TINY as BIFORMER_TINY
from tests.test_nat import ISO_TINY, TINY_DILATIONS
from tests.test_nat import TINY as NAT_TINY
from tests.test_van import TINY as VAN_TINY
from visattn.kernels import (
    agent_attention,
    bilevel_routing_attention,
    large_kernel_attention,
    neighborhood_attention,
)

# one tiny config per code path: (model name, kwargs, input side)
CASES = [
    ("nat_small", dict(NAT_TINY), 64),  # layer scale
    ("dinat_s_tiny", dict(NAT_TINY, dilations=TINY_DILATIONS), 64),
    ("nat_isotropic_small", dict(ISO_TINY), 64),
    ("biformer_t", dict(BIFORMER_TINY), 64),
    ("van_b0", dict(VAN_TINY), 64),
    ("agent_swin_tiny", AGENT_TINY["agent_swin_tiny"], 64),
    ("agent_pvt_small", AGENT_TINY["agent_pvt_small"], 64),
    ("agent_pvt_tiny", AGENT_TINY["agent_pvt_tiny"], 64),
    ("agent_deit_base", AGENT_TINY["agent_deit_base"], 32),
]
IDS = [c[0] for c in CASES]


def _model(name, kwargs, **extra):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs, **extra).eval()


def _fx(model):
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name,kwargs,size", CASES, ids=IDS)
def test_torchscript_and_fx_match_eager(name, kwargs, size):
    model = _model(name, kwargs)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        traced = _fx(model)
        (fx_out,) = traced(x).values()
        torch.testing.assert_close(fx_out, expected)
        (scripted_fx,) = torch.jit.script(traced)(x).values()
        torch.testing.assert_close(scripted_fx, expected)


@pytest.mark.parametrize("name,kwargs,size", CASES[:3] + CASES[5:6], ids=IDS[:3] + IDS[5:6])
def test_scripted_model_trains_with_eager_gradients(name, kwargs, size):
    """The TorchScript path runs the kernels as torch.ops.visattn.* with their own autograd."""
    kwargs = dict(kwargs, drop_path_rate=0.0)  # train mode without randomness
    model = _model(name, kwargs).train()
    scripted = torch.jit.script(_model(name, kwargs).train())
    x = torch.randn(2, 3, size, size)
    model(x).pow(2).mean().backward()
    scripted(x).pow(2).mean().backward()
    grads = dict(scripted.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, msg=n)


@pytest.mark.parametrize("name,kwargs,size", [c for c in CASES if "deit" not in c[0]], ids=IDS[:-1])
def test_features_only_fx_matches_getter(name, kwargs, size):
    x = torch.randn(1, 3, size, size)
    fx = _model(name, kwargs, features_only=True, feature_cls="fx")
    getter = _model(name, kwargs, features_only=True, feature_cls="getter")
    with torch.no_grad():
        a, b = fx(x), getter(x)
    assert len(a) == len(b) == len(getter.feature_info)
    for f, g in zip(a, b):
        torch.testing.assert_close(f.permute(0, 3, 1, 2) if str(fx.output_fmt).endswith("NHWC") else f, g)


@pytest.mark.parametrize("name,kwargs,size", CASES, ids=IDS)
def test_device_dtype_construction(name, kwargs, size):
    model = timm.create_model(name, **kwargs, device="meta", dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    model.reset_classifier(3)
    assert model.get_classifier().weight.device.type == "meta"
    assert model.get_classifier().weight.dtype == torch.float64


def _grads(fn, inputs):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, torch.ones_like(out))


def test_scriptable_ops_match_the_python_functions():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(2, 6, 6, 2, 4), r(2, 6, 6, 2, 4), r(2, 6, 6, 2, 4)
    rpb = r(2, 5, 5)
    cases = [
        (
            lambda q, k, v, b: neighborhood_attention(q, k, v, 3, 2, rpb=b),
            lambda q, k, v, b: torch.ops.visattn.neighborhood_attention(
                q, k, v, [3, 3], [2, 2], [False, False], b, None, "auto"
            ),
            [q, k, v, rpb],
        ),
        (
            lambda q, k, v: bilevel_routing_attention(q, k, v, 3, 2),
            lambda q, k, v: torch.ops.visattn.bilevel_routing_attention(q, k, v, 3, 2, None, "auto"),
            [q, k, v],
        ),
        (
            lambda q, k, v, a: agent_attention(q, k, v, a, 0.3),
            lambda q, k, v, a: torch.ops.visattn.agent_attention(q, k, v, a, 0.3, None, None, "auto"),
            [q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2), r(2, 4, 2, 4)],
        ),
        (
            lambda x, w0, w1, w2: large_kernel_attention(x, w0, None, w1, None, w2, None, 3),
            lambda x, w0, w1, w2: torch.ops.visattn.large_kernel_attention(
                x, w0, None, w1, None, w2, None, 3, "auto"
            ),
            [r(2, 4, 12, 12), r(4, 1, 5, 5), r(4, 1, 7, 7), r(4, 4, 1, 1)],
        ),
    ]
    for python_fn, op, inputs in cases:
        out, grads = _grads(python_fn, inputs)
        op_out, op_grads = _grads(op, inputs)
        torch.testing.assert_close(op_out, out)
        for a, b in zip(op_grads, grads):
            torch.testing.assert_close(a, b)
    torch.library.opcheck(
        torch.ops.visattn.neighborhood_attention.default,
        (q, k, v, [3, 3], [1, 1], [False, False], rpb.requires_grad_(), None, "auto"),
    )


def test_scriptable_op_keeps_the_argument_checks():
    q = torch.randn(1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="kernel_size"):
        torch.ops.visattn.neighborhood_attention(q, q, q, [5, 5], [1, 1], [False, False], None, None, "auto")


@pytest.mark.parametrize("name,kwargs,size", CASES, ids=IDS)
def test_bad_images_raise_the_same_clear_error_in_every_family(name, kwargs, size):
    """Wrong rank, wrong channel count and an empty batch: one ValueError, eager and in the FX graph."""
    model = _model(name, kwargs)
    traced = _fx(model)
    bad = {
        "3-D tensor": torch.randn(3, size, size),
        "input channels": torch.randn(1, 4, size, size),
        "batch size 0": torch.randn(0, 3, size, size),
    }
    for message, x in bad.items():
        for fn in (model, traced, model.forward_intermediates):
            with pytest.raises(ValueError, match=message):
                fn(x)
    with pytest.raises(Exception, match="input channels"):
        torch.jit.script(model)(bad["input channels"])
