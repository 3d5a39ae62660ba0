"""flash-attn's Python API (``flash_attn_func``, ``flash_attn_varlen_func``) computed with plain torch,
wired into transformers' own flash-attention path so that ``attn_implementation="flash_attention_2"``
runs on CPU: transformers still builds the 2-D padding masks, unpads, and picks the padded or varlen
call exactly as it does with the real package; only the kernel underneath is this reference.
"""

from __future__ import annotations

import pytest
import torch


def _attend(q, k, v, scale, causal):
    """One sequence: ``q [Sq, H, D]``, ``k``/``v`` ``[Sk, Hkv, D]`` -> ``[Sq, H, D]``. Causal is aligned
    to the bottom-right corner (flash-attn >= 2.1): query ``i`` sees keys ``j <= i + Sk - Sq``."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        sq, sk = q.shape[0], k.shape[0]
        allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """``q [B, Sq, H, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` -> ``[B, Sq, H, D]``."""
    assert dropout_p == 0.0
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False,
):  # fmt: skip
    """Packed sequences: ``q [total_q, H, D]`` split by ``cu_seqlens_q``, keys by ``cu_seqlens_k``."""
    assert dropout_p == 0.0
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    bounds = zip(
        cu_seqlens_q.tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k.tolist(), cu_seqlens_k[1:].tolist()
    )
    out = [_attend(q[a:b], k[c:d], v[c:d], scale, causal) for a, b, c, d in bounds]
    return torch.cat(out)


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make transformers' flash path load the functions above (undone by ``monkeypatch``)."""
    from transformers import modeling_flash_attention_utils as fa

    # transformers 5.x before the kv-cache function was added returns four functions, later five
    with_kvcache = "_flash_with_kvcache_fn" in fa.lazy_import_flash_attention.__code__.co_names

    def lazy_imports(implementation, *args, **kwargs):
        found = (flash_attn_func, flash_attn_varlen_func, None, fa._pad_input, fa._unpad_input)
        return found if with_kvcache else found[:2] + found[3:]

    monkeypatch.setattr(fa, "_lazy_imports", lazy_imports)
    monkeypatch.setattr(fa, "_loaded_implementation", None)
