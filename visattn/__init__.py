"""visattn: attention for vision backbones and multimodal LLMs.

Importing ``visattn`` registers every backbone with timm, so
``timm.create_model("nat_tiny")`` works right after ``import visattn``, and registers the
open_clip configs whose vision tower is one of them (``open_clip.list_models()`` shows the
``visattn-*`` names).
"""

from __future__ import annotations

import importlib.util

import timm

from visattn import backbones  # noqa: F401  (registers the timm models)

if importlib.util.find_spec("open_clip") is not None:
    # open_clip is a declared dependency; the guard keeps `pip install --no-deps` set-ups working.
    from visattn.integrations import open_clip as _open_clip_towers  # noqa: F401  (registers configs)

__version__ = "0.1.0"


def list_models(pattern: str = "*") -> list[str]:
    """Names of the timm models that visattn registers, filtered by a glob ``pattern``."""
    return sorted(
        name
        for name in timm.list_models(pattern)
        if timm.models.model_entrypoint(name).__module__.startswith("visattn.backbones")
    )


__all__ = ["__version__", "list_models"]
