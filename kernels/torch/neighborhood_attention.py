"""Neighborhood attention on CPU (and any device) as query tiles with their key halo through SDPA.

The reference gathers the ``prod(kernel_size)`` keys of every query, which makes it many times slower
than dense attention. Here the tokens are cut into boxes of query positions per dilation group; the
keys of all their windows lie in one box at most ``T + k - 1`` wide per dim (window starts move by at
most one per query; less where the borders clamp the windows), so each tile is one small dense
attention, masked to the exact windows (and carrying the relative positional bias as an additive
mask), and all tiles go through one batched ``torch.nn.functional.scaled_dot_product_attention``
call. Exact: the same keys and the same softmax as the reference; autograd goes through SDPA.
``choose_tile`` picks the tile size per shape from a cost model; on small maps that is one dense
masked tile (no gather at all), on some mid-sized ones bands along the first dim (contiguous token
ranges, one SDPA call each on views)."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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
# bands: tiles along the first dim only, each a contiguous range of query and of key tokens, so each runs
# as its own SDPA call on views (no gather, no copy); used when every band has at least this many query
# rows (SDPA's CPU kernel moves to 64-row blocks at 192) and the bands' work is below this fraction of the
# dense tile's. Measured: 6x8x8 k3 in two 3-row bands 0.84-0.90x the time of dense SDPA (one dense
# masked tile 1.13-1.18x); 14x14 k7 in two 7-row bands (98-row blocks) 1.29-1.37x, so not banded
BAND_MIN_ROWS = 192
BAND_FACTOR = 0.8


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
def choose_tile(spatial: tuple, kernel_size: tuple, dilation: tuple, is_causal: tuple) -> int | tuple:
    """The tile with the least padded SDPA work (``BLOCK_PAD``): query tiles (an int, the same per dim)
    where they cut the dense tile's work by more than ``DENSE_FACTOR``, else bands along the first dim
    (a tuple, ``BAND_MIN_ROWS``, ``BAND_FACTOR``) where they apply, else one dense masked tile."""
    dims = list(zip(spatial, kernel_size, dilation, is_causal))

    def cost(tiles):
        n = rows = keys = 1
        for dim, tile in zip(dims, tiles):
            t, kb, starts = _dim_layout(*dim, tile)
            n, rows, keys = n * len(starts), rows * t, keys * kb
        return n * (rows + BLOCK_PAD) * (keys + BLOCK_PAD), rows

    whole = TILE_CANDIDATES[-1]
    dense = cost((whole,) * len(dims))[0]
    best = min(TILE_CANDIDATES[:-1], key=lambda t: cost((t,) * len(dims))[0])
    if dense > DENSE_FACTOR * cost((best,) * len(dims))[0]:
        return best
    if any(dil != 1 for dil in dilation):
        return whole  # dilation groups interleave: their tokens are not contiguous ranges
    bands = [
        (t, *cost((t,) + (whole,) * (len(dims) - 1)))
        for t in sorted({*range(1, 65), 128, 256, 512})
        if t + kernel_size[0] - 1 < spatial[0]
    ]
    bands = [(work, t) for t, work, rows in bands if rows >= BAND_MIN_ROWS]
    if bands and min(bands)[0] < BAND_FACTOR * dense:
        return (min(bands)[1],) + (whole,) * (len(dims) - 1)
    return whole


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


# The cached tables and plans are built outside inference mode: a first call under
# torch.inference_mode() would otherwise cache inference tensors, which autograd refuses to save later.
@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def _tables(spatial: tuple, kernel_size: tuple, dilation: tuple, is_causal: tuple, tile: int | tuple):
    """Product of the per-dim tiles (``tile`` per dim, or one for all) over all dims (CPU tensors, flat
    token ids in row-major order):
    ``query [n, Tq]``, ``key [n, Tk]``, ``allowed [n, Tq, Tk]``, ``rel [n, Tq, Tk]`` (flat rpb index),
    ``pick [N]`` (flat ``tile * Tq + row`` of each token)."""
    query = key = torch.zeros((1, 1), dtype=torch.long)
    allowed = torch.ones((1, 1, 1), dtype=torch.bool)
    rel = torch.zeros((1, 1, 1), dtype=torch.long)
    pick = torch.zeros(1, dtype=torch.long)
    rows = 1
    per_dim = tile if isinstance(tile, tuple) else (tile,) * len(spatial)
    for length, k, dil, causal, tile in zip(spatial, kernel_size, dilation, is_causal, per_dim):
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


class _Plan(NamedTuple):
    """What a call needs for one shape, on its device (see ``_plan``)."""

    gather: tuple[torch.Tensor, torch.Tensor] | None  # token ids [n, Tq], [n, Tk]; None: all in order
    shape: tuple[int, int, int]  # (tiles, Tq, Tk)
    rel: torch.Tensor  # [n, Tq, Tk] flat rpb index
    window_mask: torch.Tensor | None  # [n, Tq, Tk] 0 / -inf fp32; None: every query sees its tile's keys
    pick: torch.Tensor | None  # [N] row of each token in the tiles' output; None: in order, once each
    bands: tuple[tuple[int, int, int], ...] | None  # (first query, first key, rows already done) per band


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def _plan(
    spatial: tuple,
    kernel_size: tuple,
    dilation: tuple,
    is_causal: tuple,
    tile: int | tuple,
    device: torch.device,
) -> _Plan:
    """``_tables`` on ``device`` plus what lets a call skip work (``_Plan``); ``bands`` only for a
    ``tile`` tuple whose tiles are contiguous token ranges (``choose_tile``'s bands)."""
    query, key, allowed, rel, pick = _tables(spatial, kernel_size, dilation, is_causal, tile)
    # decided on the CPU tables: reading device tensors would sync a GPU, and fails on the meta device
    tokens = math.prod(spatial)
    ordered = torch.arange(tokens)
    n, tq, tk = allowed.shape
    dense = n == 1 and tq == tokens and bool((query[0] == ordered).all()) and bool((key[0] == ordered).all())
    identity = pick.numel() == query.numel() and bool((pick == ordered).all())
    window_mask = None
    if not bool(allowed.all()):
        window_mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).to(device)
    bands = _bands(query, key, tokens) if isinstance(tile, tuple) and n > 1 else None
    return _Plan(
        gather=None if dense else (query.to(device), key.to(device)),
        shape=(n, tq, tk),
        rel=rel.to(device),
        window_mask=window_mask,
        pick=None if identity else pick.to(device),
        bands=bands,
    )


def static_sizes(sizes) -> tuple[int, ...]:
    """``sizes`` as Python ints. Under ``torch.compile`` with dynamic shapes a symbolic size is
    specialized to its value (dynamo guards on it: one graph per map size, as the plan is per size);
    ``range`` is the builtin whose arguments dynamo specializes that way."""
    return tuple(range(n).stop for n in sizes)


@torch.compiler.assume_constant_result
def shape_plan(
    spatial: tuple,
    kernel_size: tuple,
    dilation: tuple,
    is_causal: tuple,
    tile: int | tuple | None,
    device: torch.device,
) -> _Plan:
    """The cached ``_Plan`` of one shape (``tile`` None: ``choose_tile``'s pick).

    Under ``torch.compile`` dynamo runs this for real instead of tracing the planning (Python loops,
    ``lru_cache``, reads of CPU tensors), and the plan's index tensors and masks enter the graph as
    constants; the spatial sizes must be ints (``static_sizes``)."""
    tile = tile or choose_tile(spatial, kernel_size, dilation, is_causal)
    return _plan(spatial, kernel_size, dilation, is_causal, tile, device)


def _bands(query: torch.Tensor, key: torch.Tensor, tokens: int) -> tuple[tuple[int, int, int], ...] | None:
    """``(first query, first key, rows already done)`` per tile when every tile's queries and keys are
    contiguous token ranges that cover the tokens in order (overlaps allowed); else None."""
    (_, tq), (_, tk) = query.shape, key.shape
    bands, done = [], 0
    for q_ids, k_ids in zip(query.tolist(), key.tolist()):
        q0, k0 = q_ids[0], k_ids[0]
        if q_ids != list(range(q0, q0 + tq)) or k_ids != list(range(k0, k0 + tk)) or not q0 <= done < q0 + tq:
            return None
        bands.append((q0, k0, done - q0))
        done = q0 + tq
    return tuple(bands) if done == tokens else None


def neighborhood_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    rpb: torch.Tensor | None,
    scale: float,
    tile: int | tuple | None = None,
) -> torch.Tensor:
    """Same arguments and result as ``neighborhood_attention_reference`` (validated inputs); ``tile``
    (query positions per dim, or one per dim as a tuple) defaults to ``choose_tile``'s pick for the shape."""
    batch, *spatial, heads, head_dim = q.shape
    plan = shape_plan(static_sizes(spatial), kernel_size, dilation, is_causal, tile, q.device)
    compute = torch.promote_types(q.dtype, torch.float32)
    n, tq, tk = plan.shape
    bias = None if rpb is None else rpb.reshape(heads, -1).to(compute)[:, plan.rel]  # [H, tiles, Tq, Tk]
    if plan.bands is not None:
        return _banded(q, k, v, plan, bias, scale, compute)

    def tiles(x, idx):  # [B, *spatial, H, D] -> [B, H * tiles, Tq or Tk, D]
        flat = _token_major(x, compute)
        if idx is None:  # one tile of every token in order: a view
            return flat.transpose(1, 2)
        # index_select on the token-major layout is fast
        return (
            flat.index_select(1, idx.flatten()).unflatten(1, idx.shape).permute(0, 3, 1, 2, 4).flatten(1, 2)
        )

    query, key = (None, None) if plan.gather is None else plan.gather
    # [B, H * tiles, Tq or Tk, D]; a 4-D additive float mask keeps SDPA on its fused CPU kernel (it sends
    # a 3-D one to the unfused math path)
    qt, kt, vt = tiles(q, query), tiles(k, key), tiles(v, key)
    window_mask = plan.window_mask
    if window_mask is not None and window_mask.dtype != compute:
        window_mask = window_mask.to(compute)
    if bias is not None:
        mask = bias if window_mask is None else bias + window_mask
        mask = mask.reshape(1, heads * n, tq, tk)
    elif window_mask is not None and n == 1:
        mask = window_mask[None]  # [1, 1, Tq, Tk], broadcast over batch and heads
    elif window_mask is not None:
        mask = window_mask.expand(heads, n, tq, tk).reshape(1, heads * n, tq, tk)
    else:
        mask = None  # every query sees every key of its tile
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    out = out.reshape(batch, heads, n * tq, head_dim)  # [B, H, tiles * Tq, D]
    if plan.pick is not None:
        out = out[:, :, plan.pick]
    out = out.transpose(1, 2).reshape(q.shape)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _token_major(x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``[B, *spatial, H, D]`` -> ``[B, N, H, D]`` in ``compute``, a view when no cast is needed (a call on
    a small map costs ~50 us, so a no-op cast is skipped)."""
    flat = x.flatten(1, -3)
    return flat if flat.dtype == compute else flat.to(compute)


def _banded(q, k, v, plan: _Plan, bias: torch.Tensor | None, scale: float, compute: torch.dtype):
    """One SDPA call per band on slices of the token-major views; ``bias [H, bands, Tq, Tk]`` or None."""
    _, tq, tk = plan.shape
    qf, kf, vf = (_token_major(x, compute).transpose(1, 2) for x in (q, k, v))
    outs = []
    for i, (q0, k0, done) in enumerate(plan.bands):
        mask = None if plan.window_mask is None else plan.window_mask[i].to(compute)
        if bias is not None:
            mask = bias[:, i] if mask is None else bias[:, i] + mask
        mask = None if mask is None else mask.reshape(1, -1, tq, tk)  # [1, 1 or H, Tq, Tk]
        rows, keys = slice(q0, q0 + tq), slice(k0, k0 + tk)
        out = F.scaled_dot_product_attention(
            qf[:, :, rows],
            kf[:, :, keys],
            vf[:, :, keys],
            attn_mask=mask,
            scale=scale,
        )
        outs.append(out[:, :, done:])
    return torch.cat(outs, 2).transpose(1, 2).reshape(q.shape).to(q.dtype)
