"""Neighborhood attention on CPU (and any device) as query tiles with their key halo through SDPA.

The reference gathers the ``prod(kernel_size)`` keys of every query, which makes it many times slower
than dense attention. Here the tokens are cut into boxes of query positions per dilation group; the
keys of all their windows lie in one box at most ``T + k - 1`` wide per dim (window starts move by at
most one per query; less where the borders clamp the windows), so each tile is one small dense
attention, masked to the exact windows (and carrying the relative positional bias as an additive
mask), and all tiles go through one batched ``torch.nn.functional.scaled_dot_product_attention``
call. Exact: the same keys and the same softmax as the reference; autograd goes through SDPA.
``choose_tile`` picks the tile size per shape from a cost model; on small maps that is one dense
masked tile (no gather at all)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from visattn.kernels.reference.neighborhood_attention import window_indices

# query positions per dim and tile tried by ``choose_tile``; a tile at least as long as a dim makes
# that dim one dense masked tile
TILE_CANDIDATES = (4, 7, 8, 16, 32, 64, 1 << 30)
# SDPA's fused CPU kernel works in blocks of 32 query rows: a tile costs about (rows + 32) x (keys + 32)
BLOCK_PAD = 32
# one dense masked tile (no gather, no pick) wins unless tiling cuts that cost by more than this factor;
# measured on 2 CPU cores: 14x14 and 6x8x8 (k=7, k=3) faster dense at 1.2x and 1.9x less tiled work,
# 512 tokens (k=31) faster tiled at 3.1x
DENSE_FACTOR = 2.5


@functools.lru_cache(maxsize=256)
def _dim_layout(length: int, k: int, dil: int, causal: bool, tile: int):
    """Tiles along one dim: ``(T, Kb, [(residue, first query, first key), ...])`` in group coordinates."""
    key, valid, _ = window_indices(length, k, dil, causal)
    group_len = [len(range(r, length, dil)) for r in range(dil)]
    g_min = min(group_len)
    t = max(1, min(tile, g_min - k + 1))
    if len(set(group_len)) == 1 and tile + k - 1 >= g_min:
        t = g_min  # the whole group: one dense masked tile
    spans = []  # (residue, first query, lowest key, highest key)
    for r in range(dil):
        g = group_len[r]
        starts = list(range(0, g - t + 1, t))
        if starts[-1] + t < g:
            starts.append(g - t)
        for a in starts:
            rows = [r + dil * (a + i) for i in range(t)]
            used = key[rows][valid[rows]] // dil
            spans.append((r, a, int(used.min()), int(used.max())))
    # the key block covers the widest tile: at most t + k - 1, less where the borders clamp windows
    kb = max(hi - lo + 1 for _, _, lo, hi in spans)
    return t, kb, [(r, a, min(lo, group_len[r] - kb)) for r, a, lo, _ in spans]


@functools.lru_cache(maxsize=256)
def choose_tile(spatial: tuple, kernel_size: tuple, dilation: tuple, is_causal: tuple) -> int:
    """The ``TILE_CANDIDATES`` entry with the least padded SDPA work (see ``BLOCK_PAD``, ``DENSE_FACTOR``)."""

    def cost(tile):
        n = rows = keys = 1
        for dim in zip(spatial, kernel_size, dilation, is_causal):
            t, kb, starts = _dim_layout(*dim, tile)
            n, rows, keys = n * len(starts), rows * t, keys * kb
        return n * (rows + BLOCK_PAD) * (keys + BLOCK_PAD)

    dense = TILE_CANDIDATES[-1]
    best = min(TILE_CANDIDATES[:-1], key=cost)
    return dense if cost(dense) <= DENSE_FACTOR * cost(best) else best


def _dim_tiles(length: int, k: int, dil: int, causal: bool, tile: int):
    """Tiles along one dim: ``(query [n, T], key [n, Kb], allowed [n, T, Kb], rel [n, T, Kb], pick [L])``.

    ``pick[i]`` is the flat ``tile * T + row`` that computes position ``i`` (the last tile of a group
    is moved back to end at the group's end, so some positions sit in two tiles)."""
    key, valid, _ = window_indices(length, k, dil, causal)
    t, kb, starts = _dim_layout(length, k, dil, causal, tile)
    queries = [[r + dil * (a + i) for i in range(t)] for r, a, _ in starts]
    keys = [[r + dil * (b + u) for u in range(kb)] for r, _, b in starts]
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


@functools.lru_cache(maxsize=64)
def _plan(
    spatial: tuple, kernel_size: tuple, dilation: tuple, is_causal: tuple, tile: int, device: torch.device
):
    """``_tables`` on ``device``, plus what lets a call skip work: ``gather`` (``None`` when the one
    tile holds every token in order), ``window_mask [tiles, Tq, Tk]`` (0 inside a window, -inf
    outside, fp32; ``None`` when every query sees every key of its tile) and ``pick`` (``None`` when
    each token is computed once, in order)."""
    query, key, allowed, rel, pick = _tables(spatial, kernel_size, dilation, is_causal, tile)
    # decided on the CPU tables: reading device tensors would sync a GPU, and fails on the meta device
    tokens = math.prod(spatial)
    ordered = torch.arange(tokens)
    one_tile = query.shape[0] == 1 and query.shape[1] == tokens
    dense = one_tile and bool((query[0] == ordered).all()) and bool((key[0] == ordered).all())
    identity = pick.numel() == query.numel() and bool((pick == ordered).all())
    window_mask = None
    if not bool(allowed.all()):
        window_mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).to(device)
    gather = None if dense else (query.to(device), key.to(device))
    return gather, allowed.to(device), rel.to(device), window_mask, (None if identity else pick.to(device))


def neighborhood_attention_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    rpb: torch.Tensor | None,
    scale: float,
    tile: int | None = None,
) -> torch.Tensor:
    """Same arguments and result as ``neighborhood_attention_reference`` (validated inputs); ``tile``
    (query positions per dim) defaults to ``choose_tile``'s pick for the shape."""
    batch, *spatial, heads, head_dim = q.shape
    spatial = tuple(spatial)
    tile = tile or choose_tile(spatial, kernel_size, dilation, is_causal)
    gather, allowed, rel, window_mask, pick = _plan(spatial, kernel_size, dilation, is_causal, tile, q.device)
    compute = torch.promote_types(q.dtype, torch.float32)
    tokens = math.prod(spatial)
    n, tq, tk = allowed.shape

    def tiles(x, idx):  # [B, *spatial, H, D] -> [B, H * tiles, Tq or Tk, D]
        flat = x.reshape(batch, tokens, heads, -1).to(compute)
        if idx is None:  # one tile of every token in order: a view
            return flat.transpose(1, 2)
        # index_select on the token-major layout is fast
        return (
            flat.index_select(1, idx.flatten()).unflatten(1, idx.shape).permute(0, 3, 1, 2, 4).flatten(1, 2)
        )

    query, key = (None, None) if gather is None else gather
    # [B, H * tiles, Tq or Tk, D]; a 4-D additive float mask keeps SDPA on its fused CPU kernel (it sends
    # a 3-D one to the unfused math path)
    qt, kt, vt = tiles(q, query), tiles(k, key), tiles(v, key)
    if rpb is not None:
        mask = rpb.reshape(heads, -1).to(compute)[:, rel]  # [H, tiles, Tq, Tk]
        if window_mask is not None:
            mask = mask + window_mask
        mask = mask.reshape(1, heads * n, tq, tk)
    elif window_mask is not None and n == 1:
        mask = window_mask.to(compute)[None]  # [1, 1, Tq, Tk], broadcast over batch and heads
    elif window_mask is not None:
        mask = window_mask.to(compute).expand(heads, n, tq, tk).reshape(1, heads * n, tq, tk)
    else:
        mask = None  # every query sees every key of its tile
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    out = out.unflatten(1, (heads, n)).flatten(2, 3)  # [B, H, tiles * Tq, D]
    if pick is not None:
        out = out[:, :, pick]
    return out.transpose(1, 2).reshape(q.shape).to(q.dtype)
