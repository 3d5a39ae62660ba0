"""AgentSD's step schedule: the merge settings of each phase of the denoising steps, and the state the
processors of one UNet share (step counter, latent size, RNG of the dst tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AGENTSD_SCHEDULE", "AgentSDPhase", "AgentSDState"]


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


class AgentSDState:
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
