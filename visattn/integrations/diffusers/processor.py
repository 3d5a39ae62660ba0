"""AgentSD's diffusers attention processor: token merging, agents and unmerging around ``attn1``.

It does what diffusers' ``AttnProcessor2_0`` does around the attention itself: ``spatial_norm`` (with
``temb``), 4-D ``[B, C, H, W]`` inputs as ``H*W`` tokens and back, ``group_norm``, ``norm_q``/``norm_k``,
``to_out``, ``residual_connection`` and ``rescale_output_factor``. A call AgentSD has no merging for runs the
processor it replaced (``original``) unchanged: cross-attention (``encoder_hidden_states``, where
``norm_cross`` applies), an ``attention_mask`` (which ``original`` prepares with
``attn.prepare_attention_mask``), or a phase that neither merges tokens nor forms agents. Any input other
than ``[B, N, C]`` or ``[B, C, H, W]`` is refused with a ``ValueError``.

Why hooks: AgentSD matches tokens by the *transformer block's* input, which a processor never receives
(it gets ``norm1`` of it), and needs the latent size of the UNet call. The processor API passes nothing
else down but ``cross_attention_kwargs``, and diffusers hands those to every attention module of the
block, whose processors log a warning for each name they do not take. So two forward pre-hooks stay: the
UNet's records the latent size in the shared :class:`~visattn.integrations.diffusers.schedule.AgentSDState`,
and the block's hands its input to this processor (:attr:`AgentSDAttnProcessor.block_input`), which the very
next call takes and clears. Within a call the data flow one way: the tokens, their matching and the
attention result are passed down as values, never left on an object.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visattn.integrations.diffusers.agent_sd import agentsd_attention
from visattn.integrations.diffusers.schedule import AgentSDState
from visattn.integrations.diffusers.token_merging import bipartite_token_matching

__all__ = ["AgentSDAttnProcessor"]


class AgentSDAttnProcessor:
    """diffusers attention processor running AgentSD's self-attention (see the module docstring).

    Installed on the ``attn1`` of a transformer block that sees the latent downsampled ``downsample``
    times; ``original`` is the processor it replaced, used unchanged for calls AgentSD does not handle
    (cross-attention inputs, attention masks, or a phase that neither merges nor forms agents).
    """

    def __init__(
        self,
        state: AgentSDState,
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
        """``hidden_states [B, N, C]`` or ``[B, C, H, W]`` -> the same shape."""
        metric, self.block_input = self.block_input, None
        extra = dict(kwargs, temb=temb) if temb is not None else kwargs
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **extra,
            )
        if hidden_states.ndim not in (3, 4):
            raise ValueError(
                "AgentSDAttnProcessor: expected hidden_states [B, N, C] or [B, C, H, W], got shape "
                f"{tuple(hidden_states.shape)}"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            batch, channels, h, w = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, h * w).transpose(1, 2)
        else:
            h, w = self.grid(hidden_states.shape[1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if metric is None or metric.shape[:2] != hidden_states.shape[:2]:
            metric = hidden_states
        batch, num_tokens, _ = hidden_states.shape
        phase = self.state.phase()
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
            return self.original(attn, residual, **extra)
        tokens, agent_tokens = matching.merge(hidden_states)
        out = matching.unmerge(self.attend(attn, tokens, agent_tokens))
        if residual.ndim == 4:
            out = out.transpose(1, 2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
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
