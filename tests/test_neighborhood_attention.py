"""Neighborhood attention: reference vs a naive per-query loop, Triton vs reference, errors, dispatch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import visattn.kernels._dispatch as dispatch
from visattn.kernels import neighborhood_attention
from visattn.kernels.reference.neighborhood_attention import window_indices


def _dim_neighbours(index: int, length: int, k: int, d: int, causal: bool) -> list[tuple[int, int]]:
    """(key position, rpb index) pairs along one dim, by enumerating the query's dilation group."""
    group = list(range(index % d, length, d))
    g = group.index(index)
    if causal:
        slots = range(max(g - k + 1, 0), g + 1)
    else:
        start = min(max(g - k // 2, 0), len(group) - k)
        slots = range(start, start + k)
    return [(group[j], j - g + k - 1) for j in slots]


def _naive(q, k, v, kernel_size, dilation, causal, rpb, scale):
    """One query at a time, straight from the definition (float64)."""
    batch, *spatial, heads, _ = q.shape
    out = torch.zeros_like(q)
    for b, h in itertools.product(range(batch), range(heads)):
        for pos in itertools.product(*(range(n) for n in spatial)):
            per_dim = [
                _dim_neighbours(p, n, ks, dl, c)
                for p, n, ks, dl, c in zip(pos, spatial, kernel_size, dilation, causal)
            ]
            logits, values = [], []
            for combo in itertools.product(*per_dim):
                key = tuple(c[0] for c in combo)
                logit = scale * torch.dot(q[(b, *pos, h)], k[(b, *key, h)])
                if rpb is not None:
                    logit = logit + rpb[(h, *(c[1] for c in combo))]
                logits.append(logit)
                values.append(v[(b, *key, h)])
            weights = torch.stack(logits).softmax(0)
            out[(b, *pos, h)] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


def _inputs(shape, dtype=torch.float64, rpb_kernel=None, device="cpu"):
    q, k, v = (torch.randn(shape, dtype=dtype, device=device) for _ in range(3))
    rpb = None
    if rpb_kernel is not None:
        rpb = torch.randn(shape[-2], *(2 * ks - 1 for ks in rpb_kernel), dtype=dtype, device=device)
    return q, k, v, rpb


# (shape [batch, *spatial, heads, head_dim], kernel_size, dilation, is_causal, use_rpb)
NAIVE_CASES = [
    ((1, 9, 2, 4), 3, 1, False, True),
    ((1, 10, 1, 3), 3, 3, False, True),  # 10 not divisible by 3: groups of 4, 3, 3
    ((2, 11, 1, 4), 5, 2, False, False),
    ((1, 8, 1, 4), 4, 1, False, False),  # even kernel (NATTEN >= 0.20)
    ((1, 9, 1, 4), 3, 2, True, False),
    ((1, 5, 7, 2, 4), (3, 5), (1, 1), False, True),
    ((1, 7, 8, 1, 4), 3, (2, 2), False, True),
    ((1, 6, 5, 1, 4), (3, 2), 1, (True, False), False),
    ((1, 3, 4, 5, 1, 2), (3, 3, 3), (1, 1, 1), False, True),
    ((1, 4, 5, 6, 1, 2), (3, 2, 3), (1, 2, 2), (False, True, False), False),
]


@pytest.mark.parametrize("shape,kernel_size,dilation,causal,use_rpb", NAIVE_CASES)
def test_reference_matches_naive_loop(shape, kernel_size, dilation, causal, use_rpb):
    n = len(shape) - 3
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * n
    dl = dilation if isinstance(dilation, tuple) else (dilation,) * n
    cs = causal if isinstance(causal, tuple) else (causal,) * n
    q, k, v, rpb = _inputs(shape, rpb_kernel=ks if use_rpb else None)
    scale = 0.37
    out = neighborhood_attention(
        q, k, v, kernel_size, dilation, causal, rpb=rpb, scale=scale, backend="torch"
    )
    torch.testing.assert_close(out, _naive(q, k, v, ks, dl, cs, rpb, scale), rtol=1e-10, atol=1e-10)


def _natten_window_start(index: int, length: int, k: int, d: int) -> tuple[int, int]:
    """NATTEN 0.14-0.17's closed-form window start and rpb start ("pi") for odd kernels."""
    half = k // 2
    if d == 1:
        start = max(index - half, 0) + (length - index - half - 1 if index + half >= length else 0)
        pb = (
            half
            + (half - index if index < half else 0)
            + (length - index - 1 - half if index + half >= length else 0)
        )
        return start, pb
    if index - half * d < 0:
        return index % d, k - 1 - index // d
    if index + half * d >= length:
        full = (length // d) * d
        rem = length - full
        start = full + index % d - (k - 1) * d if index % d < rem else full + index % d - k * d
        return start, (length - index - 1) // d
    return index - half * d, half


@pytest.mark.parametrize(
    "length,k,d", [(7, 3, 1), (13, 7, 1), (10, 3, 3), (17, 5, 3), (23, 7, 3), (16, 3, 5)]
)
def test_window_rule_matches_natten_closed_form(length, k, d):
    key, valid, rel = window_indices(length, k, d, False)
    assert valid.all()
    for index in range(length):
        start, pb = _natten_window_start(index, length, k, d)
        assert key[index].tolist() == [start + j * d for j in range(k)]
        assert rel[index].tolist() == [pb + j for j in range(k)]


def test_reference_never_builds_token_by_token_matrix():
    """A 64x64 grid (4096 tokens) with a 3x3 window runs with a tiny gathered chunk budget."""
    q, k, v, _ = _inputs((1, 64, 64, 1, 8), dtype=torch.float32)
    out = neighborhood_attention(q, k, v, 3, backend="torch")
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_reference_gradcheck():
    q, k, v, rpb = _inputs((1, 4, 4, 2, 2), rpb_kernel=(3, 3))
    for t in (q, k, v, rpb):
        t.requires_grad_(True)
    fn = lambda q, k, v, rpb: neighborhood_attention(q, k, v, 3, (1, 1), rpb=rpb, backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb), fast_mode=True)
    q1, k1, v1, _ = _inputs((1, 7, 1, 3))
    for t in (q1, k1, v1):
        t.requires_grad_(True)
    fn1 = lambda q, k, v: neighborhood_attention(q, k, v, 3, 2, is_causal=True, backend="torch")
    assert torch.autograd.gradcheck(fn1, (q1, k1, v1), fast_mode=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=9), "must not exceed"),
        (dict(kernel_size=3, dilation=3), "must not exceed"),
        (dict(kernel_size=0), ">= 1"),
        (dict(kernel_size=(3, 3, 3)), "needs 2 values"),
        (dict(kernel_size=3, is_causal=1), "bool"),
        (dict(kernel_size=3, rpb=torch.zeros(2, 5, 4)), "rpb must have shape"),
        (dict(kernel_size=4, rpb=torch.zeros(2, 7, 7)), "odd kernel"),
        (dict(kernel_size=3, is_causal=True, rpb=torch.zeros(2, 5, 5)), "causal"),
        (dict(kernel_size=3, rpb=torch.zeros(2, 5, 5, dtype=torch.long)), "floating-point"),
        (dict(kernel_size=3, backend="cuda"), "backend must be one of"),
    ],
)
def test_clear_errors(kwargs, match):
    q, k, v, _ = _inputs((1, 8, 8, 2, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(q, k, v, **kwargs)


def test_clear_errors_on_tensors():
    q, k, v, _ = _inputs((1, 8, 8, 2, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        neighborhood_attention(q, k[:, :7], v, 3)
    with pytest.raises(ValueError, match="dtype"):
        neighborhood_attention(q, k.double(), v, 3)
    with pytest.raises(ValueError, match="float"):
        neighborhood_attention(q.long(), k.long(), v.long(), 3)
    with pytest.raises(ValueError, match="laid out"):
        neighborhood_attention(q[0, 0], k[0, 0], v[0, 0], 3)
    with pytest.raises(ValueError, match="is on meta"):
        neighborhood_attention(q, k.to("meta"), v, 3)


def test_dispatch_auto_uses_reference_on_cpu(monkeypatch):
    called = {}

    def fake_forward(*args):
        called["triton"] = True
        raise AssertionError("auto must not pick Triton for CPU tensors")

    monkeypatch.setattr(torch.ops.visattn, "na_forward", fake_forward, raising=False)
    q, k, v, _ = _inputs((1, 6, 2, 4), dtype=torch.float32)
    neighborhood_attention(q, k, v, 3)
    assert not called


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    q, k, v, _ = _inputs((1, 6, 2, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        neighborhood_attention(q, k, v, 3, backend="triton")


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = _inputs((1, 7, 1, 16))
    a = neighborhood_attention(q, k, v, 3, backend="torch")
    b = neighborhood_attention(q, k, v, 3, scale=1 / math.sqrt(16), backend="torch")
    torch.testing.assert_close(a, b)
