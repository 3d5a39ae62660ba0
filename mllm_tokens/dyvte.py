"""DyVTE — Dynamic Visual-Token Exit (Wu et al., "Accelerating Multimodal Large Language Models via
Dynamic Visual-Token Exit and the Empirical Findings", arXiv 2411.19628; official code
DoubtedSteam/DyVTE, ``llava/model/language_model/modeling_llama.py``).

One small router ("visual gate", the paper's hyper-network) per decoder layer decides, from the
text tokens, whether the visual tokens are still needed. Official definitions reproduced here:

* router: ``Linear(2h -> 2048, no bias) -> GELU -> Linear(2048 -> 2, no bias)`` (a dropout is defined
  but unused in the official forward, so none here); xavier-uniform init (``init_weight.py``);
* input after layer ``l``: ``concat(mean of the text tokens after the image except the last,
  last token)`` of layer ``l``'s output (prompt tokens only);
* decision: exit when ``logit[1] > logit[0]`` (no threshold), checked after every layer during the
  prefill until the first exit; from layer ``l + 1`` on ALL visual tokens are removed (hidden states,
  KV cache, mask); the remaining tokens keep their original position ids;
* labels (training): for a random layer ``l`` the text predictions with the image hidden from layer
  ``l + 1`` on are compared with the full model's: label 1 iff top-1 agreement on the answer tokens
  ``> 0.99`` and the answer loss ``< 1.03x`` the full model's; loss = cross-entropy on the router
  logits, router inputs detached (only routers learn). See :func:`exit_labels` and
  ``recipes/dyvte.py``.

Differences: the official code hard-codes the image span (start 35, 576 tokens) and batch size 1;
here the span comes from the image tokens of each sample (the text "after the image" is the text after
the last image), batches are padded and each sample exits at its own layer. The official decode
steps re-run the router on single tokens when no exit happened; here the decision is made once, at
the prefill. An empty "text after the image" contributes a zero mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer

ROUTER_DIM = 2048  # official hidden width of every router


class ExitRouter(nn.Module):
    """``[.., 2h]`` features -> ``[.., 2]`` logits (stay, exit)."""

    def __init__(self, hidden_size: int, router_dim: int = ROUTER_DIM):
        super().__init__()
        self.w1 = nn.Linear(2 * hidden_size, router_dim, bias=False)
        self.w2 = nn.Linear(router_dim, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class DyVTERouters(nn.Module):
    """The hyper-network: one :class:`ExitRouter` per decoder layer.

    Args:
        hidden_size: the language model's hidden size ``h``.
        num_layers: decoder layers (one router each).
        router_dim: router width (official 2048).
    """

    def __init__(self, hidden_size: int, num_layers: int, router_dim: int = ROUTER_DIM):
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("router_dim", router_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DyVTERouters: {name} must be a positive int, got {value!r}")
        self.hidden_size, self.num_layers, self.router_dim = hidden_size, num_layers, router_dim
        self.routers = nn.ModuleList(ExitRouter(hidden_size, router_dim) for _ in range(num_layers))
        for router in self.routers:
            nn.init.xavier_uniform_(router.w1.weight)
            nn.init.xavier_uniform_(router.w2.weight)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 2]`` of router ``layer`` for features ``[B, 2h]``."""
        router = self.routers[layer]
        return router(features.to(router.w1.weight.dtype))

    @classmethod
    def for_model(cls, model: nn.Module, router_dim: int = ROUTER_DIM) -> DyVTERouters:
        """Routers shaped for a LLaVA model's language model."""
        text = model.config.text_config
        return cls(text.hidden_size, text.num_hidden_layers, router_dim)

    def save(self, path: str | Path) -> None:
        """Write the weights (and the shape as metadata) to a safetensors file."""
        from safetensors.torch import save_file

        meta = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "router_dim": self.router_dim}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"dyvte": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> DyVTERouters:
        """Read routers written by :meth:`save` (safetensors, no pickle).

        The file is untrusted: its ``dyvte`` metadata must be JSON with exactly the keys ``hidden_size``,
        ``num_layers`` and ``router_dim`` (positive ints within :data:`LOAD_LIMITS`), and its tensors
        must be exactly the ``[router_dim, 2h]`` / ``[2, router_dim]`` weights of that many routers;
        all of this is checked from the header before anything is allocated. ``ValueError`` otherwise.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("dyvte")
                if raw is None:
                    raise ValueError(
                        f"DyVTERouters.load: {path} has no 'dyvte' metadata (not saved by DyVTERouters.save)"
                    )
                meta = _parse_router_meta(raw, path)
                names = f.keys()  # a safe_open handle is not iterable
                _check_router_shapes(meta, {k: tuple(f.get_slice(k).get_shape()) for k in names}, path)
                state = {k: f.get_tensor(k) for k in names}
        except SafetensorError as exc:
            raise ValueError(f"DyVTERouters.load: {path} is not a readable safetensors file: {exc}") from exc
        bad = sorted(k for k, v in state.items() if not v.is_floating_point())
        if bad:
            raise ValueError(f"DyVTERouters.load: {path}: tensors {bad[:3]} are not floating point")
        with torch.device("meta"):  # no second copy of the weights: the file's tensors are assigned
            routers = cls(**meta)
        routers.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
        return routers


# Bounds on what a routers file may declare (LLaMA-3-405B: hidden 16384, 126 layers; official width 2048).
LOAD_LIMITS = {"hidden_size": 65536, "num_layers": 1024, "router_dim": 65536}


def _parse_router_meta(raw: str, path: str | Path) -> dict[str, int]:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"DyVTERouters.load: {path}: 'dyvte' metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or set(meta) != set(LOAD_LIMITS):
        found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(
            f"DyVTERouters.load: {path}: 'dyvte' metadata must have exactly the keys "
            f"{sorted(LOAD_LIMITS)}, got {found}"
        )
    for key, limit in LOAD_LIMITS.items():
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(
                f"DyVTERouters.load: {path}: {key} must be an int in [1, {limit}], got {value!r}"
            )
    return meta


def _check_router_shapes(meta: dict[str, int], shapes: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """The file's tensor names and shapes must be exactly those of ``DyVTERouters(**meta)``."""
    h, d = meta["hidden_size"], meta["router_dim"]
    expected = {}
    for i in range(meta["num_layers"]):
        expected[f"routers.{i}.w1.weight"] = (d, 2 * h)
        expected[f"routers.{i}.w2.weight"] = (2, d)
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
        raise ValueError(
            f"DyVTERouters.load: {path}: tensors do not match the metadata {meta}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} of another shape (e.g. {[(k, shapes[k]) for k in wrong[:2]]})"
        )


def router_features(
    hidden: torch.Tensor, visual: torch.Tensor, real: torch.Tensor, prompt_end: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, 2h]`` router input: mean of the text tokens after the last image token (excluding the last
    prompt token) concatenated with the last prompt token.

    ``hidden`` ``[B, N, h]``; ``visual``/``real`` ``[B, N]`` bool; ``prompt_end`` ``[B]``: index one past
    each sample's last prompt token (default: the whole sequence).
    """
    b, n, _ = hidden.shape
    pos = torch.arange(n, device=hidden.device)[None]
    end = torch.full((b,), n, device=hidden.device) if prompt_end is None else prompt_end
    after = visual.long().flip(1).cumsum(1).flip(1) == 0  # no image token at or after this slot
    text = after & real & (pos < (end - 1)[:, None])
    count = text.sum(1, keepdim=True).clamp_min(1)
    mean = (hidden.float() * text[..., None]).sum(1) / count
    last = hidden.float()[torch.arange(b, device=hidden.device), end - 1]
    return torch.cat([mean, last], dim=-1)


class DyVTE(Reducer):
    """Remove all visual tokens from the layer after the one whose router says "exit".

    Args:
        hypernet: :class:`DyVTERouters` or a path to their safetensors file.
        exit_layer: force every sample to exit after this layer instead of asking the routers (what the
            training labels need; also a fixed-depth baseline).
    """

    def __init__(self, hypernet: DyVTERouters | str | Path | None = None, exit_layer: int | None = None):
        if hypernet is None and exit_layer is None:
            raise ValueError("DyVTE: give the trained routers (hypernet=...) or a fixed exit_layer")
        if isinstance(hypernet, (str, Path)):
            hypernet = DyVTERouters.load(hypernet)
        if hypernet is not None and not isinstance(hypernet, DyVTERouters):
            raise ValueError(f"DyVTE: hypernet must be DyVTERouters or a path, got {type(hypernet).__name__}")
        if exit_layer is not None and (isinstance(exit_layer, bool) or not isinstance(exit_layer, int)):
            raise ValueError(f"DyVTE: exit_layer must be an int or None, got {exit_layer!r}")
        self.hypernet, self.exit_layer = hypernet, exit_layer

    def __repr__(self) -> str:
        return f"DyVTE(hypernet={'set' if self.hypernet is not None else None}, exit_layer={self.exit_layer})"

    def check(self, info: ModelInfo) -> None:
        if self.exit_layer is not None and not 0 <= self.exit_layer < info.num_layers:
            raise ValueError(
                f"DyVTE: exit_layer={self.exit_layer} is outside the {info.num_layers}-layer model"
            )
        net = self.hypernet
        if net is not None and (net.hidden_size, net.num_layers) != (info.hidden_size, info.num_layers):
            raise ValueError(
                f"DyVTE: routers are for hidden size {net.hidden_size} x {net.num_layers} layers, "
                f"the model has {info.hidden_size} x {info.num_layers}"
            )

    def after_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> torch.Tensor | None:
        visual = state.current(state.visual)
        exited = state.extra.setdefault("dyvte_exit", torch.full_like(state.images_per_sample, -1))
        if self.exit_layer is not None:
            leave = torch.full_like(exited, layer == self.exit_layer, dtype=torch.bool)
        else:
            feats = router_features(hidden, visual, state.current(state.real))
            if self.hypernet.routers[0].w1.weight.device != hidden.device:
                self.hypernet.to(hidden.device)
            with torch.no_grad():
                logits = self.hypernet(layer, feats)
            leave = logits[:, 1] > logits[:, 0]
        leave &= (exited < 0) & visual.any(1)
        if not bool(leave.any()):
            return None
        exited[leave] = layer
        return ~(visual & leave[:, None])

    @staticmethod
    def exit_layers(state: Prefill) -> torch.Tensor:
        """``[B]`` layer after which each sample dropped its visual tokens (-1: never)."""
        return state.extra.get("dyvte_exit", torch.full_like(state.images_per_sample, -1))


def _answer_loss_and_top1(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: mean next-token loss on the answer tokens and the top-1 predictions ``[B, N-1]``."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    answer = shift_labels != -100
    ce = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp_min(0), reduction="none")
    loss = (ce * answer).sum(1) / answer.sum(1).clamp_min(1)
    return loss, shift_logits.argmax(-1)


@torch.no_grad()
def exit_labels(
    model: nn.Module,
    layer: int,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    agreement: float = 0.99,
    loss_ratio: float = 1.03,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router features after ``layer`` and the official exit labels for one batch.

    The full model (A) and the model with every visual token removed from layer ``layer + 1`` on (B)
    are run on the same image-text batch; ``labels`` ``[B, N]`` mark the answer tokens (``-100``
    elsewhere, HF convention). Label 1 iff B's top-1 next-token predictions agree with A's on more than
    ``agreement`` of the answer tokens and B's answer loss is below ``loss_ratio`` times A's.

    Returns ``features [B, 2h]`` (detached, from A's layer-``layer`` output over the prompt tokens)
    and ``labels [B]`` long.
    """
    from visattn.mllm_tokens import attach

    captured = {}
    block = model.model.language_model.layers[layer]
    hook = block.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
    try:
        full = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    finally:
        hook.remove()
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    answer = labels != -100
    pos = torch.arange(labels.shape[1], device=labels.device)[None]
    prompt_end = torch.where(answer, pos, labels.shape[1]).amin(1)
    visual = input_ids == model.config.image_token_id
    features = router_features(captured["h"], visual, real, prompt_end)
    with attach(model, DyVTE(exit_layer=layer)) as handle:
        pruned = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        where = handle.output_positions
    if where is not None:  # back to the caller's positions (visual slots stay zero; no answer is visual)
        scattered = pruned.new_zeros(full.shape)
        rows = torch.arange(where.shape[0], device=where.device)[:, None].expand_as(where)
        ok = where >= 0
        scattered[rows[ok], where[ok]] = pruned[ok]
        pruned = scattered
    loss_a, top_a = _answer_loss_and_top1(full, labels)
    loss_b, top_b = _answer_loss_and_top1(pruned, labels)
    scored = labels[:, 1:] != -100
    agree = ((top_a == top_b) & scored).sum(1) / scored.sum(1).clamp_min(1)
    return features, ((agree > agreement) & (loss_b < loss_ratio * loss_a)).long()
