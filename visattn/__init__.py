"""visattn: attention for vision backbones and multimodal LLMs.

Importing ``visattn`` registers every backbone with timm, so
``timm.create_model("nat_tiny")`` works right after ``import visattn``.
"""

from __future__ import annotations

import timm

from visattn import backbones  # noqa: F401  (registers the timm models)

__version__ = "0.1.0"


def list_models(pattern: str = "*") -> list[str]:
    """Names of the timm models that visattn registers, filtered by a glob ``pattern``."""
    return sorted(
        name
        for name in timm.list_models(pattern)
        if timm.models.model_entrypoint(name).__module__.startswith("visattn.backbones")
    )


__all__ = ["__version__", "list_models"]
