"""Neighborhood attention: reference vs a naive per-query loop, Triton vs reference, errors, dispatch."""

from __future__ import annotations

import argparse
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import visattn.kernels.ops.dispatch as dispatch
import visattn.kernels.reference.neighborhood_attention as na_reference
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


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_reference_never_builds_token_by_token_matrix(monkeypatch):
    """A 48x48 grid (2304 tokens) with a 3x3 window: with a small gathered-chunk budget no tensor of the
    reference (forward or backward) comes near tokens x tokens, and chunking does not change the result."""
    q, k, v, rpb = _inputs((1, 48, 48, 2, 8), rpb_kernel=(3, 3))
    leaves = [t.requires_grad_(True) for t in (q, k, v, rpb)]
    args = ((3, 3), (1, 1), (False, False), rpb, 8**-0.5)
    whole = na_reference.neighborhood_attention_reference(q, k, v, *args)
    whole_grads = torch.autograd.grad(whole.sum(), leaves)
    monkeypatch.setattr(na_reference, "_CHUNK_ELEMENTS", 1 << 15)
    with _LargestTensor() as mode:
        out = na_reference.neighborhood_attention_reference(q, k, v, *args)
        grads = torch.autograd.grad(out.sum(), leaves)
    tokens = 48 * 48
    assert tokens * tokens > 100 * q.numel()
    assert mode.largest <= 2 * q.numel(), mode.largest
    torch.testing.assert_close(out, whole)
    for g, r in zip(grads, whole_grads):
        torch.testing.assert_close(g, r)
    # backend="torch" (query tiles through SDPA): its largest tensor, the tiles' mask, is linear in tokens
    with _LargestTensor() as mode:
        torch.autograd.grad(neighborhood_attention(q, k, v, 3, rpb=rpb, backend="torch").sum(), leaves)
    assert mode.largest <= 16 * q.numel(), mode.largest


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
        (dict(kernel_size=3, scale=float("nan")), "scale must be a positive finite number"),
        (dict(kernel_size=3, scale=torch.tensor(0.5)), "scale must be a positive finite number"),
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

    monkeypatch.setattr(torch.ops.visattn, "neighborhood_attention_fwd", fake_forward, raising=False)
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


# --------------------------------------------------------------------------- Triton vs reference

# (shape, kernel_size, dilation, is_causal, use_rpb); float32 under the interpreter on CPU.
TRITON_CASES = [
    ((2, 9, 2, 4), 3, 1, False, True),
    ((1, 10, 1, 20), 3, 3, False, True),  # head_dim 20 padded to 32; 10 % 3 != 0
    ((1, 12, 1, 8), 5, 2, True, False),
    ((2, 5, 7, 2, 16), (3, 5), 1, False, True),
    ((1, 7, 8, 1, 8), 3, 2, False, True),
    ((1, 6, 5, 1, 8), (3, 2), 1, (True, False), False),
    ((1, 3, 4, 5, 1, 8), 3, 1, False, True),
    ((1, 4, 5, 6, 1, 8), (3, 2, 3), (1, 2, 2), (False, True, False), False),
    # several (and partial) query/key boxes per dilation group
    ((1, 12, 19, 1, 8), 5, (1, 2), False, True),
    ((1, 150, 1, 8), 7, 2, True, False),
    ((1, 100, 1, 8), 6, 1, False, False),  # even kernel: window reaches 3 back, 2 ahead
    ((1, 5, 5, 6, 1, 8), 3, 1, False, True),
]


def _compare_backends(
    shape, kernel_size, dilation, causal, use_rpb, noncontiguous=False, dtype=torch.float32
):
    n = len(shape) - 3
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * n
    q, k, v, rpb = _inputs(shape, dtype=dtype, rpb_kernel=ks if use_rpb else None)
    if noncontiguous:  # same values, strided storage: heads and head_dim swapped in memory
        q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
        assert not q.is_contiguous()
    leaves = [t.requires_grad_(True) for t in (q, k, v) + ((rpb,) if use_rpb else ())]
    kwargs = dict(kernel_size=kernel_size, dilation=dilation, is_causal=causal, rpb=rpb)
    out = neighborhood_attention(q, k, v, backend="triton", **kwargs)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    ref = neighborhood_attention(q, k, v, backend="torch", **kwargs)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for name, g, r in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads):
        torch.testing.assert_close(g, r, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape,kernel_size,dilation,causal,use_rpb", TRITON_CASES)
def test_triton_matches_reference(shape, kernel_size, dilation, causal, use_rpb):
    _compare_backends(shape, kernel_size, dilation, causal, use_rpb)


def _random_case(gen: torch.Generator):
    """A random valid problem: 1-3 dims, odd/even kernels, dilation, per-dim causality, rpb if allowed."""
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))
    n = rand(1, 3)
    spatial = tuple(rand(3, {1: 40, 2: 11, 3: 6}[n]) for _ in range(n))
    dilation = tuple(rand(1, max(1, length // 3)) for length in spatial)
    kernel = tuple(rand(1, length // dil) for length, dil in zip(spatial, dilation))
    causal = tuple(bool(rand(0, 1)) and rand(0, 2) == 0 for _ in range(n))
    use_rpb = not any(causal) and all(k % 2 for k in kernel)
    return (rand(1, 2), *spatial, rand(1, 2), 4 * rand(1, 4)), kernel, dilation, causal, use_rpb


@pytest.mark.parametrize("seed", range(6))
def test_triton_random_sweep(seed):
    case = _random_case(torch.Generator().manual_seed(seed))
    _compare_backends(*case)


def test_triton_noncontiguous_inputs():
    _compare_backends((1, 6, 7, 2, 8), (3, 5), (2, 1), False, True, noncontiguous=True)


def test_triton_reads_strided_qkv_views():
    """q, k, v unbound from one projection (NAT's layout) are read in place, with exact results."""
    qkv = torch.randn(2, 6, 7, 3, 2, 8).requires_grad_(True)
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    q, k, v = qkv.unbind(3)
    out = neighborhood_attention(q, k, v, 3, (2, 1), rpb=rpb, backend="triton")
    ref = neighborhood_attention(q, k, v, 3, (2, 1), rpb=rpb, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (qkv, rpb), grad), torch.autograd.grad(ref, (qkv, rpb), grad)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_triton_float16():
    _compare_backends((1, 7, 6, 2, 16), 3, (2, 1), False, True, dtype=torch.float16)


def test_triton_large_head_dim_forward():
    q, k, v, rpb = _inputs((1, 5, 1, 96), dtype=torch.float32, rpb_kernel=(3,))
    out = neighborhood_attention(q, k, v, 3, rpb=rpb, backend="triton")
    torch.testing.assert_close(out, neighborhood_attention(q, k, v, 3, rpb=rpb, backend="torch"))


def test_triton_head_dim_and_dtype_limits():
    q, k, v, _ = _inputs((1, 5, 1, 257), dtype=torch.float32)
    with pytest.raises(ValueError, match="head dims <= 256"):
        neighborhood_attention(q, k, v, 3, backend="triton")
    q, k, v, _ = _inputs((1, 5, 1, 8))
    with pytest.raises(ValueError, match="float64"):
        neighborhood_attention(q, k, v, 3, backend="triton")


def test_launch_falls_back_to_smaller_tiles_when_out_of_resources():
    import triton

    from visattn.kernels.triton import neighborhood_attention as tna

    tried = []

    def launch(config):
        tried.append(config)
        if config[0] == 64:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    kernel = SimpleNamespace(fn=SimpleNamespace(__name__="fake_kernel"))
    configs = [(64, 64, 32, 4, 3), (32, 32, 32, 4, 2)]
    tna._launch(kernel, ("key",), configs, launch)
    tna._launch(kernel, ("key",), configs, launch)  # remembered: no second failed attempt
    assert tried == [configs[0], configs[1], configs[1]]
    tried.clear()
    with pytest.raises(triton.runtime.errors.OutOfResources):
        tna._launch(kernel, ("other",), configs[:1], launch)


def _window_dlogits(q, k, v, rpb, grad, kernel_size, dilation, scale):
    """d(logits) per (query, window slot) ``[batch, heads, tokens, prod(kernel_size)]`` in float64, from
    the flattened neighbourhood tables (the softmax backward written out)."""
    spatial, heads = q.shape[1:-2], q.shape[-2]
    key, _, rel = na_reference.neighborhood_tables(spatial, kernel_size, dilation, (False,) * len(spatial))
    qf, kf, vf, gf = (t.detach().double().flatten(1, -3) for t in (q, k, v, grad))  # [b, tokens, h, d]
    logits = torch.einsum("bnhd,bnwhd->bhnw", qf, kf[:, key]) * scale
    logits = logits + rpb.detach().double().reshape(heads, -1)[:, rel]
    p = logits.softmax(-1)
    dp = torch.einsum("bnhd,bnwhd->bhnw", gf, vf[:, key])
    return p * (dp - (p * dp).sum(-1, keepdim=True))


def test_triton_dq_pass_writes_window_dlogits(monkeypatch):
    """With rpb the dq kernel stores d(logits) per (query, window slot) with plain stores (no atomics);
    every slot is written (the buffer starts empty), dilation groups and several query boxes included."""
    from visattn.kernels.triton import neighborhood_attention as tna

    shape, kernel_size, dilation = (1, 12, 19, 2, 8), (5, 3), (1, 2)
    q, k, v, rpb = _inputs(shape, dtype=torch.float32, rpb_kernel=kernel_size)
    captured = []
    rpb_grad = tna._rpb_grad

    def capture(ds, *args):
        captured.append(ds.clone())
        return rpb_grad(ds, *args)

    monkeypatch.setattr(tna, "_rpb_grad", capture)
    leaves = [t.requires_grad_(True) for t in (q, k, v, rpb)]
    out = neighborhood_attention(q, k, v, kernel_size, dilation, rpb=rpb, backend="triton")
    grad = torch.randn_like(out)
    torch.autograd.grad(out, leaves, grad)
    expected = _window_dlogits(q, k, v, rpb, grad, kernel_size, dilation, 8**-0.5)
    torch.testing.assert_close(captured[0].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "spatial,kernel_size,dilation",
    [
        ((1, 1, 11), (1, 1, 5), (1, 1, 2)),
        ((1, 9, 7), (1, 3, 5), (2, 1, 1)),
        ((4, 5, 6), (3, 3, 5), (1, 1, 1)),
    ],
)
def test_rpb_grad_contraction_matches_scatter(spatial, kernel_size, dilation):
    """The rpb gradient's one dense contraction over d(logits) equals the scatter of every (query, slot)
    into its relative-offset entry of the table."""
    from visattn.kernels.triton.neighborhood_attention import _rpb_grad

    batch, heads, tokens, window = 2, 3, math.prod(spatial), math.prod(kernel_size)
    ds = torch.randn(batch, heads, tokens, window, dtype=torch.float64)
    rpb = torch.zeros(heads, *(2 * ks - 1 for ks in kernel_size), dtype=torch.float64)
    _, _, rel = na_reference.neighborhood_tables(spatial, kernel_size, dilation, (False,) * 3)
    expected = torch.zeros(heads, rpb[0].numel(), dtype=torch.float64)
    expected.index_add_(1, rel.flatten(), ds.sum(0).flatten(1))
    got = _rpb_grad(ds, rpb, spatial, kernel_size, dilation)
    torch.testing.assert_close(got, expected.view(rpb.shape), rtol=1e-12, atol=1e-12)


def test_opcheck():

    q, k, v, rpb = _inputs((1, 5, 6, 2, 8), dtype=torch.float32, rpb_kernel=(3, 3))
    for t in (q, k, v, rpb):
        t.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.visattn.neighborhood_attention_fwd.default,
        (q, k, v, rpb, [3, 3], [1, 2], [False, False], 0.5),
    )
    q, k, v, _ = _inputs((1, 7, 1, 8), dtype=torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.visattn.neighborhood_attention_fwd.default, (q, k, v, None, [3], [2], [True], 0.5)
    )


def test_traces_under_torch_compile():
    q, k, v, rpb = _inputs((1, 5, 6, 2, 8), dtype=torch.float32, rpb_kernel=(3, 3))
    fn = torch.compile(
        lambda q, k, v, rpb: neighborhood_attention(q, k, v, 3, rpb=rpb, backend="triton"),
        backend="aot_eager",
        fullgraph=True,
    )
    leaves = [t.requires_grad_(True) for t in (q, k, v, rpb)]
    out = fn(q, k, v, rpb)
    out.sum().backward()
    ref = neighborhood_attention(q, k, v, 3, rpb=rpb, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    for t, r in zip(leaves, ref_grads):
        torch.testing.assert_close(t.grad, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_with_dynamic_shapes_and_default_scale(backend):
    # dynamic=True makes head_dim symbolic: the default scale derived from it must trace under
    # fullgraph (no float()/math.isfinite on a SymFloat)
    fn = torch.compile(
        lambda q, k, v: neighborhood_attention(q, k, v, 3, backend=backend),
        backend="eager",
        dynamic=True,
        fullgraph=True,
    )
    for shape in [(2, 7, 3, 8), (3, 9, 4, 16)]:
        q, k, v, _ = _inputs(shape, dtype=torch.float32)
        ref = neighborhood_attention(q, k, v, 3, backend=backend)
        torch.testing.assert_close(fn(q, k, v), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "backend,shape,kernel_size,dilation,use_rpb",
    [
        ("aot_eager", (2, 14, 14, 2, 8), 7, 1, True),  # one dense masked tile (NAT's small maps)
        ("aot_eager", (1, 40, 40, 1, 4), 5, 1, True),  # gathered query tiles
        ("aot_eager", (1, 12, 10, 2, 4), 3, 2, True),  # dilation groups (DiNAT)
        ("aot_eager", (2, 6, 8, 8, 2, 4), 3, 1, False),  # bands along the first dim
        ("inductor", (1, 12, 10, 2, 8), 3, 2, True),
    ],
)
def test_torch_path_compiles_to_the_tiled_sdpa_path(
    monkeypatch, backend, shape, kernel_size, dilation, use_rpb
):
    """Under torch.compile with static shapes backend='torch' keeps the tiled SDPA path (its per-shape plan
    enters the graph as constants) instead of the reference's per-query gather, as one graph, with the
    reference's output and gradients."""
    import visattn.kernels.ops.neighborhood_attention as na_op

    q, k, v, rpb = _inputs(shape, dtype=torch.float32, rpb_kernel=(kernel_size,) * (len(shape) - 3))
    rpb = rpb if use_rpb else None
    leaves = [t.requires_grad_() for t in (q, k, v, rpb) if t is not None]
    n = len(shape) - 3
    args = ((kernel_size,) * n, (dilation,) * n, (False,) * n, rpb, shape[-1] ** -0.5)
    ref = na_op.neighborhood_attention_reference(q, k, v, *args)
    ref_grads = torch.autograd.grad(ref.sum(), leaves)

    def refuse(*args):
        raise AssertionError("the reference ran under torch.compile")

    monkeypatch.setattr(na_op, "neighborhood_attention_reference", refuse)
    torch._dynamo.reset()
    fn = torch.compile(
        lambda q, k, v, rpb: neighborhood_attention(q, k, v, kernel_size, dilation, rpb=rpb, backend="torch"),
        backend=backend,
        fullgraph=True,
    )
    out = fn(q, k, v, rpb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out.sum(), leaves), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_torch_path_under_dynamic_shapes_specializes_each_map_size():
    """dynamic=True with an explicit scale: the tiled path needs its map sizes as ints (``static_sizes``), so
    each size gets its own guarded graph with that size's plan, one graph each, equal to the reference."""
    import visattn.kernels.ops.neighborhood_attention as na_op

    torch._dynamo.reset()
    fn = torch.compile(
        lambda q, k, v: neighborhood_attention(q, k, v, 3, scale=0.25, backend="torch"),
        backend="aot_eager",
        dynamic=True,
        fullgraph=True,
    )
    for shape in [(1, 8, 8, 2, 16), (1, 9, 7, 2, 16)]:
        q, k, v, _ = _inputs(shape, dtype=torch.float32)
        ref = na_op.neighborhood_attention_reference(q, k, v, (3, 3), (1, 1), (False, False), None, 0.25)
        torch.testing.assert_close(fn(q, k, v), ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape,kernel_size,dilation,causal,use_rpb",
    [
        ((2, 56, 56, 2, 32), 7, 1, False, True),
        ((2, 28, 28, 4, 32), 7, 4, False, True),
        ((1, 30, 1, 64), 7, 3, False, False),
        ((2, 300, 4, 64), 13, 2, True, False),
        ((1, 10, 12, 14, 2, 128), (3, 5, 7), (2, 1, 1), (True, False, False), False),
        ((1, 16, 16, 1, 80), 5, 3, False, True),
    ],
)
def test_cuda_matches_reference(dtype, shape, kernel_size, dilation, causal, use_rpb):
    n = len(shape) - 3
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * n
    q, k, v, rpb = _inputs(shape, dtype=dtype, rpb_kernel=ks if use_rpb else None, device="cuda")
    leaves = [t.requires_grad_(True) for t in (q, k, v) + ((rpb,) if use_rpb else ())]
    kwargs = dict(kernel_size=kernel_size, dilation=dilation, is_causal=causal, rpb=rpb)
    out = neighborhood_attention(q, k, v, **kwargs)  # auto -> Triton on CUDA
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_rpb = ref_leaves[3] if use_rpb else None
    ref = neighborhood_attention(*ref_leaves[:3], backend="torch", **{**kwargs, "rpb": ref_rpb})
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out, ref.to(dtype), rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        # drpb sums over all queries: compare relative to its scale
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.double() / scale, r / scale, rtol=tol, atol=tol * 4)


@pytest.mark.cuda
def test_cuda_inductor_compile():
    q, k, v, rpb = _inputs((2, 14, 14, 4, 32), dtype=torch.float16, rpb_kernel=(7, 7), device="cuda")
    fn = torch.compile(lambda q, k, v: neighborhood_attention(q, k, v, 7, rpb=rpb), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), neighborhood_attention(q, k, v, 7, rpb=rpb), rtol=0, atol=0)


def test_benchmark_runs_on_cpu(capsys):
    from visattn.bench import na as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--device", "cpu", "--case", "7x7", "--iters", "1", "--rpb"])) == 0
    rows = {
        line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "7x7" in line
    }
    for impl in ("visattn triton", "visattn torch", "sdpa + window mask", "sdpa dense"):
        assert "n/a" not in rows[impl] and "skipped" not in rows[impl], rows[impl]
    assert "skipped" in rows["natten"]  # NATTEN has no rpb


def test_benchmark_says_why_a_row_is_skipped_and_times_forward_with_backward(capsys, monkeypatch):
    """Without a GPU or the interpreter the Triton row says why it is skipped; the forward and the
    forward+backward steps of every row take turns in one measurement, so that a slow spell of a shared
    machine cannot make a forward read slower than its forward+backward."""
    from visattn.bench import na as bench

    calls = []

    def recorded(steps, *args):
        calls.append(len(steps))
        return measure_side_by_side(steps, *args)

    measure_side_by_side = bench.measure_side_by_side
    monkeypatch.setattr(bench, "measure_side_by_side", recorded)
    monkeypatch.setattr(bench, "interpreter_enabled", lambda: False)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--device", "cpu", "--case", "7x7", "--iters", "1", "--rpb"])) == 0
    rows = {
        line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "7x7" in line
    }
    assert rows["visattn triton"].endswith("skipped: Triton runs on a CUDA device (or TRITON_INTERPRET=1)")
    assert rows["natten"].endswith("skipped: NATTEN has no relative positional bias")
    assert calls == [12]  # one case: 6 rows x (forward, forward+backward), measured together


@pytest.mark.parametrize("shape,kernel_size,dilation,is_causal,use_rpb", NAIVE_CASES)
def test_benchmark_masked_sdpa_is_exact(shape, kernel_size, dilation, is_causal, use_rpb):
    """The benchmark's "sdpa + window mask" row computes neighborhood attention exactly (it is shown as
    the floor of SDPA-based paths, so it must not be a cheaper, different computation)."""
    from visattn.bench.na import Case, _masked_sdpa_fn
    from visattn.kernels.reference.neighborhood_attention import neighborhood_attention_reference

    spatial = shape[1:-2]
    n = len(spatial)
    args = tuple(a if isinstance(a, tuple) else (a,) * n for a in (kernel_size, dilation, is_causal))
    case = Case("t", shape[0], spatial, shape[-2], shape[-1], *args)
    q, k, v, rpb = _inputs(shape, rpb_kernel=args[0] if use_rpb else None)
    out = _masked_sdpa_fn(case, "cpu", torch.float64, rpb)(q, k, v)
    ref = neighborhood_attention_reference(q, k, v, *args, rpb, shape[-1] ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def _check_tiled_against_reference(shape, args, use_rpb, tile):
    """The torch path at a given ``tile`` equals the reference, output and every gradient (float64)."""
    from visattn.kernels.reference.neighborhood_attention import neighborhood_attention_reference
    from visattn.kernels.torch.neighborhood_attention import neighborhood_attention_torch

    q, k, v, rpb = _inputs(shape, rpb_kernel=args[0] if use_rpb else None)
    leaves = [t.requires_grad_() for t in (q, k, v, rpb) if t is not None]
    ref = neighborhood_attention_reference(q, k, v, *args, rpb, 0.37)
    out = neighborhood_attention_torch(q, k, v, *args, rpb, 0.37, tile=tile)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tile", [1, 2, 3, 8])
@pytest.mark.parametrize("shape,kernel_size,dilation,causal,use_rpb", NAIVE_CASES)
def test_tiled_sdpa_path_matches_reference_with_gradients(
    shape, kernel_size, dilation, causal, use_rpb, tile
):
    """backend='torch' runs query tiles with their key halo through SDPA; small tiles force many tiles
    (and tiles moved back at a group's end) even on these small maps."""
    n = len(shape) - 3
    args = tuple(a if isinstance(a, tuple) else (a,) * n for a in (kernel_size, dilation, causal))
    _check_tiled_against_reference(shape, args, use_rpb, tile)


def test_tiled_sdpa_path_half_precision_and_bench_shape():
    from visattn.kernels.reference.neighborhood_attention import neighborhood_attention_reference

    q, k, v, rpb = _inputs((1, 30, 23, 2, 8), dtype=torch.bfloat16, rpb_kernel=(7, 7))
    out = neighborhood_attention(q, k, v, 7, dilation=(2, 3), rpb=rpb, backend="torch")
    ref = neighborhood_attention_reference(q, k, v, (7, 7), (2, 3), (False, False), rpb, 8**-0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


def test_tile_choice_tiles_large_maps_and_keeps_small_maps_dense():
    """The default tile: query tiles where they cut the work (here 1-D, 1024 tokens, k=9), one dense
    masked tile on maps about the window's size; both exact."""
    from visattn.kernels.reference.neighborhood_attention import neighborhood_attention_reference
    from visattn.kernels.torch.neighborhood_attention import TILE_CANDIDATES, choose_tile

    assert choose_tile((1024,), (9,), (1,), (False,)) < 1024
    assert choose_tile((56, 56), (7, 7), (1, 1), (False, False)) < 56
    assert choose_tile((7, 7), (7, 7), (1, 1), (False, False)) == TILE_CANDIDATES[-1]
    for shape, ks in (((2, 1024, 2, 8), 9), ((1, 9, 9, 2, 8), 7)):
        q, k, v, rpb = _inputs(shape, rpb_kernel=(ks,) * (len(shape) - 3))
        args = ((ks,) * (len(shape) - 3), (1,) * (len(shape) - 3), (False,) * (len(shape) - 3), rpb, 0.3)
        out = neighborhood_attention(q, k, v, ks, rpb=rpb, scale=0.3, backend="torch")
        torch.testing.assert_close(out, neighborhood_attention_reference(q, k, v, *args))


@pytest.mark.parametrize(
    "shape,kernel_size", [((1, 14, 14, 2, 8), 7), ((1, 64, 2, 8), 9), ((1, 7, 7, 2, 8), 7)]
)
def test_torch_path_runs_on_the_meta_device(shape, kernel_size):
    """timm builds models on the meta device (``default_cfgs`` tests, deferred init): the torch path plans
    on CPU tables and never reads a device tensor."""
    q = torch.empty(shape, device="meta")
    rpb = torch.empty((shape[-2], *(2 * kernel_size - 1,) * (len(shape) - 3)), device="meta")
    out = neighborhood_attention(q, q, q, kernel_size, rpb=rpb, backend="torch")
    assert out.device.type == "meta" and out.shape == q.shape


@pytest.mark.parametrize(
    "shape,kernel_size,causal,band",
    [
        ((2, 6, 8, 8, 3, 4), (3, 3, 3), (False, False, False), 3),  # the 3-D bench case, choose_tile's pick
        ((2, 6, 8, 8, 3, 4), (3, 3, 3), (True, False, False), 3),
        ((1, 9, 5, 2, 4), (3, 3), (False, False), 2),  # last band moved back, rows computed twice
        ((1, 9, 5, 2, 4), (3, 5), (False, False), 4),
        ((2, 40, 2, 4), (5,), (True,), 6),
    ],
)
def test_bands_match_reference_with_gradients(shape, kernel_size, causal, band):
    """Bands along the first dim run one SDPA call each on slices (no gather); with rpb when not causal."""
    from visattn.kernels.torch.neighborhood_attention import TILE_CANDIDATES, _plan

    n = len(shape) - 3
    tile = (band,) + (TILE_CANDIDATES[-1],) * (n - 1)
    args = (kernel_size, (1,) * n, causal)
    assert _plan(tuple(shape[1:-2]), *args, tile, torch.device("cpu")).bands is not None
    _check_tiled_against_reference(shape, args, not any(causal), tile)


def test_tile_choice_bands_where_they_cut_the_dense_work():
    from visattn.kernels.torch.neighborhood_attention import choose_tile

    assert choose_tile((6, 8, 8), (3, 3, 3), (1, 1, 1), (False,) * 3)[0] == 3
    assert isinstance(choose_tile((14, 14), (7, 7), (1, 1), (False, False)), int)  # 98-row bands: slower
    assert isinstance(choose_tile((12, 8, 8), (3, 3, 3), (2, 1, 1), (False,) * 3), int)  # dilated: no bands


def test_plan_first_built_in_inference_mode_still_trains():
    """timm's suite runs inference before backward in one process: the cached plan must not hold
    inference tensors (autograd refuses to save them), whichever mode built it first."""
    q, k, v, rpb = _inputs((1, 11, 13, 2, 4), rpb_kernel=(5, 5))
    with torch.inference_mode():
        neighborhood_attention(q, k, v, 5, rpb=rpb, backend="torch")
    leaves = [t.requires_grad_() for t in (q, k, v, rpb)]
    out = neighborhood_attention(q, k, v, 5, rpb=rpb, backend="torch")
    assert all(g is not None for g in torch.autograd.grad(out.sum(), leaves))
