"""visattn.mllm_tokens: visual-token reducers for multimodal LLMs.

``handle = attach(model, reducer)`` hooks a reducer (:class:`FastV`, :class:`VTCCLS`, :class:`VAR`,
:class:`DyVTE`) into a supported model; ``handle.remove()`` (or leaving a ``with`` block) restores it
exactly. ``handle.stats`` lists, per sample of the last prefill, the visual tokens in, the visual
tokens each decoder layer kept and the estimated prefill FLOPs saved.
"""

from __future__ import annotations

import torch
from torch import nn

from visattn.mllm_tokens._core import ModelInfo, Reducer
from visattn.mllm_tokens.cdpruner import CDPruner
from visattn.mllm_tokens.dart import DART
from visattn.mllm_tokens.divprune import DivPrune
from visattn.mllm_tokens.dyvte import DyVTE, DyVTERouters
from visattn.mllm_tokens.fastervlm import FasterVLM
from visattn.mllm_tokens.fastv import FastV
from visattn.mllm_tokens.hiprune import HiPrune
from visattn.mllm_tokens.pooling import Pooling
from visattn.mllm_tokens.pyramiddrop import PyramidDrop
from visattn.mllm_tokens.random_prune import Random
from visattn.mllm_tokens.scope import SCOPE
from visattn.mllm_tokens.sparsevlm import SparseVLM
from visattn.mllm_tokens.tome import ToMe
from visattn.mllm_tokens.var import KNOWN_SINK_DIMS, VAR, calibrate_sink_dims
from visattn.mllm_tokens.visionzip import VisionZip
from visattn.mllm_tokens.vispruner import VisPruner
from visattn.mllm_tokens.vtc_cls import VTCCLS

# Model families: ADAPTERS[name] = (probe, adapter class); probe(model) -> bool, the class subclasses
# visattn.mllm_tokens._adapter.Adapter (constructor(model, reducer), install(), remove(), stats, info,
# output_positions()). The first probe that accepts the model wins.
ADAPTERS: dict = {}


def _register_builtin_adapters() -> None:
    from visattn.mllm_tokens import llava, llava_next, llava_onevision, qwen2_vl

    ADAPTERS["llava"] = (llava.is_supported, llava.LlavaAdapter)
    ADAPTERS["llava_next"] = (llava_next.is_supported, llava_next.LlavaNextAdapter)
    ADAPTERS["llava_onevision"] = (llava_onevision.is_supported, llava_onevision.LlavaOnevisionAdapter)
    ADAPTERS["qwen2_vl"] = (qwen2_vl.is_supported, qwen2_vl.Qwen2VLAdapter)
    ADAPTERS["qwen2_5_vl"] = (qwen2_vl.is_supported_2_5, qwen2_vl.Qwen2_5_VLAdapter)


_register_builtin_adapters()


def _adapter_for(model: nn.Module):
    for probe, adapter in ADAPTERS.values():
        if probe(model):
            return adapter
    raise ValueError(
        f"attach: no adapter for {type(model).__name__}; supported: "
        + ", ".join(f"{a.family} ({name})" for name, (_, a) in ADAPTERS.items())
    )


class Handle:
    """An attached reducer. ``remove()`` detaches it; usable as a context manager."""

    def __init__(self, model: nn.Module, reducer: Reducer):
        if getattr(model, "_visattn_handle", None) is not None:
            raise ValueError("attach: this model already has a reducer attached; remove() it first")
        if not isinstance(reducer, Reducer):
            raise ValueError(
                f"attach: reducer must be a visattn.mllm_tokens reducer, got {type(reducer).__name__}"
            )
        self.model, self.reducer = model, reducer
        self._adapter = _adapter_for(model)(model, reducer)
        self._adapter.install()
        model._visattn_handle = self

    @property
    def stats(self) -> list[dict]:
        """Per sample of the last prefill: ``visual_tokens_in``, ``kept_per_layer`` (visual tokens each
        decoder layer saw), ``prefill_flops``, ``prefill_flops_saved`` and its ratio. Empty when the last
        prefill had no image tokens."""
        return self._adapter.stats

    @property
    def output_positions(self) -> torch.Tensor | None:
        """``[B, Lout]`` position in the caller's ``input_ids`` of every output token (logits row) of the
        last prefill, -1 for filler slots added by left padding; None if nothing was reduced."""
        return self._adapter.output_positions()

    @property
    def info(self) -> ModelInfo:
        return self._adapter.info

    def remove(self) -> None:
        if getattr(self.model, "_visattn_handle", None) is self:
            self._adapter.remove()
            del self.model._visattn_handle

    def __enter__(self) -> Handle:
        if getattr(self.model, "_visattn_handle", None) is not self:
            raise ValueError(
                f"this handle of {self.reducer!r} was removed; attach(model, reducer) again for a new one"
            )
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(model: nn.Module, reducer: Reducer) -> Handle:
    """Attach ``reducer`` to a stock transformers vision-language model; returns a :class:`Handle`.

    Args:
        model: a supported transformers model (see ``ADAPTERS``; e.g. ``LlavaForConditionalGeneration``)
            with ``attn_implementation`` ``"eager"``, ``"sdpa"`` or a flash-attention one.
        reducer: :class:`FastV`, :class:`VTCCLS`, :class:`VAR`, :class:`DyVTE`, ... configured with its
            budget / layers; it is validated against the model here (``ValueError`` if it cannot act).

    The model is used as before (``model(...)``, ``model.generate(...)`` with the KV cache, padded
    batches, several images); prefills that contain images are reduced. ``handle.stats`` lists, per
    sample of the last prefill (also the one inside ``generate()``), ``visual_tokens_in``,
    ``kept_per_layer`` and the prefill FLOPs saved; ``handle.output_positions`` maps the logits rows
    of a reduced prefill back to ``input_ids`` positions. ``handle.remove()`` (or leaving a ``with``
    block) restores the model bit for bit. Raises ``ValueError`` for an unsupported model, transformers
    release or attention implementation, or a second reducer on the same model.
    """
    return Handle(model, reducer)


__all__ = [
    "CDPruner",
    "DART",
    "DivPrune",
    "DyVTE",
    "DyVTERouters",
    "KNOWN_SINK_DIMS",
    "VAR",
    "VTCCLS",
    "VisionZip",
    "VisPruner",
    "FastV",
    "HiPrune",
    "FasterVLM",
    "Pooling",
    "PyramidDrop",
    "Random",
    "Handle",
    "ModelInfo",
    "Reducer",
    "SCOPE",
    "SparseVLM",
    "ToMe",
    "attach",
    "calibrate_sink_dims",
]
