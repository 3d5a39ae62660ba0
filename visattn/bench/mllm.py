"""Visual-token reducers on a LLaVA-1.5-7B-shaped model: prefill, memory, decode, and FastV scoring.

Builds a LlavaForConditionalGeneration with random weights (no download): on CUDA a LLaMA-7B-shaped
decoder (hidden 4096, 32 layers, 32 heads, MLP 11008) behind a CLIP ViT-L/14-336-shaped tower, in
bfloat16; on CPU a scaled-down stack (``--hidden``/``--layers``) that still has 576 visual tokens.
Inputs: 576 visual + 64 text tokens, batch 1 and 8. For the unreduced model and each reducer
(FastV K=2, VTC-CLS, DivPrune, DART, VisionZip, SparseVLM at 64/128/192 kept tokens, PyramidDrop at its
official stages, DyVTE with a fixed exit after layer 2 standing in for trained routers, VAR with
LLaMA-2-7B's sink dims) it reports prefill latency, peak memory (CUDA),
decode tokens/s (greedy, KV cache) and the estimated prefill FLOPs saved, with speed-ups against the
unreduced model of the same run. A second table times FastV's scoring attention at ``--score-tokens``
tokens: eager attention that returns the probabilities (what ``output_attentions`` costs), plain SDPA,
and visattn's ``attention_with_key_mass``: last-query scoring (``auto``: SDPA output + the scored row;
on CUDA also the fused Triton kernels) and all-query scoring (Triton on CUDA, reference on CPU).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from visattn.bench._timing import measure, print_table, ratio

VISUAL, TEXT = 576, 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa",
                        help="the model's attention (flash_attention_2 needs flash-attn)")  # fmt: skip
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--keep", default="64,128,192", help="kept visual tokens per image")
    parser.add_argument("--hidden", type=int, default=None, help="LLM hidden size; default 4096 / 256 (CPU)")
    parser.add_argument("--layers", type=int, default=None, help="LLM layers; default 32 / 4 (CPU)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="default 32 (CUDA) / 6 (CPU)")
    parser.add_argument(
        "--score-tokens", default=None, help="scoring sequence lengths; default 640,4096 / 640"
    )
    parser.add_argument("--warmup", type=int, default=None, help="default: 2 (CUDA) / 1 (CPU)")
    parser.add_argument("--iters", type=int, default=None, help="default: 5 (CUDA) / 2 (CPU)")


def build_model(device: torch.device, dtype: torch.dtype, hidden: int, layers: int, attn: str = "sdpa"):
    """Random-weight LLaVA: CLIP ViT-L/14-336 + LLaMA-7B shapes on CUDA, a small stack on CPU."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    full = hidden == 4096
    vision = CLIPVisionConfig(
        hidden_size=1024 if full else 64, intermediate_size=4096 if full else 128,
        num_hidden_layers=24 if full else 4, num_attention_heads=16 if full else 4,
        image_size=336, patch_size=14, projection_dim=768 if full else 64,
    )  # fmt: skip
    heads = 32 if full else max(1, hidden // 64)
    text = LlamaConfig(
        hidden_size=hidden, intermediate_size=11008 if full else hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32064, max_position_embeddings=4096,
    )  # fmt: skip
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)
    with torch.device(device):
        # transformers checks that the implementation is usable here (flash-attn installed, CUDA, dtype)
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.eval()


def make_inputs(batch: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    before, after = 5, TEXT - 5
    ids = torch.cat(
        [
            torch.ones(batch, 1, dtype=torch.long),
            torch.randint(2, 32000, (batch, before - 1), generator=g),
            torch.full((batch, VISUAL), 32000),
            torch.randint(2, 32000, (batch, after), generator=g),
        ],
        dim=1,
    )
    pixels = torch.randn(batch, 3, 336, 336, generator=g)
    return dict(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        pixel_values=pixels.to(device, dtype),
    )


class _StepClock:
    """Logits processor that timestamps every decoding step (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def decode_tokens_per_s(model, inputs: dict, tokens: int, device: torch.device, runs: int) -> float:
    """Greedy decoding speed with KV cache: the steps after the prefill, median over ``runs``."""
    from transformers import LogitsProcessorList

    rates = []
    for _ in range(runs):
        clock = _StepClock(device)
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))  # fmt: skip
        rates.append(inputs["input_ids"].shape[0] * (tokens - 1) / (clock.stamps[-1] - clock.stamps[0]))
    return sorted(rates)[len(rates) // 2]


def _reducers(keeps: list[int], layers: int, hidden: int):
    from visattn.mllm_tokens import (
        DART,
        VAR,
        VTCCLS,
        DivPrune,
        DyVTE,
        FastV,
        PyramidDrop,
        SparseVLM,
        VisionZip,
    )
    from visattn.mllm_tokens.sparsevlm import PRESETS as SPARSEVLM_PRESETS
    from visattn.mllm_tokens.visionzip import PRESETS as VISIONZIP_PRESETS

    rows = [("unreduced", None)]
    for k in keeps:
        rows.append((f"FastV K=2 keep={k}", FastV(layer=2, keep=k)))
        rows.append((f"VTC-CLS keep={k}", VTCCLS(keep=k, start_layer=16 if hidden == 4096 else 1)))
        rows.append((f"DivPrune keep={k}", DivPrune(keep=k)))
        rows.append((f"DART K=2 keep={k}", DART(layer=min(2, layers - 1), keep=k)))
        dominant, contextual = VISIONZIP_PRESETS.get(k, (k - k // 6, k // 6))
        rows.append(
            (f"VisionZip {dominant}+{contextual}", VisionZip(dominant=dominant, contextual=contextual))
        )
        if k in SPARSEVLM_PRESETS:  # official per-layer counts; on a shallow CPU stack its first layers
            counts = SPARSEVLM_PRESETS[k]
            shallow = SparseVLM(counts=counts[: layers - 1], layers=range(layers - 1))
            reducer = SparseVLM(k) if layers >= 4 else shallow
            rows.append((f"SparseVLM {k} ({'/'.join(map(str, counts))})", reducer))
    if layers >= 4:  # the official stage layers 8/16/24 of 32 as depth fractions
        rows.append(("PyramidDrop 1/4,1/2,3/4 lambda=0.5", PyramidDrop()))
    else:
        rows.append((f"PyramidDrop 1..{layers - 1} lambda=0.5", PyramidDrop(layers=range(1, layers))))
    rows.append(("DyVTE exit after layer 2", DyVTE(exit_layer=min(2, layers - 1))))
    rows.append(("VAR (no pruning)", VAR(sink_dims="llama-2-7b" if hidden == 4096 else (0, 1))))
    return rows


def _scoring_rows(n: int, device, dtype, heads: int, head_dim: int, warmup: int, iters: int) -> list[tuple]:
    from visattn.kernels import attention_with_key_mass

    q, k, v = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()

    def eager():  # what HF eager attention does when output_attentions=True, plus FastV's row
        s = (qt @ kt.transpose(-1, -2)) * head_dim**-0.5
        p = s.masked_fill(~causal, float("-inf")).softmax(-1, dtype=torch.float32).to(dtype)
        return p @ vt, p[:, :, -1].mean(1)

    timed = {
        "eager + probs": measure(eager, device, warmup, iters),
        "sdpa (no scores)": measure(
            lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
            device, warmup, iters,
        ),
        "key-mass last": measure(
            lambda: attention_with_key_mass(q, k, v, causal=True, query_set="last"), device, warmup, iters
        ),
        "key-mass all": measure(
            lambda: attention_with_key_mass(q, k, v, causal=True, query_set="all"), device, warmup, iters
        ),
    }  # fmt: skip
    if q.is_cuda:  # the fused Triton kernels, which "auto" uses for long query sets such as "all"
        timed["key-mass last (triton)"] = measure(
            lambda: attention_with_key_mass(q, k, v, causal=True, query_set="last", backend="triton"),
            device, warmup, iters,
        )  # fmt: skip
    eager_m, sdpa_m = timed["eager + probs"], timed["sdpa (no scores)"]
    return [
        (
            n,
            name,
            f"{m.ms:.3f}",
            "-" if m.peak_mib is None else f"{m.peak_mib:.0f}",
            ratio(eager_m, m),
            ratio(sdpa_m, m),
        )
        for name, m in timed.items()
    ]


def _scoring_table(device, dtype, lengths, heads, head_dim, warmup, iters) -> None:
    rows = [row for n in lengths for row in _scoring_rows(n, device, dtype, heads, head_dim, warmup, iters)]
    print_table(
        ("tokens", "scoring attention", "ms", "peak MiB", "vs eager", "vs sdpa"),
        rows,
        title=f"\nFastV scoring, one layer ({heads} heads x {head_dim}, batch 1, causal, {dtype})",
    )


def run(args: argparse.Namespace) -> int:
    from visattn.mllm_tokens import attach

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    hidden = args.hidden or (4096 if cuda else 256)
    layers = args.layers or (32 if cuda else 4)
    decode = max(2, args.decode_tokens or (32 if cuda else 6))
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    iters = args.iters if args.iters is not None else (5 if cuda else 2)
    keeps = [int(x) for x in args.keep.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    lengths = [int(x) for x in (args.score_tokens or ("640,4096" if cuda else "640")).split(",")]
    model = build_model(device, dtype, hidden, layers, args.attn)
    rows = []
    for batch in batches:
        inputs = make_inputs(batch, device, dtype)
        base_prefill = base_decode = None
        for name, reducer in _reducers(keeps, layers, hidden):
            handle = attach(model, reducer) if reducer is not None else None
            with torch.no_grad():
                prefill = measure(functools.partial(model, **inputs, logits_to_keep=1), device, warmup, iters)
                saved = handle.stats[0]["prefill_flops_saved_ratio"] if handle is not None else 0.0
                tok_s = decode_tokens_per_s(model, inputs, decode, device, max(1, iters // 2))
            if handle is not None:
                handle.remove()
            if reducer is None:
                base_prefill, base_decode = prefill, tok_s
            rows.append((
                batch, name, f"{prefill.ms:.2f}", ratio(base_prefill, prefill),
                "-" if prefill.peak_mib is None else f"{prefill.peak_mib:.0f}",
                f"{tok_s:.1f}", f"{tok_s / base_decode:.2f}x", f"{100 * saved:.1f}%",
            ))  # fmt: skip
    print_table(
        (
            "batch",
            "method",
            "prefill ms",
            "speed-up",
            "peak MiB",
            "decode tok/s",
            "vs unreduced",
            "FLOPs saved",
        ),
        rows,
        title=(
            f"LLaVA-shaped model: LLM hidden {hidden} x {layers} layers, {VISUAL} visual + {TEXT} text "
            f"tokens, {dtype}, {args.attn} attention, {device.type}, decode {decode} tokens"
        ),
    )
    heads = model.config.text_config.num_attention_heads
    _scoring_table(device, dtype, lengths, heads, hidden // heads, warmup, iters)
    return 0
