"""The model-family-independent half of every adapter: how a reducer is hooked into a transformers
vision-language model whose language model is a stack of decoder layers.

A family module (``llava.py``, ``qwen2_vl.py``, ...) subclasses :class:`Adapter` and says where the
language model, the vision tower and the visual tokens are; this module does the rest, all undone by
:meth:`Adapter.remove`:

* attention of the layers a reducer observes or changes (key-mass scoring, VAR, the vision [CLS] row)
  runs through visattn's ``AttentionInterface`` function (:func:`~visattn.mllm_tokens._hf.route_attention`),
  which receives transformers' own q/k/v after RoPE and the cache update;
* a forward pre-hook on the outer multimodal model records ``input_ids`` (where the visual tokens are);
* a forward pre-hook on the language model starts a prefill (and applies a pre-LLM reduction), and at
  decode steps rewrites the 2-D mask / positions so they match the shortened KV cache;
* forward pre-/post-hooks on the decoder layers shrink the token layout after a layer and give later
  layers the matching mask (4-D; 2-D padding masks under flash attention), rotary embeddings and
  position ids (prefill and decode).
"""

from __future__ import annotations

import torch
from torch import nn

from visattn.kernels.ops.attention_with_key_mass import attention_with_key_mass
from visattn.mllm_tokens._core import (
    Prefill,
    PromptImage,
    Reducer,
    additive_causal_mask,
    gather_tokens,
    layer_flops,
    shrink_layout,
)
from visattn.mllm_tokens._hf import cache_from, check_version, is_prefill, route_attention, to_token_major


def padding_mask_convention(impl: str) -> bool | None:
    """How the decoder layers of attention implementation ``impl`` take their mask: False for a 4-D
    mask (eager, sdpa), True for a 2-D ``[B, Lk]`` padding mask with causality implied (the flash
    implementations and any other registered with transformers' ``flash_attention_mask``), None when
    the adapter cannot express a shortened layout in that form (flex attention's block masks, ...)."""
    if impl in ("eager", "sdpa"):
        return False
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    return True if ALL_MASK_ATTENTION_FUNCTIONS.get(impl) is flash_attention_mask else None


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the token axis of position ids (``[B, L]`` or multi-axis ``[A, B, L]``) by ``index [B, Lc]``."""
    if x.ndim == 2:
        return gather_tokens(x, index)
    return torch.stack([gather_tokens(a, index) for a in x])


def gather_rotary(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the token axis of rotary cos/sin (``[B, L, D]`` or multi-axis ``[A, B, L, D]``)."""
    if x.ndim == 3:
        return gather_tokens(x, index)
    return torch.stack([gather_tokens(a, index) for a in x])


class Adapter:
    """Hooks a :class:`~visattn.mllm_tokens._core.Reducer` into one model (see the module docstring).

    A family subclass sets, in ``__init__`` before calling :meth:`setup`: ``outer`` (the module whose
    forward takes ``input_ids``), ``lm`` (the language model: ``.layers``), ``text_config`` and
    ``info``; and implements :meth:`visual_tokens`, :meth:`segment` and optionally
    :meth:`vision_cls_attentions`, :meth:`prefill_positions`, :meth:`decode_positions`.
    """

    family = "?"

    def __init__(self, model: nn.Module, reducer: Reducer):
        check_version()
        self.model, self.reducer = model, reducer

    # ------------------------------------------------------------------ family interface
    def visual_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: the visual-token positions of ``input_ids`` that reducers may act on."""
        raise NotImplementedError

    def segment(self, ids: torch.Tensor, visual: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """``(image_id [B, L], patch_id [B, L], images_per_sample [B])`` of the visual tokens.

        Images are numbered through the batch, sample after sample. A token of ``visual`` that gets
        ``image_id`` -1 is left out of the visual tokens (LLaVA-NeXT's row-end newline tokens): reducers
        keep it and never count it."""
        raise NotImplementedError

    def vision_cls_attentions(self) -> list[nn.Module] | None:
        """The vision encoder's attention modules (one per layer) whose [CLS] row VTC-CLS scores, or
        None when the vision tower has no [CLS] token."""
        return None

    def prefill_positions(self, kwargs: dict, index: torch.Tensor, new_real: torch.Tensor) -> torch.Tensor:
        """Position ids of a sequence shortened before the LLM to the input slots ``index [B, Lnew]``.

        Default (the official LLaVA-style reducers): contiguous positions over the kept tokens."""
        return (new_real.long().cumsum(1) - 1).clamp_min(0)

    def decode_positions(self, kwargs: dict) -> torch.Tensor | None:
        """Position ids of a decode step after a pre-LLM reduction (None: leave them as they are)."""
        pos = kwargs.get("position_ids")
        return None if pos is None else pos - self.pos_shift[:, None]

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Checks shared by every family, once the subclass has set ``lm``, ``text_config``, ``info``."""
        impl = self.text_config._attn_implementation
        self.padding_masks = padding_mask_convention(impl)
        if self.padding_masks is None:
            raise ValueError(
                f"attach: the language model uses attn_implementation={impl!r}; supported: 'eager', "
                "'sdpa' and the flash-attention implementations (flash_attention_2/3/4)"
            )
        self.layers = self.lm.layers
        self.reducer.check(self.info)
        if self.reducer.vision_cls_layers(self.info) and self.vision_cls_attentions() is None:
            raise ValueError(
                f"attach: {type(self.reducer).__name__} ranks patches by the vision tower's [CLS] attention, "
                f"and the {self.family} vision tower has no [CLS] token"
            )
        if self.reducer.vision_global_layers(self.info) and self.vision_cls_attentions() is None:
            raise ValueError(
                f"attach: {type(self.reducer).__name__} ranks patches by the vision tower's attention maps, "
                f"which the adapters record only for CLIP-style towers with one prompt token per patch; the "
                f"{self.family} tower is not one"
            )
        self.stats: list[dict] = []
        self.state: Prefill | None = None
        self.in_prefill = False
        self._handles: list = []
        self._undo: list = []
        self._call_ids: torch.Tensor | None = None
        self._capture: dict | None = None  # layer_qk: where the routed attention leaves q and k
        self._clear_vision_findings()
        self._reset_decode()

    def install(self) -> None:
        hook = self._handles.append
        hook(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        hook(self.outer.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
        cls_layers = self.reducer.vision_cls_layers(self.info)
        global_layers = self.reducer.vision_global_layers(self.info)
        if cls_layers or global_layers or self.reducer.needs_vision_features:
            hook(self.vision_tower.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        if self.reducer.needs_vision_features:
            hook(self.vision_tower.register_forward_hook(self._vision_post))
        if cls_layers or global_layers:
            attentions = self.vision_cls_attentions()
            self._vision_scored = {
                attentions[i]: (i, i in cls_layers, i in global_layers) for i in {*cls_layers, *global_layers}
            }
            handlers = {module: self._vision_attention for module in self._vision_scored}
            self._undo.append(route_attention(attentions[0].config, handlers))
        hook(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        hook(self.lm.register_forward_hook(self._lm_post))
        for idx, layer in enumerate(self.layers):
            hook(layer.register_forward_pre_hook(self._make_layer_pre(idx), with_kwargs=True))
            hook(layer.register_forward_hook(self._make_layer_post(idx)))
        # every decoder layer's attention is routed: the handler defers to transformers' own function
        # except where a reducer observes or changes a layer, or layer_qk asks for its q and k
        handlers = {layer.self_attn: self._lm_attention for layer in self.layers}
        self._undo.append(route_attention(self.text_config, handlers))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.state = None
        self._reset_decode()

    def _reset_decode(self) -> None:
        self.active = False  # a reduced prefill happened and decode steps must follow it
        self.in_len = 0  # LLM input length at prefill (after pre-LLM reduction)
        self.orig_len = 0  # length of the caller's sequence at prefill
        self.in_mask: torch.Tensor | None = None  # [B, in_len] long mask given to the LLM at prefill
        self.pre_llm_reduced = False
        self.pre_index: torch.Tensor | None = None  # [B, in_len] caller position of each LLM input slot
        self.pos_shift: torch.Tensor | None = None  # [B] tokens removed before the LLM
        self.layer_key_ok: dict[int, torch.Tensor] = {}  # layer -> [B, Lc] keys of its prefill cache
        self.override: dict[int, tuple] = {}  # prefill: layer -> (mask, (cos, sin), position_ids)
        self.decode_new: torch.Tensor | None = None  # [B, T] mask of tokens appended after prefill
        self.decode_shift: dict[int, torch.Tensor] = {}  # layer -> [B] position shift (renumber_positions)

    def _clear_vision_findings(self) -> None:
        self._cls_buffer: list[torch.Tensor] = []  # per scored vision layer: [images, patches] [CLS] mass
        self._global_buffer: dict[int, torch.Tensor] = {}  # vision layer -> [images, 1 + patches] key mass
        self._key_buffer: list[torch.Tensor] = []  # needs_vision_features: [images, 1 + patches, Dh] keys
        self._vision_hidden: list[torch.Tensor] = []  # needs_vision_features: the projector's input

    # ------------------------------------------------------------------ model-level hooks
    def _model_pre(self, module, args, kwargs):
        if kwargs.get("labels") is not None and self.reducer.removes_tokens:
            raise ValueError(
                f"attach: labels are not supported with {type(self.reducer).__name__}, which removes tokens "
                "(the logits would no longer line up with the labels); compute the loss from the logits "
                "and handle.output_positions, or remove() the reducer to train"
            )
        return None

    def _outer_pre(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None and kwargs.get("inputs_embeds") is not None and is_prefill(cache_from(kwargs)):
            # the visual tokens can only be found in input_ids: without them the reducer would do nothing
            raise ValueError(
                "attach: a reduced prompt must come as input_ids (with its images), not inputs_embeds"
            )
        self._call_ids = ids
        self._call_kwargs = kwargs
        return None

    def _vision_pre(self, module, args, kwargs):
        # generate() runs the vision tower before the model forward (mm_encoder_outputs): collect here
        self._clear_vision_findings()
        return None

    def _vision_post(self, module, args, output):
        self._vision_hidden = [self.vision_features(output)]
        return None

    def vision_features(self, tower_output) -> torch.Tensor:
        """``[images, 1 + patches, Dv]``: the vision features the projector takes, [CLS] first (for
        reducers with ``needs_vision_features``)."""
        raise ValueError(f"attach: the {self.family} adapter does not expose the vision features")

    def _vision_attention(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """Records the [CLS] query's attention over the patches and / or every key's attention mass from
        all queries (``vision_global_layers``), then lets the layer run unchanged."""
        layer, cls_row, all_rows = self._vision_scored[module]
        if cls_row:
            q, k = to_token_major(query[:, :, :1], key)
            _, mass = attention_with_key_mass(q, k, k, scale=scaling, query_set="all")
            self._cls_buffer.append(mass[:, 1:])
            if self.reducer.needs_vision_features:
                self._key_buffer.append(key.mean(1))
        if all_rows:
            q, k = to_token_major(query, key)
            self._global_buffer[layer] = attention_with_key_mass(q, k, k, scale=scaling, query_set="all")[1]
        return None

    # ------------------------------------------------------------------ language model
    def _lm_pre(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        cache = cache_from(kwargs)
        ids, outer_kwargs = self._call_ids, getattr(self, "_call_kwargs", {})
        self._call_ids = None
        if is_prefill(cache):
            self._reset_decode()
            self.state = None
            self.in_prefill = False
            if embeds is None or ids is None or ids.shape[:2] != embeds.shape[:2]:
                self.stats = []
                return None
            visual = self.visual_tokens(ids)
            if not bool(visual.any()):
                self.stats = []
                return None
            return args, self._start_prefill(ids, embeds, visual, kwargs, outer_kwargs)
        if not self.active:
            return None
        if embeds is None:
            raise ValueError(
                f"attach: decode steps of a reduced model must come through the {self.family} model"
            )
        return args, self._decode_inputs(kwargs, cache, embeds.shape[0], embeds.shape[1])

    def _start_prefill(self, ids, embeds, visual, kwargs: dict, outer_kwargs: dict) -> dict:
        b, length = visual.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError(
                "attach: a reduced model needs a 2-D attention_mask (or None), got a 4-D mask "
                "(generate(cache_implementation='static') passes one: use the default dynamic cache)"
            )
        real = mask.bool() if mask is not None else torch.ones_like(visual)
        if self.reducer.removes_tokens and bool((real[:, :-1] & ~real[:, 1:]).any()):
            # the reduced layouts keep each sample's last token in the last slot (FastV's "last" query,
            # DyVTE's router input): padding after a real token would stand in for it
            raise ValueError(
                f"attach: {type(self.reducer).__name__} needs left padding (padding_side='left'), but the "
                "attention_mask has padding after real tokens"
            )
        image_id, patch_id, images_per_sample = self.segment(ids, visual, outer_kwargs)
        media, visual = visual, visual & (image_id >= 0)
        image_tokens = torch.bincount(image_id[visual], minlength=int(images_per_sample.sum()))
        arange = torch.arange(length, device=visual.device).expand(b, length)
        state = Prefill(
            visual=visual, real=real, image_id=image_id, patch_id=patch_id,
            images_per_sample=images_per_sample, image_tokens=image_tokens,
            original_real=real.sum(1), original_visual=visual.sum(1), index=arange,
            valid=torch.ones_like(visual), cls_scores=self._expanded(self._cls_buffer, images_per_sample),
            embeds=embeds, ops=self, media=media, global_scores=dict(zip(
                self._global_buffer, self._expanded(list(self._global_buffer.values()), images_per_sample)
            )),
            cls_keys=self._expanded(self._key_buffer, images_per_sample),
            vision_hidden=next(iter(self._expanded(self._vision_hidden, images_per_sample)), None),
        )  # fmt: skip
        self.orig_len = length
        keep = self.reducer.pre_llm(state)
        embeds = kwargs["inputs_embeds"] = state.embeds  # pre_llm may have written new tokens into it
        if keep is not None and not bool(keep.all()):
            index, valid, _ = shrink_layout(arange, torch.ones_like(visual), keep | ~real)
            new_real = real.gather(1, index) & valid
            state.visual = visual.gather(1, index) & valid
            state.real = new_real
            state.image_id = torch.where(valid, image_id.gather(1, index), -1)
            state.patch_id = torch.where(valid, patch_id.gather(1, index), -1)
            kwargs["position_ids"] = self.prefill_positions(kwargs, index, new_real)
            kwargs["inputs_embeds"] = gather_tokens(embeds, index)
            kwargs["attention_mask"] = None if mask is None and bool(valid.all()) else new_real.long()
            self.pos_shift = real.sum(1) - new_real.sum(1)
            self.pre_index = torch.where(valid, index, -1)
            self.pre_llm_reduced = True
            length = index.shape[1]
            arange = torch.arange(length, device=visual.device).expand(b, length)
            state.index, state.valid = arange, torch.ones_like(state.visual)
        self.state = state
        self.in_prefill = True
        self.active = True
        self.in_len = length
        self.in_mask = kwargs.get("attention_mask")
        return kwargs

    def _expanded(self, scores: list[torch.Tensor], images_per_sample: torch.Tensor) -> list[torch.Tensor]:
        """Per-image findings of the vision pass (``[images, ...]`` each), one row per image of the batch.

        ``generate(num_beams=n)`` / ``num_return_sequences=n`` encodes the images once and then repeats
        each sample's image group ``n`` times (``_expand_multimodal_outputs``): repeat the findings alike.
        """
        if not scores:
            return scores
        total, encoded = int(images_per_sample.sum()), scores[0].shape[0]
        if total == encoded:
            return scores
        batch, expand = images_per_sample.shape[0], total // encoded
        if (
            total % encoded
            or batch % expand
            or bool((images_per_sample.view(-1, expand) != images_per_sample[::expand, None]).any())
        ):
            raise ValueError(f"attach: the prompt has {total} images but the vision tower encoded {encoded}")
        groups = images_per_sample[::expand]
        starts = groups.cumsum(0) - groups
        index = torch.cat(
            [
                torch.arange(int(n), device=groups.device) + int(s)
                for s, n in zip(starts.repeat_interleave(expand), images_per_sample)
            ]
        )
        return [s[index] for s in scores]

    def _decode_inputs(self, kwargs: dict, cache, batch: int, q_len: int) -> dict:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("attach: decode steps of a reduced model need a 2-D attention_mask (or None)")
        if mask is not None:
            new = mask[:, self.orig_len :]
        else:
            new_len = cache.get_seq_length(0) + q_len - self.in_len
            new = torch.ones(batch, new_len, dtype=torch.long, device=self.state.real.device)
        self.decode_new = new.bool()
        if self.pre_llm_reduced:
            if mask is not None:
                prefix = self.in_mask if self.in_mask is not None else torch.ones_like(self.state.real).long()
                kwargs["attention_mask"] = torch.cat([prefix.to(mask.dtype), new], dim=1)
            pos = self.decode_positions(kwargs)
            if pos is not None:
                kwargs["position_ids"] = pos
        return kwargs

    def _lm_post(self, module, args, output):
        if not self.in_prefill:
            return None
        self.in_prefill = False
        self._record_stats()
        return None

    # ------------------------------------------------------------------ decoder layers
    def _make_layer_pre(self, idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            state = self.state
            if self.in_prefill:
                if idx == 0:
                    self._full_pe = kwargs.get("position_embeddings")
                    self._full_pos = kwargs.get("position_ids")
                if idx in self.override:
                    mask, pe, pos = self.override[idx]
                    kwargs.update(attention_mask=mask, position_embeddings=pe, position_ids=pos)
                state.layer_visual.append((state.current(state.visual)).sum(1))
                state.layer_real.append((state.current(state.real)).sum(1))
                self.reducer.before_layer(idx, hidden, state)
                return args, kwargs
            if self.active and idx in self.layer_key_ok:
                key_ok = torch.cat([self.layer_key_ok[idx], self.decode_new], dim=1)
                kwargs["attention_mask"] = self._layer_mask(key_ok, hidden.shape[1], hidden.dtype)
                if idx in self.decode_shift:
                    pos = kwargs["position_ids"] - self.decode_shift[idx][:, None]
                    kwargs.update(position_ids=pos, position_embeddings=self.lm.rotary_emb(hidden, pos))
                return args, kwargs
            return None

        return hook

    def _make_layer_post(self, idx: int):
        def hook(module, args, output):
            if not self.in_prefill:
                return None
            state = self.state
            hidden = output[0] if isinstance(output, tuple) else output
            keep, replaced = self.reducer.after_layer(idx, hidden, state), None
            if isinstance(keep, tuple):  # the reducer also rewrote some slots of the output
                keep, hidden = keep
                replaced = (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            if keep is None or bool((keep | ~state.valid).all()) or idx == self.info.num_layers - 1:
                return replaced
            index, valid, source = shrink_layout(state.index, state.valid, keep)
            state.index, state.valid = index, valid
            key_ok = state.current(state.real)
            cos, sin = self._full_pe
            pe = (gather_rotary(cos, index), gather_rotary(sin, index))
            pos = gather_positions(self._full_pos, index) if self._full_pos is not None else index
            shift = None
            if self.reducer.renumber_positions and not self.info.multi_axis_positions:
                dropped_before = gather_tokens(state.real.long().cumsum(1), index) - key_ok.long().cumsum(1)
                pos = (pos - dropped_before).clamp_min(0)
                pe = self.lm.rotary_emb(hidden, pos)
                shift = state.real.sum(1) - key_ok.sum(1)
            mask = self._layer_mask(key_ok, index.shape[1], hidden.dtype)
            for later in range(idx + 1, self.info.num_layers):
                self.override[later] = (mask, pe, pos)
                self.layer_key_ok[later] = key_ok
                if shift is not None:
                    self.decode_shift[later] = shift
            hidden = gather_tokens(hidden, source)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _layer_mask(self, key_ok: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask a decoder layer gets for keys ``key_ok [B, Lk]`` and the last ``q_len`` queries."""
        if self.padding_masks:
            return key_ok
        return additive_causal_mask(key_ok, q_len, dtype)

    def _lm_attention(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """Attention of a decoder layer a reducer observes (key mass) or changes (VAR); None defers to
        the model's own implementation. ``query [B, H, Nq, D]``, ``key``/``value`` ``[B, Hkv, Nk, D]``."""
        if self._capture is not None:  # layer_qk: keep q and k, skip the attention itself
            self._capture.update(zip("qk", to_token_major(query, key)))
            return query.new_zeros(query.transpose(1, 2).shape), None
        idx, state = module.layer_idx, self.state
        query_set = self.reducer.key_mass_query(idx) if self.in_prefill else None
        var = idx in self.reducer.attention_layers(self.info) and self.active
        if query_set is None and not var:
            return None
        q, k, v = to_token_major(query, key, value)
        mask, causal = attention_mask, attention_mask is None
        if mask is not None and mask.ndim == 2:  # flash convention: [B, Lk] padding
            mask, causal = mask.bool()[:, None, None, :], True
        if query_set is not None:
            if query_set == "all":
                query_set = state.current(state.real)
            elif query_set == "text":
                query_set = state.current(state.real) & ~state.current(state.visual)
            elif query_set in state.query_sets:
                query_set = state.current(state.query_sets[query_set])
            out, mass = attention_with_key_mass(
                q, k, v, attn_mask=mask, causal=causal, scale=scaling, query_set=query_set
            )
            state.key_mass[idx] = mass
        else:
            out = self.reducer.attention(idx, q, k, v, mask, causal, scaling, self, self.in_prefill)
        return out, None

    # ------------------------------------------------------------------ ModelOps (Prefill.ops)
    def layer_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[B, Lc, H, Dh]`` and k ``[B, Lc, Hkv, Dh]`` of decoder layer ``layer`` on its input ``hidden``
        at the current positions: the layer's own attention module runs (its projections and RoPE, no
        cache) and the routed attention function hands back q and k instead of attending."""
        decoder = self.layers[layer]
        pe = self.override[layer][1] if layer in self.override else self._full_pe
        self._capture = {}
        try:
            decoder.self_attn(
                hidden_states=decoder.input_layernorm(hidden), position_embeddings=pe, attention_mask=None
            )
            return self._capture["q"], self._capture["k"]
        finally:
            self._capture = None

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.norm(hidden)

    def project_image_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.outer.multi_modal_projector(features)

    def prompt_images(self, state: Prefill) -> list[PromptImage]:
        """Default: every unit is a whole image (one view) whose slots are its visual tokens."""
        owner = torch.repeat_interleave(
            torch.arange(state.images_per_sample.shape[0]), state.images_per_sample.cpu()
        )
        return [
            PromptImage(int(b), (state.image_id[b] == unit).nonzero()[:, 0], [unit])
            for unit, b in enumerate(owner.tolist())
        ]

    # ------------------------------------------------------------------ stats
    def _record_stats(self) -> None:
        state = self.state
        n_full = state.original_real
        full = layer_flops(n_full, self.info) * self.info.num_layers
        reduced = sum(layer_flops(n, self.info) for n in state.layer_real)
        self.stats = [
            {
                "visual_tokens_in": int(state.original_visual[b]),
                "kept_per_layer": [int(n[b]) for n in state.layer_visual],
                "prefill_flops": float(full[b]),
                "prefill_flops_saved": float(full[b] - reduced[b]),
                "prefill_flops_saved_ratio": float((full[b] - reduced[b]) / full[b]),
            }
            for b in range(n_full.shape[0])
        ]

    def output_positions(self) -> torch.Tensor | None:
        """``[B, Lout]``: the caller's sequence position of every output slot of the last prefill
        (-1 for filler slots), or None when that prefill was not reduced."""
        state = self.state
        if state is None:
            return None
        index = torch.where(state.valid, state.index, -1)
        if self.pre_index is not None:
            index = torch.where(index >= 0, self.pre_index.gather(1, index.clamp_min(0)), -1)
        return index
