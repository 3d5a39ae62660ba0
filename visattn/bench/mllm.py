"""Visual-token reducers on 7B-shaped MLLMs of every supported family: prefill, memory, decode, FLOPs.

``visattn bench mllm --family {llava,llava_next,llava_onevision,qwen2_vl,qwen2_5_vl}`` builds the
family's model with random weights (no download). ``--size full`` (the CUDA default, bfloat16) has the
real 7B shapes: LLaVA-1.5-7B / LLaVA-NeXT-7B are a CLIP ViT-L/14-336 tower and a LLaMA-7B decoder
(hidden 4096, 32 layers, 32 heads, MLP 11008); LLaVA-OneVision-7B a SigLIP-so400m/14-384 tower and
Qwen2-VL-7B / Qwen2.5-VL-7B their 32-block ViTs (width 1280), all three on a Qwen2-7B decoder (hidden
3584, 28 layers, 28 heads, 4 KV heads, MLP 18944). ``--size cpu`` (the CPU default, float32) keeps the
towers' image and patch sizes, hence the visual-token counts, with narrow towers and a small decoder
(``--hidden``/``--layers``); ``--size tiny`` shrinks the images too (a dry run for tests).

One prompt per sample: 5 text tokens, one image, 59 text tokens. The images: LLaVA 336x336 (576
tokens); LLaVA-NeXT an anyres 672x672 image (full; 336x672 on CPU) in 336 tiles with row-end newline
tokens; OneVision an anyres 768x768 (full; 384x768 on CPU) image in 384 tiles; Qwen2-VL / 2.5-VL a
784x784 image at dynamic resolution (784 tokens). For the unreduced model and each reducer (FastV K=2,
VTC-CLS, DivPrune, DART, VisionZip, SparseVLM at 64/128/192 kept tokens per image, CDPruner, VisPruner,
HiPrune and SCOPE at 64/128/192 on LLaVA-1.5 and the fractions k / 576 elsewhere, PyramidDrop at its
official stages, DyVTE with a fixed exit after layer 2 standing in for trained routers, VAR with the
decoder's known sink dims) it reports prefill latency, peak memory, decode tokens/s (greedy, KV
cache), and from ``handle.stats`` the visual tokens per sample, the mean kept per decoder layer and the
estimated prefill FLOPs saved; speed-ups are against the unreduced model of the same run. A reducer the
family refuses (``attach`` raises ValueError) is a row "refused [n]", its reason printed below the
table. A second table times FastV's scoring attention at ``--score-tokens`` tokens: eager attention
that returns the probabilities (what ``output_attentions`` costs), plain SDPA, and visattn's
``attention_with_key_mass``: last-query scoring (``auto``: SDPA output + the scored row; on CUDA also
the fused Triton kernels) and all-query scoring (Triton on CUDA, reference on CPU).
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass

import torch

from visattn.bench._timing import measure, print_table, ratio

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
SIZES = ("full", "cpu", "tiny")
BEFORE, AFTER = 5, 59  # text tokens before / after the image
LLAMA_7B = dict(hidden=4096, layers=32, heads=32, kv=32, mlp=11008, vocab=32064)
QWEN2_7B = dict(hidden=3584, layers=28, heads=28, kv=4, mlp=18944, vocab=152064)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=FAMILIES, default="llava")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=SIZES, default=None,
                        help="full: 7B shapes (CUDA default); cpu: small towers and decoder, "
                             "real visual-token counts (CPU default); tiny: small images")  # fmt: skip
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa",
                        help="the model's attention (flash_attention_2 needs flash-attn)")  # fmt: skip
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--keep", default="64,128,192", help="kept visual tokens per image")
    parser.add_argument("--hidden", type=int, default=None, help="LLM hidden size; default 7B / 256 / 64")
    parser.add_argument("--layers", type=int, default=None, help="LLM layers; default 7B / 4 / 3")
    parser.add_argument("--decode-tokens", type=int, default=None, help="default 32 (CUDA) / 6 (CPU)")
    parser.add_argument(
        "--score-tokens", default=None, help="scoring sequence lengths; default 640,4096 / 640"
    )
    parser.add_argument("--warmup", type=int, default=None, help="default: 2 (CUDA) / 1 (CPU)")
    parser.add_argument("--iters", type=int, default=None, help="default: 5 (CUDA) / 2 (CPU)")


@dataclass
class Bench:
    """A family's random-weight model and a function ``inputs(batch) -> model kwargs``."""

    model: torch.nn.Module
    inputs: object
    visual: int  # visual tokens per sample
    image: str  # what the image is, for the table title


def _text(shape: dict, size: str, hidden: int | None, layers: int | None) -> dict:
    """Decoder dimensions: the 7B ``shape``, or a small stack with its vocabulary and GQA ratio."""
    if size == "full" and hidden in (None, shape["hidden"]):
        return dict(shape, layers=layers or shape["layers"])
    hidden = hidden or (256 if size == "cpu" else 64)
    heads = max(1, hidden // 64) if size == "cpu" else 4
    kv = heads if shape["kv"] == shape["heads"] else max(1, heads // 2)
    mlp = hidden * shape["mlp"] // shape["hidden"]
    return dict(hidden=hidden, layers=layers or (4 if size == "cpu" else 3), heads=heads, kv=kv, mlp=mlp,
                vocab=shape["vocab"])  # fmt: skip


def _llama(t: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=t["hidden"], intermediate_size=t["mlp"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], num_key_value_heads=t["kv"], vocab_size=t["vocab"],
        max_position_embeddings=8192,
    )  # fmt: skip


def _qwen2(t: dict):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=t["hidden"], intermediate_size=t["mlp"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], num_key_value_heads=t["kv"], vocab_size=t["vocab"],
        max_position_embeddings=32768, rope_theta=1e6,
    )  # fmt: skip


def _clip(size: str):
    from transformers import CLIPVisionConfig

    full = size == "full"
    return CLIPVisionConfig(
        hidden_size=1024 if full else 64, intermediate_size=4096 if full else 128,
        num_hidden_layers=24 if full else 4, num_attention_heads=16 if full else 4,
        image_size=56 if size == "tiny" else 336, patch_size=14, projection_dim=768 if full else 64,
    )  # fmt: skip


def _siglip(size: str):
    from transformers import SiglipVisionConfig

    full = size == "full"
    return SiglipVisionConfig(
        hidden_size=1152 if full else 64, intermediate_size=4304 if full else 128,
        num_hidden_layers=26 if full else 4, num_attention_heads=16 if full else 4,
        image_size=56 if size == "tiny" else 384, patch_size=14,
    )  # fmt: skip


def _prompt(batch: int, visual: int, image_id: int, vocab: int, start: int = 1) -> torch.Tensor:
    """``[batch, BEFORE + visual + AFTER]`` random text around ``visual`` image tokens."""
    g = torch.Generator().manual_seed(0)
    high = min(vocab, 32000)
    return torch.cat([
        torch.full((batch, 1), start), torch.randint(2, high, (batch, BEFORE - 1), generator=g),
        torch.full((batch, visual), image_id), torch.randint(2, high, (batch, AFTER), generator=g),
    ], dim=1)  # fmt: skip


def _pixels(shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def _anyres(model, pixels: torch.Tensor, hw: tuple[int, int], image_id: int, vocab: int, **extra) -> Bench:
    """LLaVA-NeXT / OneVision: one anyres image of ``hw`` pixels per sample, ``pixels`` its crops."""
    sizes = torch.tensor([hw], device=pixels.device)
    with torch.no_grad():
        visual = len(model.model.get_image_features(pixels[None], sizes, **extra).pooler_output[0])

    def inputs(batch):
        ids = _prompt(batch, visual, image_id, vocab).to(pixels.device)
        more = {k: v.expand(batch) for k, v in extra.items()}
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_sizes=sizes.expand(batch, 2),
                    pixel_values=pixels.expand(batch, *pixels.shape), **more)  # fmt: skip

    return Bench(model, inputs, visual, f"{hw[0]}x{hw[1]} anyres ({len(pixels)} crops)")


def model_config(family: str, size: str, hidden: int | None = None, layers: int | None = None):
    """``(model class, config)`` of the ``family`` at ``size`` (see the module docstring)."""
    import transformers as tf

    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"bench mllm: unknown family {family!r} or size {size!r}")
    llama = family in ("llava", "llava_next")
    t = _text(LLAMA_7B if llama else QWEN2_7B, size, hidden, layers)
    tiny = size == "tiny"
    if family == "llava":
        cfg = tf.LlavaConfig(vision_config=_clip(size), text_config=_llama(t), image_token_id=32000)
        cls = tf.LlavaForConditionalGeneration
    elif family == "llava_next":
        cfg = tf.LlavaNextConfig(
            vision_config=_clip(size), text_config=_llama(t), image_token_id=32000,
            image_grid_pinpoints=[[112, 112]] if tiny else None,
        )  # fmt: skip
        cls = tf.LlavaNextForConditionalGeneration
    elif family == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(
            vision_config=_siglip(size), text_config=_qwen2(t), image_token_id=151646, video_token_id=151647,
            image_grid_pinpoints=[[56, 56], [56, 112]] if tiny else None,
        )  # fmt: skip
        cls = tf.LlavaOnevisionForConditionalGeneration
    else:
        half = t["hidden"] // t["heads"] // 2  # M-RoPE sections as in Qwen2-VL-7B (16/24/24 of 64)
        t_sec, h_sec = half // 4, (half - half // 4) // 2
        rope = {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [t_sec, h_sec, half - t_sec - h_sec],
        }
        text = _qwen2(t).to_dict() | {"rope_parameters": rope}
        full = size == "full"
        common = dict(depth=32 if full else 2, num_heads=16 if full else 4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
        if family == "qwen2_vl":
            vision = dict(common, embed_dim=1280 if full else 64, hidden_size=t["hidden"], mlp_ratio=4)
            cls, config_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig
        else:
            vision = dict(common, hidden_size=1280 if full else 64, intermediate_size=3420 if full else 128,
                          out_hidden_size=t["hidden"], window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31] if full else [1])  # fmt: skip
            cls, config_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig
        cfg = config_cls(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653)  # fmt: skip
    return cls, cfg


def build(family: str, size: str, device, dtype, hidden=None, layers=None, attn: str = "sdpa") -> Bench:
    """The ``family``'s random-weight model at ``size`` with its inputs."""
    import transformers as tf

    cls, cfg = model_config(family, size, hidden, layers)
    with torch.device(device):
        # transformers checks that the implementation is usable here (flash-attn installed, CUDA, dtype)
        model = cls._from_config(cfg, dtype=dtype, attn_implementation=attn).eval()
    device, vocab, tiny = torch.device(device), cfg.text_config.vocab_size, size == "tiny"
    if family == "llava":
        side = cfg.vision_config.image_size
        pixels = _pixels((1, 3, side, side), device, dtype)
        visual = (side // 14) ** 2

        def inputs(batch):
            ids = _prompt(batch, visual, 32000, vocab).to(device)
            return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=pixels.expand(batch, -1, -1, -1))  # fmt: skip

        return Bench(model, inputs, visual, f"{side}x{side}")
    if family in ("llava_next", "llava_onevision"):
        side = cfg.vision_config.image_size
        hw = (side, 2 * side) if size != "full" else (2 * side, 2 * side)
        mod = tf.models.llava_next.modeling_llava_next
        crops = mod.image_size_to_num_patches(hw, cfg.image_grid_pinpoints, side)
        pixels = _pixels((crops, 3, side, side), device, dtype)
        if family == "llava_next":
            return _anyres(model, pixels, hw, 32000, vocab)
        return _anyres(model, pixels, hw, 151646, vocab, batch_num_images=torch.tensor([1], device=device))
    grid = (1, 8, 8) if tiny else (1, 56, 56)  # 112x112 / 784x784 pixels in 14x14 patches
    visual = grid[0] * grid[1] * grid[2] // 4
    pixels = _pixels((grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14), device, dtype)

    def inputs(batch):
        ids = _prompt(batch, visual, 151655, vocab)
        ids = torch.cat([ids[:, :BEFORE], torch.full((batch, 1), 151652), ids[:, BEFORE:BEFORE + visual],
                         torch.full((batch, 1), 151653), ids[:, BEFORE + visual:]], 1).to(device)  # fmt: skip
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    mm_token_type_ids=(ids == 151655).int(), pixel_values=pixels.repeat(batch, 1),
                    image_grid_thw=torch.tensor([grid] * batch, device=device))  # fmt: skip

    return Bench(model, inputs, visual, f"{14 * grid[1]}x{14 * grid[2]} dynamic resolution")


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


def _issue24_rows(k: int, family: str, full: bool) -> list[tuple]:
    """CDPruner and VisPruner at ``k`` kept tokens per LLaVA-1.5 image; on the other families at the
    matching fraction ``k / 576`` of each image's tokens (64 / 128 / 192 -> 11.1 / 22.2 / 33.3 %, the
    budgets the papers use on Qwen2.5-VL)."""
    from visattn.mllm_tokens import SCOPE, CDPruner, HiPrune, VisPruner

    keep = k if family == "llava" else round(k / 576, 3)
    return [
        (f"CDPruner keep={keep}", CDPruner(keep=keep)),
        (f"VisPruner keep={keep}", VisPruner(keep=keep)),
        # the official object layer 9 of CLIP-L's 24; the CPU / tiny towers' 4 layers: layer 2 (9/24 x 4)
        (f"HiPrune keep={keep}", HiPrune(keep=keep, object_layer=9 if full else 2)),
        (f"SCOPE keep={keep}", SCOPE(keep=keep)),
    ]


def _reducers(keeps: list[int], layers: int, full: bool, sink_dims: str, family: str = "llava"):
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
        rows.append((f"VTC-CLS keep={k}", VTCCLS(keep=k, start_layer=16 if full else 1)))
        rows.append((f"DivPrune keep={k}", DivPrune(keep=k)))
        rows.extend(_issue24_rows(k, family, full))
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
    rows.append(("VAR (no pruning)", VAR(sink_dims=sink_dims if full else (0, 1))))
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
            f"{m.peak_mib:.0f}",
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


def _row(model, reducer, inputs, device, decode, warmup, iters):
    """``(prefill Measurement, decode tok/s, handle.stats[0] or None)``; ValueError if refused."""
    from visattn.mllm_tokens import attach

    handle = attach(model, reducer) if reducer is not None else None
    try:
        with torch.no_grad():
            prefill = measure(functools.partial(model, **inputs, logits_to_keep=1), device, warmup, iters)
            stats = handle.stats[0] if handle is not None else None
            tok_s = decode_tokens_per_s(model, inputs, decode, device, max(1, iters // 2))
    finally:
        if handle is not None:
            handle.remove()
    return prefill, tok_s, stats


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("full" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    decode = max(2, args.decode_tokens or (32 if cuda else 6))
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    iters = args.iters if args.iters is not None else (5 if cuda else 2)
    keeps = [int(x) for x in args.keep.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    lengths = [int(x) for x in (args.score_tokens or ("640,4096" if cuda else "640")).split(",")]
    bench = build(args.family, size, device, dtype, args.hidden, args.layers, args.attn)
    text = bench.model.config.text_config
    layers, full = text.num_hidden_layers, size == "full"
    sink = "llama-2-7b" if args.family in ("llava", "llava_next") else "qwen2-7b"
    rows, refusals = [], {}
    for batch in batches:
        inputs = bench.inputs(batch)
        base_prefill = base_decode = None
        for name, reducer in _reducers(keeps, layers, full, sink, args.family):
            try:
                prefill, tok_s, stats = _row(bench.model, reducer, inputs, device, decode, warmup, iters)
            except ValueError as e:
                note = refusals.setdefault(str(e), len(refusals) + 1)
                rows.append((batch, name, f"refused [{note}]", *["-"] * 7))
                continue
            if reducer is None:
                base_prefill, base_decode = prefill, tok_s
            kept = "-" if stats is None else f"{sum(stats['kept_per_layer']) / layers:.0f}"
            saved = 0.0 if stats is None else stats["prefill_flops_saved_ratio"]
            rows.append((
                batch, name, f"{prefill.ms:.2f}", ratio(base_prefill, prefill),
                f"{prefill.peak_mib:.0f}",
                f"{tok_s:.1f}", f"{tok_s / base_decode:.2f}x",
                "-" if stats is None else stats["visual_tokens_in"], kept, f"{100 * saved:.1f}%",
            ))  # fmt: skip
    print_table(
        ("batch", "method", "prefill ms", "speed-up", "peak MiB", "decode tok/s", "vs unreduced",
         "visual in", "kept/layer", "FLOPs saved"),
        rows,
        title=(
            f"{args.family} ({size}): LLM hidden {text.hidden_size} x {layers} layers, {bench.image} image = "
            f"{bench.visual} visual + {BEFORE + AFTER} text tokens, {dtype}, {args.attn} attention, "
            f"{device.type}, decode {decode} tokens"
        ),
    )  # fmt: skip
    for reason, note in refusals.items():
        print(f"refused [{note}]: {reason}")
    heads = text.num_attention_heads
    _scoring_table(device, dtype, lengths, heads, text.hidden_size // heads, warmup, iters)
    return 0
