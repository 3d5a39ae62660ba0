"""Adapter for ``transformers`` ``LlavaForConditionalGeneration`` (LLaMA-family language model, CLIP
vision tower). Everything model-specific lives here; another family gets its own adapter module.

Mechanics (all installed by :meth:`LlavaAdapter.install`, all undone by :meth:`LlavaAdapter.remove`):

* a forward pre-hook on ``LlavaModel`` records ``input_ids`` (where the image tokens are);
* forward pre-hooks on the CLIP attention modules of the layers a reducer scores compute only the
  [CLS] query row (through :func:`visattn.kernels.attention_with_key_mass`), never the full map;
* a forward pre-hook on the LLaMA model shortens its input (pre-LLM reduction), and at decode steps
  rewrites the 2-D mask / positions so they match the shortened KV cache;
* forward pre-/post-hooks on the decoder layers shrink the token layout after a layer and give later
  layers the matching mask (4-D; 2-D padding masks under flash attention), rotary embeddings and
  position ids (prefill and decode);
* an instance-level ``forward`` on the self-attention of the layers a reducer must observe or modify
  (key-mass scoring, VAR); it defers to the class forward whenever nothing is needed.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from visattn.kernels.attention_with_key_mass import attention_with_key_mass
from visattn.mllm_tokens._core import (
    ModelInfo,
    Prefill,
    Reducer,
    additive_causal_mask,
    gather_tokens,
    layer_flops,
    shrink_layout,
)


def padding_mask_convention(impl: str) -> bool | None:
    """How the decoder layers of attention implementation ``impl`` take their mask: False for a 4-D
    mask (eager, sdpa), True for a 2-D ``[B, Lk]`` padding mask with causality implied (the flash
    implementations and any other registered with transformers' ``flash_attention_mask``), None when
    the adapter cannot express a shortened layout in that form (flex attention's block masks, ...)."""
    if impl in ("eager", "sdpa"):
        return False
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    return True if ALL_MASK_ATTENTION_FUNCTIONS.get(impl) is flash_attention_mask else None


def is_supported(model: nn.Module) -> bool:
    """True for a transformers ``LlavaForConditionalGeneration`` with a LLaMA-style decoder."""
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError:
        return False
    return isinstance(model, LlavaForConditionalGeneration)


def _llama_qkv(module: nn.Module, hidden_states, position_embeddings, past_key_values):
    """q, k, v of a LLaMA attention as ``[B, N, H, D]`` (after RoPE and the KV-cache update)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = module.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, module.layer_idx)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class LlavaAdapter:
    """Hooks a :class:`~visattn.mllm_tokens._core.Reducer` into a LLaVA model."""

    def __init__(self, model: nn.Module, reducer: Reducer):
        self.model = model
        self.reducer = reducer
        self.llava = model.model
        self.lm = model.model.language_model
        self.layers = self.lm.layers
        cfg, tcfg, vcfg = model.config, model.config.text_config, model.config.vision_config
        impl = tcfg._attn_implementation
        self.padding_masks = padding_mask_convention(impl)
        if self.padding_masks is None:
            raise ValueError(
                f"attach: the language model uses attn_implementation={impl!r}; supported: 'eager', "
                "'sdpa' and the flash-attention implementations (flash_attention_2/3/4)"
            )
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                "attach: only vision_feature_select_strategy='default' (CLS dropped, one token per patch) "
                f"is supported, got {cfg.vision_feature_select_strategy!r}"
            )
        self.image_token_id = cfg.image_token_id
        self.patches = (vcfg.image_size // vcfg.patch_size) ** 2
        self.info = ModelInfo(
            num_layers=tcfg.num_hidden_layers,
            hidden_size=tcfg.hidden_size,
            num_heads=tcfg.num_attention_heads,
            num_kv_heads=tcfg.num_key_value_heads,
            intermediate_size=tcfg.intermediate_size,
            vision_layers=vcfg.num_hidden_layers,
            patches_per_image=self.patches,
            attn_implementation=impl,
        )
        reducer.check(self.info)
        self.stats: list[dict] = []
        self.state: Prefill | None = None
        self.in_prefill = False
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self._call_ids: torch.Tensor | None = None
        self._reset_decode()

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(self.llava.register_forward_pre_hook(self._llava_pre, with_kwargs=True))
        tower = self.llava.vision_tower
        vision_layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers
        self._cls_buffer, self._key_buffer, self._vision_hidden = [], [], []
        self._handles.append(tower.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        if self.reducer.needs_vision_features:
            if not isinstance(self.model.config.vision_feature_layer, int):
                raise ValueError(
                    f"attach: {type(self.reducer).__name__} needs one vision feature layer, got "
                    f"vision_feature_layer={self.model.config.vision_feature_layer!r}"
                )
            self._handles.append(tower.register_forward_hook(self._vision_post))
        for layer in self.reducer.vision_cls_layers(self.info):
            attn = vision_layers[layer].self_attn
            self._handles.append(attn.register_forward_pre_hook(self._cls_pre, with_kwargs=True))
        self._handles.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self._handles.append(self.lm.register_forward_hook(self._lm_post))
        for idx, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_layer_pre(idx), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._make_layer_post(idx)))
        custom = {i for i in range(self.info.num_layers) if self.reducer.key_mass_query(i) is not None}
        custom |= self.reducer.attention_layers(self.info)
        for idx in sorted(custom):
            attn = self.layers[idx].self_attn
            attn.forward = types.MethodType(self._make_attention(idx), attn)
            self._patched.append(attn)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn in self._patched:
            del attn.forward
        self._patched.clear()
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

    # ------------------------------------------------------------------ hooks
    def _model_pre(self, module, args, kwargs):
        if kwargs.get("labels") is not None and self.reducer.removes_tokens:
            raise ValueError(
                f"attach: labels are not supported with {type(self.reducer).__name__}, which removes tokens "
                "(the logits would no longer line up with the labels); compute the loss from the logits "
                "and handle.output_positions, or remove() the reducer to train"
            )
        return None

    def _llava_pre(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        past = kwargs.get("past_key_values")
        if (
            ids is None
            and kwargs.get("inputs_embeds") is not None
            and (past is None or past.get_seq_length() == 0)
        ):
            # the image tokens can only be found in input_ids: without them the reducer would do nothing
            raise ValueError(
                "attach: a reduced prompt must come as input_ids (with pixel_values), not inputs_embeds"
            )
        self._call_ids = ids
        return None

    def _vision_pre(self, module, args, kwargs):
        # generate() runs the vision tower before the model forward (mm_encoder_outputs): collect here
        self._cls_buffer, self._key_buffer, self._vision_hidden = [], [], []
        return None

    def _vision_post(self, module, args, output):
        self._vision_hidden = [output.hidden_states[self.model.config.vision_feature_layer]]
        return None

    def _cls_pre(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        b, n, _ = hidden.shape
        q = module.q_proj(hidden[:, :1]).view(b, 1, module.num_heads, module.head_dim)
        k = module.k_proj(hidden).view(b, n, module.num_heads, module.head_dim)
        _, mass = attention_with_key_mass(q, k, k, scale=module.scale, query_set="all")
        self._cls_buffer.append(mass[:, 1:])
        if self.reducer.needs_vision_features:
            self._key_buffer.append(k.mean(2))
        return None

    def _lm_pre(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        past = kwargs.get("past_key_values")
        prefill = past is None or past.get_seq_length() == 0
        ids = self._call_ids
        self._call_ids = None
        if prefill:
            self._reset_decode()
            self.state = None
            self.stats = []
            self.in_prefill = False
            if embeds is None or ids is None or ids.shape[:2] != embeds.shape[:2]:
                return None
            visual = ids == self.image_token_id
            if not bool(visual.any()):
                return None
            return args, self._start_prefill(embeds, visual, kwargs)
        if not self.active:
            return None
        if embeds is None:
            raise ValueError("attach: decode steps of a reduced model must come through the LLaVA model")
        return args, self._decode_inputs(kwargs, past, embeds.shape[0], embeds.shape[1])

    def _start_prefill(self, embeds: torch.Tensor, visual: torch.Tensor, kwargs: dict) -> dict:
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
        counts = visual.sum(1)
        if bool((counts % self.patches != 0).any()):
            raise ValueError(
                f"attach: each sample needs a multiple of {self.patches} image tokens, got {counts.tolist()}"
            )
        flat = visual.flatten().cumsum(0).view(b, length) - 1
        image_id = torch.where(visual, flat // self.patches, -1)
        patch_id = torch.where(visual, flat % self.patches, -1)
        arange = torch.arange(length, device=visual.device).expand(b, length)
        images_per_sample = counts // self.patches
        state = Prefill(
            visual=visual, real=real, image_id=image_id, patch_id=patch_id,
            images_per_sample=images_per_sample, original_real=real.sum(1), original_visual=counts,
            index=arange, valid=torch.ones_like(visual),
            cls_scores=self._expanded(self._cls_buffer, images_per_sample), embeds=embeds, ops=self,
            cls_keys=self._expanded(self._key_buffer, images_per_sample),
            vision_hidden=next(iter(self._expanded(self._vision_hidden, images_per_sample)), None),
        )  # fmt: skip
        self.orig_len = length
        keep = self.reducer.pre_llm(state)
        embeds = kwargs["inputs_embeds"] = state.embeds  # pre_llm may have written new tokens into it
        if keep is not None and not bool(keep.all()):
            index, valid, _ = shrink_layout(arange, torch.ones_like(visual), keep | ~real)
            embeds = gather_tokens(embeds, index)
            new_real = real.gather(1, index) & valid
            state.visual = visual.gather(1, index) & valid
            state.real = new_real
            state.image_id = torch.where(valid, image_id.gather(1, index), -1)
            state.patch_id = torch.where(valid, patch_id.gather(1, index), -1)
            # the official code builds contiguous positions over the shortened sequence
            positions = (new_real.long().cumsum(1) - 1).clamp_min(0)
            kwargs["inputs_embeds"] = embeds
            kwargs["attention_mask"] = None if mask is None and bool(valid.all()) else new_real.long()
            kwargs["position_ids"] = positions
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
        each sample's image group ``n`` times (``_expand_multimodal_outputs``): repeat the scores alike.
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

    def _decode_inputs(self, kwargs: dict, past, batch: int, q_len: int) -> dict:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("attach: decode steps of a reduced model need a 2-D attention_mask (or None)")
        if mask is not None:
            new = mask[:, self.orig_len :]
        else:
            new_len = past.get_seq_length(0) + q_len - self.in_len
            new = torch.ones(batch, new_len, dtype=torch.long, device=self.state.real.device)
        self.decode_new = new.bool()
        if self.pre_llm_reduced:
            if mask is not None:
                prefix = self.in_mask if self.in_mask is not None else torch.ones_like(self.state.real).long()
                kwargs["attention_mask"] = torch.cat([prefix.to(mask.dtype), new], dim=1)
            pos = kwargs.get("position_ids")
            if pos is not None:
                kwargs["position_ids"] = pos - self.pos_shift[:, None]
        return kwargs

    def _lm_post(self, module, args, output):
        if not self.in_prefill:
            return None
        self.in_prefill = False
        self._record_stats()
        return None

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
            keep, replaced = self.reducer.after_layer(idx, output, state), None
            if isinstance(keep, tuple):  # the reducer also rewrote some slots of the output
                keep, replaced = keep
                output = replaced
            if keep is None or bool((keep | ~state.valid).all()) or idx == self.info.num_layers - 1:
                return replaced
            index, valid, source = shrink_layout(state.index, state.valid, keep)
            state.index, state.valid = index, valid
            key_ok = state.current(state.real)
            cos, sin = self._full_pe
            pe = (gather_tokens(cos, index), gather_tokens(sin, index))
            pos = gather_tokens(self._full_pos, index) if self._full_pos is not None else index
            shift = None
            if self.reducer.renumber_positions:
                dropped_before = gather_tokens(state.real.long().cumsum(1), index) - key_ok.long().cumsum(1)
                pos = (pos - dropped_before).clamp_min(0)
                pe = self.lm.rotary_emb(output, pos)
                shift = state.real.sum(1) - key_ok.sum(1)
            mask = self._layer_mask(key_ok, index.shape[1], output.dtype)
            for later in range(idx + 1, self.info.num_layers):
                self.override[later] = (mask, pe, pos)
                self.layer_key_ok[later] = key_ok
                if shift is not None:
                    self.decode_shift[later] = shift
            return gather_tokens(output, source)

        return hook

    def _layer_mask(self, key_ok: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask a decoder layer gets for keys ``key_ok [B, Lk]`` and the last ``q_len`` queries."""
        if self.padding_masks:
            return key_ok
        return additive_causal_mask(key_ok, q_len, dtype)

    def _make_attention(self, idx: int):
        adapter = self

        def forward(
            module,
            hidden_states,
            position_embeddings=None,
            attention_mask=None,
            past_key_values=None,
            **kwargs,
        ):
            state = adapter.state
            query = adapter.reducer.key_mass_query(idx) if adapter.in_prefill else None
            var = idx in adapter.reducer.attention_layers(adapter.info) and adapter.active
            if query is None and not var:
                return type(module).forward(
                    module, hidden_states, position_embeddings=position_embeddings,
                    attention_mask=attention_mask, past_key_values=past_key_values, **kwargs,
                )  # fmt: skip
            q, k, v = _llama_qkv(module, hidden_states, position_embeddings, past_key_values)
            causal = attention_mask is None
            if attention_mask is not None and attention_mask.ndim == 2:  # flash convention: [B, Lk] padding
                attention_mask, causal = attention_mask.bool()[:, None, None, :], True
            if query is not None:
                if query == "all":
                    query = state.current(state.real)
                elif query == "text":
                    query = state.current(state.real) & ~state.current(state.visual)
                elif query in state.query_sets:
                    query = state.current(state.query_sets[query])
                out, mass = attention_with_key_mass(
                    q, k, v, attn_mask=attention_mask, causal=causal, scale=module.scaling, query_set=query
                )
                state.key_mass[idx] = mass
            else:
                out = adapter.reducer.attention(
                    idx, q, k, v, attention_mask, causal, module.scaling, adapter, adapter.in_prefill
                )
            out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
            return module.o_proj(out), None

        return forward

    # ------------------------------------------------------------------ ModelOps (Prefill.ops)
    def layer_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.layers[layer]
        pe = self.override[layer][1] if layer in self.override else self._full_pe
        q, k, _ = _llama_qkv(decoder.self_attn, decoder.input_layernorm(hidden), pe, None)
        return q, k

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.norm(hidden)

    def project_image_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.llava.multi_modal_projector(features)

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
