"""visattn.kernels.agent_attention: reference, Triton (interpreter on CPU) and errors."""

import math

import pytest
import torch

from visattn.kernels import agent_attention
from visattn.kernels.torch.agent_attention import agent_attention_sdpa

# Triton runs on the GPU when there is one, else under the CPU interpreter (tests/conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(
    b=2,
    nq=20,
    nk=24,
    h=2,
    d=8,
    dv=8,
    a=5,
    dtype=torch.float32,
    bias_batch=1,
    requires_grad=False,
    device="cpu",
):
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (
            (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)
            .to(device=device, dtype=dtype)
            .requires_grad_(requires_grad)
        )

    q, k, v, agent = r(b, nq, h, d), r(b, nk, h, d), r(b, nk, h, dv), r(b, a, h, d)
    agent_bias = r(bias_batch, h, a, nk, scale=0.5)
    query_bias = r(bias_batch, h, nq, a, scale=0.5)
    return q, k, v, agent, agent_bias, query_bias


@pytest.mark.parametrize("bias_batch", [1, 2])
def test_reference_matches_the_sdpa_composition(bias_batch):
    """The reference and the two-SDPA path (auto's fallback on CUDA) agree: two independent writings."""
    q, k, v, agent, ab, qb = _inputs(dtype=torch.float64, dv=6, bias_batch=bias_batch)
    out = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend="torch")
    assert out.shape == (2, 20, 2, 6)
    torch.testing.assert_close(out, agent_attention_sdpa(q, k, v, agent, 8**-0.5, ab, qb))
    out = agent_attention(q, k, v, agent, scale=0.3, backend="torch")
    torch.testing.assert_close(out, agent_attention_sdpa(q, k, v, agent, 0.3, None, None))


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


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], g)


@pytest.mark.parametrize(
    "case",
    [
        dict(bias_batch=1),
        dict(bias_batch=2, nq=33, nk=17, a=9, d=5, dv=3),  # odd sizes: every dim padded with masks
        dict(bias=False, nq=131, nk=140, a=16, h=1),  # two token tiles per (batch, head)
    ],
)
def test_triton_matches_reference(case):
    case = dict(case)
    with_bias = case.pop("bias", True)
    q, k, v, agent, ab, qb = _inputs(requires_grad=True, device=TRITON_DEVICE, **case)
    if not with_bias:
        ab = qb = None
    inputs = (q, k, v, agent, ab, qb)
    ours = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend="triton")
    ref = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend="torch")
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    for name, g_ours, g_ref in zip(
        ["q", "k", "v", "agent", "agent_bias", "query_bias"], _grads(ours, inputs), _grads(ref, inputs)
    ):
        torch.testing.assert_close(g_ours, g_ref, atol=5e-6, rtol=1e-5, msg=f"grad of {name}")


def test_triton_strided_inputs_and_fp16():
    # q/k/v as views into one fused projection (the layout the models pass), agents pooled from q
    x = torch.randn(2, 16, 3, 2, 8, dtype=torch.float16, device=TRITON_DEVICE)
    q, k, v = x.unbind(2)
    agent = q.reshape(2, 4, 4, 2, 8).mean(2)
    ours = agent_attention(q, k, v, agent, backend="triton")
    ref = agent_attention(q.float(), k.float(), v.float(), agent.float(), backend="torch")
    assert ours.dtype == torch.float16 and ours.is_contiguous()
    torch.testing.assert_close(ours.float(), ref, atol=2e-3, rtol=2e-3)


def test_triton_opcheck():
    q, k, v, agent, ab, qb = _inputs(nq=9, nk=11, a=4, requires_grad=True, device=TRITON_DEVICE)
    op = torch.ops.visattn.agent_attention_fwd.default
    torch.library.opcheck(op, (q, k, v, agent, ab, qb, 0.3))


def test_triton_errors():
    q, k, v, agent, ab, qb = _inputs(device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="at most 256 agents"):
        agent_attention(q, k, v, torch.zeros(2, 257, 2, 8, device=TRITON_DEVICE), backend="triton")
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        agent_attention(q.double(), k.double(), v.double(), agent.double(), backend="triton")


def test_bench_runs_on_cpu(capsys):
    from visattn.cli import main

    assert (
        main(["bench", "agent", "--device", "cpu", "--case", "pvt-t s4", "--batch", "1", "--iters", "1"]) == 0
    )
    table = capsys.readouterr().out
    assert "official-style" in table and "visattn torch" in table and "n/a" not in table


def test_auto_uses_sdpa_beyond_triton_limits(monkeypatch):
    from visattn.kernels.ops import dispatch
    from visattn.kernels.torch import agent_attention as module

    q, k, v, _, _, _ = _inputs()
    agent = torch.randn(2, 300, 2, 8)
    monkeypatch.setattr(dispatch, "cuda_tensors", lambda *tensors: True)  # as on a CUDA device
    sdpa_calls = []
    sdpa = module.F.scaled_dot_product_attention
    monkeypatch.setattr(
        module.F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw)
    )
    out = agent_attention(q, k, v, agent)
    assert len(sdpa_calls) == 2
    torch.testing.assert_close(out, agent_attention(q, k, v, agent, backend="torch"))
    with pytest.raises(ValueError, match="at most 256 agents"):
        agent_attention(q, k, v, agent, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 3136, 3, 32, 9), (8, 196, 12, 32, 49), (4, 197, 12, 64, 81)])
def test_triton_cuda_half_precision(dtype, shape):
    """Agent-Swin-T stage 1 / 3 and Agent-DeiT-B shapes on the GPU, against the float32 reference."""
    b, n, h, d, a = shape
    q, k, v, agent, ab, qb = _inputs(b, n, n, h, d, d, a, dtype=dtype, device="cuda", requires_grad=True)
    inputs = (q, k, v, agent, ab, qb)
    ours = agent_attention(*inputs[:4], agent_bias=ab, query_bias=qb, backend="triton")
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref = agent_attention(
        *ref_inputs[:4], agent_bias=ref_inputs[4], query_bias=ref_inputs[5], backend="torch"
    )
    torch.testing.assert_close(ours.float(), ref, atol=2e-2, rtol=2e-2)
    for g, g_ref in zip(_grads(ours, inputs), _grads(ref, ref_inputs)):
        scale = g_ref.abs().max().item() + 1e-6
        assert (g.float() - g_ref).abs().max().item() / scale < 3e-2


def test_triton_split_keys_forward():
    """Several programs per (batch, head) over the keys (as on a GPU with few heads), merged by lse."""
    from visattn.kernels.ops.dispatch import interpreter_enabled
    from visattn.kernels.triton.agent_attention import agent_attention_forward

    q, k, v, agent, ab, qb = _inputs(nq=10, nk=300, a=6, device=TRITON_DEVICE)
    out, agent_v, lse, _ = agent_attention_forward(
        q, k, v, agent, ab, qb, 8**-0.5, interpreter_enabled(), splits=3
    )
    torch.testing.assert_close(
        out, agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend="torch")
    )
    scores = torch.einsum("bahd,bnhd->bhan", agent * 8**-0.5, k) + ab
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1) / math.log(2))
    torch.testing.assert_close(agent_v, scores.softmax(-1) @ v.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gpu_tiles_at_49_agents(dtype):
    """The tiles the launchers pick on a GPU (``interpret=False``), run here under the interpreter: 49
    agents take 32-key tiles in the aggregation backward (four tiles of 100 keys, the last partial)."""
    from visattn.kernels.triton import agent_attention as tk

    assert tk._tile(100, 64, interpret=False, gpu_cap=32) == 32
    inputs = _inputs(b=1, nq=40, nk=100, h=1, d=32, dv=32, a=49, dtype=dtype, device=TRITON_DEVICE)
    q, k, v, agent, ab, qb = inputs
    out, agent_v, lse_a, lse_q = tk.agent_attention_forward(q, k, v, agent, ab, qb, 32**-0.5, False)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = tk.agent_attention_backward(
        dout, q, k, v, agent, ab, qb, out, agent_v, lse_a, lse_q, 32**-0.5, False
    )
    ref_inputs = [t.float().requires_grad_() for t in inputs]
    ra, rq = ref_inputs[4:]
    ref = agent_attention(*ref_inputs[:4], agent_bias=ra, query_bias=rq, backend="torch")
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout.float())
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    for name, g, g_ref in zip(["q", "k", "v", "agent", "agent_bias", "query_bias"], grads, ref_grads):
        scale = g_ref.abs().max().item()
        torch.testing.assert_close(g.float() / scale, g_ref / scale, **tol, msg=f"grad of {name}")
