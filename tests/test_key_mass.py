"""attention_with_key_mass: Triton (interpreter on CPU) and dense math vs the PyTorch reference."""

import pytest
import torch

from visattn.kernels.ops.attention_with_key_mass import attention_with_key_mass


def _dense(q, k, v, mask, causal):
    rep = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(rep, 2).double(), v.repeat_interleave(rep, 2).double()
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if causal:
        n = q.shape[1]
        s = s.masked_fill(torch.ones(n, k.shape[1], dtype=torch.bool).triu(1 + k.shape[1] - n), float("-inf"))
    p = s.softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), p


def _inputs(nq=37, nk=37, heads=4, kv_heads=2, dtype=torch.float32):
    q = torch.randn(2, nq, heads, 16, dtype=dtype)
    k = torch.randn(2, nk, kv_heads, 16, dtype=dtype)
    v = torch.randn(2, nk, kv_heads, 8, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("query_set", ["all", "last", "mask"])
def test_reference_matches_dense_attention(query_set):
    q, k, v = _inputs(dtype=torch.float64)
    mask = torch.rand(2, 1, 37, 37) > 0.3
    mask[..., 0] = True
    sel = torch.rand(2, 37) > 0.5 if query_set == "mask" else query_set
    out, mass = attention_with_key_mass(q, k, v, attn_mask=mask, causal=True, query_set=sel, backend="torch")
    ref_out, p = _dense(q, k, v, mask, causal=True)
    if query_set == "all":
        ref_mass = p.mean(dim=(1, 2))
    elif query_set == "last":
        ref_mass = p[:, :, -1].mean(1)
    else:
        w = sel.double() / sel.double().sum(1, keepdim=True)
        ref_mass = torch.einsum("bhqk,bq->bk", p, w) / p.shape[1]
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(mass.double(), ref_mass, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass.sum(1), torch.ones(2), atol=1e-5, rtol=0, check_dtype=False)


@pytest.mark.parametrize(
    "query_set,causal,mask_kind,nq",
    [
        ("all", True, None, 37),
        ("last", True, "bool", 37),
        ("mask", False, "float", 37),
        ("mask", True, None, 37),  # FastV "text"/"all" scoring of an unpadded prompt
        ("last", True, None, 5),
    ],
)
def test_triton_matches_reference(query_set, causal, mask_kind, nq):
    q, k, v = _inputs(nq=nq, nk=70)
    if mask_kind == "bool":
        mask = torch.rand(2, 1, nq, 70) > 0.3
    elif mask_kind == "float":
        mask = torch.where(torch.rand(1, 4, nq, 70) > 0.3, 0.0, torch.finfo(torch.float32).min)
    else:
        mask = None
    sel = torch.rand(2, nq) > 0.5 if query_set == "mask" else query_set
    ref = attention_with_key_mass(q, k, v, attn_mask=mask, causal=causal, query_set=sel, backend="torch")
    tri = attention_with_key_mass(q, k, v, attn_mask=mask, causal=causal, query_set=sel, backend="triton")
    torch.testing.assert_close(tri[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tri[1], ref[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mask_kind,nq", [(None, 37), ("bool", 37), ("float", 5), (None, 5)])
def test_auto_sdpa_path_for_last_query_matches_reference(mask_kind, nq):
    q, k, v = _inputs(nq=nq, nk=37)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, nq, 37) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.where(torch.rand(2, 4, nq, 37) > 0.3, 0.0, torch.finfo(torch.float32).min)
    sel = torch.zeros(2, nq, dtype=torch.bool)
    sel[:, -2:] = True
    for query_set in ("last", sel):
        ref = attention_with_key_mass(
            q, k, v, attn_mask=mask, causal=True, query_set=query_set, backend="torch"
        )
        auto = attention_with_key_mass(q, k, v, attn_mask=mask, causal=True, query_set=query_set)
        torch.testing.assert_close(auto[0], ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(auto[1], ref[1], atol=1e-6, rtol=1e-4)


def test_triton_half_precision():
    q, k, v = _inputs(dtype=torch.float16)
    ref = attention_with_key_mass(q.float(), k.float(), v.float(), causal=True, backend="torch")
    tri = attention_with_key_mass(q, k, v, causal=True, backend="triton")
    torch.testing.assert_close(tri[0].float(), ref[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(tri[1], ref[1], atol=2e-3, rtol=2e-2)


def test_opcheck():
    q, k, v = _inputs(nq=6, nk=6)
    w = torch.full((2, 6), 1 / 6)
    torch.library.opcheck(
        torch.ops.visattn.attention_with_key_mass_fwd.default, (q, k, v, w, None, True, 0.25, 0)
    )


def test_validation_errors():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="query_set"):
        attention_with_key_mass(q, k, v, query_set="first")
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        attention_with_key_mass(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="attn_mask"):
        attention_with_key_mass(q, k, v, attn_mask=torch.ones(2, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_tokens >= tokens"):
        attention_with_key_mass(q, k[:, :5], v[:, :5], causal=True)
    with pytest.raises(ValueError, match="bool of shape"):
        attention_with_key_mass(q, k, v, query_set=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("nq", [37, 5])
def test_key_padding_row_mask_equals_the_full_mask(nq):
    """A ``[B, 1, 1, Nk]`` mask (one row for all queries: how the adapter passes flash attention's 2-D
    padding masks, with ``causal``) gives what that row repeated over the queries gives, on every path,
    the reference also in several query chunks."""
    from visattn.kernels.reference.attention_with_key_mass import attention_with_key_mass_reference

    q, k, v = _inputs(nq=nq, nk=70)
    row = torch.rand(2, 1, 1, 70) > 0.3
    row[0, ..., :9] = False  # left padding of sample 0
    row[..., -1] = True
    full = row.expand(2, 1, nq, 70).contiguous()
    for query_set in ("last", "all"):
        ref = attention_with_key_mass(
            q, k, v, attn_mask=full, causal=True, query_set=query_set, backend="torch"
        )
        for backend in ("torch", "triton", "auto"):
            got = attention_with_key_mass(
                q, k, v, attn_mask=row, causal=True, query_set=query_set, backend=backend
            )
            torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-4)
    weight = torch.full((2, nq), 1.0 / nq)
    chunked = attention_with_key_mass_reference(q, k, v, weight, row, causal=True, chunk=4)
    whole = attention_with_key_mass_reference(q, k, v, weight, full, causal=True)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="or 1"):
        attention_with_key_mass(q, k, v, attn_mask=row.expand(2, 1, 2, 70))
