"""visual_sink_attention: redistribution rule, Triton (interpreter) vs reference, validation."""

import pytest
import torch

from visattn.kernels.ops.attention_with_key_mass import attention_with_key_mass
from visattn.kernels.ops.visual_sink_attention import visual_sink_attention
from visattn.kernels.reference.visual_sink_attention import redistribute


def _inputs(nq=40, nk=40, dtype=torch.float32, dim=16, dv=8):
    q = torch.randn(2, nq, 4, dim, dtype=dtype)
    k = torch.randn(2, nk, 2, dim, dtype=dtype)
    v = torch.randn(2, nk, 2, dv, dtype=dtype)
    category = torch.zeros(2, nk, dtype=torch.long)
    category[:, 2:20] = 3  # image span
    category[:, 5] = 2  # visual sinks
    category[:, 0] = 1  # BOS text sink
    k[:, 5] = k[:, 5] * 0 + q[:, :, ::2].mean(1)  # make the sinks attractive
    query_mask = torch.zeros(2, nq, dtype=torch.bool)
    query_mask[:, nq - 15 :] = True
    return q, k, v, category, query_mask


def test_redistribution_rule_preserves_rows_and_moves_sink_mass():
    probs = torch.rand(2, 3, 6, 8).softmax(-1)
    category = torch.tensor([[1, 2, 3, 3, 3, 0, 0, 0], [0, 3, 3, 2, 3, 3, 0, 1]])
    query_mask = torch.ones(2, 6, dtype=torch.bool)
    out = redistribute(probs, category, query_mask, fraction=0.4, rho=0.0, min_image_attention=0.0)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 6))
    sink = (category == 1) | (category == 2)
    torch.testing.assert_close(out * sink[:, None, None], 0.6 * probs * sink[:, None, None])
    other = category == 0
    torch.testing.assert_close(out * other[:, None, None], probs * other[:, None, None])
    # the freed 40% of the sink mass goes to the non-sink image tokens in proportion to their weights
    image = (category == 3)[:, None, None]
    freed = 0.4 * (probs * sink[:, None, None]).sum(-1, keepdim=True)
    share = probs * image / (probs * image).sum(-1, keepdim=True)
    torch.testing.assert_close(out * image, probs * image + freed * share)
    # rows failing the image-centric test are untouched
    strict = redistribute(probs, category, query_mask, fraction=0.4, rho=1.0, min_image_attention=0.99)
    torch.testing.assert_close(strict, probs)


def test_image_centric_rows_by_the_official_thresholds():
    # keys: BOS text sink, visual sink, two image tokens, one other token
    category = torch.tensor([[1, 2, 3, 3, 0]])
    probs = torch.tensor(
        [
            [0.30, 0.10, 0.20, 0.10, 0.30],  # image 0.4 >= 0.2, non-sink share 0.75 >= 0.5: chosen
            [0.30, 0.21, 0.05, 0.04, 0.40],  # image 0.3, non-sink share 0.3 < 0.5: untouched
            [0.50, 0.02, 0.05, 0.03, 0.40],  # image 0.1 < 0.2: untouched
        ]
    )[None, None]
    out = redistribute(probs, category, torch.ones(1, 3, dtype=torch.bool), 0.4, 0.5, 0.2)
    torch.testing.assert_close(out[0, 0, 1:], probs[0, 0, 1:])
    freed = 0.4 * (0.30 + 0.10)
    expected = torch.tensor([0.18, 0.06, 0.20 + freed * 2 / 3, 0.10 + freed / 3, 0.30])
    torch.testing.assert_close(out[0, 0, 0], expected)
    query_off = redistribute(probs, category, torch.zeros(1, 3, dtype=torch.bool), 0.4, 0.5, 0.2)
    torch.testing.assert_close(query_off, probs)


def test_fraction_zero_is_plain_attention():
    q, k, v, category, query_mask = _inputs()
    out = visual_sink_attention(q, k, v, category, query_mask, fraction=0.0, causal=True, backend="torch")
    plain, _ = attention_with_key_mass(q, k, v, causal=True, backend="torch")
    torch.testing.assert_close(out, plain)
    moved = visual_sink_attention(q, k, v, category, query_mask, min_image_attention=0.0, causal=True)
    assert not torch.allclose(moved, plain)
    torch.testing.assert_close(moved[:, :25], plain[:, :25])  # queries outside query_mask


@pytest.mark.parametrize(
    "causal,mask_kind,nq",
    [
        (True, None, 40),
        (False, "bool", 40),
        (True, "float", 3),
        (True, "key_padding", 40),
        (True, "d128", 40),
    ],
)
def test_triton_matches_reference(causal, mask_kind, nq):
    # d128: LLaVA's head dim, where the launcher takes 32-row query tiles
    dims = dict(dim=128, dv=128) if mask_kind == "d128" else {}
    q, k, v, category, query_mask = _inputs(nq=nq, nk=70, **dims)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, nq, 70) > 0.2
    elif mask_kind == "key_padding":  # one row for all queries (flash attention's 2-D padding masks)
        mask = torch.rand(2, 1, 1, 70) > 0.2
        full = visual_sink_attention(
            q, k, v, category, query_mask, attn_mask=mask.expand(2, 1, nq, 70), causal=causal, backend="torch"
        )
        row = visual_sink_attention(
            q, k, v, category, query_mask, attn_mask=mask, causal=causal, backend="torch"
        )
        torch.testing.assert_close(row, full)
    elif mask_kind == "float":
        mask = torch.where(torch.rand(1, 4, nq, 70) > 0.2, 0.0, -1e4)
    kw = dict(fraction=0.5, rho=0.3, min_image_attention=0.1, attn_mask=mask, causal=causal)
    ref = visual_sink_attention(q, k, v, category, query_mask, backend="torch", **kw)
    tri = visual_sink_attention(q, k, v, category, query_mask, backend="triton", **kw)
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-4)


def test_opcheck_and_validation():
    q, k, v, category, query_mask = _inputs(nq=6, nk=6)
    args = (q, k, v, category.to(torch.int8), query_mask, 0.4, 0.5, 0.2, None, True, 0.25)
    torch.library.opcheck(torch.ops.visattn.visual_sink_attention_fwd.default, args)
    with pytest.raises(ValueError, match="category"):
        visual_sink_attention(q, k, v, category.float(), query_mask)
    with pytest.raises(ValueError, match="category values"):
        visual_sink_attention(q, k, v, category + 4, query_mask)
    with pytest.raises(ValueError, match="query_mask"):
        visual_sink_attention(q, k, v, category, query_mask[:, :2])
    with pytest.raises(ValueError, match="fraction"):
        visual_sink_attention(q, k, v, category, query_mask, fraction=1.5)
