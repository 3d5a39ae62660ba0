"""Agent-PVT: Pyramid Vision Transformer (v1) with agent attention.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv 2312.08874). Official code: https://github.com/LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_pvt.py, cfgs/agent_pvt_*.yaml).

PVT-v1 layout: four stages, each a strided-conv patch embedding (+ LayerNorm eps 1e-5), a learned
position embedding, and blocks with LayerNorm eps 1e-6; no class token and no final norm (the head
reads the token mean). ``attn_type`` picks per stage ``A`` (agent attention over the whole stage,
keys/values reduced by ``agent_sr_ratios``, 1 in every released model) or ``B`` (PVT spatial-reduction
attention with ``sr_ratios``). Agents come from queries pooled to ``sqrt(agent_num)`` squared.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    get_norm_layer,
    register_notrace_module,
    to_2tuple,
    trunc_normal_,
)
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.pvt_v2 import Attention as SpatialReductionAttention
from torch import nn

from visattn.backbones.agent_family import (
    AgentAttentionBase,
    agent_cfg,
    resize_pos_embed,
    resize_to_model,
    tsinghua_file,
)
from visattn.backbones.helpers import (
    PooledLinearHead,
    build_backbone,
    check_image,
    factory_kwargs,
    init_weights,
    load_pretrained_file,
    unwrap_checkpoint,
)

__all__ = ["AgentPyramidVisionTransformer"]
torch.fx.wrap("check_image")  # FX records the input check as one call (it runs with the graph)


@register_notrace_module  # an FX leaf, like every agent-attention layer
class AgentPVTAttention(AgentAttentionBase):
    """Agent attention over a stage grid; keys/values optionally spatially reduced by ``sr_ratio``."""

    def __init__(
        self,
        dim: int,
        grid_size: tuple[int, int],
        num_heads: int,
        agent_num: int = 49,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        kv_size = (grid_size[0] // sr_ratio, grid_size[1] // sr_ratio)
        super().__init__(dim, num_heads, agent_num, grid_size, kv_size, attn_drop, proj_drop)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x)
        if self.sr is not None and self.norm is not None:
            x = self.norm(self.sr(x.transpose(1, 2).unflatten(2, size)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, c).unbind(2)
        kv_size = (size[0] // self.sr_ratio, size[1] // self.sr_ratio)
        agents = self.agent_tokens(q, size)
        agent_bias, query_bias = self.position_biases(size, kv_size)
        out = self.attend(q, k, v, agents, agent_bias, query_bias)
        out = out + self.dwc_tokens(v, kv_size, out_size=size)
        return self.project(out)


class AgentPVTBlock(nn.Module):
    """Pre-norm block; ``attn_type`` ``"A"`` (agent) or ``"B"`` (PVT spatial-reduction attention)."""

    def __init__(
        self,
        dim: int,
        grid_size: tuple[int, int],
        num_heads: int,
        attn_type: str = "A",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        agent_num: int = 49,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        if attn_type == "A":
            self.attn = AgentPVTAttention(
                dim, grid_size, num_heads, agent_num, sr_ratio, qkv_bias, attn_drop, proj_drop
            )
        elif attn_type == "B":
            self.attn = SpatialReductionAttention(
                dim, num_heads, sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
            )
        else:
            raise ValueError(f"attn_type must be 'A' or 'B', got {attn_type!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentPyramidVisionTransformer(PooledLinearHead, nn.Module):
    """Agent-PVT classifier. Attribute names (``patch_embed1``, ``pos_embed1``, ``block1``, ...) are the
    official ones so that official checkpoints load unchanged.

    ``dynamic_img_size=True`` accepts any input size (timm's convention): each stage's position embedding
    and agent biases are resized to its token grid on every forward, with the same helpers
    ``checkpoint_filter_fn`` uses for a checkpoint of another resolution.
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        qkv_bias: bool = True,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        agent_sr_ratios: str | tuple[int, ...] = "1111",
        agent_num: tuple[int, ...] = (9, 16, 49, 49),
        attn_type: str = "AAAA",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: str | type[nn.Module] | None = None,
        act_layer: str | type[nn.Module] = nn.GELU,
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        norm_layer = get_norm_layer(norm_layer) or partial(nn.LayerNorm, eps=1e-6)
        act_layer = get_act_layer(act_layer)
        num_stages = len(depths)
        self.dynamic_img_size = dynamic_img_size
        dynamic = dict(strict_img_size=False, output_fmt="NHWC") if dynamic_img_size else {}
        if len(attn_type) != num_stages or any(t not in "AB" for t in attn_type):
            raise ValueError(f"attn_type needs one 'A' or 'B' per stage ({num_stages}), got {attn_type!r}")
        self.in_chans = in_chans
        self.num_stages = num_stages
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        self.feature_info = []
        img_hw = to_2tuple(img_size)
        # the input sizes it takes (check_image): the built one, or with dynamic_img_size multiples of the
        # total stride (each stage's patch embedding asserts that its input divides by its patch)
        self.fixed_img_size = None if dynamic_img_size else tuple(img_hw)
        self.patch_size = patch_size
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        cur = 0
        for i in range(num_stages):
            patch_embed = PatchEmbed(
                img_size=tuple(s // (patch_size * 2 ** (i - 1)) for s in img_hw) if i else img_hw,
                patch_size=patch_size if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1],
                embed_dim=embed_dims[i],
                norm_layer=nn.LayerNorm,
                **dynamic,
            )
            grid = patch_embed.grid_size
            sr = sr_ratios[i] if attn_type[i] == "B" else int(agent_sr_ratios[i])
            blocks = nn.ModuleList(
                AgentPVTBlock(
                    embed_dims[i],
                    grid,
                    num_heads[i],
                    attn_type[i],
                    mlp_ratios[i],
                    qkv_bias,
                    sr,
                    int(agent_num[i]),
                    proj_drop_rate,
                    attn_drop_rate,
                    dpr[cur + j],
                    norm_layer,
                    act_layer,
                )
                for j in range(depths[i])
            )
            cur += depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(
                self,
                f"pos_embed{i + 1}",
                nn.Parameter(torch.zeros(1, patch_embed.num_patches, embed_dims[i])),
            )
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
            setattr(self, f"block{i + 1}", blocks)
            # tokens -> NCHW map as a (parameter-free) module, so the stage output is a module output (FX)
            setattr(self, f"to_map{i + 1}", nn.Unflatten(2, grid))
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=patch_size * 2**i, module=f"to_map{i + 1}")
            )
        self.init_head(num_classes, global_pool, drop_rate, output_fmt="NCHW")
        for i in range(num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        self.apply(init_weights)

    @property
    def size_multiple(self) -> int:
        """With ``dynamic_img_size``, input sides must be multiples of this: the stride of the last stage."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^(?:patch_embed1|pos_embed1)\b",
            blocks=r"^(?:patch_embed|pos_embed|block)(\d+)"
            if coarse
            else [
                (r"^block(\d+)\.(\d+)", None),
                (r"^(?:patch_embed|pos_embed)(\d+)", (0,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` (0-based): NCHW (or the image) in, NCHW out."""
        patch_embed = getattr(self, f"patch_embed{i + 1}")
        tokens, pos_embed = patch_embed(x), getattr(self, f"pos_embed{i + 1}")
        if self.dynamic_img_size:
            size = (tokens.shape[1], tokens.shape[2])
            tokens, pos_embed = tokens.flatten(1, 2), resize_pos_embed(pos_embed, size)
        else:
            size = patch_embed.grid_size
        tokens = getattr(self, f"pos_drop{i + 1}")(tokens + pos_embed)
        for blk in getattr(self, f"block{i + 1}"):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                tokens = checkpoint(blk, tokens, size)
            else:
                tokens = blk(tokens, size)
        if self.dynamic_img_size:
            return tokens.transpose(1, 2).unflatten(2, size)
        return getattr(self, f"to_map{i + 1}")(tokens.transpose(1, 2))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs as NCHW (PVT has no norm, so ``norm`` changes nothing)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        intermediates = []
        x = check_image(x, self.in_chans, self.fixed_img_size, self.size_multiple)
        for i in range(max_index + 1 if stop_early else self.num_stages):
            x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in ("patch_embed", "pos_embed", "pos_drop", "block", "to_map"):
                delattr(self, f"{name}{i + 1}")
        self.num_stages = max_index + 1
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official (or visattn) checkpoint file: timm calls this for the cfgs' ``custom_load``."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> last-stage features ``[B, C, H/32, W/32]`` (no final norm in PVT-v1)."""
        x = check_image(x, self.in_chans, self.fixed_img_size, self.size_multiple)
        for i in range(self.num_stages):
            x = self._stage(i, x)
        return x

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles instead of this model (it cannot look up ``f"block{i}"``)."""
        if self.dynamic_img_size:
            raise ValueError("TorchScript needs the fixed-size Agent-PVT (dynamic_img_size=False)")
        return _ScriptableAgentPVT(self)


class _PVTStage(nn.Module):
    """One stage of an :class:`AgentPyramidVisionTransformer` (its modules and position embedding, shared)."""

    def __init__(self, model: AgentPyramidVisionTransformer, i: int):
        super().__init__()
        self.patch_embed = getattr(model, f"patch_embed{i}")
        self.pos_embed = getattr(model, f"pos_embed{i}")
        self.pos_drop = getattr(model, f"pos_drop{i}")
        self.blocks = getattr(model, f"block{i}")
        self.to_map = getattr(model, f"to_map{i}")
        self.grid_size: tuple[int, int] = (self.patch_embed.grid_size[0], self.patch_embed.grid_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        for blk in self.blocks:
            tokens = blk(tokens, self.grid_size)
        return self.to_map(tokens.transpose(1, 2))


class _ScriptableAgentPVT(PooledLinearHead, nn.Module):
    """An :class:`AgentPyramidVisionTransformer`'s modules grouped per stage, for TorchScript."""

    def __init__(self, model: AgentPyramidVisionTransformer):
        super().__init__()
        self.stages = nn.ModuleList([_PVTStage(model, i + 1) for i in range(model.num_stages)])
        self.global_pool, self.head_drop, self.head = model.global_pool, model.head_drop, model.head
        self.output_fmt, self.in_chans = model.output_fmt, model.in_chans
        self.fixed_img_size, self.size_multiple = model.fixed_img_size, model.size_multiple
        self.train(model.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = check_image(x, self.in_chans, self.fixed_img_size, self.size_multiple)
        for stage in self.stages:
            x = stage(x)
        return x


def checkpoint_filter_fn(state_dict: dict, model: AgentPyramidVisionTransformer) -> dict:
    """Official checkpoints (``{'model': state_dict, ...}`` or bare) load unchanged: same key names.

    Agent biases and position embeddings of another resolution are resized (see ``resize_to_model``).
    """
    return resize_to_model(unwrap_checkpoint(state_dict), model)


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 2, 2))))))
    return build_backbone(
        AgentPyramidVisionTransformer, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs
    )


_cfg = partial(agent_cfg, pool_size=(7, 7), first_conv="patch_embed1.proj")
default_cfgs = generate_default_cfgs(
    {
        "agent_pvt_tiny.in1k": _cfg(url=tsinghua_file("13fdf0e0a7c5498c934f", "agent_pvt_tiny_in1k.pth")),
        "agent_pvt_small.in1k": _cfg(url=tsinghua_file("36b8be9a8863456685a3", "agent_pvt_small_in1k.pth")),
        "agent_pvt_medium.in1k": _cfg(url=tsinghua_file("4d00ecacf18b45f9b88c", "agent_pvt_medium_in1k.pth")),
        "agent_pvt_medium_256.in1k": _cfg(
            url=tsinghua_file("654df734121643b19c52", "agent_pvt_medium_256_in1k.pth"),
            input_size=(3, 256, 256),
            pool_size=(8, 8),
        ),
        "agent_pvt_large.in1k": _cfg(url=tsinghua_file("040cfe0cfbbe4762ad09", "agent_pvt_large_in1k.pth")),
    }
)


def _variant(variant: str, pretrained: bool, **kwargs) -> AgentPyramidVisionTransformer:
    args = dict(agent_num=(9, 16, 49, 49), attn_type="AAAA", agent_sr_ratios="1111")
    return _create_agent_pvt(variant, pretrained, **dict(args, **kwargs))


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-T (cfgs/agent_pvt_t.yaml: AAAA, agents 9-16-49-49; paper drop_path 0.1)."""
    return _variant("agent_pvt_tiny", pretrained, **dict(dict(depths=(2, 2, 2, 2)), **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-S (cfgs/agent_pvt_s.yaml; paper drop_path 0.1)."""
    return _variant("agent_pvt_small", pretrained, **dict(dict(depths=(3, 4, 6, 3)), **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M (cfgs/agent_pvt_m.yaml; paper drop_path 0.3)."""
    return _variant("agent_pvt_medium", pretrained, **dict(dict(depths=(3, 4, 18, 3)), **kwargs))


@register_model
def agent_pvt_medium_256(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M at 256 (cfgs/agent_pvt_m_256.yaml)."""
    return _variant("agent_pvt_medium_256", pretrained, **dict(dict(depths=(3, 4, 18, 3)), **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-L (cfgs/agent_pvt_b.yaml; paper drop_path 0.3)."""
    return _variant("agent_pvt_large", pretrained, **dict(dict(depths=(3, 8, 27, 3)), **kwargs))
