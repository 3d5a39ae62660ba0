"""bilevel_routing_attention: reference vs a naive loop, Triton (interpreter on CPU) vs reference,
gradients, padding, top-k extremes, routing output, argument errors, torch.library registration."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from visattn.kernels import bilevel_routing_attention, interpreter_enabled
from visattn.kernels.reference.bilevel_routing_attention import (
    bilevel_routing_attention_reference,
    routing_indices,
)
from visattn.kernels.torch.bilevel_routing_attention import bilevel_routing_attention_torch


def _inputs(b, h, w, heads, d, dv=None, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + heads)
    q, k = (torch.randn(b, h, w, heads, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, w, heads, dv or d, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _naive(q, k, v, s, topk, scale):
    """Token-by-token bi-level routing attention over the real (unpadded) tokens only."""
    b_, h_, w_, heads, _ = q.shape
    rh, rw = math.ceil(h_ / s), math.ceil(w_ / s)
    members = [[] for _ in range(s * s)]
    for y in range(h_):
        for x in range(w_):
            members[(y // rh) * s + x // rw].append((y, x))
    out = torch.zeros(v.shape, dtype=v.dtype)
    routes = []
    for b in range(b_):

        def region_mean(t, r, b=b):
            if not members[r]:
                return torch.zeros(heads * t.shape[-1], dtype=t.dtype)
            return torch.stack([t[b, y, x].flatten() for y, x in members[r]]).mean(0)

        qm = torch.stack([region_mean(q, r) for r in range(s * s)])
        km = torch.stack([region_mean(k, r) for r in range(s * s)])
        affinity = (qm * scale) @ km.T
        affinity[:, [r for r in range(s * s) if not members[r]]] = float("-inf")
        n = s * s if topk == -1 else min(topk, s * s)
        route = affinity.topk(n, dim=-1).indices
        routes.append(route)
        for r in range(s * s):
            keys = [yx for kr in route[r].tolist() for yx in members[kr]]
            ky = torch.tensor([y for y, _ in keys])
            kx = torch.tensor([x for _, x in keys])
            for y, x in members[r]:
                for hd in range(heads):
                    logits = (k[b, ky, kx, hd] @ q[b, y, x, hd]) * scale
                    out[b, y, x, hd] = logits.softmax(0) @ v[b, ky, kx, hd]
    return out, torch.stack(routes)


CASES = [
    # b, h, w, heads, d, dv, regions, topk
    (1, 8, 8, 2, 4, 4, 2, 1),  # divisible, top-1
    (2, 6, 6, 1, 3, 5, 3, 4),  # divisible, some regions, dv != d
    (1, 7, 9, 2, 4, 4, 3, 2),  # padding in both directions
    (1, 5, 5, 1, 4, 4, 4, 3),  # padding leaves a whole empty region row/column
    (1, 6, 4, 2, 4, 4, 2, -1),  # all regions
    (1, 6, 6, 1, 4, 4, 2, 10),  # topk > regions means all
    # maps smaller than the region grid: one-token regions, empty regions routed last
    (1, 4, 4, 1, 4, 4, 7, 1),
    (2, 4, 4, 2, 4, 3, 7, 4),
    (1, 4, 4, 1, 4, 4, 7, -1),  # the routed set holds every empty region too
    (1, 5, 3, 1, 4, 4, 4, 6),  # 5x3 in a 4x4 grid: 2x1 regions, 7 of 16 empty; topk > 9 real
]


@pytest.mark.parametrize("b,h,w,heads,d,dv,s,topk", CASES)
def test_reference_matches_naive_loop(b, h, w, heads, d, dv, s, topk):
    q, k, v = _inputs(b, h, w, heads, d, dv)
    scale = 0.7
    out, routing = bilevel_routing_attention(
        q, k, v, s, topk, scale=scale, return_routing=True, backend="torch"
    )
    expected, expected_routing = _naive(q, k, v, s, topk, scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(routing, expected_routing)
    ref = bilevel_routing_attention_reference(q, k, v, routing, s, scale)
    torch.testing.assert_close(ref, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("b,h,w,heads,d,dv,s,topk", CASES)
def test_sdpa_path_matches_reference_with_gradients(dense, b, h, w, heads, d, dv, s, topk):
    # backend="torch" runs bilevel_routing_attention_torch (both layouts here); the reference is the
    # readable ground truth
    q, k, v = _inputs(b, h, w, heads, d, dv, grad=True)
    routing = routing_indices(q, k, s, topk, 0.7)
    grad_out = torch.randn(v.shape, dtype=v.dtype)
    out = bilevel_routing_attention_torch(q, k, v, routing, s, 0.7, dense=dense)
    ref = bilevel_routing_attention_reference(q, k, v, routing, s, 0.7)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)


def test_all_regions_is_full_attention_over_real_tokens():
    q, k, v = _inputs(2, 7, 5, 2, 8)
    out = bilevel_routing_attention(q, k, v, 3, -1, backend="torch")
    flat = [t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)]  # [B, heads, HW, d]
    full = F.scaled_dot_product_attention(*flat).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out, full)


def test_reference_gradcheck():
    q, k, v = _inputs(1, 5, 3, 1, 2, 3, grad=True)
    routing = routing_indices(q, k, 2, 2, 0.5)
    assert torch.autograd.gradcheck(
        lambda q, k, v: bilevel_routing_attention_reference(q, k, v, routing, 2, 0.5), (q, k, v)
    )
    # The public op: routing is recomputed but not differentiated.
    assert torch.autograd.gradcheck(
        lambda q, k, v: bilevel_routing_attention(q, k, v, 2, 2, scale=0.5, backend="torch"),
        (q, k, v),
        fast_mode=True,
    )


def test_routing_shares_one_choice_across_heads_and_is_detached():
    q, k, v = _inputs(1, 8, 8, 4, 4, grad=True)
    _, routing = bilevel_routing_attention(q, k, v, 4, 3, return_routing=True, backend="torch")
    assert routing.shape == (1, 16, 3) and routing.dtype == torch.int64 and not routing.requires_grad
    # Same region means taken over all heads' channels at once.
    qm = q.detach().reshape(1, 4, 2, 4, 2, 16).mean((2, 4)).reshape(1, 16, 16)
    km = k.detach().reshape(1, 4, 2, 4, 2, 16).mean((2, 4)).reshape(1, 16, 16)
    expected = (qm @ km.transpose(1, 2)).topk(3, dim=-1).indices
    torch.testing.assert_close(routing, expected)


# Triton runs under the CPU interpreter here: float32, few programs, one loop step each.
TRITON_CASES = [
    (1, 8, 8, 2, 16, 16, 2, 1),
    (1, 7, 9, 1, 16, 8, 3, 2),  # padding, dv != d
    (2, 4, 4, 1, 16, 16, 2, -1),
    (1, 5, 5, 1, 8, 8, 4, 3),  # empty region row/column
    (1, 4, 3, 1, 16, 16, 5, -1),  # map smaller than the grid, routed set mostly empty regions
    (1, 5, 3, 1, 8, 8, 4, -1),
]


@pytest.mark.parametrize("b,h,w,heads,d,dv,s,topk", TRITON_CASES)
def test_triton_matches_reference(b, h, w, heads, d, dv, s, topk):
    q, k, v = _inputs(b, h, w, heads, d, dv, dtype=torch.float32, grad=True)
    grad_out = torch.randn(b, h, w, heads, dv)
    out, routing = bilevel_routing_attention(q, k, v, s, topk, return_routing=True, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref, ref_routing = bilevel_routing_attention(q, k, v, s, topk, return_routing=True, backend="torch")
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(routing, ref_routing)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)  # assert_close also fails on NaN


# Packed tiles: several regions and heads per program, tiles that end inside a region.
PACKED_CASES = [
    (2, 14, 14, 2, 16, 16, 7, 4),  # 4 tokens per region (BiFormer-S stage 3 layout), batch 2
    (2, 14, 14, 1, 16, 16, 7, 16),
    (1, 7, 7, 3, 16, 8, 7, 1),  # 1 token per region
    (2, 7, 7, 2, 16, 16, 7, 16),
    (2, 9, 9, 2, 16, 16, 3, 2),  # 9 tokens per region: tiles of 16 and 64 end inside regions
    (1, 10, 13, 2, 8, 8, 4, 3),  # 12-token regions with padded slots
]


@pytest.mark.parametrize("tile_rows", [16, 64])
@pytest.mark.parametrize("b,h,w,heads,d,dv,s,topk", PACKED_CASES)
def test_triton_packed_tiles_match_reference(monkeypatch, tile_rows, b, h, w, heads, d, dv, s, topk):
    from visattn.kernels.triton import bilevel_routing_attention as tbra

    monkeypatch.setattr(tbra, "INTERPRETER_TILE_ROWS", tile_rows)
    plan = tbra.tile_plan((b, h, w, heads, d), s, s * s if topk == -1 else min(topk, s * s))
    assert plan.block == tile_rows and plan.tiles > 1
    test_triton_matches_reference(b, h, w, heads, d, dv, s, topk)


@pytest.mark.parametrize("b,h,w,heads,s,topk", [(2, 14, 14, 2, 7, 4), (2, 7, 7, 2, 7, 16)])
def test_triton_packed_tiles_fp16(monkeypatch, b, h, w, heads, s, topk):
    from visattn.kernels.triton import bilevel_routing_attention as tbra

    monkeypatch.setattr(tbra, "INTERPRETER_TILE_ROWS", 64)
    q, k, v = _inputs(b, h, w, heads, 16, dtype=torch.float16, grad=True)
    grad_out = torch.randn(b, h, w, heads, 16).half()
    out, routing = bilevel_routing_attention(q, k, v, s, topk, return_routing=True, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = bilevel_routing_attention_reference(*ref_in, routing, s, 16**-0.5)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("batch", [1, 2, 64])
@pytest.mark.parametrize("size,heads,topk", [(56, 2, 1), (28, 4, 4), (14, 8, 16), (7, 16, 16)])
def test_gpu_tiles_are_mostly_real_tokens_at_biformer_s_stages(batch, size, heads, topk):
    # BiFormer-S at 224x224, 7x7 regions: 64, 16, 4 and 1 tokens per region (its 7x7 stage runs global
    # attention, but BRA at 1 token per region is the same packing); the plan the GPU launch uses
    from visattn.kernels.triton.bilevel_routing_attention import tile_plan

    plan = tile_plan((batch, size, size, heads, 32), 7, topk, interpreted=False)
    assert plan.tokens == (size // 7) ** 2
    assert plan.block == 64 and plan.key_block == 64
    assert plan.real_fraction >= 0.5, plan
    # every tile but the launch's last is full; the last holds the remainder (16 of 64 rows at 7x7, batch 1)
    assert plan.worst >= (0.25 if (size, batch) == (7, 1) else 0.5), plan


def test_tile_plan_counts_padding_rows():
    from visattn.kernels.triton.bilevel_routing_attention import tile_plan

    # 5x5 map in 2x2 regions of 3x3 slots: 36 slots, 25 real; one 64-row tile
    plan = tile_plan((1, 5, 5, 1, 8), 2, 1, interpreted=False)
    assert (plan.tokens, plan.rows, plan.block, plan.tiles) == (9, 36, 64, 1)
    assert plan.real_rows_per_tile().tolist() == [25]
    assert plan.real_fraction == plan.worst == 25 / 64


@pytest.mark.parametrize("h,w,s,topk", [(4, 4, 7, 1), (4, 4, 7, -1), (5, 3, 4, 6), (2, 1, 3, 2)])
def test_maps_smaller_than_the_grid_route_real_regions_first(h, w, s, topk):
    q, k, v = _inputs(1, h, w, 2, 4, grad=True)
    out, routing = bilevel_routing_attention(q, k, v, s, topk, return_routing=True, backend="torch")
    rh, rw = math.ceil(h / s), math.ceil(w / s)
    real = {(y // rh) * s + x // rw for y in range(h) for x in range(w)}
    n_real = min(len(real), routing.shape[-1])
    assert all(set(row[:n_real].tolist()) <= real for row in routing[0])
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(t.isfinite().all() for t in (out, *grads))
    assert grads[2].abs().sum() > 0  # (top-1 over one-token regions is a copy of v: dq = dk = 0)


def test_triton_reads_strided_views_in_place():
    # The model splits one qkv projection into q/k/v views; the kernels take them as they are.
    qkv = torch.randn(1, 8, 8, 2 * 32 + 32, requires_grad=True)
    q, k, v = (t.unflatten(-1, (2, 16)) for t in qkv.split([32, 32, 32], dim=-1))
    assert not q.is_contiguous()
    out = bilevel_routing_attention(q, k, v, 2, 2, scale=32**-0.5, backend="triton")
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    ref = bilevel_routing_attention(q, k, v, 2, 2, scale=32**-0.5, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), qkv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_custom_op_opcheck_and_compile():
    q, k, v = _inputs(1, 4, 4, 1, 16, dtype=torch.float32, grad=True)
    routing = routing_indices(q, k, 2, 2, 0.25)
    torch.library.opcheck(
        torch.ops.visattn.bilevel_routing_attention_fwd.default, (q, k, v, routing, 2, 0.25)
    )
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q, k, v: bilevel_routing_attention(q, k, v, 2, 2, scale=0.25, backend="triton"),
        backend="eager",
        fullgraph=True,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(q, k, v), bilevel_routing_attention_reference(q, k, v, routing, 2, 0.25)
        )


def test_auto_backend_is_the_reference_on_cpu(monkeypatch):
    def no_triton(*args):
        raise AssertionError("auto must not pick Triton for CPU tensors")

    # float32, which the Triton kernels would take (float64 falls back to the reference anyway)
    monkeypatch.setattr(
        sys.modules["visattn.kernels.ops.bilevel_routing_attention"], "_triton_fwd", no_triton
    )
    q, k, v = _inputs(1, 4, 4, 1, 4, dtype=torch.float32)
    torch.testing.assert_close(
        bilevel_routing_attention(q, k, v, 2, 1), bilevel_routing_attention(q, k, v, 2, 1, backend="torch")
    )
    if interpreter_enabled():  # the patch is live: an explicit Triton request reaches it
        with pytest.raises(AssertionError, match="must not pick Triton"):
            bilevel_routing_attention(q, k, v, 2, 1, backend="triton")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.zeros(1, 4, 4, 4, dtype=torch.float64)), "5-D"),
        (dict(k=torch.zeros(1, 4, 4, 1, 3, dtype=torch.float64)), "k has shape"),
        (dict(v=torch.zeros(1, 4, 5, 1, 4, dtype=torch.float64)), "v must share"),
        (dict(v=torch.zeros(1, 4, 4, 1, 4, dtype=torch.float32)), "dtype"),
        (dict(q=torch.zeros(1, 4, 4, 1, 4, dtype=torch.int64)), "float"),
        (dict(num_regions=0), "positive int"),
        (dict(topk=0), "topk"),
        (dict(topk=-2), "topk"),
        (dict(scale=-1.0), "scale"),
        (dict(backend="cuda"), "backend"),
        (dict(backend="triton"), "float64"),
    ],
)
def test_errors(change, match):
    q, k, v = _inputs(1, 4, 4, 1, 4)
    args = dict(q=q, k=k, v=v, num_regions=2, topk=1, scale=None, backend="torch")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        bilevel_routing_attention(**args)


def test_triton_limits_raise_or_fall_back(monkeypatch):
    from visattn.kernels.ops import dispatch

    q, k, v = _inputs(1, 4, 4, 1, 4, dv=257, dtype=torch.float32)
    # as on CUDA tensors: dispatch picks Triton for both "triton" and "auto"
    monkeypatch.setattr(dispatch, "cuda_tensors", lambda *tensors: True)
    with pytest.raises(ValueError, match="head dims <= 256"):
        bilevel_routing_attention(q, k, v, 2, 1, backend="triton")
    # the kernels index token rows of all (batch, head, region) segments in int32
    huge = torch.zeros(1, 1, 1, 1, 4).expand(2**16, 64, 64, 8, 4)
    with pytest.raises(ValueError, match="padded H \\* W < 2\\*\\*31"):
        bilevel_routing_attention(huge, huge, huge, 8, 1, backend="triton")
    # auto falls back to the PyTorch path instead of failing
    torch.testing.assert_close(
        bilevel_routing_attention(q, k, v, 2, 1), bilevel_routing_attention(q, k, v, 2, 1, backend="torch")
    )


def test_benchmark_baseline_computes_the_same_attention():
    from visattn.bench.bra import official_style_bra

    q, k, v = _inputs(2, 6, 6, 2, 4, 3, grad=True)
    out = official_style_bra(q, k, v, 3, 4, 0.5)
    torch.testing.assert_close(out, bilevel_routing_attention(q, k, v, 3, 4, scale=0.5, backend="torch"))
    assert all(g is not None for g in torch.autograd.grad(out.sum(), (q, k, v)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("size,s,topk", [(56, 7, 1), (28, 7, 4), (14, 7, 16), (30, 7, 4)])
def test_triton_cuda_matches_reference(dtype, size, s, topk):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, size, size, 4, 32, generator=gen).cuda() for _ in range(3))
    grad_out = torch.randn(2, size, size, 4, 32, generator=gen).cuda()
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref, routing = bilevel_routing_attention(*ref_in, s, topk, return_routing=True, backend="torch")
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    ins = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, got_routing = bilevel_routing_attention(*ins, s, topk, return_routing=True, backend="triton")
    grads = torch.autograd.grad(out, ins, grad_out.to(dtype))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    if dtype == torch.float32:  # low-precision region means may reorder near-ties of the routing
        torch.testing.assert_close(got_routing, routing)
    else:
        ref_in = [t.detach().requires_grad_(True) for t in ins]
        ref = bilevel_routing_attention(*[t.float() for t in ref_in], s, topk, backend="torch")
        ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), rg.float(), **tol)
