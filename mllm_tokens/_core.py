"""Model-independent pieces of the token reducers: the reducer contract, token layouts, masks, FLOPs.

A *layout* says which tokens of the language model's input sequence a decoder layer sees: ``index``
``[B, Lc]`` (positions in the LLM input) and ``valid`` ``[B, Lc]`` (False for filler slots added at the
front so that samples with different kept counts share one tensor: left padding, so the last slot is
always each sample's last token). Reducers only ever shrink a layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class ModelInfo:
    """What a reducer needs to know about the model to validate itself."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_layers: int
    patches_per_image: int  # tokens of one full image (anyres: one view), the unit of an int keep; 0 when
    # images have no common size (dynamic resolution): an int keep is then per image, capped at its tokens
    attn_implementation: str
    # M-RoPE (Qwen2-VL): ``(t, h, w)`` position ids that have no contiguous renumbering; every kept token
    # keeps its ids after any drop (``Reducer.renumber_positions`` does not apply)
    multi_axis_positions: bool = False
    # every reducer image is one ``side x side`` view and ``Prefill.patch_id`` its raster index there (a
    # LLaVA-NeXT tile that lost rows to unpadding has fewer tokens); False where units mix views or
    # pooled frames (LLaVA-OneVision) or have no common grid (Qwen2-VL)
    patch_grid: bool = True


@dataclass
class PromptImage:
    """One image of a prompt as its family lays it out, for reducers that rewrite whole images."""

    sample: int
    slots: torch.Tensor  # [n] long: its positions in the sample (visual tokens and any row-end newlines)
    units: list[int]  # its units (``Prefill.image_id`` values): one, or an anyres base view then its tiles
    grid: tuple[int, int] | None = None  # anyres: the tiles' (rows, columns) as stitched; None: one view


class ModelOps(Protocol):
    """Computations of the language model that an adapter lends to reducers during a prefill
    (``Prefill.ops``), for methods that score with a layer's projections or the final norm."""

    def layer_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[B, Lc, H, Dh]`` and k ``[B, Lc, Hkv, Dh]`` (RoPE applied at the current positions, no
        cache update) that decoder layer ``layer`` computes from its input ``hidden`` ``[B, Lc, D]``."""
        ...

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's final norm (before the LM head) applied to ``hidden`` ``[B, Lc, D]``."""
        ...

    def project_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """The multimodal projector: vision features ``[images, n, Dv]`` -> embeddings ``[images, n, D]``."""
        ...

    def prompt_images(self, state: Prefill) -> list[PromptImage]:
        """The prompt's images, sample after sample, in prompt order."""
        ...


@dataclass
class VisionPass:
    """State of one vision-tower pass for reducers that merge tokens inside the encoder
    (``Reducer.vision_merge_layers``): created when the tower starts, passed to every merge step."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [views, n, Dh] head-mean keys
    extra: dict = field(default_factory=dict)  # the reducer's running state (groups, sizes, order)
    # per-view findings for the prefill, ``[views, ...]`` each (``Prefill.vision_findings``)
    findings: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Prefill:
    """Per-forward state of one prefill (the forward that sees the images).

    Shapes use ``B`` (batch) and ``L`` (LLM input length after any pre-LLM reduction).
    """

    visual: torch.Tensor  # [B, L] bool: image-token positions
    real: torch.Tensor  # [B, L] bool: not padding
    image_id: torch.Tensor  # [B, L] long: global image index of each visual token, -1 elsewhere
    patch_id: torch.Tensor  # [B, L] long: patch index of each visual token inside its image, -1 elsewhere
    images_per_sample: torch.Tensor  # [B] long
    image_tokens: torch.Tensor  # [images] long: visual tokens of each image in the caller's prompt
    original_real: torch.Tensor  # [B] long: real tokens before any pre-LLM reduction
    original_visual: torch.Tensor  # [B] long: visual tokens before any pre-LLM reduction
    index: torch.Tensor  # [B, Lc] current layout
    valid: torch.Tensor  # [B, Lc]
    key_mass: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, Lc] float32
    cls_scores: list[torch.Tensor] = field(default_factory=list)  # per vision layer: [images, patches]
    layer_visual: list[torch.Tensor] = field(default_factory=list)  # per LLM layer: [B] visual tokens seen
    layer_real: list[torch.Tensor] = field(default_factory=list)  # per LLM layer: [B] real tokens seen
    extra: dict = field(default_factory=dict)  # reducer-specific prefill findings (e.g. VAR's sinks)
    # [B, L0, D] the language model's input embeddings (word embeddings with the projected image features
    # scattered in) as the prefill starts, before any pre-LLM reduction: what pre_llm may score (DivPrune)
    embeds: torch.Tensor | None = None
    ops: ModelOps | None = None  # the adapter's model computations (PyramidDrop, DART)
    # [B, L0] bool every image / video placeholder of input_ids as the prefill starts (row-end newlines
    # too): ``real & ~media`` is the prompt's text (CDPruner's instruction)
    media: torch.Tensor | None = None
    # needs_vision_features only: [images, 1 + patches, Dv] the vision features the projector takes (the
    # LLM's feature layer), [CLS] first; and per vision_cls_layers layer [images, 1 + patches, Dh] keys
    # averaged over heads
    vision_hidden: torch.Tensor | None = None
    cls_keys: list[torch.Tensor] = field(default_factory=list)
    # vision_global_layers: layer -> [images, 1 + patches] float32 attention mass each token of the vision
    # tower received, averaged over heads and all queries ([CLS] first)
    global_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    # [B, L] bool query sets over the LLM input that a reducer registers during the prefill (before the
    # layer that needs them); key_mass_query may return one's name (SparseVLM's text raters)
    query_sets: dict[str, torch.Tensor] = field(default_factory=dict)
    # VisionPass.findings of the vision pass, one row per image of the batch (beams repeat them)
    vision_findings: list[torch.Tensor] = field(default_factory=list)

    def per_sample(self, per_image: torch.Tensor) -> torch.Tensor:
        """Sum a per-image ``[images]`` tensor over each sample's images: ``[B]`` long."""
        counts = self.images_per_sample
        owner = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)
        return torch.zeros_like(counts).index_add_(0, owner, per_image.to(counts.dtype))

    def current(self, per_token: torch.Tensor) -> torch.Tensor:
        """Gather a ``[B, L]`` per-input-token tensor into the current layout ``[B, Lc]``."""
        out = per_token.gather(1, self.index)
        return out & self.valid if out.dtype == torch.bool else out


class Reducer:
    """Base class: a configuration object; the adapter calls these hooks (all optional).

    * ``check(info)`` raises ``ValueError`` when the reducer cannot act on this model.
    * ``vision_cls_layers(info)``: vision-encoder layers whose [CLS] attention row must be scored.
    * ``vision_global_layers(info)``: vision-encoder layers whose per-key attention mass from all queries
      must be recorded (``Prefill.global_scores``).
    * ``pre_llm(state)``: ``[B, L]`` bool keep mask applied before the language model, or None.
    * ``key_mass_query(layer)``: query set for which ``layer`` must report per-key attention mass:
      ``"all"``, ``"text"``, ``"last"`` or the name of one of ``Prefill.query_sets``.
    * ``after_layer(layer, hidden, state)``: ``[B, Lc]`` keep mask over the current layout, or None; or
      ``(keep, new_hidden)`` to also replace the layer's output ``[B, Lc, D]`` before the kept slots are
      taken (SparseVLM puts its recycled tokens in slots it keeps).
    * ``attention_layers(info)`` / ``attention(...)``: replace the attention of some layers (VAR).
    * ``before_layer(layer, hidden, state)``: look at a layer's input during prefill.
    * ``vision_merge_layers(info)`` / ``vision_merge(layer, hidden, vision)``: after the attention of
      those vision-encoder layers, rewrite the residual stream ``hidden [views, n, Dv]`` in place
      (before the layer's MLP; ``VisionPass.keys[layer]`` holds that attention's keys). The stream keeps
      its length: merged tokens are represented by their members all holding the merged value (ToMe).

    ``removes_tokens`` is False for reducers that never shorten the sequence (VAR): only those accept
    ``labels``, because a shortened prefill returns fewer logits rows than the labels have.

    ``pre_llm`` may also write new values into ``state.embeds`` (same shape) at the slots it keeps: the
    language model then takes those (VisionZip puts merged tokens there). ``needs_vision_features`` True:
    the adapter fills ``Prefill.vision_hidden`` and ``Prefill.cls_keys``.

    ``renumber_positions`` True: after a drop inside the LLM (``after_layer``) each kept token's position
    id moves down by the real tokens dropped before it, so later layers see contiguous positions, and
    decode steps at those layers move down by all tokens dropped (PyramidDrop's official code). False
    (default): tokens keep their original position ids (FastV, DART). On models with multi-axis positions
    (``ModelInfo.multi_axis_positions``) tokens always keep their ids.
    """

    removes_tokens = True
    renumber_positions = False
    needs_vision_features = False

    def check(self, info: ModelInfo) -> None:
        return None

    def vision_cls_layers(self, info: ModelInfo) -> list[int]:
        return []

    def vision_global_layers(self, info: ModelInfo) -> list[int]:
        return []

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        return None

    def key_mass_query(self, layer: int) -> str | None:
        return None

    def after_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> torch.Tensor | None:
        return None

    def attention_layers(self, info: ModelInfo) -> set[int]:
        return set()

    def before_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> None:
        return None

    def vision_merge_layers(self, info: ModelInfo) -> list[int]:
        return []

    def vision_merge(self, layer: int, hidden: torch.Tensor, vision: VisionPass) -> None:
        return None


def check_budget(reducer: str, budget: str, tokens: int, patches: int) -> None:
    """The one error of every reducer whose ``budget`` (its arguments, e.g. ``"keep=64"``) keeps ``tokens``
    visual tokens per image, more than the ``patches`` of an image (``ModelInfo.patches_per_image``; 0, no
    common size, is checked per image at the prefill)."""
    if 0 < patches < tokens:
        raise ValueError(
            f"{reducer}: {budget} keeps {tokens} tokens per image, which is more than the {patches} visual "
            f"tokens per image; lower it to at most {patches}"
        )


def shrink_layout(
    index: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the slots marked in ``keep`` ``[B, Lc]`` (original order), left-padded to the longest row.

    Returns ``(new_index, new_valid, source_slot)``, all ``[B, Lnew]``; ``source_slot`` indexes the old
    layout and gathers any per-slot tensor (hidden states, positions) into the new one.
    """
    keep = keep & valid
    counts = keep.sum(1)
    new_len = int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_len]
    slots = torch.arange(new_len, device=index.device)
    shift = new_len - counts
    source = order.gather(1, (slots[None] - shift[:, None]).clamp_min(0))
    new_valid = slots[None] >= shift[:, None]
    return index.gather(1, source), new_valid, source


def gather_tokens(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``x[b, source[b, i]]`` for ``x`` of shape ``[B or 1, L, ...]``."""
    x = x.expand(source.shape[0], *x.shape[1:])
    idx = source.view(*source.shape, *([1] * (x.ndim - 2))).expand(*source.shape, *x.shape[2:])
    return x.gather(1, idx)


def additive_causal_mask(key_ok: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, q_len, Lk]`` additive mask: query ``i`` (the last ``q_len`` slots) sees key ``j`` iff
    ``key_ok[b, j]`` and ``j <= i`` (bottom-right causal)."""
    lk = key_ok.shape[1]
    qi = torch.arange(lk - q_len, lk, device=key_ok.device)[:, None]
    kj = torch.arange(lk, device=key_ok.device)[None, :]
    allowed = key_ok[:, None, None, :] & (kj <= qi)[None, None]
    zero = torch.zeros((), dtype=dtype, device=key_ok.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def layer_flops(n: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """Prefill FLOPs of one LLaMA-style decoder layer on ``n`` tokens (2 FLOPs per multiply-add).

    q/k/v/o projections ``2 n d (2 d + 2 d_kv)``, scores and weighted sum ``4 n^2 d``, and the gated
    MLP's three matrices ``6 n d m`` (PyramidDrop's correction of FastV's ``2 n d m``).
    """
    d = info.hidden_size
    d_kv = d * info.num_kv_heads // info.num_heads
    n = n.double()
    return 2 * n * d * (2 * d + 2 * d_kv) + 4 * n * n * d + 6 * n * d * info.intermediate_size
