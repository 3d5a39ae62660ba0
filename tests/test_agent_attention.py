"""visattn.kernels.agent_attention: reference, Triton (interpreter on CPU) and errors."""

import pytest
import torch
import torch.nn.functional as F

from visattn.kernels import agent_attention


def _inputs(b=2, nq=20, nk=24, h=2, d=8, dv=8, a=5, dtype=torch.float32, bias_batch=1, requires_grad=False):
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (
            (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)
            .to(dtype)
            .requires_grad_(requires_grad)
        )

    q, k, v, agent = r(b, nq, h, d), r(b, nk, h, d), r(b, nk, h, dv), r(b, a, h, d)
    agent_bias = r(bias_batch, h, a, nk, scale=0.5)
    query_bias = r(bias_batch, h, nq, a, scale=0.5)
    return q, k, v, agent, agent_bias, query_bias


def _sdpa_agent(q, k, v, agent, scale, agent_bias, query_bias):
    """The same two steps written with torch's scaled_dot_product_attention (independent check)."""
    qh, kh, vh, ah = (t.transpose(1, 2) for t in (q, k, v, agent))
    agent_v = F.scaled_dot_product_attention(ah, kh, vh, attn_mask=agent_bias, scale=scale)
    return F.scaled_dot_product_attention(qh, ah, agent_v, attn_mask=query_bias, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("bias_batch", [1, 2])
def test_reference_matches_sdpa(bias_batch):
    q, k, v, agent, ab, qb = _inputs(dtype=torch.float64, dv=6, bias_batch=bias_batch)
    out = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend="torch")
    assert out.shape == (2, 20, 2, 6)
    torch.testing.assert_close(out, _sdpa_agent(q, k, v, agent, 8**-0.5, ab, qb))
    out = agent_attention(q, k, v, agent, scale=0.3, backend="torch")
    torch.testing.assert_close(out, _sdpa_agent(q, k, v, agent, 0.3, None, None))


def test_reference_gradcheck_float64():
    q, k, v, agent, ab, qb = _inputs(
        b=1, nq=5, nk=6, h=1, d=3, dv=2, a=3, dtype=torch.float64, requires_grad=True
    )
    assert torch.autograd.gradcheck(
        lambda *t: agent_attention(*t[:4], agent_bias=t[4], query_bias=t[5], backend="torch"),
        (q, k, v, agent, ab, qb),
    )


def test_errors():
    q, k, v, agent, ab, qb = _inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        agent_attention(q, k, v, agent, backend="cuda")
    with pytest.raises(ValueError, match="q must be laid out as"):
        agent_attention(q[0], k, v, agent)
    with pytest.raises(ValueError, match="k must be"):
        agent_attention(q, k[..., :4], v, agent)
    with pytest.raises(ValueError, match="v must be"):
        agent_attention(q, k, v[:, :3], agent)
    with pytest.raises(ValueError, match="agent must be"):
        agent_attention(q, k, v, agent[:, :, :1])
    with pytest.raises(ValueError, match="agent_bias must have shape"):
        agent_attention(q, k, v, agent, agent_bias=qb)
    with pytest.raises(ValueError, match="query_bias must have shape"):
        agent_attention(q, k, v, agent, query_bias=torch.zeros(3, 2, 20, 5))
    with pytest.raises(ValueError, match="dtype"):
        agent_attention(q, k.double(), v, agent)
    with pytest.raises(ValueError, match="scale must be"):
        agent_attention(q, k, v, agent, scale=-1.0)
    with pytest.raises(ValueError, match="empty input"):
        agent_attention(q, k, v, agent[:, :0])
