"""Installing AgentSD on a diffusers UNet and removing it: the handle, the choice of attention modules,
argument checks, and the two forward pre-hooks (see :mod:`visattn.integrations.diffusers.processor`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from visattn.integrations.diffusers.processor import AgentSDAttnProcessor
from visattn.integrations.diffusers.schedule import AGENTSD_SCHEDULE, AgentSDPhase, AgentSDState
from visattn.integrations.handles import HandleRegistry

__all__ = ["AgentSDHandle", "agent_attention_targets", "apply_agent_attention", "remove_agent_attention"]


class AgentSDHandle:
    """Returned by :func:`apply_agent_attention`: the step counter, the pipeline callback and removal.

    Pass ``handle.callback`` as a pipeline's ``callback_on_step_end``: after denoising step ``i`` the
    counter becomes ``i + 1`` (back to 0 after the last step, ready for the next generation). As a
    context manager it removes AgentSD on exit::

        with apply_agent_attention(pipe) as handle:
            image = pipe(prompt, callback_on_step_end=handle.callback).images[0]
    """

    def __init__(self, unet: nn.Module, state: AgentSDState) -> None:
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
        _HANDLES.forget(self.unet, self)


_HANDLES: HandleRegistry[AgentSDHandle] = HandleRegistry("apply_agent_attention")


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
    handle = AgentSDHandle(unet, AgentSDState(phases, bool(use_rand), seed))
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
    _HANDLES.record(unet, handle)
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
