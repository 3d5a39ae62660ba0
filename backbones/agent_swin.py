"""Agent-Swin: Swin Transformer with agent attention.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv 2312.08874). Official code: https://github.com/LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_swin.py, cfgs/agent_swin_*.yaml).

A Swin-T/S/B layout (patch 4, PatchMerging, LayerNorm eps 1e-5) whose stages use one of two block
types, chosen per stage by an ``attn_type`` string such as ``"AAAB"``:

- ``A``: agent attention in windows of ``window_size`` (56 at 224, i.e. the whole stage: global);
- ``B``: plain Swin window attention with relative position bias, window ``max(7, window_size // 8)``;
- ``M<k>`` (only at the end of the string, for one stage): the first ``k`` blocks ``A``, the rest ``B``.

Windows larger than the stage are clamped to it (and then not shifted), exactly as in Swin. The agent
blocks ignore the shifted-window mask, like the official code.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    get_act_layer,
    get_norm_layer,
    register_notrace_module,
    to_2tuple,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse
from torch import nn

from visattn.backbones._common import PooledLinearHead, check_image, factory_kwargs, init_weights
from visattn.backbones.agent_common import TSINGHUA_URL, AgentAttentionBase, agent_cfg, resize_to_model

__all__ = ["AgentSwinTransformer"]
torch.fx.wrap("check_image")  # FX records the input check as one call (it runs with the graph)


def parse_attn_type(attn_type: str, depths: tuple[int, ...]) -> list[list[str]]:
    """Per-stage, per-block attention types from the official string (``"AAAB"``, ``"AAMB2"``, ...)."""
    num_stages = len(depths)
    head, tail = attn_type[:num_stages], attn_type[num_stages:]
    if len(head) != num_stages or any(c not in "ABM" for c in head) or ("M" in head) != bool(tail):
        raise ValueError(
            f"attn_type must give A/B/M for each of {num_stages} stages (M followed by a block "
            f"count at the end), got {attn_type!r}"
        )
    stages = []
    for kind, depth in zip(head, depths):
        if kind == "M":
            num_agent = int(tail)
            stages.append(["A" if i < num_agent else "B" for i in range(depth)])
        else:
            stages.append([kind] * depth)
    return stages


@register_notrace_module  # an FX leaf, like every agent-attention layer
class AgentWindowAttention(AgentAttentionBase):
    """Agent attention inside one (square) window; input and output ``[B * windows, N, C]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        agent_num: int = 49,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, agent_num, window_size, window_size, attn_drop, proj_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        agents = self.agent_tokens(q, self.q_size)
        agent_bias, query_bias = self.position_biases()
        x = self.attend(q, k, v, agents, agent_bias, query_bias) + self.dwc_tokens(v, self.q_size)
        return self.project(x)


class AgentSwinBlock(nn.Module):
    """Swin block with agent attention; input and output ``[B, H, W, C]``."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        agent_num: int = 49,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.input_resolution = input_resolution
        if min(input_resolution) <= window_size:
            window_size, shift_size = min(input_resolution), 0
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = AgentWindowAttention(
            dim, num_heads, to_2tuple(window_size), agent_num, qkv_bias, attn_drop, proj_drop
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        ws, shift = self.window_size, self.shift_size
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, (ws, ws)).flatten(1, 2)
        windows = self.attn(windows).unflatten(1, (ws, ws))
        x = window_reverse(windows, (ws, ws), h, w)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class AgentSwinStage(nn.Module):
    """Blocks at one resolution, then the PatchMerging that halves it (all stages but the last)."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        block_types: list[str],
        window_size: int,
        agent_num: int,
        downsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: list[float] | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.grad_checkpointing = False
        drop_path = drop_path or [0.0] * len(block_types)
        blocks = []
        for i, kind in enumerate(block_types):
            common = dict(
                dim=dim,
                input_resolution=input_resolution,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
            )
            if kind == "A":
                blocks.append(
                    AgentSwinBlock(
                        window_size=window_size,
                        shift_size=0 if i % 2 == 0 else window_size // 2,
                        agent_num=agent_num,
                        **common,
                    )
                )
            else:
                ws = max(7, window_size // 8)
                blocks.append(
                    SwinTransformerBlock(window_size=ws, shift_size=0 if i % 2 == 0 else ws // 2, **common)
                )
        self.blocks = nn.Sequential(*blocks)
        self.downsample = PatchMerging(dim, norm_layer=norm_layer) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class AgentSwinTransformer(PooledLinearHead, nn.Module):
    """Agent-Swin classifier; tokens are kept NHWC (``[B, H, W, C]``) between blocks."""

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 56,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        agent_num: tuple[int, ...] = (9, 16, 49, 49),
        attn_type: str = "AAAB",
        norm_layer: str | type[nn.Module] = nn.LayerNorm,
        act_layer: str | type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        num_stages = len(depths)
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_stages - 1))
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, norm_layer=norm_layer, output_fmt="NHWC"
        )
        grid = self.patch_embed.grid_size
        self.pos_drop = nn.Dropout(drop_rate)
        block_types = parse_attn_type(attn_type, tuple(depths))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu")
        dpr = [r.tolist() for r in rates.split(list(depths))]
        self.layers = nn.Sequential()
        self.feature_info = []
        for i in range(num_stages):
            dim = int(embed_dim * 2**i)
            self.layers.append(
                AgentSwinStage(
                    dim=dim,
                    input_resolution=(grid[0] // 2**i, grid[1] // 2**i),
                    num_heads=num_heads[i],
                    block_types=block_types[i],
                    window_size=window_size,
                    agent_num=int(agent_num[i]),
                    downsample=i < num_stages - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                )
            )
            # the stage's blocks, before the PatchMerging ending the stage (as in forward_intermediates)
            self.feature_info.append(
                dict(num_chs=dim, reduction=patch_size * 2**i, module=f"layers.{i}.blocks")
            )
        self.norm = norm_layer(self.num_features)
        self.init_head(num_classes, global_pool, drop_rate, output_fmt="NHWC")
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
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
        """Stage outputs before PatchMerging as NCHW; ``norm`` applies the final norm to the last one."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self.pos_drop(self.patch_embed(check_image(x, self.in_chans)))
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None and i < len(stages) - 1:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> normalised last-stage tokens ``[B, H/32, W/32, C]``."""
        x = self.pos_drop(self.patch_embed(check_image(x, self.in_chans)))
        x = self.layers(x)
        return self.norm(x)


def checkpoint_filter_fn(state_dict: dict, model: AgentSwinTransformer) -> dict:
    """Official checkpoints (``{'model': state_dict, ...}`` or bare) -> our state_dict.

    Key names are the official ones; the index/mask buffers the official code saves are rebuilt here
    (non-persistent), so they are dropped, as the official ``load_pretrained`` does. Agent biases and
    relative position tables of another resolution are resized (see ``resize_to_model``).
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    drop = ("relative_position_index", "relative_coords_table", "attn_mask")
    return resize_to_model({k: v for k, v in state_dict.items() if not k.endswith(drop)}, model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))))
    return build_model_with_cfg(
        AgentSwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


_cfg = partial(agent_cfg, pool_size=(7, 7), first_conv="patch_embed.proj")
default_cfgs = generate_default_cfgs(
    {
        "agent_swin_tiny.in1k": _cfg(url=TSINGHUA_URL.format("a2ddc1190c224f768a41")),
        "agent_swin_small.in1k": _cfg(url=TSINGHUA_URL.format("f607172c9fea4d6e99bb")),
        "agent_swin_small_288.in1k": _cfg(
            url=TSINGHUA_URL.format("09760394e93b4046a25e"),
            input_size=(3, 288, 288),
            pool_size=(9, 9),
            crop_pct=1.0,
        ),
        "agent_swin_base.in1k": _cfg(url=TSINGHUA_URL.format("4fcd2d0114bb490483c3")),
        "agent_swin_base_384.in1k": _cfg(
            url=TSINGHUA_URL.format("bb84ee9058954706a557"),
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
        ),
    }
)

_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type="AABB")
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type="AAMB2")


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T (cfgs/agent_swin_t.yaml: AAAB, agents 9-16-49-49, window 56; paper drop_path 0.2)."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type="AAAB")
    return _create_agent_swin("agent_swin_tiny", pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S (cfgs/agent_swin_s.yaml: AABB, agents 9-16-49-49, window 56; paper drop_path 0.3)."""
    return _create_agent_swin("agent_swin_small", pretrained, **dict(_SMALL, **kwargs))


@register_model
def agent_swin_small_288(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S at 288 (cfgs/agent_swin_s_288.yaml: window 72)."""
    args = dict(_SMALL, window_size=72)
    return _create_agent_swin("agent_swin_small_288", pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B (cfgs/agent_swin_b.yaml: AAMB2 = stage 3 first 2 blocks agent; paper drop_path 0.5)."""
    return _create_agent_swin("agent_swin_base", pretrained, **dict(_BASE, **kwargs))


@register_model
def agent_swin_base_384(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B at 384 (cfgs/agent_swin_b_384.yaml: window 96)."""
    args = dict(_BASE, window_size=96)
    return _create_agent_swin("agent_swin_base_384", pretrained, **dict(args, **kwargs))
