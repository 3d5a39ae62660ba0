"""Which handle an integration has installed on a model: one registry per integration.

An integration that patches a model (``apply_agent_attention`` on a diffusers UNet, ...) returns a handle
that undoes the patch; the registry finds that handle again from the model alone (``remove_...(model)``)
and refuses a second one where the integration allows one at a time. Entries are weak: nothing is set on
the model, and a model that is garbage collected drops its entry.

``visattn.mllm_tokens`` keeps its reducer handle as ``model._visattn_handle`` and its per-module
attention handlers in ``mllm_tokens._hf._HANDLERS``, not through this module (that folder has its own
owners; see the issue 27 report).
"""

from __future__ import annotations

import weakref
from typing import Generic, TypeVar

from torch import nn

__all__ = ["HandleRegistry"]

H = TypeVar("H")


class HandleRegistry(Generic[H]):
    """Model -> the handle ``integration`` installed on it (at most one per model)."""

    def __init__(self, integration: str) -> None:
        self.integration = integration
        self._handles: weakref.WeakKeyDictionary[nn.Module, H] = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module) -> H | None:
        """The handle recorded for ``model``, or ``None``."""
        return self._handles.get(model)

    def record(self, model: nn.Module, handle: H) -> None:
        """Remember ``handle`` for ``model``; a ``ValueError`` if the model already has another one."""
        held = self._handles.get(model)
        if held is not None and held is not handle:
            raise ValueError(
                f"{self.integration}: this {type(model).__name__} already has one installed; remove it first"
            )
        self._handles[model] = handle

    def forget(self, model: nn.Module, handle: H) -> bool:
        """Drop the entry of ``model`` if it is ``handle``; returns whether it was."""
        if self._handles.get(model) is not handle:
            return False
        del self._handles[model]
        return True
