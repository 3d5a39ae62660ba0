"""One policy for every op of visattn.kernels (kernels/ops/dispatch.py, kernels/ops/checks.py).

- ``backend="auto"`` falls back to PyTorch at a capability limit of the Triton kernels and never
  raises for one; ``backend="triton"`` raises a ValueError naming the limit.
- One scale rule: a positive finite number (or None); any such scale gives finite outputs.
- A fully masked (head, query) row has a zero output and gives zero attention mass, on both backends.
Triton runs under the CPU interpreter here (tests/conftest.py).
"""

import importlib
import importlib.util

import pytest
import torch

from visattn.kernels import (
    agent_attention,
    attention_with_key_mass,
    bilevel_routing_attention,
    large_kernel_attention,
    neighborhood_attention,
    visual_sink_attention,
)
from visattn.kernels.ops import dispatch


def _attn(dtype=torch.float32, nq=12, nk=12, d=8):
    return (
        torch.randn(2, nq, 2, d, dtype=dtype),
        torch.randn(2, nk, 2, d, dtype=dtype),
        torch.randn(2, nk, 2, d, dtype=dtype),
    )


def _lka_args(dtype):
    c = 4
    return (
        torch.randn(1, c, 8, 8, dtype=dtype), torch.randn(c, 1, 5, 5, dtype=dtype), None,
        torch.randn(c, 1, 7, 7, dtype=dtype), None, torch.randn(c, c, 1, 1, dtype=dtype), None,
    )  # fmt: skip


def _sink(q, k, v, **kw):
    category = torch.arange(k.shape[1]).remainder(4).expand(k.shape[0], -1)
    return visual_sink_attention(q, k, v, category, torch.ones(q.shape[:2], dtype=torch.bool), **kw)


# op name -> (call with backend=..., inputs that hit a capability limit, the limit's words)
LIMITS = {
    "neighborhood_attention": (
        lambda a, **kw: neighborhood_attention(*a, 3, **kw),
        lambda: tuple(torch.randn(1, 6, 6, 1, 257) for _ in range(3)),
        "head dims <= 256",
    ),
    "bilevel_routing_attention": (
        lambda a, **kw: bilevel_routing_attention(*a, 2, 1, **kw),
        lambda: tuple(torch.randn(1, 4, 4, 1, 8, dtype=torch.float64) for _ in range(3)),
        "float64",
    ),
    "agent_attention": (
        lambda a, **kw: agent_attention(*a, **kw),
        lambda: (*_attn(torch.float64), torch.randn(2, 4, 2, 8, dtype=torch.float64)),
        "float64",
    ),
    "attention_with_key_mass": (
        lambda a, **kw: attention_with_key_mass(*a, **kw)[0],
        lambda: _attn(torch.float64),
        "float64",
    ),
    "visual_sink_attention": (lambda a, **kw: _sink(*a, **kw), lambda: _attn(torch.float64), "float64"),
    "large_kernel_attention": (
        lambda a, **kw: large_kernel_attention(*a, **kw),
        lambda: _lka_args(torch.float64),
        "float64",
    ),
}


@pytest.mark.parametrize("op", sorted(LIMITS))
def test_auto_falls_back_at_a_limit_and_triton_names_it(op, monkeypatch):
    call, inputs, words = LIMITS[op]
    args = inputs()
    monkeypatch.setattr(dispatch, "cuda_tensors", lambda *tensors: True)  # as on a GPU: auto picks Triton
    expected = call(args, backend="torch")
    torch.testing.assert_close(call(args, backend="auto"), expected)
    with pytest.raises(ValueError, match=f"{op}: backend='triton' .*{words}"):
        call(args, backend="triton")


SCALED = {
    "neighborhood_attention": lambda s: neighborhood_attention(*_attn(), 3, scale=s, backend="torch"),
    "bilevel_routing_attention": lambda s: bilevel_routing_attention(
        *(torch.randn(1, 4, 4, 1, 8) for _ in range(3)), 2, 1, scale=s, backend="torch"
    ),
    "agent_attention": lambda s: agent_attention(*_attn(), torch.randn(2, 4, 2, 8), scale=s, backend="torch"),
    "attention_with_key_mass": lambda s: attention_with_key_mass(*_attn(), scale=s),
    "visual_sink_attention": lambda s: _sink(*_attn(), scale=s),
}


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -1.0, True, "0.5", torch.tensor(0.5)])
@pytest.mark.parametrize("op", sorted(SCALED))
def test_one_scale_rule(op, scale):
    with pytest.raises(ValueError, match=f"{op}: scale must be a positive finite number or None"):
        SCALED[op](scale)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference", "triton"])
def test_huge_finite_scale_saturates_instead_of_nan(backend):
    q, k, v = (torch.randn(1, 10, 9, 2, 8) for _ in range(3))
    out = neighborhood_attention(q, k, v, 3, scale=1e38, backend=backend)
    assert torch.isfinite(out).all()
    out, mass = attention_with_key_mass(*_attn(), scale=1e38, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    torch.testing.assert_close(mass.sum(1), torch.ones(2))


def _masked_rows(kind, nq=12, nk=12):
    """A mask with query row 3 of head 1 (batch 0) and the last row (batch 1, every head) fully masked."""
    keep = torch.rand(2, 2, nq, nk) > 0.3
    keep[..., 0] = True
    keep[0, 1, 3] = False
    keep[1, :, -1] = False
    if kind == "bool":
        return keep, keep
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf")), keep


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("query_set", ["all", "last"])
@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_fully_masked_rows_give_zero_output_and_zero_mass(kind, query_set, backend):
    q, k, v = _attn()
    mask, keep = _masked_rows(kind)
    out, mass = attention_with_key_mass(q, k, v, attn_mask=mask, query_set=query_set, backend=backend)
    # definition, in float64: softmax over the kept keys, dead rows contribute nothing
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 8**-0.5
    p = s.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
    ref_out = torch.einsum("bhqk,bkhd->bqhd", p, v.double())
    rows = p if query_set == "all" else p[:, :, -1:]
    ref_mass = rows.mean(2).mean(1)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.double(), ref_mass, atol=1e-6, rtol=1e-5)
    assert out[0, 3, 1].abs().max() == 0 and out[1, -1].abs().max() == 0
    if query_set == "last":
        assert mass[1].abs().max() == 0  # batch 1's last query sees no key in any head
    else:
        torch.testing.assert_close(mass.sum(1), torch.tensor([1 - 1 / 24, 1 - 1 / 12]))


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_one_row_mask_and_sink(causal):
    """A padding row mask [B, 1, 1, Nk] that masks every key a causal query can see, and VAR's op."""
    q, k, v = _attn()
    keep = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    keep[1, ..., :5] = False  # causal: batch 1's queries 0-4 see only keys 0..i
    if not causal:
        keep[1] = False
    results = [
        attention_with_key_mass(q, k, v, attn_mask=keep, causal=causal, backend=b)
        for b in ("torch", "triton", "auto")
    ]
    dead = 5 if causal else 12
    for out, mass in results:
        assert out[1, :dead].abs().max() == 0
        torch.testing.assert_close(out, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass, results[0][1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mass[1].sum(), torch.tensor(1 - dead / 12))
    sink = [_sink(q, k, v, attn_mask=keep, causal=causal, backend=b) for b in ("torch", "triton")]
    assert sink[0][1, :dead].abs().max() == 0
    torch.testing.assert_close(sink[1], sink[0], atol=1e-5, rtol=1e-5)


def _out_and_mass(out, mass):  # [B, Nq, H, Dv], [B, Nk] -> [B, Nq * H * Dv + Nk]
    return torch.cat([out.flatten(1), mass], 1)


# op name -> (call with backend=..., float32 inputs, the name of the op module's reference function)
VOCABULARY = {
    "neighborhood_attention": (
        lambda a, **kw: neighborhood_attention(*a, 3, **kw),
        lambda: tuple(torch.randn(1, 6, 6, 2, 8) for _ in range(3)),
        "neighborhood_attention_reference",
    ),
    "bilevel_routing_attention": (
        lambda a, **kw: bilevel_routing_attention(*a, 2, 1, **kw),
        lambda: tuple(torch.randn(1, 4, 4, 2, 8) for _ in range(3)),
        "bilevel_routing_attention_reference",
    ),
    "agent_attention": (
        lambda a, **kw: agent_attention(*a, **kw),
        lambda: (*_attn(), torch.randn(2, 4, 2, 8)),
        "agent_attention_reference",
    ),
    "attention_with_key_mass": (
        lambda a, **kw: _out_and_mass(*attention_with_key_mass(*a, query_set="last", **kw)),
        _attn,
        "attention_with_key_mass_reference",
    ),
    "visual_sink_attention": (lambda a, **kw: _sink(*a, **kw), _attn, "visual_sink_attention_reference"),
    "large_kernel_attention": (
        lambda a, **kw: large_kernel_attention(*a, **kw),
        lambda: _lka_args(torch.float32),
        "large_kernel_attention_reference",
    ),
}


@pytest.mark.parametrize("op", sorted(VOCABULARY))
def test_every_op_answers_to_the_four_backend_names(op, monkeypatch):
    """``reference`` runs the op's reference function (and only it), ``torch`` and ``auto`` (CPU) agree
    with it, ``triton`` runs the kernels (interpreter), and a bad name lists all four."""
    import importlib

    call, inputs, reference_name = VOCABULARY[op]
    args = inputs()
    module = importlib.import_module(f"visattn.kernels.ops.{op}")
    reference = getattr(module, reference_name)
    calls = []
    monkeypatch.setattr(module, reference_name, lambda *a, **kw: calls.append(1) or reference(*a, **kw))
    want = call(args, backend="reference")
    assert calls, f"backend='reference' did not run {reference_name}"
    for backend in ("torch", "auto", "triton"):
        torch.testing.assert_close(call(args, backend=backend), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"backend must be one of \('auto', 'reference', 'torch', 'triton'\)"
    ):
        call(args, backend="naive")


def test_torch_key_mass_scores_a_short_suffix_through_sdpa(monkeypatch):
    """backend='torch' on a short suffix of selected queries takes SDPA's output and scores only those rows
    (formerly reachable only through 'auto'), with the reference's result."""
    from visattn.kernels.torch import attention_with_key_mass as op

    q, k, v = _attn(nq=12, nk=12)
    want = attention_with_key_mass(q, k, v, query_set="last", backend="reference")
    suffix = []
    real = op.sdpa_with_suffix_mass
    monkeypatch.setattr(op, "sdpa_with_suffix_mass", lambda *a: suffix.append(1) or real(*a))
    got = attention_with_key_mass(q, k, v, query_set="last", backend="torch")
    assert suffix
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


OPS = ("neighborhood_attention", "bilevel_routing_attention", "agent_attention", "large_kernel_attention",
       "attention_with_key_mass", "visual_sink_attention")  # fmt: skip
TRAINED = OPS[:4]


@pytest.mark.parametrize("op", OPS)
def test_one_custom_op_pattern(op):
    """Every op's Triton path is ``visattn::<op>_fwd`` (and ``_bwd`` where it trains), its launchers are
    ``<op>_forward`` (``_backward``) in kernels/triton/<op>.py, and each backend has a module of its own."""
    assert hasattr(torch.ops.visattn, f"{op}_fwd")
    assert hasattr(torch.ops.visattn, f"{op}_bwd") == (op in TRAINED)
    triton_module = importlib.import_module(f"visattn.kernels.triton.{op}")
    assert hasattr(triton_module, f"{op}_forward")
    assert hasattr(triton_module, f"{op}_backward") == (op in TRAINED)
    assert hasattr(importlib.import_module(f"visattn.kernels.reference.{op}"), f"{op}_reference")
    ops_module = importlib.import_module(f"visattn.kernels.ops.{op}")
    assert op == ops_module.OP
    if importlib.util.find_spec(f"visattn.kernels.torch.{op}") is not None:
        assert hasattr(importlib.import_module(f"visattn.kernels.torch.{op}"), f"{op}_torch")
