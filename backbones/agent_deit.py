"""Agent-DeiT: DeiT (ViT with a class token) whose first blocks use agent attention.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv 2312.08874). Official code: https://github.com/LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_deit.py, cfgs/agent_deit_*.yaml).

The first ``agent_layer`` blocks (all 12 for tiny/small, 4 for base) are agent blocks; block ``i`` uses
``agent_num[stage]`` agents with ``stage = (0, 1, 2, 2, 2, 3)[i // 2]`` (the official mapping). Agents
are pooled from the patch-token queries only; the class token gets its own biases ``ac_bias`` (agent ->
class key) and ``ca_bias`` (class query -> agent), and the DWC branch touches the patch tokens only.
The remaining blocks are plain DeiT blocks. LayerNorm eps 1e-6, head on the class token.
"""

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
    trunc_normal_,
)
from timm.models import (
    checkpoint,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn

from visattn.backbones.agent_family import (
    AgentAttentionBase,
    agent_cfg,
    resize_pos_embed,
    resize_to_model,
    tsinghua_file,
)
from visattn.backbones.helpers import (
    build_backbone,
    check_image,
    factory_kwargs,
    init_weights,
    load_pretrained_file,
    unwrap_checkpoint,
)

__all__ = ["AgentVisionTransformer"]
torch.fx.wrap("check_image")  # FX records the input check as one call (it runs with the graph)

_STAGE_OF_BLOCK_PAIR = (0, 1, 2, 2, 2, 3)


@register_notrace_module  # an FX leaf, like every agent-attention layer
class AgentDeiTAttention(AgentAttentionBase):
    """Agent attention over ``[cls, patches]`` tokens ``[B, 1 + h*w, C]`` on the patch grid ``grid``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        agent_num: int = 49,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, agent_num, grid, grid, attn_drop, proj_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
        self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
        trunc_normal_(self.ac_bias, std=0.02)
        trunc_normal_(self.ca_bias, std=0.02)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``size``: the patch grid (default: the training one)."""
        b, n, c = x.shape
        size = self.q_size if size is None else size
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        agents = self.agent_tokens(q[:, 1:], size)
        agent_bias, query_bias = self.position_biases(size, size)
        agent_bias = torch.cat([self.ac_bias, agent_bias], dim=-1)
        query_bias = torch.cat([self.ca_bias, query_bias], dim=-2)
        x = self.attend(q, k, v, agents, agent_bias, query_bias)
        x = torch.cat([x[:, :1], x[:, 1:] + self.dwc_tokens(v[:, 1:], size)], dim=1)
        return self.project(x)


class AgentDeiTBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        agent_num: int = 49,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = AgentDeiTAttention(dim, num_heads, grid, agent_num, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentVisionTransformer(nn.Module):
    """Agent-DeiT classifier (class token, learned position embedding, ``depth`` blocks).

    ``dynamic_img_size=True`` accepts any input of at least one patch (timm's convention): the position
    embedding and the agent biases are resized to the input's patch grid on each forward, with the same
    helpers ``checkpoint_filter_fn`` uses for a checkpoint of another resolution.
    """

    dynamic_img_size: torch.jit.Final[bool]

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        agent_num: tuple[int, ...] = (49, 49, 49, 49),
        agent_layer: int = -1,
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
        if global_pool not in ("", "token", "avg"):
            raise ValueError(f"global_pool must be '', 'token' or 'avg', got {global_pool!r}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size
        agent_layer = agent_layer if agent_layer > 0 else depth

        dynamic = dict(strict_img_size=False, output_fmt="NHWC") if dynamic_img_size else {}
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **dynamic)
        grid = self.patch_embed.grid_size
        # the input sizes it takes (check_image): the built one, or (dynamic_img_size) multiples of the patch
        self.fixed_img_size = None if dynamic_img_size else tuple(self.patch_embed.img_size)
        self.size_multiple = patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        common = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        self.blocks = nn.Sequential(
            *[
                AgentDeiTBlock(
                    embed_dim,
                    num_heads,
                    grid,
                    int(agent_num[_STAGE_OF_BLOCK_PAIR[min(i // 2, 5)]]),
                    drop_path=dpr[i],
                    **common,
                )
                if i < agent_layer
                else Block(embed_dim, num_heads, drop_path=dpr[i], **common)
                for i in range(depth)
            ]
        )
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("", "token", "avg"):
                raise ValueError(f"global_pool must be '', 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        like = self.cls_token  # the new head follows the model's device and dtype
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=like.device, dtype=like.dtype)
            if num_classes > 0
            else nn.Identity()
        ).train(self.training)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image -> ``([B, 1 + h*w, C]`` tokens with position embedding, patch grid ``(h, w))``."""
        x = self.patch_embed(check_image(x, self.in_chans, self.fixed_img_size, self.size_multiple))
        if self.dynamic_img_size:
            grid = (x.shape[1], x.shape[2])
            x, pos_embed = x.flatten(1, 2), resize_pos_embed(self.pos_embed, grid, prefix=1)
        else:
            grid, pos_embed = (self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]), self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed), grid

    def _blocks(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The blocks on tokens of the patch grid ``grid`` (any grid with ``dynamic_img_size``)."""
        if not self.dynamic_img_size:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                return checkpoint_seq(self.blocks, x)
            return self.blocks(x)
        for blk in self.blocks:
            if not isinstance(blk, AgentDeiTBlock):
                x = blk(x)
            elif self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, grid)
            else:
                x = blk(x, grid)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch tokens after the chosen blocks as NCHW maps (class token dropped)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        b = x.shape[0]
        x, (gh, gw) = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x, (gh, gw)) if isinstance(blk, AgentDeiTBlock) else blk(x)
            if i in take_indices:
                feat = self.norm(x) if norm else x
                intermediates.append(feat[:, 1:].reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official (or visattn) checkpoint file: timm calls this for the cfgs' ``custom_load``."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> normalised tokens ``[B, 1 + H*W/patch**2, C]`` (class token first)."""
        x, grid = self._embed(x)
        return self.norm(self._blocks(x, grid))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: AgentVisionTransformer) -> dict:
    """Official checkpoints (``{'model': state_dict, ...}`` or bare) -> our state_dict (same key names).

    ``pos_embed`` and the separable agent biases of another resolution are resized as the official
    ``load_pretrained`` does (see ``resize_to_model``).
    """
    return resize_to_model(unwrap_checkpoint(state_dict), model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_backbone(
        AgentVisionTransformer, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs
    )


_cfg = partial(agent_cfg, pool_size=None, first_conv="patch_embed.proj")
default_cfgs = generate_default_cfgs(
    {
        "agent_deit_tiny.in1k": _cfg(url=tsinghua_file("57e0904221824ee7b7af", "agent_deit_tiny_in1k.pth")),
        "agent_deit_small.in1k": _cfg(url=tsinghua_file("fdd43304372541db8ea7", "agent_deit_small_in1k.pth")),
        "agent_deit_small_448.in1k": _cfg(
            url=tsinghua_file("a228f86241c445f1969b", "agent_deit_small_448_in1k.pth"),
            input_size=(3, 448, 448),
        ),
        "agent_deit_base.in1k": _cfg(url=tsinghua_file("5115f15fdd7e4ab58fbc", "agent_deit_base_in1k.pth")),
    }
)


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-T (cfgs/agent_deit_t.yaml: 12 agent blocks, 49 agents)."""
    args = dict(embed_dim=192, depth=12, num_heads=3, agent_num=(49, 49, 49, 49))
    return _create_agent_deit("agent_deit_tiny", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-S (cfgs/agent_deit_s.yaml: 12 agent blocks, 49 agents; paper drop_path 0.1)."""
    args = dict(embed_dim=384, depth=12, num_heads=6, agent_num=(49, 49, 49, 49))
    return _create_agent_deit("agent_deit_small", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_small_448(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-S at 448 (cfgs/agent_deit_s_448.yaml: 28x28 patch grid, 49 agents)."""
    args = dict(embed_dim=384, depth=12, num_heads=6, agent_num=(49, 49, 49, 49))
    return _create_agent_deit("agent_deit_small_448", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-B (cfgs/agent_deit_b.yaml: first 4 blocks agent with 81 agents; paper drop_path 0.3)."""
    args = dict(embed_dim=768, depth=12, num_heads=12, agent_num=(81, 81, 81, 81), agent_layer=4)
    return _create_agent_deit("agent_deit_base", pretrained, **dict(args, **kwargs))
