"""Neighborhood attention on CPU (and any device) as query tiles with their key halo through SDPA.

The reference gathers the ``prod(kernel_size)`` keys of every query, which makes it many times slower
than dense attention. Here the tokens are cut into boxes of query positions per dilation group; the
keys of all their windows lie in one box ``T + k - 1`` wide per dim (window starts move by at most one
per query), so each tile is one small dense attention, masked to the exact windows (and carrying the
relative positional bias as an additive mask), and all tiles go through one batched
``torch.nn.functional.scaled_dot_product_attention`` call. Exact: the same keys and the same softmax
as the reference; autograd goes through SDPA. Where a tile would hold about the whole dim the dim is
one tile (dense masked attention).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from visattn.kernels.reference.neighborhood_attention import window_indices

QUERY_TILE = 8  # query positions per dim and tile (a 2-D tile: 64 queries, 14 x 14 keys at k=7)


def _dim_tiles(length: int, k: int, dil: int, causal: bool, tile: int):
    """Tiles along one dim: ``(query [n, T], key [n, Kb], allowed [n, T, Kb], rel [n, T, Kb], pick [L])``.

    ``pick[i]`` is the flat ``tile * T + row`` that computes position ``i`` (the last tile of a group
    is moved back to end at the group's end, so some positions sit in two tiles)."""
    key, valid, _ = window_indices(length, k, dil, causal)
    group_len = [len(range(r, length, dil)) for r in range(dil)]
    g_min = min(group_len)
    t = max(1, min(tile, g_min - k + 1))
    kb = min(t + k - 1, g_min)
    if len(set(group_len)) == 1 and tile + k - 1 >= g_min:
        t = kb = g_min  # the whole group: one dense masked tile
    queries, keys = [], []
    for r in range(dil):
        g = group_len[r]
        starts = list(range(0, g - t + 1, t))
        if starts[-1] + t < g:
            starts.append(g - t)
        for a in starts:
            first = int(key[r + dil * a, 0]) // dil  # window start (group coordinate) of the first query
            b = min(first, g - kb)
            queries.append([r + dil * (a + i) for i in range(t)])
            keys.append([r + dil * (b + u) for u in range(kb)])
    query, keyb = torch.tensor(queries), torch.tensor(keys)
    win = key[query]  # [n, T, k] key positions of each query's window
    ok = valid[query]
    allowed = ((win[..., None] == keyb[:, None, None, :]) & ok[..., None]).any(2)  # [n, T, Kb]
    group_q, group_k = query // dil, keyb // dil
    rel = (group_k[:, None, :] - group_q[:, :, None] + k - 1).clamp(0, 2 * k - 2)
    pick = torch.empty(length, dtype=torch.long)
    pick[query.flatten()] = torch.arange(query.numel())
    return query, keyb, allowed, rel, pick


@functools.lru_cache(maxsize=64)
def _tables(spatial: tuple, kernel_size: tuple, dilation: tuple, is_causal: tuple, tile: int):
    """Product of the per-dim tiles over all dims (CPU tensors, flat token ids in row-major order):
    ``query [n, Tq]``, ``key [n, Tk]``, ``allowed [n, Tq, Tk]``, ``rel [n, Tq, Tk]`` (flat rpb index),
    ``pick [N]`` (flat ``tile * Tq + row`` of each token)."""
    query = key = torch.zeros((1, 1), dtype=torch.long)
    allowed = torch.ones((1, 1, 1), dtype=torch.bool)
    rel = torch.zeros((1, 1, 1), dtype=torch.long)
    pick = torch.zeros(1, dtype=torch.long)
    rows = 1
    for length, k, dil, causal in zip(spatial, kernel_size, dilation, is_causal):
        q_d, k_d, a_d, r_d, p_d = _dim_tiles(length, k, dil, causal, tile)
        n, t = q_d.shape
        # tiles of the dims so far x tiles of this dim; rows and keys likewise, row-major
        query = (query[:, None, :, None] * length + q_d[None, :, None, :]).flatten(0, 1).flatten(1, 2)
        key = (key[:, None, :, None] * length + k_d[None, :, None, :]).flatten(0, 1).flatten(1, 2)
        allowed = allowed[:, None, :, None, :, None] & a_d[None, :, None, :, None, :]
        allowed = allowed.flatten(0, 1).flatten(1, 2).flatten(2, 3)
        rel = rel[:, None, :, None, :, None] * (2 * k - 1) + r_d[None, :, None, :, None, :]
        rel = rel.flatten(0, 1).flatten(1, 2).flatten(2, 3)
        tile_id = (pick // rows)[:, None] * n + (p_d // t)[None, :]
        row_id = (pick % rows)[:, None] * t + (p_d % t)[None, :]
        rows *= t
        pick = (tile_id * rows + row_id).flatten()
    return query, key, allowed, rel, pick


def neighborhood_attention_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    rpb: torch.Tensor | None,
    scale: float,
    tile: int = QUERY_TILE,
) -> torch.Tensor:
    """Same arguments and result as ``neighborhood_attention_reference`` (validated inputs)."""
    batch, *spatial, heads, head_dim = q.shape
    spatial = tuple(spatial)
    query, key, allowed, rel, pick = (
        t.to(q.device) for t in _tables(spatial, kernel_size, dilation, is_causal, tile)
    )
    compute = torch.promote_types(q.dtype, torch.float32)
    tokens = math.prod(spatial)
    n, tq, tk = allowed.shape

    def tiles(x, idx):  # [B, *spatial, H, D] -> [B, H * tiles, len(idx row), D]
        flat = x.reshape(batch, tokens, heads, -1).to(compute)
        if idx.shape[0] > 1 or idx.shape[1] < tokens:  # index_select on the token-major layout is fast
            flat = flat.index_select(1, idx.flatten())
        return flat.unflatten(1, idx.shape).permute(0, 3, 1, 2, 4).flatten(1, 2)

    # [B, H * tiles, Tq or Tk, D]: 4-D with an additive float mask keeps SDPA on its fused CPU kernel
    qt, kt, vt = tiles(q, query), tiles(k, key), tiles(v, key)
    if rpb is None:
        mask = torch.zeros(allowed.shape, dtype=compute, device=q.device).expand(heads, n, tq, tk)
    else:
        mask = rpb.reshape(heads, -1).to(compute)[:, rel]  # [H, tiles, Tq, Tk]
    # a 4-D mask: SDPA sends a 3-D one to its unfused math path
    mask = mask.masked_fill(~allowed, float("-inf")).reshape(1, heads * n, tq, tk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    out = out.unflatten(1, (heads, n)).flatten(2, 3)[:, :, pick]  # [B, H, N, D]
    return out.transpose(1, 2).reshape(q.shape).to(q.dtype)
