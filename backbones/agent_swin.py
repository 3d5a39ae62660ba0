"""Agent-Swin: Swin Transformer with agent attention.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv 2312.08874). Official code: https://github.com/LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_swin.py, cfgs/agent_swin_*.yaml).

A Swin-T/S/B layout (patch 4, PatchMerging, LayerNorm eps 1e-5) whose stages use one of two block
types, chosen per stage by an ``attn_type`` string such as ``"AAAB"``:

- ``A``: agent attention in windows of ``window_size`` (56 at 224, i.e. the whole stage: global);
- ``B``: plain Swin window attention with relative position bias, window ``max(7, window_size // 8)``;
- ``M<k>`` (only at the end of the string, for one stage): the first ``k`` blocks ``A``, the rest ``B``.

Windows larger than the stage are clamped to it (and then not shifted), per axis, exactly as in Swin.
The agent blocks ignore the shifted-window mask, like the official code.

``dynamic_img_size=True`` (timm's convention) accepts any input size the patch embedding allows. A window
that covered its whole stage at the configured size (every agent window of the released models, whose
``window_size`` is the stage-1 grid) covers the whole stage grid of any input, its biases or relative
position table resized as ``checkpoint_filter_fn`` resizes them; other windows keep their size, the stage
is padded to a multiple of it and the shifted-window mask is built for it (as timm's Swin does).
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
)
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformerBlock,
    get_relative_position_index,
    window_partition,
    window_reverse,
)
from torch import nn
from torch.nn import functional as F

from visattn.backbones.agent_family import (
    AgentAttentionBase,
    agent_cfg,
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
    resize_rel_pos_table,
    unwrap_checkpoint,
)

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

    def forward(self, x: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """``window``: the window's (h, w) (default: the training one)."""
        b, n, c = x.shape
        window = self.q_size if window is None else window
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        agents = self.agent_tokens(q, window)
        agent_bias, query_bias = self.position_biases(window, window)
        x = self.attend(q, k, v, agents, agent_bias, query_bias) + self.dwc_tokens(v, window)
        return self.project(x)


def stage_window(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], follow: tuple[bool, bool]
) -> tuple[tuple[int, int], tuple[int, int]]:
    r"""(window, shift) on a stage ``grid``: per axis the whole grid (no shift) where the window ``follow``\s
    the grid (it covered the stage at the configured size) or the grid fits in it, else as configured."""
    fit_h = follow[0] or grid[0] <= window[0]
    fit_w = follow[1] or grid[1] <= window[1]
    ws = (grid[0] if fit_h else window[0], grid[1] if fit_w else window[1])
    return ws, (0 if fit_h else shift[0], 0 if fit_w else shift[1])


class AgentSwinBlock(nn.Module):
    """Swin block with agent attention; input and output ``[B, H, W, C]``.

    With ``dynamic`` the window and shift are worked out for each input's grid (:func:`stage_window`).
    """

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
        dynamic: bool = False,
    ):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dynamic = dynamic
        self.follow = (input_resolution[0] <= window_size, input_resolution[1] <= window_size)
        self.target_window, self.target_shift = to_2tuple(window_size), to_2tuple(shift_size)
        self.window_size, self.shift_size = stage_window(
            self.input_resolution, self.target_window, self.target_shift, self.follow
        )
        self.norm1 = norm_layer(dim)
        self.attn = AgentWindowAttention(
            dim, num_heads, self.window_size, agent_num, qkv_bias, attn_drop, proj_drop
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, window, shift = self.input_resolution, self.window_size, self.shift_size
        if self.dynamic:
            grid = (x.shape[1], x.shape[2])
            window, shift = stage_window(grid, self.target_window, self.target_shift, self.follow)
        x = x + self.drop_path1(self._windowed(self.norm1(x), grid, window, shift))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def _windowed(
        self, x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
    ) -> torch.Tensor:
        """Agent attention in the (cyclically shifted) windows of ``x`` ``[B, H, W, C]`` on the ``grid``
        (H, W); a grid that is not a multiple of the window is zero-padded at the bottom/right (as timm's
        Swin does), then cropped."""
        h, w = grid
        if shift[0] > 0 or shift[1] > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        pad_h, pad_w = (window[0] - h % window[0]) % window[0], (window[1] - w % window[1]) % window[1]
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        windows = self.attn(window_partition(x, window).flatten(1, 2), window).unflatten(1, window)
        x = window_reverse(windows, window, hp, wp)[:, :h, :w]
        if shift[0] > 0 or shift[1] > 0:
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x


class SwinBlock(SwinTransformerBlock):
    """timm's Swin block (the ``B`` blocks). With ``dynamic`` (timm's ``dynamic_mask``: padding and the
    shifted-window mask built per input), and a window that covered the whole stage at the configured size
    covers the whole grid of any input: one window, its relative position table resized by
    :func:`~visattn.backbones.helpers.resize_rel_pos_table` (as ``checkpoint_filter_fn`` resizes a
    checkpoint's)."""

    def __init__(self, *args, dynamic: bool = False, **kwargs):
        super().__init__(*args, dynamic_mask=dynamic, **kwargs)
        self.dynamic = dynamic
        self.follow = tuple(w >= r for w, r in zip(self.window_size, self.input_resolution))

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[1], x.shape[2])
        if not self.dynamic or grid == tuple(self.window_size):
            return super()._attn(x)
        window, _ = stage_window(grid, self.window_size, self.shift_size, self.follow)
        if window != grid:  # a local window: timm pads the grid to a multiple of it and masks shifts
            return super()._attn(x)
        attn = self.attn
        n = grid[0] * grid[1]
        table = resize_rel_pos_table(attn.relative_position_bias_table, grid)
        bias = table[get_relative_position_index(*grid, device=x.device).view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0).to(x.dtype)
        q, k, v = attn.qkv(x.flatten(1, 2)).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
        p = attn.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).flatten(2))).view_as(x)


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
        dynamic: bool = False,
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
                        dynamic=dynamic,
                        **common,
                    )
                )
            else:
                ws = max(7, window_size // 8)
                shift = 0 if i % 2 == 0 else ws // 2
                if dynamic:
                    blocks.append(SwinBlock(window_size=ws, shift_size=shift, dynamic=True, **common))
                else:  # timm's block as is: TorchScript cannot compile the subclass's super() call
                    blocks.append(SwinTransformerBlock(window_size=ws, shift_size=shift, **common))
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
    """Agent-Swin classifier; tokens are kept NHWC (``[B, H, W, C]``) between blocks.

    ``dynamic_img_size=True``: any input size the patch embedding allows (see the module docstring).
    """

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
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        num_stages = len(depths)
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_stages - 1))
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            norm_layer=norm_layer,
            output_fmt="NHWC",
            strict_img_size=not dynamic_img_size,
        )
        grid = self.patch_embed.grid_size
        # the input sizes it takes (check_image): the built one, or (dynamic_img_size) multiples of the patch
        self.fixed_img_size = None if dynamic_img_size else tuple(self.patch_embed.img_size)
        self.size_multiple = patch_size
        self.pos_drop = nn.Dropout(drop_rate)
        block_types = parse_attn_type(attn_type, tuple(depths))
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.layers = nn.Sequential()
        self.feature_info = []
        res = (grid[0], grid[1])
        for i in range(num_stages):
            if i:  # PatchMerging pads an odd grid: ceil(res / 2)
                res = ((res[0] + 1) // 2, (res[1] + 1) // 2)
            dim = int(embed_dim * 2**i)
            self.layers.append(
                AgentSwinStage(
                    dim=dim,
                    input_resolution=res,
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
                    dynamic=dynamic_img_size,
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
        x = self.pos_drop(
            self.patch_embed(check_image(x, self.in_chans, self.fixed_img_size, self.size_multiple))
        )
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

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official (or visattn) checkpoint file: timm calls this for the cfgs' ``custom_load``."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> normalised last-stage tokens ``[B, H/32, W/32, C]``."""
        x = self.pos_drop(
            self.patch_embed(check_image(x, self.in_chans, self.fixed_img_size, self.size_multiple))
        )
        x = self.layers(x)
        return self.norm(x)

    def __prepare_scriptable__(self) -> nn.Module:
        if self.dynamic_img_size:
            raise ValueError("TorchScript needs the fixed-size Agent-Swin (dynamic_img_size=False)")
        return self


_REBUILT_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


def checkpoint_filter_fn(state_dict: dict, model: AgentSwinTransformer) -> dict:
    """Official checkpoints (``{'model': state_dict, ...}`` or bare) -> our state_dict.

    Key names are the official ones. The index/mask buffers the official code saves are rebuilt here
    (non-persistent), so they are dropped, as the official ``load_pretrained`` does, but only where they
    belong to a module of this model: any other key is passed on for ``load_state_dict`` to name. Agent
    biases and relative position tables of another resolution are resized (see ``resize_to_model``).
    """
    modules = dict(model.named_modules())
    kept = {}
    for key, value in unwrap_checkpoint(state_dict).items():
        module, _, name = key.rpartition(".")
        if not (name in _REBUILT_BUFFERS and module in modules):
            kept[key] = value
    return resize_to_model(kept, model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))))
    return build_backbone(
        AgentSwinTransformer, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs
    )


_cfg = partial(agent_cfg, pool_size=(7, 7), first_conv="patch_embed.proj")
default_cfgs = generate_default_cfgs(
    {
        "agent_swin_tiny.in1k": _cfg(url=tsinghua_file("a2ddc1190c224f768a41", "agent_swin_tiny_in1k.pth")),
        "agent_swin_small.in1k": _cfg(url=tsinghua_file("f607172c9fea4d6e99bb", "agent_swin_small_in1k.pth")),
        "agent_swin_small_288.in1k": _cfg(
            url=tsinghua_file("09760394e93b4046a25e", "agent_swin_small_288_in1k.pth"),
            input_size=(3, 288, 288),
            pool_size=(9, 9),
            crop_pct=1.0,
        ),
        "agent_swin_base.in1k": _cfg(url=tsinghua_file("4fcd2d0114bb490483c3", "agent_swin_base_in1k.pth")),
        "agent_swin_base_384.in1k": _cfg(
            url=tsinghua_file("bb84ee9058954706a557", "agent_swin_base_384_in1k.pth"),
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
