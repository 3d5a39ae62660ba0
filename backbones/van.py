"""VAN: Visual Attention Network (large kernel attention, LKA).

Paper: Guo, Lu, Liu, Cheng, Hu, "Visual Attention Network", Computational Visual Media 2023,
    https://arxiv.org/abs/2202.09741
Official code: https://github.com/Visual-Attention-Network/VAN-Classification (models/van.py,
    Apache-2.0). This is a re-implementation whose module and parameter names follow the official
    code (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``, ``head``) except for the layer scales (timm's
    ``ls1.gamma`` / ``ls2.gamma``): the released checkpoints (``{'state_dict': ...}`` files) load through
    ``checkpoint_filter_fn``, which renames those.

Architecture: four stages, each an overlapping patch embedding (conv 7x7 stride 4, then 3x3 stride 2;
each followed by BatchNorm), a stack of blocks, and a LayerNorm over the stage's tokens. A block is
``x + ls1 * SpatialAttention(BN(x))`` then ``x + ls2 * Mlp(BN(x))``, all channels-first. The spatial
attention is ``proj_2(LKA(GELU(proj_1(x)))) + x`` where LKA (:func:`visattn.kernels.large_kernel_attention`)
is ``u * conv1x1(dwconv7x7_dilation3(dwconv5x5(u)))``. The Mlp is 1x1 conv -> depthwise 3x3 -> GELU -> 1x1.
The head averages the final normed tokens.

Feature maps (``forward_intermediates``, ``features_only``) are the stage outputs after their LayerNorm,
as NCHW: strides 4/8/16/32 (what the official segmentation/detection backbones return).

Preprocessing: the official models were trained with timm 0.4.12's ``vision_transformer._cfg`` data config
(mean = std = 0.5, bicubic, crop 0.9), reproduced in the pretrained cfgs below.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import (
    DropPath,
    LayerNorm2d,
    LayerScale2d,
    calculate_drop_path_rates,
    get_act_layer,
    get_norm_layer,
    register_notrace_module,
)
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from visattn.backbones.helpers import (
    PooledLinearHead,
    build_backbone,
    check_image,
    factory_kwargs,
    init_weights,
    unwrap_checkpoint,
)
from visattn.kernels import large_kernel_attention

__all__ = ["VAN"]
torch.fx.wrap("check_image")  # FX records the input check as one call (it runs with the graph)

# stage norm of every official variant: LayerNorm (eps 1e-6) over channels, the official token LayerNorm
# computed in place on the NCHW map (same parameters, so stage outputs are modules' outputs, e.g. for FX)
_LayerNormEps6 = partial(LayerNorm2d, eps=1e-6)


class DWConv(nn.Module):
    """Depthwise 3x3 conv of the Mlp (a module of its own so the key is ``mlp.dwconv.dwconv``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class Mlp(nn.Module):
    """Convolutional MLP: 1x1 -> depthwise 3x3 -> act -> drop -> 1x1 -> drop, on ``[B, C, H, W]``."""

    def __init__(
        self, dim: int, hidden_dim: int, act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0
    ):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = DWConv(hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x)))
        return self.drop(self.fc2(self.drop(x)))


@register_notrace_module  # an FX leaf: the fused kernel call stays one node
class LargeKernelAttention(nn.Module):
    """LKA (official name ``AttentionModule``): depthwise 5x5, depthwise 7x7 dilation 3, 1x1, gate.

    The three convolutions only hold the parameters (official key names ``conv0``, ``conv_spatial``,
    ``conv1``); the computation is the fused op :func:`visattn.kernels.large_kernel_attention`.
    """

    def __init__(self, dim: int, backend: str = "auto"):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.visattn.large_kernel_attention(
                x,
                self.conv0.weight,
                self.conv0.bias,
                self.conv_spatial.weight,
                self.conv_spatial.bias,
                self.conv1.weight,
                self.conv1.bias,
                self.conv_spatial.dilation[0],
                self.backend,
            )
        return large_kernel_attention(
            x,
            self.conv0.weight,
            self.conv0.bias,
            self.conv_spatial.weight,
            self.conv_spatial.bias,
            self.conv1.weight,
            self.conv1.bias,
            dilation=self.conv_spatial.dilation[0],
            backend=self.backend,
        )


class SpatialAttention(nn.Module):
    """``proj_2(LKA(act(proj_1(x)))) + x`` on ``[B, C, H, W]``."""

    def __init__(self, dim: int, act_layer: Callable[[], nn.Module] = nn.GELU, backend: str = "auto"):
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.activation = act_layer()
        self.spatial_gating_unit = LargeKernelAttention(dim, backend=backend)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class Block(nn.Module):
    """VAN block: BN -> spatial attention and BN -> Mlp, each scaled by a per-channel layer scale ``ls1`` /
    ``ls2`` (timm's LayerScale2d; the official ``layer_scale_1`` / ``layer_scale_2``)."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-2,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        attn_backend: str = "auto",
    ):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim, act_layer=act_layer, backend=attn_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls1 = LayerScale2d(dim, layer_scale_init_value)
        self.ls2 = LayerScale2d(dim, layer_scale_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class OverlapPatchEmbed(nn.Module):
    """Strided conv with ``kernel // 2`` padding, then BatchNorm: ``[B, Cin, H, W] -> [B, C, H/s, W/s]``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class VAN(PooledLinearHead, nn.Module):
    """Visual Attention Network (channels-first throughout)."""

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-2,
        norm_layer: str | Callable[[int], nn.Module] = _LayerNormEps6,
        act_layer: str | Callable[[], nn.Module] = nn.GELU,
        attn_backend: str = "auto",
    ):
        """
        Args:
            embed_dims, depths, mlp_ratios: per-stage width, number of blocks and Mlp expansion.
            drop_rate: dropout inside the Mlps (as the official ``drop_rate``; the head has none).
            drop_path_rate: stochastic depth, increased linearly over all blocks.
            layer_scale_init_value: initial layer scale (hard-coded 1e-2 in the official code).
            norm_layer: channels-first stage norm (official: LayerNorm eps 1e-6 over each location).
            attn_backend: ``backend`` of :func:`visattn.kernels.large_kernel_attention`.
        """
        super().__init__()
        if not (len(embed_dims) == len(depths) == len(mlp_ratios)):
            raise ValueError(
                f"VAN: embed_dims, depths and mlp_ratios need one entry per stage, got {len(embed_dims)}, "
                f"{len(depths)} and {len(mlp_ratios)}"
            )
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        self.in_chans = in_chans
        self.num_stages = len(depths)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        self.feature_info = []
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        cur = 0
        for i in range(self.num_stages):
            patch_embed = OverlapPatchEmbed(
                in_chans if i == 0 else embed_dims[i - 1],
                embed_dims[i],
                patch_size=7 if i == 0 else 3,
                stride=4 if i == 0 else 2,
            )
            blocks = nn.ModuleList(
                Block(
                    embed_dims[i],
                    mlp_ratio=mlp_ratios[i],
                    drop=drop_rate,
                    drop_path=dpr[cur + j],
                    layer_scale_init_value=layer_scale_init_value,
                    act_layer=act_layer,
                    attn_backend=attn_backend,
                )
                for j in range(depths[i])
            )
            cur += depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", norm_layer(embed_dims[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"norm{i + 1}"))
        self.init_head(num_classes, global_pool, 0.0, output_fmt="NCHW")  # no head dropout in VAN
        self.apply(partial(init_weights, conv_fan_out=True))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Nothing beyond what timm's optimizer factory already excludes (every 1-D parameter: norms,
        # biases, layer scales); the official method names parameters this model does not have.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed1\.",
            blocks=r"^(?:patch_embed|block|norm)(\d+)"
            if coarse
            else [
                (r"^block(\d+)\.(\d+)", None),
                (r"^patch_embed(\d+)\.", (0,)),
                (r"^norm(\d+)", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` (0-based): patch embed, blocks, stage norm; ``[B, C, H, W]`` in and out."""
        x = getattr(self, f"patch_embed{i + 1}")(x)
        for blk in getattr(self, f"block{i + 1}"):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
        return getattr(self, f"norm{i + 1}")(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward returning the stage outputs selected by ``indices`` (NCHW).

        ``indices``: last n stages if int, all if None, these stages if a list. ``norm`` has nothing to add:
        every stage output already ends with its own LayerNorm. ``stop_early`` skips the stages after the
        last selected one.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"VAN intermediates are NCHW only, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        intermediates = []
        last = max_index if stop_early or intermediates_only else self.num_stages - 1
        x = check_image(x, self.in_chans)
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for prefix in ("patch_embed", "block", "norm"):
                delattr(self, f"{prefix}{i + 1}")
        if max_index + 1 < self.num_stages:
            self.num_stages = max_index + 1
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.feature_info = self.feature_info[: max_index + 1]
            if not prune_head:
                self.reset_classifier(self.num_classes)  # a new head for the last kept stage's width
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> normed last-stage map ``[B, C, H/32, W/32]``."""
        x = check_image(x, self.in_chans)
        for i in range(self.num_stages):
            x = self._stage(i, x)
        return x

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles instead of this model (it cannot look up ``f"block{i}"``)."""
        return _ScriptableVAN(self)


class _ScriptableVAN(PooledLinearHead, nn.Module):
    """A :class:`VAN`'s modules (shared, not copied) grouped per stage in ModuleLists, for TorchScript."""

    def __init__(self, model: VAN):
        super().__init__()
        stages = range(1, model.num_stages + 1)
        self.patch_embeds = nn.ModuleList([getattr(model, f"patch_embed{i}") for i in stages])
        self.blocks = nn.ModuleList([getattr(model, f"block{i}") for i in stages])
        self.norms = nn.ModuleList([getattr(model, f"norm{i}") for i in stages])
        self.global_pool, self.head_drop, self.head = model.global_pool, model.head_drop, model.head
        self.output_fmt, self.in_chans = model.output_fmt, model.in_chans
        self.train(model.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = check_image(x, self.in_chans)
        for patch_embed, blocks, norm in zip(self.patch_embeds, self.blocks, self.norms):
            x = patch_embed(x)
            for blk in blocks:
                x = blk(x)
            x = norm(x)
        return x


def _official_to_ours(key: str) -> str:
    """One official key -> this model's key: the layer scales ``block{i}.{j}.layer_scale_{k}`` become
    ``block{i}.{j}.ls{k}.gamma``; every other official name is this model's (keys already in this layout pass
    unchanged)."""
    return re.sub(r"^(block\d+\.\d+)\.layer_scale_([12])$", r"\1.ls\2.gamma", key)


def checkpoint_filter_fn(state_dict: dict, model: VAN) -> dict[str, torch.Tensor]:
    """Map an official VAN state_dict (plain, or wrapped under ``'state_dict'`` / ``'model'``) to this model.

    Each key is mapped on its own, so ``load_state_dict`` then names exactly the keys a file lacks or has
    in excess.
    """
    state_dict = unwrap_checkpoint(state_dict, containers=("state_dict", "model"))  # mmcv saves 'state_dict'
    return {_official_to_ours(key): value for key, value in state_dict.items()}


def _create_van(variant: str, pretrained: bool = False, **kwargs) -> VAN:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    # The released .pth.tar files were written by timm 0.4.12's train.py, whose checkpoints also pickle the
    # run's argparse.Namespace under 'args': allow that one plain class in timm's weights_only load.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return build_backbone(VAN, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed1.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2202.09741",
        "origin_url": "https://github.com/Visual-Attention-Network/VAN-Classification",
        **kwargs,
    }


_HF = "https://huggingface.co/Visual-Attention-Network"
default_cfgs = generate_default_cfgs(
    {
        "van_b0.in1k": _cfg(url=f"{_HF}/VAN-Tiny-original/resolve/main/van_tiny_754.pth.tar"),
        "van_b1.in1k": _cfg(url=f"{_HF}/VAN-Small-original/resolve/main/van_small_811.pth.tar"),
        "van_b2.in1k": _cfg(url=f"{_HF}/VAN-Base-original/resolve/main/van_base_828.pth.tar"),
        "van_b3.in1k": _cfg(url=f"{_HF}/VAN-Large-original/resolve/main/van_large_839.pth.tar"),
        # the official repository defines B4-B6 but releases no ImageNet-1K weights for them
        "van_b4.untrained": _cfg(),
        "van_b5.untrained": _cfg(),
        "van_b6.untrained": _cfg(),
    }
)


@register_model
def van_b0(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B0 (VAN-Tiny): 4.1M params."""
    args = dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b0", pretrained, **dict(args, **kwargs))


@register_model
def van_b1(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B1 (VAN-Small): 13.9M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b1", pretrained, **dict(args, **kwargs))


@register_model
def van_b2(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B2 (VAN-Base): 26.6M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b2", pretrained, **dict(args, **kwargs))


@register_model
def van_b3(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B3 (VAN-Large): 44.8M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b3", pretrained, **dict(args, **kwargs))


@register_model
def van_b4(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B4: 60.3M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b4", pretrained, **dict(args, **kwargs))


@register_model
def van_b5(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B5: 90.0M params."""
    args = dict(embed_dims=(96, 192, 480, 768), depths=(3, 3, 24, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b5", pretrained, **dict(args, **kwargs))


@register_model
def van_b6(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B6: 200.0M params."""
    args = dict(embed_dims=(96, 192, 384, 768), depths=(6, 6, 90, 6), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b6", pretrained, **dict(args, **kwargs))
