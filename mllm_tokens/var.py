"""VAR — Visual Attention Redistribution (Kang, Kim, Kim, Hwang, "See What You Are Told: Visual
Attention Sink in Large Multimodal Models", ICLR 2025; official code MICV-yonsei/VisAttnSink).

Training-free and not a token reducer: no token is removed. On the hidden state entering decoder
layer ``l`` (prefill), a token is a *sink* when ``phi(x) = max_{d in D_sink} |x_d| / rms(x) > tau``
over the language model's fixed sink dimensions ``D_sink`` (massive activations, innate to the LLM);
visual sinks lie in the image span, text sinks (e.g. BOS) outside. In that layer's attention, every
(head, query) row of a text query after the image that is image-centric (attention to the image
``>= 0.2``, non-sink share of it ``>= rho``) moves part of the attention of all sinks to the non-sink
image tokens, proportionally (:func:`visattn.kernels.visual_sink_attention`, one fused pass).
Prefill sinks are reused at decode steps, whose new token is always a redistributed query.

Official defaults (A_exps/lv1.5_7b.yml): ``tau=20``, ``rho=0.5``, ``summ=0.2``, ``p=0.6`` where the
code MULTIPLIES sink attention by ``p`` (moves 40%): ``fraction=0.4`` here. The paper writes the rule
with ``p`` as the moved share; pass ``fraction=0.6`` for that reading. Layers: sinks are searched
from layer 2 on and the last layer is excluded, i.e. layers ``2 .. L-2``. The official head test is
"sink share <= rho", the paper's "non-sink share >= rho": identical at the default 0.5 (we use the
paper's form); like the official code, a layer whose input has no visual sink is left unchanged
(text sinks alone do not trigger redistribution). ``phi`` uses the official RMS norm (eps 1e-6).
Official code needs eager attention and batch size 1; this one runs under SDPA too and takes padded
batches (with several images, "after the image" means after the first image token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from visattn.kernels.ops.visual_sink_attention import visual_sink_attention
from visattn.kernels.reference.visual_sink_attention import OTHER, TEXT_SINK, VISUAL, VISUAL_SINK
from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer

# Sink dimensions of the language models, from the official constants (src/logic/constants.py) and the
# paper's Fig. 7: keyed by a model name, each a tuple of hidden-state indices.
KNOWN_SINK_DIMS: dict[str, tuple[int, ...]] = {
    "llama-2-7b": (1415, 2533),  # LLaVA-1.5-7B, Vicuna-7B
    "llama-2-13b": (2100, 4743),  # LLaVA-1.5-13B, LLaVA-1.6-Vicuna-13B
    "qwen2-7b": (458, 2570),  # Qwen2-VL-7B
}
# (hidden_size, layers) of the language models above, for sink_dims="auto"
_AUTO = {(4096, 32): "llama-2-7b", (5120, 40): "llama-2-13b"}


def sink_scores(hidden: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``phi(x)`` ``[B, N]``: the largest ``|x_d| / rms(x)`` over the sink dimensions ``dims``."""
    x = hidden.float()
    inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # the official RMS norm, eps 1e-6
    return (x[..., list(dims)].abs() * inv_rms).amax(-1)


@torch.no_grad()
def calibrate_sink_dims(model: nn.Module, count: int = 2, from_layer: int = 2, **inputs) -> tuple[int, ...]:
    """Find a new language model's sink dimensions from its activations.

    Runs ``model(**inputs, output_hidden_states=True)`` and ranks hidden dimensions by their largest
    RMS-normalised magnitude ``|x_d| / rms(x)`` over all tokens of the hidden states entering layers
    ``from_layer`` and later (sinks appear from layer 2 on); the ``count`` strongest are returned,
    sorted. Use a few real prompts (with images): the massive activations of the BOS token and the
    visual sinks sit on these dimensions.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"calibrate_sink_dims: count must be a positive int, got {count!r}")
    hidden_states = model(**inputs, output_hidden_states=True).hidden_states
    layers = hidden_states[from_layer:-1]
    if not layers:
        raise ValueError(f"calibrate_sink_dims: from_layer={from_layer} leaves no layer of the model")
    best = None
    for h in layers:
        x = h.float()
        ratio = (x.abs() / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)).flatten(0, -2).amax(0)
        best = ratio if best is None else torch.maximum(best, ratio)
    return tuple(sorted(int(i) for i in best.topk(count).indices))


class VAR(Reducer):
    """Visual attention redistribution on layers ``layers`` (default: 2 .. L-2).

    Args:
        sink_dims: the LLM's sink dimensions: a tuple of ints, a key of :data:`KNOWN_SINK_DIMS`, or
            ``"auto"`` (LLaMA-2-7B/13B-shaped models by hidden size and depth).
        tau: sink threshold on ``phi`` (20).
        fraction: share of sink attention moved (0.4 = official ``p=0.6`` kept).
        rho: minimum non-sink share of the image attention for an image-centric head (0.5).
        min_image_attention: minimum image attention of a row (0.2).
        layers: decoder layers to act on, default ``range(2, L - 1)``.
    """

    removes_tokens = False

    def __init__(
        self,
        sink_dims: Sequence[int] | str = "auto",
        tau: float = 20.0,
        fraction: float = 0.4,
        rho: float = 0.5,
        min_image_attention: float = 0.2,
        layers: Sequence[int] | None = None,
    ):
        if isinstance(sink_dims, str):
            if sink_dims != "auto" and sink_dims not in KNOWN_SINK_DIMS:
                raise ValueError(
                    f"VAR: sink_dims must be a tuple of ints, 'auto' or one of {sorted(KNOWN_SINK_DIMS)}; "
                    f"got {sink_dims!r} (find them with calibrate_sink_dims)"
                )
        elif not sink_dims or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sink_dims
        ):
            raise ValueError(f"VAR: sink_dims must be non-negative ints, got {sink_dims!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
            raise ValueError(f"VAR: tau must be a positive number, got {tau!r}")
        for name, value in (
            ("fraction", fraction),
            ("rho", rho),
            ("min_image_attention", min_image_attention),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"VAR: {name} must be in [0, 1], got {value!r}")
        self.sink_dims, self.tau, self.fraction = sink_dims, float(tau), float(fraction)
        self.rho, self.min_image_attention = float(rho), float(min_image_attention)
        self.layers = None if layers is None else tuple(layers)
        self._dims: tuple[int, ...] = ()
        self._layers: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"VAR(sink_dims={self.sink_dims!r}, tau={self.tau}, fraction={self.fraction}, rho={self.rho}, "
            f"min_image_attention={self.min_image_attention}, layers={self.layers})"
        )

    def check(self, info: ModelInfo) -> None:
        dims = self.sink_dims
        if dims == "auto":
            name = _AUTO.get((info.hidden_size, info.num_layers))
            if name is None:
                raise ValueError(
                    f"VAR: no known sink dimensions for a {info.hidden_size}-wide, {info.num_layers}-layer "
                    "language model; pass sink_dims=... (see calibrate_sink_dims)"
                )
            dims = KNOWN_SINK_DIMS[name]
        elif isinstance(dims, str):
            dims = KNOWN_SINK_DIMS[dims]
        if max(dims) >= info.hidden_size:
            raise ValueError(f"VAR: sink dimension {max(dims)} is outside the hidden size {info.hidden_size}")
        layers = range(2, info.num_layers - 1) if self.layers is None else self.layers
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < info.num_layers:
                raise ValueError(
                    f"VAR: layer {layer!r} is outside the {info.num_layers}-layer language model"
                )
        self._dims, self._layers = tuple(dims), set(layers)

    def attention_layers(self, info: ModelInfo) -> set[int]:
        return self._layers

    def before_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> None:
        if layer not in self._layers:
            return
        visual = state.current(state.visual)
        sink = (sink_scores(hidden, self._dims) > self.tau) & state.current(state.real)
        category = torch.full_like(visual, OTHER, dtype=torch.int8)
        category[visual] = VISUAL
        category[sink & visual] = VISUAL_SINK
        category[sink & ~visual] = TEXT_SINK
        state.extra.setdefault("var_category", {})[layer] = category
        if "var_queries" not in state.extra:
            after_image = visual.long().cumsum(1) > 0
            state.extra["var_queries"] = after_image & ~visual & state.current(state.real)

    def sinks(self, state: Prefill) -> dict[int, torch.Tensor]:
        """Per acted-on layer, the ``[B, L]`` key categories found at the last prefill."""
        return state.extra.get("var_category", {})

    def attention(self, layer, q, k, v, attn_mask, causal, scale, adapter, prefill: bool) -> torch.Tensor:
        state = adapter.state
        category = state.extra["var_category"][layer]
        if prefill:
            queries = state.extra["var_queries"]
        else:
            extra = k.shape[1] - category.shape[1]
            category = torch.cat([category, category.new_zeros(category.shape[0], extra)], dim=1)
            queries = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        # the official HeadFork selects no head at all in a layer without visual sinks
        queries = queries & (category == VISUAL_SINK).any(1, keepdim=True)
        return visual_sink_attention(
            q, k, v, category, queries, fraction=self.fraction, rho=self.rho,
            min_image_attention=self.min_image_attention, attn_mask=attn_mask, causal=causal, scale=scale,
        )  # fmt: skip
