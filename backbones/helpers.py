"""What more than one visattn backbone family shares (NAT, BiFormer, VAN and the Agent models).

Input checks, device/dtype construction, weight init, the pooled linear head, checkpoint loading
(:func:`unwrap_checkpoint`, :func:`load_pretrained_file`) and relative-position table resizing
(:func:`resize_rel_pos_table`). What only the Agent families share (their attention layer, checkpoint
resizing and pretrained cfgs) is in :mod:`visattn.backbones.agent_family`. Drop-path rates come from
timm's ``calculate_drop_path_rates`` directly.
"""

import contextlib
import functools
import math

import torch
from timm.layers import (
    SelectAdaptivePool2d,
    register_notrace_function,
    resize_rel_pos_bias_table_simple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, clean_state_dict, load_pretrained
from torch import nn

__all__ = [
    "PooledLinearHead",
    "build_backbone",
    "check_image",
    "factory_kwargs",
    "init_weights",
    "load_pretrained_file",
    "resize_rel_pos_table",
    "unwrap_checkpoint",
]


@register_notrace_function  # FX records the call (the check runs with the graph) instead of tracing into it
def check_image(
    x: torch.Tensor, in_chans: int, fixed_size: tuple[int, int] | None = None, multiple: int = 1
) -> torch.Tensor:
    """``x`` unchanged if it is a non-empty image batch ``[B, in_chans, H, W]`` of a size the model takes,
    else a ValueError that says which sizes work: ``fixed_size`` only (a model built without
    ``dynamic_img_size``), or sides that are multiples of ``multiple`` (with it)."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B, {in_chans}, H, W], got a {x.dim()}-D tensor")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels [B, {in_chans}, H, W], got {x.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("the image batch is empty (batch size 0)")
    h, w = x.shape[2], x.shape[3]
    fits = h % multiple == 0 and w % multiple == 0
    if fixed_size is not None and (h != fixed_size[0] or w != fixed_size[1]):
        built = f"input {h}x{w}, but this model was built for {fixed_size[0]}x{fixed_size[1]}"
        if fits:
            raise ValueError(
                f"{built}: create it with dynamic_img_size=True (timm.create_model(..., "
                f"dynamic_img_size=True)) to take any size whose sides are multiples of {multiple}"
            )
        raise ValueError(
            f"{built}: resize the input to {fixed_size[0]}x{fixed_size[1]}, or create the model with "
            f"dynamic_img_size=True and give sides that are multiples of {multiple}, "
            f"{_nearest(h, w, multiple)}"
        )
    if not fits:
        raise ValueError(
            f"input {h}x{w}: this model takes sides that are multiples of {multiple}; resize or crop the "
            f"input, {_nearest(h, w, multiple)}"
        )
    return x


def _nearest(h: int, w: int, multiple: int) -> str:
    """``"e.g. AxB or CxD"``: the sizes of sides rounded down and up to multiples of ``multiple``."""
    down = f"{max(h // multiple, 1) * multiple}x{max(w // multiple, 1) * multiple}"
    up = f"{(h + multiple - 1) // multiple * multiple}x{(w + multiple - 1) // multiple * multiple}"
    return f"e.g. {down}" if down == up else f"e.g. {down} or {up}"


def factory_kwargs(init):
    """Decorator for a model ``__init__``: adds the ``device`` / ``dtype`` keywords of timm models.

    Every parameter and buffer is created on ``device`` (``"meta"`` builds without allocating) and the
    floating-point ones are then cast to ``dtype``.
    """

    @functools.wraps(init)
    def wrapper(self, *args, device=None, dtype=None, **kw):
        with torch.device(device) if device is not None else contextlib.nullcontext():
            init(self, *args, **kw)
        if dtype is not None:
            self.to(dtype=dtype)

    return wrapper


def build_backbone(
    model_cls: type[nn.Module], variant: str, pretrained: bool, filter_fn, out_indices, **kwargs
) -> nn.Module:
    """timm's ``build_model_with_cfg`` as every ``_create_<family>`` calls it: ``filter_fn`` maps the
    official checkpoints, ``features_only`` goes through the model's ``forward_intermediates`` (timm's
    ``"getter"`` feature class) at ``out_indices``."""
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def load_pretrained_file(model: nn.Module, path: str, filter_fn) -> None:
    """Load the checkpoint file at ``path`` into a timm-built ``model`` through timm's own loader, as a
    cfg ``file`` would: ``filter_fn`` maps the keys, a head of another class count keeps its fresh init and
    the ``first_conv`` weights adapt to ``in_chans``. For cfgs with ``custom_load``, whose loader timm
    calls with the downloaded file only."""
    cfg = dict(model.pretrained_cfg, file=str(path), custom_load=False)
    load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=model.in_chans, filter_fn=filter_fn)


def unwrap_checkpoint(
    checkpoint: dict, containers: tuple[str, ...] = ("model", "state_dict")
) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint: under the first of ``containers`` that holds a dict (the official
    trainers save ``{'model': state_dict, ...}``, mmcv-style ones ``{'state_dict': ...}``), else the
    checkpoint itself; DDP / ``torch.compile`` key prefixes removed by timm's ``clean_state_dict``."""
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"expected a checkpoint dict (a state_dict or a wrapper of one), got {type(checkpoint)}"
        )
    for container in containers:
        if isinstance(checkpoint.get(container), dict):
            return clean_state_dict(checkpoint[container])
    return clean_state_dict(checkpoint)


def resize_rel_pos_table(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """A relative position bias table resized bicubically to ``window`` (h, w), unchanged if it fits.

    Swin's flat ``[(2s-1)**2, heads]`` table of a square ``s x s`` window becomes
    ``[(2h-1) * (2w-1), heads]``; NAT's ``rpb [heads, 2k-1, 2k-1]`` becomes ``[heads, 2h-1, 2w-1]``.
    This is timm's ``resize_rel_pos_bias_table_simple`` (``F.interpolate``, bicubic,
    ``align_corners=False``: how the official Agent-Swin ``load_pretrained`` and the official NAT 11x11
    checkpoints resized them), computed in float32 and cast back. timm's ``resize_rel_pos_bias_table``
    (BEiT's geometric-progression resampling) gives other values, so it is not used.
    """
    new = (2 * window[0] - 1, 2 * window[1] - 1)
    shape = (table.shape[0], *new) if table.ndim == 3 else (new[0] * new[1], table.shape[1])
    if tuple(table.shape) == shape:
        return table
    return resize_rel_pos_bias_table_simple(table.float(), window, shape).to(table.dtype)


def init_weights(module: nn.Module, conv_fan_out: bool = False) -> None:
    """The official init of every family (``model.apply(init_weights)``): trunc-normal(0.02) Linear weights,
    zero biases, LayerNorm 1/0; with ``conv_fan_out`` (VAN) also He-normal Conv2d weights over
    ``fan_out / groups`` with zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif conv_fan_out and isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PooledLinearHead:
    """Mixin for models whose classifier is timm's ``SelectAdaptivePool2d`` (``global_pool``) then a Linear
    named ``head`` (the official checkpoints' key) after ``head_drop``.

    The model sets ``num_features`` and calls :meth:`init_head` with ``output_fmt`` (``"NCHW"`` or
    ``"NHWC"``, the layout of its ``forward_features``). Any timm pool type works (``avg``, ``max``,
    ``avgmax``, ``catavgmax``, ...); ``global_pool=''`` keeps the map and the head then classifies every
    location (``[B, classes, h, w]`` for NCHW features, ``[B, h, w, classes]`` for NHWC).
    """

    def init_head(self, num_classes: int, global_pool: str, drop_rate: float, output_fmt: str) -> None:
        self.output_fmt = output_fmt
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for ``num_classes`` (0: none) on the model's device and dtype; ``global_pool=None``
        keeps the pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            try:
                fmt = self.output_fmt
                pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool), input_fmt=fmt)
            except AssertionError as e:  # timm asserts on unknown pool types
                raise ValueError(f"global_pool: {e}") from None
            self.global_pool = pool.train(self.training)
        pooled = self.num_features * self.global_pool.feat_mult()
        self.head_hidden_size = pooled
        like = next(self.parameters(), None)
        factory = {} if like is None else dict(device=like.device, dtype=like.dtype)
        self.head = (nn.Linear(pooled, num_classes, **factory) if num_classes > 0 else nn.Identity()).train(
            self.training
        )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features (``output_fmt``) -> logits ``[B, num_classes]``, or pooled features if ``pre_logits``."""
        x = self.head_drop(self.global_pool(x))
        if pre_logits:
            return x
        if self.global_pool.is_identity() and self.output_fmt == "NCHW":  # per-location logits
            return self.head(x.movedim(1, -1)).movedim(-1, 1)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
