"""The adapters' contact surface with transformers, in one place.

Everything the adapters need from transformers goes through here, and only through what it publishes
for extension:

* **attention routing**: :func:`route_attention` registers ``visattn_<impl>`` in transformers'
  ``AttentionInterface`` (and the matching mask function in ``AttentionMaskInterface``) and points a
  sub-model's config at it. The registered function receives ``q``/``k``/``v`` after RoPE and the cache
  update and ``module.layer_idx``; a per-module handler may take a layer's attention over, every other
  layer runs the original implementation unchanged.
* **keyword names**: transformers 5.24 renamed the decoder keyword ``past_key_values`` to ``cache``
  (the old name is a deprecated alias until 5.40). :func:`cache_keyword` reads the name from a forward
  signature and :func:`cache_from` finds the cache under either name.
* **the supported range**: :data:`SUPPORTED` is tested at both ends by ``.ci/run``; :func:`check_version`
  refuses anything outside it at ``attach``.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable

import torch
from torch import nn

# Declared in pyproject.toml too; .ci/run tests the oldest (tests/constraints-oldest.txt) and
# the newest release a fresh install resolves (5.25.0 on 2026-12-07, which installs the ``kernels``
# distribution and imports it with the model classes: docs/layout.md).
SUPPORTED = ("5.4.0", "5.40.0")  # [oldest, first unsupported)
CACHE_NAMES = ("cache", "past_key_values")  # the 5.24+ name first, then the deprecated one

# module -> handler(module, q, k, v, attention_mask, scaling, **kwargs) -> (out, weights) | None
_HANDLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREFIX = "visattn_"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())


def check_version(version: str | None = None) -> None:
    """Raise ``ValueError`` when the installed transformers is outside :data:`SUPPORTED`."""
    if version is None:
        import transformers

        version = transformers.__version__
    low, high = SUPPORTED
    if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        raise ValueError(
            f"attach: transformers {version} is outside the range visattn supports and tests "
            f"(>={low},<{high}); install a release in that range"
        )


def cache_keyword(forward: Callable) -> str:
    """The name under which ``forward`` takes its KV cache (``cache`` from transformers 5.24 on)."""
    params = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise ValueError(f"{forward.__qualname__} takes no KV cache argument ({' / '.join(CACHE_NAMES)})")


def cache_from(kwargs: dict):
    """The KV cache in a forward's keyword arguments, under either name (None if there is none)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def is_prefill(cache) -> bool:
    """True when the forward starts from an empty (or no) cache."""
    return cache is None or cache.get_seq_length() == 0


def _original_attention(module: nn.Module, impl: str) -> Callable:
    """The attention function transformers would run for ``module`` under implementation ``impl``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":  # each modeling file defines its own eager function
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(
                f"visattn: {type(module).__module__} has no eager_attention_forward; this transformers "
                "release changed how eager attention is defined"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[impl]


def _routed_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    config = module.config
    routed = config._attn_implementation
    impl = routed.removeprefix(_PREFIX)
    handler = _HANDLERS.get(module)
    if handler is not None:
        result = handler(module, query, key, value, attention_mask, scaling, **kwargs)
        if result is not None:
            return result
    # the flash functions read the implementation name from the module's config: show them the original
    config._attn_implementation = impl
    try:
        return _original_attention(module, impl)(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    finally:
        config._attn_implementation = routed


def route_attention(config, modules: dict[nn.Module, Callable]) -> Callable[[], None]:
    """Send the attention of ``modules`` (all configured by ``config``) through their handlers.

    ``config`` is switched to ``visattn_<impl>``, registered with transformers' attention and mask
    interfaces (same mask function as ``<impl>``: masks are built exactly as before; the name keeps
    "flash" where transformers looks for it). A handler returns ``(out [B, N, H, D], weights)`` or None
    to let the original implementation run. Returns the function that undoes it all.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    impl = config._attn_implementation
    if impl.startswith(_PREFIX):
        raise ValueError("attach: this model's attention is already routed through visattn")
    routed = _PREFIX + impl
    AttentionInterface.register(routed, _routed_attention)
    AttentionMaskInterface.register(routed, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    for module, handler in modules.items():
        _HANDLERS[module] = handler
    config._attn_implementation = routed
    if config._attn_implementation != routed:
        raise RuntimeError("visattn: transformers ignored the attention implementation set on the config")

    def undo() -> None:
        config._attn_implementation = impl
        for module in modules:
            _HANDLERS.pop(module, None)

    return undo


def to_token_major(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[B, H, N, D]`` (transformers' attention layout) -> ``[B, N, H, D]`` (the kernels' layout)."""
    return tuple(t.transpose(1, 2) for t in tensors)
