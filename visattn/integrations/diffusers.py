"""Agent attention for Stable Diffusion UNets in diffusers (AgentSD, done with diffusers' processor API).

AgentSD (Han et al., "Agent Attention", ECCV 2024, section on Stable Diffusion; official code
LeapLabTHU/Agent-Attention, ``agentsd/``) accelerates a pretrained Stable Diffusion model without
training. It builds on ToMe for SD (Bolya & Hoffman, tomesd). In the self-attention of the
highest-resolution transformer blocks:

1. The block input ``x [B, N, C]`` is split into *dst* tokens (one per ``sy x sx`` cell of the latent
   grid, chosen at random when ``use_rand``) and *src* tokens (the rest). Every src token is matched
   to its most similar dst token (cosine similarity); the ``r = int(N * ratio)`` best-matched src tokens
   are averaged into their dst (bipartite soft matching). The self-attention runs on the ``N - r``
   merged tokens and its output is copied back to all ``N`` tokens.
2. The same matching with ``agent_r = int(N * agent_ratio)`` merges gives ``N - agent_r`` *agent
   tokens*. They are used only while ``2 * (N - agent_r) < N - r``; otherwise the step falls back to
   plain softmax attention on the merged tokens (ToMe only).
3. With ``Q, K, V`` of the merged tokens, ``A = to_q(agent tokens)`` and ``s = head_dim ** -0.5``::

       out = softmax(Q A^T * s ** k_scale2) softmax(A K^T * s) V + k_shortcut * V

   i.e. the query->agent softmax has its own, softer temperature (``k_scale2 = 0.3``) and the value
   shortcut ``k_shortcut = 0.075`` adds back part of ``V``.
4. The official usage re-patches the model during sampling: steps 0-19 use ``sx = sy = 4,
   ratio = 0.4, agent_ratio = 0.95``; from step 20 on ``sx = sy = 2, ratio = 0.4, agent_ratio = 0.5``
   (which leaves ToMe only at SD 1.5's 64x64 latents). :data:`AGENTSD_SCHEDULE` encodes that.

The official ``agentsd`` package swaps classes of LDM modules and never supported diffusers. Here the
same computation is installed with ``Attention.set_processor`` on the chosen ``attn1`` modules only;
two kinds of PyTorch forward pre-hooks collect what a processor cannot see by itself (the latent size
from the UNet input, and the transformer-block input that AgentSD uses as the matching metric). The
step schedule follows a step counter that the pipeline's ``callback_on_step_end`` advances::

    handle = apply_agent_attention(pipe)
    image = pipe(prompt, num_inference_steps=50, callback_on_step_end=handle.callback).images[0]
    remove_agent_attention(pipe)          # original processors back, bit-identical outputs

Agent attention itself is :func:`visattn.kernels.agent_attention`. That op has one ``scale`` for both
softmaxes; AgentSD's second temperature is applied by scaling the queries before the call:
``(Q * s ** (k_scale2 - 1)) A^T * s == Q A^T * s ** k_scale2``.

Differences from the official code, all deliberate: agent tokens are also formed when ``ratio == 0``
(agent attention without token merging; AgentSD returns before forming agents when nothing is merged);
the random dst choice draws from a CPU generator (seeded by ``seed``, or forked from the global RNG like
AgentSD); a self-attention call that carries an attention mask runs the original processor unchanged
(AgentSD prints "Mask not supported yet!" and ignores the mask).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visattn.kernels import agent_attention

__all__ = [
    "AGENTSD_SCHEDULE",
    "AgentSDAttnProcessor",
    "AgentSDHandle",
    "AgentSDPhase",
    "TokenMatching",
    "agent_attention_targets",
    "agentsd_attention",
    "apply_agent_attention",
    "bipartite_token_matching",
    "remove_agent_attention",
]


@dataclass(frozen=True)
class AgentSDPhase:
    """Merge settings used from denoising step ``start_step`` on (until the next phase starts).

    ``ratio``: fraction of tokens merged away before self-attention (ToMe); ``agent_ratio``: fraction
    merged away to form the agent tokens; ``sx``/``sy``: the dst-token stride on the latent grid.
    """

    start_step: int = 0
    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"AgentSDPhase: start_step must be an int >= 0, got {self.start_step!r}")
        for name in ("ratio", "agent_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"AgentSDPhase: {name} must be a number in [0, 1), got {value!r}")
        for name in ("sx", "sy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AgentSDPhase: {name} must be an int >= 1, got {value!r}")


# The official schedule (agentsd/README.md): agent attention + ToMe for the first 20 steps, then ToMe.
AGENTSD_SCHEDULE: tuple[AgentSDPhase, ...] = (
    AgentSDPhase(start_step=0, ratio=0.4, agent_ratio=0.95, sx=4, sy=4),
    AgentSDPhase(start_step=20, ratio=0.4, agent_ratio=0.5, sx=2, sy=2),
)


# --------------------------------------------------------------------------------------------------
# Token matching (bipartite soft matching on a 2-D grid, as in ToMe for SD)
# --------------------------------------------------------------------------------------------------


def _dst_and_src_indices(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raster indices of the dst tokens (one per full ``sy x sx`` cell) and of all other (src) tokens.

    Without a generator the dst token is the top-left one of its cell; with one it is drawn uniformly.
    Rows/columns beyond the last full cell are all src.
    """
    cells_y, cells_x = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(cells_y, cells_x, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (cells_y, cells_x), generator=generator, device=generator.device).cpu()
    rows = torch.arange(cells_y)[:, None] * sy + pick // sx
    cols = torch.arange(cells_x)[None, :] * sx + pick % sx
    is_dst = torch.zeros(h, w, dtype=torch.bool)
    is_dst[rows, cols] = True
    is_dst = is_dst.flatten()
    return is_dst.nonzero().squeeze(1).to(device), (~is_dst).nonzero().squeeze(1).to(device)


class TokenMatching:
    """The outcome of one bipartite soft matching of ``N`` tokens (see :func:`bipartite_token_matching`).

    ``merge(x [B, N, C])`` -> ``(merged [B, N - r, C], agents [B, N - agent_r, C] or None)``;
    ``unmerge(y [B, N - r, C])`` -> ``[B, N, C]`` (every merged-away token receives its dst's row).
    Merged rows are ``[unmerged src..., dst...]``; a dst row is the mean of the dst token and the src
    tokens merged into it.
    """

    def __init__(
        self,
        num_tokens: int,
        dst_idx: torch.Tensor,
        src_idx: torch.Tensor,
        order: torch.Tensor,
        best_dst: torch.Tensor,
        r: int,
        agent_r: int | None,
    ) -> None:
        self.num_tokens = num_tokens
        self.dst_idx, self.src_idx = dst_idx, src_idx
        self.order, self.best_dst = order, best_dst  # [B, S]: src by descending similarity; src -> dst
        self.r, self.agent_r = r, agent_r

    @property
    def num_merged(self) -> int:
        """Token count after merging, ``N - r``."""
        return self.num_tokens - self.r

    @property
    def num_agents(self) -> int | None:
        """Agent token count ``N - agent_r``, or ``None`` when this matching forms no agents."""
        return None if self.agent_r is None else self.num_tokens - self.agent_r

    def _reduce(self, x: torch.Tensor, r: int) -> torch.Tensor:
        """Average the ``r`` best-matched src rows of ``x [B, N, C]`` into their dst rows."""
        channels = x.shape[-1]
        src, dst = x[:, self.src_idx], x[:, self.dst_idx]
        kept = self.order[:, r:, None].expand(-1, -1, channels)
        moved = self.order[:, :r, None].expand(-1, -1, channels)
        target = self.best_dst.gather(1, self.order[:, :r])[..., None].expand(-1, -1, channels)
        dst = dst.scatter_reduce(1, target, src.gather(1, moved), reduce="mean", include_self=True)
        return torch.cat([src.gather(1, kept), dst], dim=1)

    def merge(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, N, C]`` -> merged tokens ``[B, N - r, C]`` and agent tokens ``[B, N - agent_r, C]``."""
        merged = x if self.r == 0 else self._reduce(x, self.r)
        agents = None if self.agent_r is None else self._reduce(x, self.agent_r)
        return merged, agents

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``y [B, N - r, C]`` (rows as returned by :meth:`merge`) -> ``[B, N, C]``."""
        if self.r == 0:
            return y
        batch, _, channels = y.shape
        num_kept = self.src_idx.numel() - self.r
        kept, dst = y[:, :num_kept], y[:, num_kept:]
        target = self.best_dst.gather(1, self.order[:, : self.r])[..., None].expand(-1, -1, channels)
        src = torch.empty(batch, self.src_idx.numel(), channels, dtype=y.dtype, device=y.device)
        src.scatter_(1, self.order[:, self.r :, None].expand(-1, -1, channels), kept)
        src.scatter_(1, self.order[:, : self.r, None].expand(-1, -1, channels), dst.gather(1, target))
        out = torch.empty(batch, self.num_tokens, channels, dtype=y.dtype, device=y.device)
        out[:, self.dst_idx] = dst
        out[:, self.src_idx] = src
        return out


@torch.no_grad()
def bipartite_token_matching(
    metric: torch.Tensor,
    h: int,
    w: int,
    sx: int,
    sy: int,
    r: int,
    agent_r: int,
    generator: torch.Generator | None = None,
) -> TokenMatching:
    """Match the tokens of an ``h x w`` grid for merging (ToMe for SD's bipartite soft matching).

    Args:
        metric: ``[B, N, C]`` with ``N == h * w``; cosine similarity of these rows decides the matching.
        sx, sy: one dst token per ``sy x sx`` cell (random with ``generator``, else the top-left one).
        r: src tokens merged away before attention (clipped to the src count).
        agent_r: src tokens merged away to form the agents (clipped to the src count). Agents are formed
            only when ``2 * (N - agent_r) < N - r``, as AgentSD does.
    """
    batch, num_tokens, _ = metric.shape
    if num_tokens != h * w:
        raise ValueError(f"bipartite_token_matching: metric has {num_tokens} tokens, grid is {h}x{w}")
    dst_idx, src_idx = _dst_and_src_indices(h, w, sx, sy, generator, metric.device)
    if dst_idx.numel() == 0:  # grid smaller than one cell: nothing can be matched
        empty = torch.zeros(batch, src_idx.numel(), dtype=torch.long, device=metric.device)
        return TokenMatching(num_tokens, dst_idx, src_idx, empty, empty, 0, None)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    similarity = unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)  # [B, S, D]
    best_sim, best_dst = similarity.max(dim=-1)
    order = best_sim.argsort(dim=-1, descending=True, stable=True)
    r = min(src_idx.numel(), r)
    agent_r = min(src_idx.numel(), agent_r)
    use_agents = 2 * (num_tokens - agent_r) < num_tokens - r
    return TokenMatching(num_tokens, dst_idx, src_idx, order, best_dst, r, agent_r if use_agents else None)


# --------------------------------------------------------------------------------------------------
# The attention computation
# --------------------------------------------------------------------------------------------------


def agentsd_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    scale: float,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    upcast: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """AgentSD's attention: ``softmax(q A^T s^k_scale2) softmax(A k^T s) v + k_shortcut v``.

    Shapes: q/k ``[B, N, H, D]``, v ``[B, N, H, Dv]``, agent ``[B, A, H, D]``; returns ``[B, N, H, Dv]``
    in the dtype of ``q``. ``upcast`` computes in float32 (AgentSD's ``attn_precision="fp32"``).
    The second temperature enters through the queries: ``(q s^(k_scale2 - 1)) A^T s = q A^T s^k_scale2``.
    """
    dtype = q.dtype
    if upcast:
        q, k, v, agent = (t.float() for t in (q, k, v, agent))
    out = agent_attention(q * scale ** (k_scale2 - 1.0), k, v, agent, scale=scale, backend=backend)
    return (out + k_shortcut * v).to(dtype)


class _AgentSDState:
    """What the processors of one UNet share: schedule, step counter, latent size, RNG."""

    def __init__(self, schedule: tuple[AgentSDPhase, ...], use_rand: bool, seed: int | None) -> None:
        self.schedule = schedule
        self.use_rand = use_rand
        self.seed = seed
        self.step = 0
        self.latent_size: tuple[int, int] | None = None
        self.generator: torch.Generator | None = None

    def phase(self) -> AgentSDPhase:
        """The phase whose range holds the current step."""
        return [p for p in self.schedule if p.start_step <= self.step][-1]

    def generator_for(self, batch: int) -> torch.Generator | None:
        """The RNG for random dst tokens, or ``None`` (top-left dst) when ``use_rand`` is off or the batch
        is odd (AgentSD: prompted and unprompted halves must share one pattern)."""
        if not self.use_rand or batch % 2 == 1:
            return None
        if self.generator is None:
            self.generator = torch.Generator()
            if self.seed is None:
                self.generator.set_state(torch.get_rng_state())
            else:
                self.generator.manual_seed(self.seed)
        return self.generator

    def capture_latent_size(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """UNet forward pre-hook: remember the latent ``(H, W)`` of ``sample [B, C, H, W]``."""
        sample = args[0] if args else kwargs["sample"]
        self.latent_size = (sample.shape[-2], sample.shape[-1])


class AgentSDAttnProcessor:
    """diffusers attention processor running AgentSD's self-attention (see the module docstring).

    Installed on the ``attn1`` of a transformer block that sees the latent downsampled ``downsample``
    times; ``original`` is the processor it replaced, used unchanged for calls AgentSD does not handle
    (cross-attention inputs, attention masks, 4-D inputs, or a phase that neither merges nor forms agents).
    """

    def __init__(
        self,
        state: _AgentSDState,
        downsample: int,
        original: Any,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        upcast: bool = False,
        backend: str = "auto",
    ) -> None:
        self.state = state
        self.downsample = downsample
        self.original = original
        self.k_scale2 = k_scale2
        self.k_shortcut = k_shortcut
        self.upcast = upcast
        self.backend = backend
        self.block_input: torch.Tensor | None = None

    def capture_block_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Transformer-block forward pre-hook: the block input is AgentSD's matching metric."""
        self.block_input = args[0] if args else kwargs.get("hidden_states")

    def grid(self, num_tokens: int) -> tuple[int, int]:
        """``(h, w)`` of the token grid: the latent size seen by the UNet hook divided by ``downsample``
        (rounded up, like SD's stride-2 convolutions), or a square grid when no UNet call was seen."""
        if self.state.latent_size is not None:
            height, width = self.state.latent_size
            h, w = math.ceil(height / self.downsample), math.ceil(width / self.downsample)
            if h * w != num_tokens:
                raise ValueError(
                    f"AgentSDAttnProcessor: {num_tokens} tokens do not form the {h}x{w} grid expected for "
                    f"a {height}x{width} latent downsampled {self.downsample}x"
                )
            return h, w
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"AgentSDAttnProcessor: called outside a UNet forward with {num_tokens} tokens, which are "
                "not a square grid; run it through the UNet so that the latent size is known"
            )
        return side, side

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``hidden_states [B, N, C]`` -> ``[B, N, C]``."""
        metric, self.block_input = self.block_input, None
        extra = dict(kwargs, temb=temb) if temb is not None else kwargs
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **extra,
            )
        if metric is None or metric.shape[:2] != hidden_states.shape[:2]:
            metric = hidden_states
        batch, num_tokens, _ = hidden_states.shape
        phase = self.state.phase()
        h, w = self.grid(num_tokens)
        matching = bipartite_token_matching(
            metric,
            h,
            w,
            phase.sx,
            phase.sy,
            int(num_tokens * phase.ratio),
            int(num_tokens * phase.agent_ratio),
            self.state.generator_for(batch),
        )
        if matching.r == 0 and matching.num_agents is None:
            return self.original(attn, hidden_states, **extra)
        tokens, agent_tokens = matching.merge(hidden_states)
        out = matching.unmerge(self.attend(attn, tokens, agent_tokens))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def attend(
        self, attn: nn.Module, tokens: torch.Tensor, agent_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """Self-attention of ``tokens [B, M, C]`` through the agents ``[B, A, C]`` (plain softmax
        attention when ``agent_tokens`` is ``None``), followed by ``attn.to_out``; returns ``[B, M, C]``."""
        batch, num, _ = tokens.shape
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, num, attn.heads, head_dim) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if agent_tokens is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=attn.scale
            ).transpose(1, 2)
        else:
            agent = attn.to_q(agent_tokens).view(batch, -1, attn.heads, head_dim)
            if attn.norm_q is not None:
                agent = attn.norm_q(agent)
            out = agentsd_attention(
                q, k, v, agent, attn.scale, self.k_scale2, self.k_shortcut, self.upcast, self.backend
            )
        out = attn.to_out[0](out.reshape(batch, num, -1).to(q.dtype))
        return attn.to_out[1](out)


# --------------------------------------------------------------------------------------------------
# Installing and removing
# --------------------------------------------------------------------------------------------------


class AgentSDHandle:
    """Returned by :func:`apply_agent_attention`: the step counter, the pipeline callback and removal.

    Pass ``handle.callback`` as a pipeline's ``callback_on_step_end``: after denoising step ``i`` the
    counter becomes ``i + 1`` (back to 0 after the last step, ready for the next generation). As a
    context manager it removes AgentSD on exit::

        with apply_agent_attention(pipe) as handle:
            image = pipe(prompt, callback_on_step_end=handle.callback).images[0]
    """

    def __init__(self, unet: nn.Module, state: _AgentSDState) -> None:
        self.unet = unet
        self.state = state
        self.processors: dict[str, AgentSDAttnProcessor] = {}
        self._originals: list[tuple[nn.Module, Any]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def step(self) -> int:
        """The denoising step the next UNet call belongs to."""
        return self.state.step

    @property
    def phase(self) -> AgentSDPhase:
        """The schedule phase used at the current step."""
        return self.state.phase()

    def set_step(self, step: int) -> None:
        """Set the step counter (e.g. from a custom sampling loop)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"AgentSDHandle.set_step: step must be an int >= 0, got {step!r}")
        self.state.step = step

    def callback(self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` for diffusers pipelines; returns ``callback_kwargs`` unchanged."""
        total = getattr(pipe, "num_timesteps", None)
        self.state.step = 0 if total is not None and step_index + 1 >= total else step_index + 1
        return callback_kwargs

    def __enter__(self) -> AgentSDHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        if not self.processors:
            return "AgentSDHandle(removed)"
        phase = self.phase
        return (
            f"AgentSDHandle({len(self.processors)} self-attention modules, step {self.step}, "
            f"{len(self.state.schedule)}-phase schedule, now ratio={phase.ratio} "
            f"agent_ratio={phase.agent_ratio} sx={phase.sx} sy={phase.sy})"
        )

    def remove(self) -> None:
        """Put the original processors back and drop the hooks (see :func:`remove_agent_attention`)."""
        for attn, original in self._originals:
            attn.set_processor(original)
        for hook in self._hooks:
            hook.remove()
        self._originals.clear()
        self._hooks.clear()
        self.processors.clear()
        if _HANDLES.get(self.unet) is self:
            del _HANDLES[self.unet]


_HANDLES: weakref.WeakKeyDictionary[nn.Module, AgentSDHandle] = weakref.WeakKeyDictionary()


def _resolve_unet(pipe_or_unet: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(
            "expected a diffusers UNet2DConditionModel or a pipeline holding one as `.unet`, "
            f"got {type(pipe_or_unet).__name__}"
        )
    return unet


def _downsample_of_blocks(unet: nn.Module) -> dict[str, int]:
    """Module-path prefix of each UNet block -> the factor (1, 2, 4, 8) its input is downsampled by."""
    factors, level = {}, 0
    for i, block in enumerate(unet.down_blocks):
        factors[f"down_blocks.{i}."] = 2**level
        level += getattr(block, "downsamplers", None) is not None
    factors["mid_block."] = 2**level
    for i, block in enumerate(unet.up_blocks):
        factors[f"up_blocks.{i}."] = 2**level
        level -= getattr(block, "upsamplers", None) is not None
    return factors


def agent_attention_targets(unet: nn.Module, max_downsample: int = 1) -> dict[str, int]:
    """Self-attention modules AgentSD acts on: path of each ``attn1`` -> its downsample factor.

    These are the ``attn1`` of the ``BasicTransformerBlock`` s whose input is downsampled by a factor of at
    most ``max_downsample`` (1: the latent's resolution, 2: half of it, then 4, 8; AgentSD default 1: the
    highest-resolution blocks, in SD 1.x/2.x the two of ``down_blocks.0`` and the three of ``up_blocks.3``),
    excluding blocks whose ``attn1`` is cross-attention.
    """
    from diffusers.models.attention import BasicTransformerBlock

    factors = _downsample_of_blocks(unet)
    targets = {}
    for name, module in unet.named_modules():
        if not isinstance(module, BasicTransformerBlock) or module.only_cross_attention:
            continue
        factor = next((f for prefix, f in factors.items() if name.startswith(prefix)), None)
        if factor is not None and factor <= max_downsample:
            targets[f"{name}.attn1"] = factor
    return targets


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"apply_agent_attention: {name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"apply_agent_attention: {name} must be {bound}, got {value!r}")
    return float(value)


def apply_agent_attention(
    pipe_or_unet: Any,
    schedule: AgentSDPhase | Sequence[AgentSDPhase] = AGENTSD_SCHEDULE,
    *,
    max_downsample: int = 1,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    use_rand: bool = True,
    seed: int | None = None,
    upcast: bool = False,
    backend: str = "auto",
) -> AgentSDHandle:
    """Install AgentSD processors on a ``UNet2DConditionModel`` (or ``pipe.unet``); returns a handle.

    Args:
        pipe_or_unet: a diffusers pipeline with ``.unet`` or the UNet itself.
        schedule: one phase, or phases sorted by ``start_step`` with the first at step 0; the default is
            the official two-phase schedule :data:`AGENTSD_SCHEDULE`. Advance steps with ``handle.callback``.
        max_downsample: act on transformer blocks whose input is downsampled by at most this factor
            (1: the latent's resolution, 2: half of it, then 4, 8; AgentSD: 1; SDXL has no attention at
            full resolution, use 2 there).
        k_scale2: the query->agent softmax uses ``scale ** k_scale2`` (AgentSD: 0.3).
        k_shortcut: weight of the ``V`` shortcut (AgentSD: 0.075).
        use_rand: random dst token per cell (off automatically for odd batches).
        seed: seed of the dst-token RNG; ``None`` forks the global CPU RNG at first use.
        upcast: run the agent attention in float32 (AgentSD's ``attn_precision="fp32"``, for SD 2.1).
        backend: backend of :func:`visattn.kernels.agent_attention`.

    A UNet that already has AgentSD installed is restored first, so calling this again re-configures it.
    """
    unet = _resolve_unet(pipe_or_unet)
    phases = (schedule,) if isinstance(schedule, AgentSDPhase) else tuple(schedule)
    if not phases or not all(isinstance(p, AgentSDPhase) for p in phases):
        raise ValueError(
            "apply_agent_attention: schedule must be an AgentSDPhase or a non-empty sequence of them"
        )
    starts = [p.start_step for p in phases]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(
            f"apply_agent_attention: schedule start steps must begin at 0 and increase strictly, got {starts}"
        )
    if isinstance(max_downsample, bool) or not isinstance(max_downsample, int) or max_downsample < 1:
        raise ValueError(f"apply_agent_attention: max_downsample must be an int >= 1, got {max_downsample!r}")
    k_scale2 = _check_number("k_scale2", k_scale2, 0.0)
    k_shortcut = _check_number("k_shortcut", k_shortcut, 0.0)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"apply_agent_attention: seed must be an int or None, got {seed!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(
            f"apply_agent_attention: backend must be 'auto', 'triton' or 'torch', got {backend!r}"
        )

    targets = agent_attention_targets(unet, max_downsample)
    if not targets:
        available = sorted(set(agent_attention_targets(unet, 2**30).values()))
        raise ValueError(
            f"apply_agent_attention: no self-attention block is downsampled at most {max_downsample}x "
            f"in this UNet; its transformer blocks are downsampled {available}x: raise max_downsample"
        )

    remove_agent_attention(unet)
    handle = AgentSDHandle(unet, _AgentSDState(phases, bool(use_rand), seed))
    handle._hooks.append(unet.register_forward_pre_hook(handle.state.capture_latent_size, with_kwargs=True))
    for path, factor in targets.items():
        attn = unet.get_submodule(path)
        block = unet.get_submodule(path.rsplit(".", 1)[0])
        processor = AgentSDAttnProcessor(
            handle.state, factor, attn.processor, k_scale2, k_shortcut, bool(upcast), backend
        )
        handle._originals.append((attn, attn.processor))
        attn.set_processor(processor)
        handle._hooks.append(block.register_forward_pre_hook(processor.capture_block_input, with_kwargs=True))
        handle.processors[path] = processor
    _HANDLES[unet] = handle
    return handle


def remove_agent_attention(pipe_or_unet: Any) -> bool:
    """Restore the processors that :func:`apply_agent_attention` replaced and remove its hooks.

    Returns ``True`` if AgentSD was installed. Afterwards the UNet computes exactly what it did before.
    """
    handle = _HANDLES.get(_resolve_unet(pipe_or_unet))
    if handle is None:
        return False
    handle.remove()
    return True
