"""ToMe for SD's bipartite soft matching of the tokens of a 2-D grid (Bolya & Hoffman, tomesd), as AgentSD
uses it both to merge tokens before self-attention and to form its agent tokens."""

from __future__ import annotations

import torch

__all__ = ["TokenMatching", "bipartite_token_matching"]


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
