"""visattn: attention for vision backbones and multimodal LLMs.

Importing ``visattn`` registers every backbone with timm, so ``timm.create_model("nat_tiny")`` works
right after ``import visattn`` (in either order with ``import timm``). Registration needs timm, so it
happens as soon as timm is imported: at once when it already is, otherwise right after the first
``import timm``. That keeps ``import visattn.kernels`` free of timm, open_clip, transformers and
diffusers. The sub-packages (``visattn.mllm_tokens``, ``visattn.recipes``, ``visattn.integrations``,
...) load on first use; ``import visattn.integrations.open_clip`` registers the open_clip configs.

Why an import hook rather than ``from visattn import backbones`` here (timm's plugin convention):
``import visattn.kernels`` runs this file first, so registering eagerly would import timm (and the six
model modules) into every kernel user and every ``visattn`` CLI start, which ``tests/test_package.py``
forbids. Measured with ``python -X importtime`` (2-core CPU box, torch 2.x, timm 1.0.31): ``import visattn``
takes about 10 ms with the hook, ``import visattn.kernels`` about 2.4 s (torch), and
``import visattn.backbones`` (timm + the models) adds about 0.58 s on top of that. The hook costs one
``find_spec`` call per module imported before timm and removes itself when timm loads.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("backbones", "bench", "integrations", "kernels", "mllm_tokens", "recipes")


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """One-shot import hook: once ``timm`` has finished importing, import ``visattn.backbones``
    (whose ``@register_model`` functions put the models into timm's registry)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")  # the finders that would have found it anyway
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_then_register(module):
            exec_timm(module)
            importlib.import_module("visattn.backbones")

        spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    from visattn import backbones  # noqa: F401  (registers the timm models)
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"visattn.{name}")
    raise AttributeError(f"module 'visattn' has no attribute {name!r}")


def list_models(pattern: str = "*") -> list[str]:
    """Names of the timm models that visattn registers, filtered by a glob ``pattern``."""
    import timm

    import visattn.backbones  # noqa: F401  (registered already unless timm was imported some odd way)

    return sorted(
        name
        for name in timm.list_models(pattern)
        if timm.models.model_entrypoint(name).__module__.startswith("visattn.backbones")
    )


__all__ = ["__version__", "list_models"]
