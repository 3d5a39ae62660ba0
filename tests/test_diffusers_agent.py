"""AgentSD processors for diffusers UNets (visattn.integrations.diffusers), tiny UNets built from configs."""

import argparse
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from visattn.integrations.diffusers import (  # noqa: E402
    AGENTSD_SCHEDULE,
    AgentSDAttnProcessor,
    AgentSDPhase,
    agent_attention_targets,
    apply_agent_attention,
    bipartite_token_matching,
    remove_agent_attention,
)
from visattn.kernels.reference.agent_attention import agent_attention_reference  # noqa: E402

CROSS_DIM = 16


def tiny_unet(down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up=None) -> UNet2DConditionModel:
    up = up or tuple(b.replace("Down", "Up") for b in reversed(down))
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def unet_inputs(batch=2, size=16):
    return torch.randn(batch, 4, size, size), torch.tensor([10]), torch.randn(batch, 5, CROSS_DIM)


def run(unet, inputs):
    sample, t, ehs = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=ehs).sample


def hook_count(unet):
    return sum(len(m._forward_pre_hooks) for m in unet.modules())


# --------------------------------------------------------------------------------------------------
# Installation / removal
# --------------------------------------------------------------------------------------------------


def test_installs_on_highest_resolution_self_attention_only():
    unet = tiny_unet()
    before = dict(unet.attn_processors)
    classes = {name: type(m) for name, m in unet.named_modules()}
    handle = apply_agent_attention(unet)
    # no class swapping and no per-instance forward override: only processors and pre-hooks change
    assert {name: type(m) for name, m in unet.named_modules()} == classes
    assert not any("forward" in vars(m) for m in unet.modules())
    expected = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    }
    assert set(handle.processors) == expected
    for key, proc in unet.attn_processors.items():
        if key.removesuffix(".processor") in expected:
            assert isinstance(proc, AgentSDAttnProcessor) and proc.original is before[key]
        else:
            assert proc is before[key]
    # one UNet pre-hook + one pre-hook per targeted transformer block
    assert hook_count(unet) == 1 + len(expected)
    remove_agent_attention(unet)
    assert hook_count(unet) == 0
    assert all(unet.attn_processors[k] is p for k, p in before.items())


def test_sd15_targets_and_sdxl_style_needs_larger_max_downsample():
    cfg = dict(cross_attention_dim=768, attention_head_dim=8)  # SD 1.5: UNet2DConditionModel defaults
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**cfg)
    targets = agent_attention_targets(sd15)
    assert sorted(targets) == [
        f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)
    ] + [f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn1" for i in range(3)]
    assert set(targets.values()) == {1}
    assert len(agent_attention_targets(sd15, max_downsample=2)) == 10
    assert len(agent_attention_targets(sd15, max_downsample=8)) == 16  # every transformer block
    sd2 = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    with torch.device("meta"):
        assert agent_attention_targets(UNet2DConditionModel(**sd2)) == targets

    xl_style = tiny_unet(down=("DownBlock2D", "CrossAttnDownBlock2D"))  # no attention at full resolution
    with pytest.raises(ValueError, match="raise max_downsample"):
        apply_agent_attention(xl_style)
    handle = apply_agent_attention(xl_style, max_downsample=2)
    assert set(p.downsample for p in handle.processors.values()) == {2}
    out = run(xl_style, unet_inputs())
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_shape_dtype_and_remove_restores_bit_identical_outputs():
    unet = tiny_unet()
    inputs = unet_inputs()
    base = run(unet, inputs)
    apply_agent_attention(unet, seed=0, backend="torch")
    swapped = run(unet, inputs)
    assert swapped.shape == base.shape and swapped.dtype == base.dtype
    assert not torch.equal(swapped, base)  # the swap changes the computation
    apply_agent_attention(unet, AgentSDPhase(ratio=0.2, agent_ratio=0.9), backend="torch")  # re-apply
    assert remove_agent_attention(unet) is True
    assert torch.equal(run(unet, inputs), base)
    assert remove_agent_attention(unet) is False


def test_handle_is_a_context_manager_with_a_repr():
    unet = tiny_unet()
    inputs = unet_inputs()
    base = run(unet, inputs)
    with apply_agent_attention(unet, seed=0, backend="torch") as handle:
        assert repr(handle) == (
            "AgentSDHandle(3 self-attention modules, step 0, 2-phase schedule, now ratio=0.4 "
            "agent_ratio=0.95 sx=4 sy=4)"
        )
        assert not torch.equal(run(unet, inputs), base)
        handle.set_step(20)
        assert "step 20" in repr(handle) and "agent_ratio=0.5 sx=2 sy=2" in repr(handle)
    assert repr(handle) == "AgentSDHandle(removed)"
    assert torch.equal(run(unet, inputs), base) and remove_agent_attention(unet) is False


def test_phase_without_merging_or_agents_runs_the_original_processor():
    unet = tiny_unet()
    inputs = unet_inputs()
    base = run(unet, inputs)
    handle = apply_agent_attention(unet, AgentSDPhase(ratio=0.0, agent_ratio=0.0), backend="torch")
    calls = []
    for proc in handle.processors.values():
        original = proc.original
        proc.original = lambda *a, _o=original, **kw: calls.append(1) or _o(*a, **kw)
    assert torch.equal(run(unet, inputs), base)
    assert len(calls) == len(handle.processors)


def test_fp16_keeps_dtype():
    unet = tiny_unet().to(torch.float16)
    sample, t, ehs = unet_inputs()
    apply_agent_attention(unet, backend="torch", upcast=True)
    with torch.no_grad():
        out = unet(sample.half(), t, encoder_hidden_states=ehs.half()).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.cuda
def test_cuda_fp16_forward_and_removal():
    unet = tiny_unet().to("cuda", torch.float16)
    sample, t, ehs = (x.to("cuda") for x in unet_inputs())
    sample, ehs = sample.half(), ehs.half()
    base = run(unet, (sample, t, ehs))
    apply_agent_attention(unet, seed=0, backend="torch")
    out = run(unet, (sample, t, ehs))
    assert out.dtype == torch.float16 and out.shape == base.shape and torch.isfinite(out).all()
    remove_agent_attention(unet)
    assert torch.equal(run(unet, (sample, t, ehs)), base)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda u: apply_agent_attention(torch.nn.Linear(2, 2)), "UNet2DConditionModel"),
        (lambda u: apply_agent_attention(u, []), "non-empty"),
        (lambda u: apply_agent_attention(u, [AgentSDPhase(3)]), "begin at 0"),
        (lambda u: apply_agent_attention(u, [AgentSDPhase(0), AgentSDPhase(0)]), "increase strictly"),
        (lambda u: apply_agent_attention(u, max_downsample=0), "max_downsample"),
        (lambda u: apply_agent_attention(u, k_scale2=-1.0), "k_scale2"),
        (lambda u: apply_agent_attention(u, k_shortcut=float("nan")), "k_shortcut"),
        (lambda u: apply_agent_attention(u, backend="cuda"), "backend"),
        (lambda u: AgentSDPhase(ratio=1.0), "ratio"),
        (lambda u: AgentSDPhase(sx=0), "sx"),
        (lambda u: apply_agent_attention(u).set_step(-1), "step"),
    ],
)
def test_argument_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_unet())


# --------------------------------------------------------------------------------------------------
# The computation against hand-written AgentSD formulas
# --------------------------------------------------------------------------------------------------


def agentsd_by_hand(q, k, v, agent, scale, k_scale2, k_shortcut):
    """AgentSD (agentsd/patch.py AgentAttention.forward), per batch*head, written with einsum."""
    attn1 = torch.einsum("bhid,bhjd->bhij", agent, k).mul(scale).softmax(-1)
    agent_v = torch.einsum("bhij,bhjd->bhid", attn1, v)
    attn2 = torch.einsum("bhid,bhjd->bhij", q, agent).mul(scale**k_scale2).softmax(-1)
    return torch.einsum("bhij,bhjd->bhid", attn2, agent_v) + k_shortcut * v


def heads(x, n):  # [B, N, n*d] -> [B, n, N, d]
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def test_processor_attention_equals_kernel_reference_and_hand_formula():
    torch.manual_seed(1)
    attn = Attention(32, heads=4, dim_head=8, out_bias=True).double()
    phase = AgentSDPhase(ratio=0.0, agent_ratio=0.9)
    proc = apply_agent_attention(tiny_unet(), phase, backend="torch").processors[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    ]
    tokens, agent_tokens = torch.randn(2, 64, 32).double(), torch.randn(2, 6, 32).double()
    out = proc.attend(attn, tokens, agent_tokens)

    q, k, v = (t.view(2, -1, 4, 8) for t in (attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)))
    a = attn.to_q(agent_tokens).view(2, -1, 4, 8)
    s = 8**-0.5
    kernel = agent_attention_reference(q * s ** (0.3 - 1.0), k, v, a, s) + 0.075 * v
    torch.testing.assert_close(out, attn.to_out[0](kernel.reshape(2, 64, 32)), rtol=1e-12, atol=1e-12)

    by_hand = agentsd_by_hand(*(t.transpose(1, 2) for t in (q, k, v, a)), s, 0.3, 0.075).transpose(1, 2)
    torch.testing.assert_close(out, attn.to_out[0](by_hand.reshape(2, 64, 32)), rtol=1e-12, atol=1e-12)


def test_unet_self_attention_equals_agentsd_by_hand():
    """Through a UNet forward: capture block input, attn1 input and output; recompute AgentSD by hand."""
    unet = tiny_unet().double()
    phase = AgentSDPhase(ratio=0.0, agent_ratio=0.95, sx=4, sy=4)  # no ToMe merge: agents only
    handle = apply_agent_attention(unet, phase, use_rand=False, k_scale2=0.4, k_shortcut=0.1, backend="torch")
    path = "down_blocks.0.attentions.0.transformer_blocks.0"
    block = unet.get_submodule(path)
    seen = {}
    block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    block.attn1.register_forward_hook(lambda m, a, o: seen.update(y=a[0], out=o))
    run(unet, tuple(t.double() for t in unet_inputs()))
    assert handle.processors[f"{path}.attn1"].block_input is None  # consumed

    x, y, attn = seen["x"], seen["y"], block.attn1
    batch, n, c = y.shape  # 16x16 grid, one dst token (top-left) per 4x4 cell, every src merged
    grid = torch.arange(n).view(16, 16)
    dst = grid[::4, ::4].flatten()
    src = torch.tensor([i for i in range(n) if i not in set(dst.tolist())])
    unit = x / x.norm(dim=-1, keepdim=True)
    best = (unit[:, src] @ unit[:, dst].transpose(1, 2)).argmax(-1)  # [B, S]
    onehot = torch.nn.functional.one_hot(best, dst.numel()).double()  # [B, S, D]
    agents = (y[:, dst] + onehot.transpose(1, 2) @ y[:, src]) / (1 + onehot.sum(1))[..., None]

    nh = attn.heads
    q, k, v, a = (
        heads(f(t), nh) for f, t in ((attn.to_q, y), (attn.to_k, y), (attn.to_v, y), (attn.to_q, agents))
    )
    expected = agentsd_by_hand(q, k, v, a, attn.scale, 0.4, 0.1).transpose(1, 2).reshape(batch, n, c)
    torch.testing.assert_close(seen["out"], attn.to_out[0](expected), rtol=1e-10, atol=1e-10)


def brute_force_merge(metric, x, dst, r):
    """ToMe bipartite soft matching with Python loops.

    Returns the merged rows ``[B, N - r, C]`` (row order irrelevant) and, per token, the merged row it
    belongs to ``[B, N, C]`` (what unmerge must produce).
    """
    rows_all, per_token_all = [], []
    for b in range(x.shape[0]):
        src = [i for i in range(x.shape[1]) if i not in set(dst)]
        unit = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        best = {i: max(range(len(dst)), key=lambda j: float(unit[i] @ unit[dst[j]])) for i in src}
        score = {i: float(unit[i] @ unit[dst[best[i]]]) for i in src}
        merged = sorted(src, key=lambda i: -score[i])[:r]
        per_token = {i: x[b, i] for i in src if i not in merged}
        rows = list(per_token.values())
        for j, d in enumerate(dst):
            members = [d] + [i for i in merged if best[i] == j]
            row = x[b, members].mean(0)
            rows.append(row)
            per_token.update({i: row for i in members})
        rows_all.append(torch.stack(rows))
        per_token_all.append(torch.stack([per_token[i] for i in range(x.shape[1])]))
    return torch.stack(rows_all), torch.stack(per_token_all)


def sort_rows(t):
    return torch.stack([ti[ti[:, 0].argsort()] for ti in t])


def test_token_matching_merges_like_tome_and_unmerges():
    torch.manual_seed(2)
    h, w = 6, 10  # sx = sy = 4: two full cells (dst tokens 0 and 4); the rest, incl. rows 4-5, is src
    metric, x = torch.randn(2, h * w, 8).double(), torch.randn(2, h * w, 5).double()
    m = bipartite_token_matching(metric, h, w, 4, 4, r=20, agent_r=50)
    assert m.dst_idx.tolist() == [0, 4]
    merged, agents = m.merge(x)
    assert m.num_merged == 40 and m.num_agents == 10
    expected_rows, expected_tokens = brute_force_merge(metric, x, [0, 4], 20)
    torch.testing.assert_close(sort_rows(merged), sort_rows(expected_rows))
    torch.testing.assert_close(m.unmerge(merged), expected_tokens)
    torch.testing.assert_close(sort_rows(agents), sort_rows(brute_force_merge(metric, x, [0, 4], 50)[0]))
    # too few tokens saved for agents: 2 * (N - agent_r) must be < N - r, else ToMe only
    assert bipartite_token_matching(metric, h, w, 2, 2, r=20, agent_r=30).num_agents is None
    # a grid smaller than one cell has no dst token: nothing is merged, no agents
    small = bipartite_token_matching(metric[:, :6], 2, 3, 4, 4, r=3, agent_r=5)
    assert small.num_merged == 6 and small.num_agents is None
    assert torch.equal(small.merge(x[:, :6])[0], x[:, :6])


def test_processor_with_token_merging_equals_tome_then_agentsd_by_hand():
    """ToMe merge (r > 0) + agents + unmerge through the processor, against loops and einsum."""
    torch.manual_seed(3)
    attn = Attention(32, heads=4, dim_head=8, out_bias=True).double()
    handle = apply_agent_attention(
        tiny_unet(), AgentSDPhase(ratio=0.4, agent_ratio=0.95), use_rand=False, backend="torch"
    )
    proc = handle.processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    x, y = torch.randn(2, 64, 32).double(), torch.randn(2, 64, 32).double()  # block input, attn1 input
    proc.block_input = x
    out = proc(attn, y)  # no UNet call seen: the 64 tokens are an 8x8 grid

    dst = [0, 4, 32, 36]  # top-left of each 4x4 cell; r = int(64 * 0.4) = 25, agent_r = 60 (all src)
    merged, per_token = brute_force_merge(x, y, dst, 25)
    agents, _ = brute_force_merge(x, y, dst, 60)
    q, v_tok = heads(attn.to_q(per_token), 4), heads(attn.to_v(per_token), 4)
    k, v, a = heads(attn.to_k(merged), 4), heads(attn.to_v(merged), 4), heads(attn.to_q(agents), 4)
    agent_v = torch.einsum(
        "bhij,bhjd->bhid", torch.einsum("bhid,bhjd->bhij", a, k).mul(attn.scale).softmax(-1), v
    )
    probs = torch.einsum("bhid,bhjd->bhij", q, a).mul(attn.scale**0.3).softmax(-1)
    expected = torch.einsum("bhij,bhjd->bhid", probs, agent_v) + 0.075 * v_tok
    expected = attn.to_out[0](expected.transpose(1, 2).reshape(2, 64, 32))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def norm_attention(**kw):
    """A UNet-mid-block style Attention: 4-D input, group_norm, spatial_norm (temb), residual, rescale."""
    torch.manual_seed(4)
    kw = dict(dict(norm_num_groups=8, spatial_norm_dim=16, residual_connection=True), **kw)
    return Attention(32, heads=4, dim_head=8, out_bias=True, rescale_output_factor=2.0, **kw).double()


def agentsd_processor(phase):
    handle = apply_agent_attention(tiny_unet(), phase, use_rand=False, backend="torch")
    return handle.processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]


def test_processor_without_merging_matches_attn_processor_2_0_with_norms_and_4d_input():
    attn = norm_attention()
    x, temb = torch.randn(2, 32, 8, 8).double(), torch.randn(2, 16, 4, 4).double()  # temb: VAE latent
    proc = agentsd_processor(AgentSDPhase(ratio=0.0, agent_ratio=0.0))
    torch.testing.assert_close(
        proc(attn, x, temb=temb), AttnProcessor2_0()(attn, x, temb=temb), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "phase", [AgentSDPhase(ratio=0.4, agent_ratio=0.0), AgentSDPhase(ratio=0.4, agent_ratio=0.95)]
)
def test_processor_applies_spatial_and_group_norm_reshapes_and_rescales_like_attn_processor_2_0(phase):
    """Merging around an Attention with all of AttnProcessor2_0's extras equals merging the tokens those
    extras produce in a plain Attention of the same weights, then the 4-D reshape, residual and rescale."""
    attn = norm_attention()
    plain = Attention(32, heads=4, dim_head=8, out_bias=True).double()
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k in plain.state_dict()})
    x, temb = torch.randn(2, 32, 8, 8).double(), torch.randn(2, 16, 4, 4).double()  # temb: VAE latent
    tokens = attn.spatial_norm(x, temb).flatten(2).transpose(1, 2)
    tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
    proc = agentsd_processor(phase)
    expected = proc(plain, tokens).transpose(1, 2).reshape(x.shape)  # the 64 tokens: an 8x8 grid
    out = proc(attn, x, temb=temb)
    assert out.shape == x.shape
    torch.testing.assert_close(out, (expected + x) / 2.0, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, AttnProcessor2_0()(attn, x, temb=temb))  # merging did change it


def test_processor_refuses_inputs_that_are_neither_tokens_nor_images():
    proc = agentsd_processor(AgentSDPhase())
    with pytest.raises(ValueError, match=r"\[B, N, C\] or \[B, C, H, W\]"):
        proc(Attention(32, heads=4, dim_head=8), torch.randn(64, 32))


def test_random_dst_is_one_per_cell_and_seeded():
    metric = torch.randn(2, 64, 4)
    g = torch.Generator().manual_seed(0)
    m1 = bipartite_token_matching(metric, 8, 8, 2, 2, 10, 40, generator=g)
    cells = [(int(i) // 8 // 2, int(i) % 8 // 2) for i in m1.dst_idx]
    assert sorted(cells) == [(r, c) for r in range(4) for c in range(4)]
    m2 = bipartite_token_matching(metric, 8, 8, 2, 2, 10, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m1.dst_idx, m2.dst_idx)


# --------------------------------------------------------------------------------------------------
# Step schedule
# --------------------------------------------------------------------------------------------------


def test_default_schedule_is_agentsd_and_callback_advances_steps():
    early, late = AGENTSD_SCHEDULE
    assert (early.start_step, early.ratio, early.agent_ratio, early.sx, early.sy) == (0, 0.4, 0.95, 4, 4)
    assert (late.start_step, late.ratio, late.agent_ratio, late.sx, late.sy) == (20, 0.4, 0.5, 2, 2)
    handle = apply_agent_attention(tiny_unet())

    class Pipe:
        num_timesteps = 50

    kwargs = {"latents": torch.zeros(1)}
    for i in range(19):
        assert handle.callback(Pipe(), i, 999 - i, kwargs) is kwargs
    assert handle.step == 19 and handle.phase is early
    handle.callback(Pipe(), 19, 0, kwargs)
    assert handle.step == 20 and handle.phase is late
    handle.callback(Pipe(), 49, 0, kwargs)
    assert handle.step == 0 and handle.phase is early  # ready for the next generation


def test_pipeline_callback_switches_ratios_during_sampling():
    unet = tiny_unet()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    schedule = (AgentSDPhase(0, 0.4, 0.95, 4, 4), AgentSDPhase(2, 0.3, 0.5, 2, 2))
    inputs = unet_inputs()
    before, base = dict(unet.attn_processors), run(unet, inputs)
    handle = apply_agent_attention(pipe, schedule, seed=0, backend="torch")
    used = []
    proc = handle.processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1").register_forward_hook(
        lambda m, a, o: used.append((handle.phase, proc.state.latent_size))
    )
    embeds = torch.randn(1, 5, CROSS_DIM)
    latents = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.randn(1, 5, CROSS_DIM),
        num_inference_steps=3,
        height=128,
        width=128,  # vae=None -> scale factor 8 -> 16x16 latents
        output_type="latent",
        callback_on_step_end=handle.callback,
    ).images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()
    assert [p for p, _ in used] == [schedule[0], schedule[0], schedule[1]]  # step 2 starts phase 2
    assert {size for _, size in used} == {(16, 16)}
    assert handle.step == 0
    assert remove_agent_attention(pipe) is True  # through the pipeline as well
    assert all(unet.attn_processors[k] is p for k, p in before.items()) and hook_count(unet) == 0
    assert torch.equal(run(unet, inputs), base)


def test_non_square_latents_use_the_recorded_grid():
    unet = tiny_unet()
    handle = apply_agent_attention(unet, backend="torch")
    sample, t, ehs = unet_inputs()
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 12, 20), t, encoder_hidden_states=ehs).sample
    assert out.shape == (2, 4, 12, 20)
    assert handle.state.latent_size == (12, 20)
    assert math.prod(handle.processors[next(iter(handle.processors))].grid(240)) == 240


def test_sd_benchmark_runs_on_cpu(capsys):
    from visattn.bench import sd

    parser = argparse.ArgumentParser()
    sd.add_arguments(parser)
    args = parser.parse_args(
        ["--device", "cpu", "--latent", "8", "--batch", "2", "--warmup", "0", "--iters", "1"]
    )
    assert sd.run(args) == 0
    table = capsys.readouterr().out
    assert "stock processors" in table and "AgentSD early" in table and "unavailable" not in table
