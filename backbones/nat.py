"""NAT and DiNAT: Neighborhood Attention Transformers (hierarchical, channels-last).

Papers:
    Hassani, Walton, Li, Li, Shi, "Neighborhood Attention Transformer", CVPR 2023,
    https://arxiv.org/abs/2204.07143
    Hassani, Shi, "Dilated Neighborhood Attention Transformer", 2022, https://arxiv.org/abs/2209.15001
Official code: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer
    (classification/nat.py, dinat.py, dinats.py; MIT licence). This is a re-implementation whose module
    and parameter names follow the official code, except timm's layer scale ``ls1.gamma`` / ``ls2.gamma``
    (official ``gamma1`` / ``gamma2``) and DiNAT_s levels ``levels.i`` (official ``layers.i``):
    ``checkpoint_filter_fn`` renames those, key by key.

NAT: overlapping conv tokenizer (two 3x3 stride-2 convs + LayerNorm), four levels of pre-norm
transformer layers whose token mixer is 2-D neighborhood attention (each query attends to the
``kernel_size x kernel_size`` nearest keys, with a relative position bias table), and a 3x3 stride-2
conv downsampler (+ LayerNorm) at the END of every level but the last. DiNAT is the same network with
a per-layer dilation (alternating plain / dilated NA). DiNAT_s (``dinat_s_*``) uses the Swin layout:
a 4x4 patch embedding and patch merging, MLP ratio 4.

Tensors are (B, H, W, C) between the stem and the head. Feature maps (``forward_intermediates``,
``features_only``) are the outputs of each level's layers before its downsampler: strides 4/8/16/32.

Isotropic NAT / DiNAT (``nat_isotropic_*``, ``dinat_isotropic_*``; official classification/isotropic.py,
DiNAT paper's isotropic ablation): a ViT-sized column without pyramid, 16x16 patch embedding (+ LayerNorm)
and 12 of the same layers at stride 16 (DiNAT: odd layers dilated). Its feature maps are the block outputs.

The attention itself is :func:`visattn.kernels.neighborhood_attention`. ``checkpoint_filter_fn`` loads the
official checkpoints and also the transformers-format ones (``NatForImageClassification`` /
``DinatForImageClassification``, e.g. ``shi-labs/dinat-mini-in1k-224``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    get_norm_layer,
    register_notrace_module,
    trunc_normal_,
)
from timm.models import (
    checkpoint,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging
from torch import nn

from visattn.backbones.helpers import (
    PooledLinearHead,
    build_backbone,
    check_image,
    factory_kwargs,
    init_weights,
    resize_rel_pos_table,
    unwrap_checkpoint,
)
from visattn.kernels import neighborhood_attention

__all__ = ["NAT", "NATIsotropic", "NeighborhoodAttention2D", "checkpoint_filter_fn"]
torch.fx.wrap("check_image")  # FX records the input check as one call (it runs with the graph)

LayerNorm = partial(nn.LayerNorm, eps=1e-5)


class ConvTokenizer(nn.Module):
    """NAT stem: 3x3/s2 conv (C/2) -> 3x3/s2 conv (C) -> LayerNorm. (B, 3, H, W) -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """NAT downsampler: 3x3/s2 conv without bias (C -> 2C) -> LayerNorm. (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


@register_notrace_module  # an FX leaf: the kernel call and the small-map padding stay out of the graph
class NeighborhoodAttention2D(nn.Module):
    """2-D (dilated) neighborhood attention with relative position bias on (B, H, W, C) maps.

    Parameters as NATTEN's module: ``qkv``, ``rpb`` (heads, 2k-1, 2k-1) and ``proj``. A map smaller
    than the attention window (``kernel_size * dilation``) is zero-padded at the bottom/right before
    the qkv projection and cropped after the attention, as NATTEN 0.14 (used to train NAT/DiNAT) did.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if kernel_size < 2 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd number > 1, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = float(qk_scale or self.head_dim**-0.5)
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = "auto"  # backend of visattn.kernels.neighborhood_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        window = self.kernel_size * self.dilation
        pad_h, pad_w = max(0, window - H), max(0, window - W)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [0, 0, 0, pad_w, 0, pad_h])
        Hp, Wp = H + pad_h, W + pad_w
        q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        ks, dil = self.kernel_size, self.dilation
        if torch.jit.is_scripting():
            x = torch.ops.visattn.neighborhood_attention(
                q, k, v, [ks, ks], [dil, dil], [False, False], self.rpb, self.scale, self.backend
            )
        else:
            x = neighborhood_attention(q, k, v, ks, dil, rpb=self.rpb, scale=self.scale, backend=self.backend)
        x = x.reshape(B, Hp, Wp, C)[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"num_heads={self.num_heads}, head_dim={self.head_dim}"
        )


class NATLayer(nn.Module):
    """Pre-norm transformer layer: x + NA(LN(x)), then x + MLP(LN(x)); optional layer scale ``ls1``/``ls2``
    (timm's LayerScale; the official ``gamma1``/``gamma2``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2D(
            dim, num_heads, kernel_size, dilation, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls1 = LayerScale(dim, float(layer_scale)) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, float(layer_scale)) if layer_scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class NATLevel(nn.Module):
    """One level (the official ``NATBlock`` / ``BasicLayer``): ``blocks`` then ``downsample``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        kernel_size: int,
        dilations: Sequence[int],
        downsample: Callable[[int], nn.Module] | None,
        drop_path: Sequence[float],
        **layer_kwargs,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(
            *[
                NATLayer(dim, num_heads, kernel_size, dilations[i], drop_path=drop_path[i], **layer_kwargs)
                for i in range(depth)
            ]
        )
        self.downsample = downsample(dim) if downsample is not None else nn.Identity()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The layers of this level, without the downsampler. (B, H, W, C) -> (B, H, W, C)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


class _NATClassifier(PooledLinearHead, nn.Module):
    """What :class:`NAT` and :class:`NATIsotropic` share: the pooled linear head over their NHWC features
    and the parameters exempt from weight decay."""

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position bias tables (the official ``no_weight_decay_keywords = {"rpb"}``)."""
        return {n for n, _ in self.named_parameters() if n.endswith(".rpb")}


class NAT(_NATClassifier):
    """NAT / DiNAT / DiNAT_s classifier. Input (B, in_chans, H, W), logits (B, num_classes).

    ``dilations`` (one list per level, one int per layer) turns NAT into DiNAT; ``layout="swin"`` gives
    DiNAT_s (4x4 patch embedding and patch merging instead of the conv tokenizer / downsampler).
    """

    @factory_kwargs
    def __init__(
        self,
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 3.0,
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        layer_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        act_layer: str | Callable[..., nn.Module] = nn.GELU,
        norm_layer: str | Callable[[int], nn.Module] = LayerNorm,
        layout: str = "nat",
    ) -> None:
        """``drop_rate`` is the dropout before the classifier; ``proj_drop_rate`` is the official
        ``drop_rate`` (after the stem, in the MLPs and after the attention projection)."""
        super().__init__()
        num_levels = len(depths)
        if len(num_heads) != num_levels:
            raise ValueError(
                f"num_heads {tuple(num_heads)} needs one entry per level of depths {tuple(depths)}"
            )
        if dilations is None:
            dilations = [[1] * d for d in depths]
        if len(dilations) != num_levels or any(len(dl) != d for dl, d in zip(dilations, depths)):
            raise ValueError(f"dilations {dilations} needs one int per layer of depths {tuple(depths)}")
        if layout not in ("nat", "swin"):
            raise ValueError(f"layout must be 'nat' or 'swin', got {layout!r}")
        act_layer, norm_layer = get_act_layer(act_layer), get_norm_layer(norm_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_levels - 1))
        self.grad_checkpointing = False

        if layout == "nat":
            self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer)
            downsample = partial(ConvDownsampler, norm_layer=norm_layer)
        else:
            self.patch_embed = PatchEmbed(
                img_size=None,
                patch_size=4,
                in_chans=in_chans,
                embed_dim=embed_dim,
                norm_layer=norm_layer,
                output_fmt="NHWC",
                strict_img_size=False,
                dynamic_img_pad=True,
            )
            downsample = partial(PatchMerging, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(proj_drop_rate)

        # stochastic depth grows linearly over all layers
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i in range(num_levels):
            dim = int(embed_dim * 2**i)
            self.levels.append(
                NATLevel(
                    dim,
                    depths[i],
                    num_heads[i],
                    kernel_size,
                    dilations[i],
                    downsample if i < num_levels - 1 else None,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    layer_scale=layer_scale,
                )
            )
            self.feature_info.append(
                dict(num_chs=dim, reduction=4 * 2**i, module=f"levels.{i}.blocks.{depths[i] - 1}")
            )

        self.norm = norm_layer(self.num_features)
        self.init_head(num_classes, global_pool, drop_rate, output_fmt="NHWC")
        self.apply(init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^levels\.(\d+)"
            if coarse
            else [
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^levels\.(\d+)\.downsample", (99998,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for level in self.levels:
            level.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Level features before each downsampler, (B, C_i, H/s_i, W/s_i) for ``output_fmt="NCHW"``.

        ``indices``: last n levels if int, all if None, else the listed levels. ``norm`` applies the final
        norm to the last level's feature. Returns the intermediates, or (final NHWC features, intermediates).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        last = len(self.levels) - 1
        stop = max_index if stop_early and not torch.jit.is_scripting() else last
        intermediates = []
        x = self.pos_drop(self.patch_embed(check_image(x, self.in_chans)))
        i = 0
        for i, level in enumerate(self.levels[: stop + 1]):
            x = level.forward_blocks(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
            if i < stop:  # stopping early skips the downsampler after the last level run
                x = level.downsample(x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the levels (and downsampler, norm, head) not needed for ``indices``; returns kept indices."""
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        prune_end = max_index < len(self.levels) - 1
        self.levels = self.levels[: max_index + 1]
        self.levels[-1].downsample = nn.Identity()
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalised last-level map (B, H/32, W/32, num_features)."""
        x = self.pos_drop(self.patch_embed(check_image(x, self.in_chans)))
        for level in self.levels:
            x = level(x)
        return self.norm(x)


class NATIsotropic(_NATClassifier):
    """Isotropic NAT / DiNAT classifier (the official ``NATIsotropic``). Input (B, in_chans, H, W).

    16x16 patch embedding + LayerNorm, then ``depth`` NAT layers at one resolution (H/16, W/16); layer i
    uses dilation 1 if i is even else ``dilation`` (``dilation=1``: NAT-iso, 2: DiNAT-iso). Final LayerNorm,
    average pool, linear head. Inputs not divisible by the patch size are zero-padded at the bottom/right.
    """

    @factory_kwargs
    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        dilation: int = 1,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        act_layer: str | Callable[..., nn.Module] = nn.GELU,
        norm_layer: str | Callable[[int], nn.Module] = LayerNorm,
    ) -> None:
        """``drop_rate`` is the dropout before the classifier; ``proj_drop_rate`` is the official
        ``drop_rate`` (after the patch embedding, in the MLPs and after the attention projection)."""
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        act_layer, norm_layer = get_act_layer(act_layer), get_norm_layer(norm_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.pos_drop = nn.Dropout(proj_drop_rate)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.layers = nn.Sequential(
            *[
                NATLayer(
                    embed_dim,
                    num_heads,
                    kernel_size,
                    1 if i % 2 == 0 else dilation,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                )
                for i in range(depth)
            ]
        )
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"layers.{i}") for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim)
        self.init_head(num_classes, global_pool, drop_rate, output_fmt="NHWC")
        self.apply(init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs at stride ``patch_size``: (B, C, H/16, W/16) for ``output_fmt="NCHW"``, (B, h, w, C)
        for ``"NHWC"``, (B, h*w, C) for ``"NLC"`` (timm's ViT format).

        ``indices``: last n blocks if int, all if None, else the listed blocks. ``norm`` applies the final
        norm to every intermediate (as timm's ViT). Returns the intermediates, or (final normalised NHWC
        features, intermediates).
        """
        if output_fmt not in ("NCHW", "NHWC", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW', 'NHWC' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        blocks = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[: max_index + 1]
        intermediates = []
        x = self.pos_drop(self.patch_embed(check_image(x, self.in_chans)))
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i in take_indices:
                feat = self.norm(x) if norm else x
                if output_fmt == "NCHW":
                    feat = feat.permute(0, 3, 1, 2).contiguous()
                elif output_fmt == "NLC":
                    feat = feat.flatten(1, 2)
                intermediates.append(feat)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and norm / head if asked); returns kept indices."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalised map (B, H/16, W/16, embed_dim)."""
        x = self.pos_drop(self.patch_embed(check_image(x, self.in_chans)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.layers, x)
        else:
            x = self.layers(x)
        return self.norm(x)


# transformers NatLayer / DinatLayer sub-module names -> NATLayer names (query/key/value handled apart)
_HF_LAYER_NAMES = (
    ("layernorm_before.", "norm1."),
    ("attention.self.rpb", "attn.rpb"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_OTHER_NAMES = (
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("embeddings.norm.", "patch_embed.norm."),
    ("encoder.levels.", "levels."),
    ("layernorm.", "norm."),
    ("classifier.", "head."),
)


# a key with one of these prefixes is in the transformers layout (no official key starts with them)
_HF_PREFIXES = ("nat.", "dinat.", "embeddings.", "encoder.", "layernorm.", "classifier.")
_HF_QKV = re.compile(
    r"(?:(?:di)?nat\.)?encoder\.levels\.(\d+)\.layers\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)"
)


def _from_transformers(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One transformers ``Nat*`` / ``Dinat*`` key (not a query/key/value projection) -> :class:`NAT` key(s).

    The ``(di)nat.`` prefix goes; ``layer_scale_parameters`` (2, C) splits into ``ls1.gamma`` / ``ls2.gamma``.
    """
    key = re.sub(r"^(di)?nat\.", "", key)
    layer = re.match(r"encoder\.levels\.(\d+)\.layers\.(\d+)\.(.+)$", key)
    if layer is None:
        return {_rename_prefix(key, _HF_OTHER_NAMES): value}
    prefix, rest = f"levels.{layer[1]}.blocks.{layer[2]}.", layer[3]
    if rest == "layer_scale_parameters":
        return {prefix + "ls1.gamma": value[0], prefix + "ls2.gamma": value[1]}
    return {prefix + _rename_prefix(rest, _HF_LAYER_NAMES): value}


def _official_to_ours(key: str, pyramid: bool) -> str:
    """One official key -> this model's key: DiNAT_s levels ``layers.i`` become ``levels.i`` in a pyramid
    model (the isotropic models keep ``layers.i``), layer scales ``gamma1``/``gamma2`` become timm's
    ``ls1.gamma``/``ls2.gamma``; keys already in this layout pass unchanged."""
    if pyramid and key.startswith("layers."):
        key = "levels." + key[len("layers.") :]
    return re.sub(r"\.gamma([12])$", r".ls\1.gamma", key)


def _rename_prefix(key: str, table: Sequence[tuple[str, str]]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: NAT | NATIsotropic
) -> dict[str, torch.Tensor]:
    """Map an official NAT / DiNAT / DiNAT_s / isotropic state_dict onto :class:`NAT` / :class:`NATIsotropic`.

    Accepts the released files unchanged (a plain state_dict) or wrapped under ``'model'`` /
    ``'state_dict'``, and transformers-format ones (``NatForImageClassification``,
    ``DinatForImageClassification`` or the bare ``NatModel`` / ``DinatModel``), whose separate
    query/key/value projections are concatenated (in that order) into ``qkv``. Each key is mapped on its own
    (a file lacking some keys, or mixing layouts, maps what it has), so ``load_state_dict`` then names
    exactly the keys that are missing or unexpected; a qkv with a projection missing is reported as the
    missing ``qkv`` and its unmatched projections as unexpected. Relative position bias tables of another
    kernel size are resized bicubically (how the official 11x11 checkpoints were made from the 7x7 ones).
    """
    state_dict = unwrap_checkpoint(state_dict)
    pyramid = isinstance(model, NAT)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        proj = _HF_QKV.fullmatch(key)
        if proj is not None:
            fused = f"levels.{proj[1]}.blocks.{proj[2]}.attn.qkv.{proj[4]}"
            qkv.setdefault(fused, {})[proj[3]] = (key, value)
        elif key.startswith(_HF_PREFIXES):
            out.update(_from_transformers(key, value))
        else:
            out[_official_to_ours(key, pyramid)] = value
    for key, parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[key] = torch.cat([parts[name][1] for name in ("query", "key", "value")], dim=0)
        else:
            out.update(parts.values())
    target = model.state_dict()
    for key, value in out.items():
        if key.endswith(".rpb") and key in target and value.shape != target[key].shape:
            kernel = ((target[key].shape[-2] + 1) // 2, (target[key].shape[-1] + 1) // 2)
            out[key] = resize_rel_pos_table(value, kernel).to(target[key].dtype)
    return out


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    depths = kwargs.get("depths", (3, 4, 6, 5))
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    return build_backbone(NAT, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _create_nat_isotropic(variant: str, pretrained: bool = False, **kwargs) -> NATIsotropic:
    out_indices = kwargs.pop("out_indices", 3)  # timm's ViT default: the last three blocks
    return build_backbone(NATIsotropic, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/"


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0",
        "classifier": "head",
        "license": "mit",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        **kwargs,
    }


def _dinat_cfg(path: str, **kwargs) -> dict:
    return _cfg(_DINAT_URL + path, paper_ids="arXiv:2209.15001", **kwargs)


def _isotropic_cfg(name: str) -> dict:
    return _dinat_cfg(f"isotropic/{name}_in1k_224.pth", pool_size=(14, 14), first_conv="patch_embed.proj")


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_IN22K = dict(num_classes=21841)
_SWIN_STEM = dict(first_conv="patch_embed.proj")

default_cfgs = generate_default_cfgs(
    {
        "nat_mini.in1k": _cfg(_NAT_URL + "nat_mini.pth", paper_ids="arXiv:2204.07143"),
        "nat_tiny.in1k": _cfg(_NAT_URL + "nat_tiny.pth", paper_ids="arXiv:2204.07143"),
        "nat_small.in1k": _cfg(_NAT_URL + "nat_small.pth", paper_ids="arXiv:2204.07143"),
        "nat_base.in1k": _cfg(_NAT_URL + "nat_base.pth", paper_ids="arXiv:2204.07143"),
        "dinat_mini.in1k": _dinat_cfg("imagenet1k/dinat_mini_in1k_224.pth"),
        "dinat_tiny.in1k": _dinat_cfg("imagenet1k/dinat_tiny_in1k_224.pth"),
        "dinat_small.in1k": _dinat_cfg("imagenet1k/dinat_small_in1k_224.pth"),
        "dinat_base.in1k": _dinat_cfg("imagenet1k/dinat_base_in1k_224.pth"),
        "dinat_large.in22k_ft_in1k": _dinat_cfg("imagenet1k/dinat_large_in22k_in1k_224.pth"),
        "dinat_large_384.in22k_ft_in1k": _dinat_cfg("imagenet1k/dinat_large_in22k_in1k_384.pth", **_384),
        "dinat_large_384_11x11.in22k_ft_in1k": _dinat_cfg(
            "imagenet1k/dinat_large_in22k_in1k_384_11x11.pth", **_384
        ),
        "dinat_large_21k.in22k": _dinat_cfg("imagenet22k/dinat_large_in22k_224.pth", **_IN22K),
        "dinat_large_21k_11x11.in22k": _dinat_cfg(
            "imagenet22k/dinat_large_in22k_224_11x11interp.pth", **_IN22K
        ),
        "dinat_s_tiny.in1k": _dinat_cfg("imagenet1k/dinat_s_tiny_in1k_224.pth", **_SWIN_STEM),
        "dinat_s_small.in1k": _dinat_cfg("imagenet1k/dinat_s_small_in1k_224.pth", **_SWIN_STEM),
        "dinat_s_base.in1k": _dinat_cfg("imagenet1k/dinat_s_base_in1k_224.pth", **_SWIN_STEM),
        "dinat_s_large.in22k_ft_in1k": _dinat_cfg("imagenet1k/dinat_s_large_in1k_224.pth", **_SWIN_STEM),
        "dinat_s_large_384.in22k_ft_in1k": _dinat_cfg(
            "imagenet1k/dinat_s_large_in1k_384.pth", **_SWIN_STEM, **_384
        ),
        "dinat_s_large_21k.in22k": _dinat_cfg(
            "imagenet22k/dinat_s_large_in22k_224.pth", **_SWIN_STEM, **_IN22K
        ),
        "nat_isotropic_small.in1k": _isotropic_cfg("nat_isotropic_small"),
        "nat_isotropic_base.in1k": _isotropic_cfg("nat_isotropic_base"),
        "dinat_isotropic_small.in1k": _isotropic_cfg("dinat_isotropic_small"),
        "dinat_isotropic_base.in1k": _isotropic_cfg("dinat_isotropic_base"),
    }
)


def _alternating(depths: Sequence[int], dilated: Sequence[int]) -> list[list[int]]:
    """DiNAT's schedule: in level i, even layers use dilation 1 and odd layers ``dilated[i]``."""
    return [[1 if j % 2 == 0 else d for j in range(n)] for n, d in zip(depths, dilated)]


_DEPTHS_NAT = (3, 4, 18, 5)
_DEPTHS_DINAT_S = (2, 2, 18, 2)
_DIL_224 = (8, 4, 2, 1)  # stage resolution 56/28/14/7 divided by kernel 7
_DIL_384 = (13, 6, 3, 1)  # 96/48/24/12 divided by 7


def _model(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> NAT:
    return _create_nat(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3, drop_path_rate=0.2)
    return _model("nat_mini", pretrained, args, kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(embed_dim=64, depths=_DEPTHS_NAT, num_heads=(2, 4, 8, 16), mlp_ratio=3, drop_path_rate=0.2)
    return _model("nat_tiny", pretrained, args, kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(
        embed_dim=96,
        depths=_DEPTHS_NAT,
        num_heads=(3, 6, 12, 24),
        mlp_ratio=2,
        drop_path_rate=0.3,
        layer_scale=1e-5,
    )
    return _model("nat_small", pretrained, args, kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(
        embed_dim=128,
        depths=_DEPTHS_NAT,
        num_heads=(4, 8, 16, 32),
        mlp_ratio=2,
        drop_path_rate=0.5,
        layer_scale=1e-5,
    )
    return _model("nat_base", pretrained, args, kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    depths = (3, 4, 6, 5)
    args = dict(
        embed_dim=64,
        depths=depths,
        num_heads=(2, 4, 8, 16),
        mlp_ratio=3,
        drop_path_rate=0.2,
        dilations=_alternating(depths, _DIL_224),
    )
    return _model("dinat_mini", pretrained, args, kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(
        embed_dim=64,
        depths=_DEPTHS_NAT,
        num_heads=(2, 4, 8, 16),
        mlp_ratio=3,
        drop_path_rate=0.2,
        dilations=_alternating(_DEPTHS_NAT, _DIL_224),
    )
    return _model("dinat_tiny", pretrained, args, kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(
        embed_dim=96,
        depths=_DEPTHS_NAT,
        num_heads=(3, 6, 12, 24),
        mlp_ratio=2,
        drop_path_rate=0.3,
        dilations=_alternating(_DEPTHS_NAT, _DIL_224),
    )
    return _model("dinat_small", pretrained, args, kwargs)


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(
        embed_dim=128,
        depths=_DEPTHS_NAT,
        num_heads=(4, 8, 16, 32),
        mlp_ratio=2,
        drop_path_rate=0.5,
        layer_scale=1e-5,
        dilations=_alternating(_DEPTHS_NAT, _DIL_224),
    )
    return _model("dinat_base", pretrained, args, kwargs)


def _dinat_large_args(drop_path_rate: float, kernel_size: int, dilated: Sequence[int]) -> dict:
    return dict(
        embed_dim=192,
        depths=_DEPTHS_NAT,
        num_heads=(6, 12, 24, 48),
        mlp_ratio=2,
        drop_path_rate=drop_path_rate,
        kernel_size=kernel_size,
        dilations=_alternating(_DEPTHS_NAT, dilated),
    )


@register_model
def dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    return _model("dinat_large", pretrained, _dinat_large_args(0.35, 7, _DIL_224), kwargs)


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs) -> NAT:
    return _model("dinat_large_384", pretrained, _dinat_large_args(0.35, 7, _DIL_384), kwargs)


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs) -> NAT:
    # The official 11x11 model keeps the 224 dilation schedule.
    return _model("dinat_large_384_11x11", pretrained, _dinat_large_args(0.35, 11, _DIL_224), kwargs)


@register_model
def dinat_large_21k(pretrained: bool = False, **kwargs) -> NAT:
    return _model("dinat_large_21k", pretrained, _dinat_large_args(0.2, 7, _DIL_224), kwargs)


@register_model
def dinat_large_21k_11x11(pretrained: bool = False, **kwargs) -> NAT:
    return _model("dinat_large_21k_11x11", pretrained, _dinat_large_args(0.2, 11, _DIL_224), kwargs)


def _dinat_s_args(
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    drop_path_rate: float,
    dilated: Sequence[int] = _DIL_224,
) -> dict:
    return dict(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        mlp_ratio=4,
        drop_path_rate=drop_path_rate,
        dilations=_alternating(depths, dilated),
        layout="swin",
    )


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _model("dinat_s_tiny", pretrained, _dinat_s_args(96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2), kwargs)


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs) -> NAT:
    return _model(
        "dinat_s_small", pretrained, _dinat_s_args(96, _DEPTHS_DINAT_S, (3, 6, 12, 24), 0.3), kwargs
    )


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs) -> NAT:
    return _model(
        "dinat_s_base", pretrained, _dinat_s_args(128, _DEPTHS_DINAT_S, (4, 8, 16, 32), 0.5), kwargs
    )


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs) -> NAT:
    return _model(
        "dinat_s_large", pretrained, _dinat_s_args(192, _DEPTHS_DINAT_S, (6, 12, 24, 48), 0.35), kwargs
    )


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs) -> NAT:
    args = _dinat_s_args(192, _DEPTHS_DINAT_S, (6, 12, 24, 48), 0.35, dilated=_DIL_384)
    return _model("dinat_s_large_384", pretrained, args, kwargs)


@register_model
def dinat_s_large_21k(pretrained: bool = False, **kwargs) -> NAT:
    return _model(
        "dinat_s_large_21k", pretrained, _dinat_s_args(192, _DEPTHS_DINAT_S, (6, 12, 24, 48), 0.2), kwargs
    )


# Isotropic models (official isotropic.py): ViT-S / ViT-B widths, 12 layers, kernel 7 at stride 16. DiNAT-iso
# dilates every odd layer by 2, so its window (7 x 2) spans the whole 14x14 map at 224.
_ISO_SMALL = dict(embed_dim=384, depth=12, num_heads=12, mlp_ratio=4, kernel_size=7, drop_path_rate=0.1)
_ISO_BASE = dict(embed_dim=768, depth=12, num_heads=24, mlp_ratio=4, kernel_size=7, drop_path_rate=0.4)


def _isotropic(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> NATIsotropic:
    return _create_nat_isotropic(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _isotropic("nat_isotropic_small", pretrained, dict(_ISO_SMALL, dilation=1), kwargs)


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _isotropic("nat_isotropic_base", pretrained, dict(_ISO_BASE, dilation=1), kwargs)


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _isotropic("dinat_isotropic_small", pretrained, dict(_ISO_SMALL, dilation=2), kwargs)


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _isotropic("dinat_isotropic_base", pretrained, dict(_ISO_BASE, dilation=2), kwargs)
