"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: Lei Zhu, Xinjiang Wang, Zhanghan Ke, Wayne Zhang, Rynson Lau, "BiFormer: Vision
Transformer with Bi-Level Routing Attention", CVPR 2023 (arXiv 2303.08810).
Official code and weights: https://github.com/rayleizhu/BiFormer (models/biformer.py,
ops/bra_legacy.py, models/_common.py).

The architecture follows the official models exactly (so the released checkpoints load
through :func:`checkpoint_filter_fn` and give the official outputs): UniFormer-style
two-conv stem, strided 3x3 conv + BN downsampling, blocks of ``x + dwconv3x3(x)`` followed
by pre-norm attention and MLP, a final BatchNorm2d and mean pooling. Stages 1-3 use
bi-level routing attention (:func:`visattn.kernels.bilevel_routing_attention`, region grid
``n_win x n_win``, top-k 1/4/16) plus a 5x5 depthwise conv on V (local context
enhancement, "LePE"); stage 4 uses plain global attention with LePE on its input.

Legacy details reproduced for checkpoint parity: the BRA softmax scale is
``qk_dim ** -0.5`` (whole qk width, not the head width); stage-4 attention has 8 heads
and no qkv bias whatever the width; LayerNorm eps is 1e-6.

Sizes that are not multiples of ``n_win`` per BRA stage, or smaller than it (stage 3 of
inputs under 112 px): by default the kernel pads internally and masks the padded tokens
(they get no attention and do not count in the region means; regions with no real token
are routed last). ``auto_pad=True`` instead does what the official ``auto_pad`` does: zero-pad
the block input before the qkv projection, attend to the padded tokens like real ones, and
crop the output; use it for output parity with official models at such sizes.

Differences to the official module tree (names only; :func:`checkpoint_filter_fn` maps
them): ``downsample_layers.0`` -> ``stem``; ``downsample_layers.i`` ->
``stages.i.downsample``; ``stages.i.j`` -> ``stages.i.blocks.j``; ``attn.qkv.qkv`` ->
``attn.qkv``; ``attn.wo`` -> ``attn.proj``; ``mlp.0/mlp.3`` -> ``mlp.fc1/mlp.fc2``. The
released models use no KV downsampling (``kv_downsample_mode='identity'``), no layer scale and no
routing parameters; only that configuration is built here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    Mlp,
    calculate_drop_path_rates,
    get_act_layer,
    get_norm_layer,
    register_notrace_module,
)
from timm.models import (
    adapt_input_conv,
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    register_model_deprecations,
)
from timm.models._features import feature_take_indices

from visattn.backbones.helpers import (
    PooledLinearHead,
    check_image,
    factory_kwargs,
    init_weights,
    unwrap_checkpoint,
)
from visattn.kernels import bilevel_routing_attention

__all__ = ["BiFormer", "checkpoint_filter_fn"]
torch.fx.wrap("check_image")  # FX records the input check as one call (it runs with the graph)

_LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)  # the official block norm


@register_notrace_module  # an FX leaf: the kernel call and the auto_pad branch stay out of the graph
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention with LePE on V and an output projection. NHWC in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int = 7,
        topk: int = 4,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        auto_pad: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim {self.qk_dim} and dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = float(qk_scale or self.qk_dim**-0.5)  # official: whole qk width
        self.auto_pad = auto_pad
        self.backend = backend  # kernel backend of visattn.kernels.bilevel_routing_attention
        self.qkv = nn.Linear(dim, 2 * self.qk_dim + dim)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
            if side_dwconv > 0
            else None
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        _, h, w, _ = x.shape
        if self.auto_pad:
            pad_b, pad_r = (-h) % self.n_win, (-w) % self.n_win
            x = F.pad(x, [0, 0, 0, pad_r, 0, pad_b])
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        heads = (self.num_heads, -1)
        if torch.jit.is_scripting():
            out = torch.ops.visattn.bilevel_routing_attention(
                q.unflatten(-1, heads),
                k.unflatten(-1, heads),
                v.unflatten(-1, heads),
                self.n_win,
                self.topk,
                self.scale,
                self.backend,
            )
        else:
            out = bilevel_routing_attention(
                q.unflatten(-1, heads),
                k.unflatten(-1, heads),
                v.unflatten(-1, heads),
                num_regions=self.n_win,
                topk=self.topk,
                scale=self.scale,
                backend=self.backend,
            )
        out = out.flatten(-2)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.proj(out)
        return out[:, :h, :w] if self.auto_pad else out


class AttentionLePE(nn.Module):
    """Global multi-head self-attention (+ LePE dwconv on the input when ``side_dwconv > 0``). NHWC."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, side_dwconv: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
            if side_dwconv > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        qkv = self.qkv(x.flatten(1, 2)).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(x.shape)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """``x + dwconv(x)``, then pre-norm attention and MLP with stochastic depth. NCHW in and out.

    ``topk > 0``: bi-level routing attention; ``topk == -2``: global attention with LePE
    (official stage 4); ``topk == -1``: global attention without LePE (official code's -1).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int,
        topk: int,
        qk_dim: int | None = None,
        mlp_ratio: float = 3.0,
        drop_path: float = 0.0,
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        auto_pad: bool = False,
        norm_layer: Callable[[int], nn.Module] = _LayerNormEps6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.pos_embed = (
            nn.Conv2d(dim, dim, before_attn_dwconv, padding=before_attn_dwconv // 2, groups=dim)
            if before_attn_dwconv > 0
            else None
        )
        self.norm1 = norm_layer(dim)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim,
                num_heads,
                n_win=n_win,
                topk=topk,
                qk_dim=qk_dim,
                side_dwconv=side_dwconv,
                auto_pad=auto_pad,
            )
        elif topk in (-1, -2):
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv if topk == -2 else 0)
        else:
            raise ValueError(f"topk must be > 0 (routing), -1 or -2 (global attention), got {topk}")
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormerStage(nn.Module):
    """Optional strided-conv downsampling followed by a sequence of blocks. NCHW."""

    def __init__(
        self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: list[float], **block_kw
    ):
        super().__init__()
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *[BiFormerBlock(dim, drop_path=drop_path[i], **block_kw) for i in range(depth)]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class BiFormer(PooledLinearHead, nn.Module):
    """BiFormer image classifier (four stages, strides 4/8/16/32)."""

    @factory_kwargs
    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 8, 2),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        mlp_ratios: tuple[float, ...] = (3, 3, 3, 3),
        n_win: int = 7,
        topks: tuple[int, ...] = (1, 4, 16, -2),
        head_dim: int = 32,
        qk_dims: tuple[int, ...] | None = None,
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        auto_pad: bool = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: str | Callable[[int], nn.Module] = _LayerNormEps6,
        act_layer: str | Callable[[], nn.Module] = nn.GELU,
    ):
        """``topks``: per stage, > 0 = routing attention with that top-k, -2 = global attention +
        LePE, -1 = global attention (official codes). ``head_dim`` sets the heads of routing stages
        (``qk_dim // head_dim``); global-attention stages use 8 heads, as the official models do.
        ``norm_layer`` / ``act_layer``: the blocks' token norm (official: LayerNorm eps 1e-6) and activation
        (stem and MLPs; official: GELU)."""
        super().__init__()
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        qk_dims = tuple(qk_dims or embed_dims)
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dims[0] // 2),
            act_layer(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dims[0]),
        )
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        for i, depth in enumerate(depths):
            stages.append(
                BiFormerStage(
                    embed_dims[i - 1] if i else embed_dims[0],
                    embed_dims[i],
                    depth,
                    downsample=i > 0,
                    drop_path=dpr[i],
                    num_heads=qk_dims[i] // head_dim,
                    n_win=n_win,
                    topk=topks[i],
                    qk_dim=qk_dims[i],
                    mlp_ratio=mlp_ratios[i],
                    side_dwconv=side_dwconv,
                    before_attn_dwconv=before_attn_dwconv,
                    auto_pad=auto_pad,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.init_head(num_classes, global_pool, drop_rate, output_fmt="NCHW")
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The official list ({'pos_embed', 'cls_token'}) names no parameter of this model, so in
        # effect nothing is exempt beyond what the optimizer factory exempts by itself (1-D params).
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW) at ``indices``; ``norm`` applies the final norm to the last stage's."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(check_image(x, self.in_chans))
        feat_idx = -1
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (the final norm too when it no longer fits)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or prune_end:  # the final BatchNorm has the channels of the dropped last stage
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(check_image(x, self.in_chans))
        x = self.stages(x)
        return self.norm(x)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official (or visattn) checkpoint file; a head of another class count is left as is, and
        the stem's RGB weights are adapted to ``in_chans`` as timm's own loader does (timm leaves both to this
        method for the official files, ``custom_load``)."""
        state_dict = checkpoint_filter_fn(
            torch.load(checkpoint_path, map_location="cpu", weights_only=True), self
        )
        own = self.state_dict()
        stem = "stem.0.weight"
        if stem in state_dict and state_dict[stem].shape[1] != own[stem].shape[1]:
            state_dict[stem] = adapt_input_conv(self.in_chans, state_dict[stem])
        head_keys = [k for k in ("head.weight", "head.bias") if k in state_dict]
        if any(k not in own or own[k].shape != state_dict[k].shape for k in head_keys):
            for k in head_keys:
                del state_dict[k]
            missing, unexpected = self.load_state_dict(state_dict, strict=False)
            if unexpected or set(missing) - {"head.weight", "head.bias"}:
                raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        else:
            self.load_state_dict(state_dict, strict=True)


_OFFICIAL_RENAMES = (
    (".attn.qkv.qkv.", ".attn.qkv."),
    (".attn.wo.", ".attn.proj."),
    (".mlp.0.", ".mlp.fc1."),
    (".mlp.3.", ".mlp.fc2."),
)


def _official_to_ours(key: str) -> str | None:
    """One official key -> this model's key (None: drop it); keys already in this layout pass unchanged."""
    parts = key.split(".")
    if parts[0] == "downsample_layers":
        rest = ".".join(parts[2:])
        return f"stem.{rest}" if parts[1] == "0" else f"stages.{parts[1]}.downsample.{rest}"
    if parts[0] == "stages" and len(parts) > 2 and parts[2].isdigit():  # official stages.i.j -> blocks.j
        key = ".".join(["stages", parts[1], "blocks", *parts[2:]])
        for old, new in _OFFICIAL_RENAMES:
            key = key.replace(old, new)
        return key
    if parts[0] == "pre_logits":
        return None  # Identity in every released model
    return key


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map an official BiFormer state_dict (plain, or wrapped under 'model'/'state_dict') to this model.

    Each key is mapped on its own (a file mixing both layouts, or missing some keys, maps what it has),
    so ``load_state_dict`` then names exactly the keys that are missing or unexpected.
    """
    out = {}
    for key, value in unwrap_checkpoint(state_dict).items():
        new = _official_to_ours(key)
        if new is not None:
            out[new] = value
    return out


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=True),
        **kwargs,
    )


def _cfg(url=(), **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        "paper_name": "BiFormer: Vision Transformer with Bi-Level Routing Attention",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/{}/root/content"

# The official OneDrive links all end in ".../content", so each cfg names its cache file
# (timm's (url, filename) form) and loads through BiFormer.load_pretrained.
default_cfgs = generate_default_cfgs(
    {
        "biformer_t.in1k": _cfg(
            url=(_ONEDRIVE.format("s!AkBbczdRlZvChHEOoGkgwgQzEDlM"), "biformer_tiny_in1k.pth"),
            custom_load=True,
        ),
        "biformer_s.in1k": _cfg(
            url=(_ONEDRIVE.format("s!AkBbczdRlZvChHDyM-x9KWRBZ832"), "biformer_small_in1k.pth"),
            custom_load=True,
        ),
        "biformer_b.in1k": _cfg(
            url=(_ONEDRIVE.format("s!AkBbczdRlZvChHI_XPhoadjaNxtO"), "biformer_base_in1k.pth"),
            custom_load=True,
        ),
    }
)

_COMMON = dict(mlp_ratios=(3, 3, 3, 3), n_win=7, topks=(1, 4, 16, -2), head_dim=32)


@register_model
def biformer_t(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T (13.1M params, 81.4% IN-1k top-1)."""
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), **_COMMON)
    return _create_biformer("biformer_t", pretrained, **dict(args, **kwargs))


@register_model
def biformer_s(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S (25.5M params, 83.8% IN-1k top-1)."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), **_COMMON)
    return _create_biformer("biformer_s", pretrained, **dict(args, **kwargs))


@register_model
def biformer_b(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B (56.8M params, 84.3% IN-1k top-1)."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), **_COMMON)
    return _create_biformer("biformer_b", pretrained, **dict(args, **kwargs))


register_model_deprecations(
    __name__, {"biformer_tiny": "biformer_t", "biformer_small": "biformer_s", "biformer_base": "biformer_b"}
)
