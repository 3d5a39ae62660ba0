"""What only the Agent families (Agent-Swin, Agent-PVT, Agent-DeiT) share: their attention layer,
checkpoint resizing and pretrained cfgs. Helpers of every family are in :mod:`visattn.backbones.helpers`.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv 2312.08874). Official code: https://github.com/LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_{swin,pvt,deit}.py, class ``AgentAttention``).

Every family projects its own q/k/v (``qkv`` or ``q`` + ``kv`` Linears) and then shares the same
mechanics, collected in :class:`AgentAttentionBase`:

- agent tokens: the queries average-pooled to a ``sqrt(agent_num) x sqrt(agent_num)`` grid;
- position biases (parameter names as in the official code): ``an_bias``/``na_bias`` of shape
  ``(heads, agent_num, 7, 7)``, bilinearly resized to the key/query grid, plus the separable
  ``ah_bias + aw_bias`` (agent -> key) and ``ha_bias + wa_bias`` (query -> agent);
- the attention itself, :func:`visattn.kernels.agent_attention` (one scale ``head_dim ** -0.5``);
- ``dwc``: a depthwise 3x3 convolution of V added to the output ("diversity restoration"), then ``proj``.

:func:`resize_to_model` resizes a checkpoint's resolution-bound tensors to a model (the official
``load_pretrained``); :func:`agent_cfg` and :func:`tsinghua_file` hold what the three families' pretrained
cfgs share (the official checkpoints' Tsinghua cloud share links with a cache file name each).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

from visattn.backbones.helpers import resize_rel_pos_table
from visattn.kernels import agent_attention


def agent_pool_size(agent_num: int) -> int:
    """Side of the square agent grid; ``agent_num`` must be a perfect square (9, 16, 49, 81, ...)."""
    side = math.isqrt(agent_num) if agent_num > 0 else 0
    if side * side != agent_num or agent_num <= 0:
        raise ValueError(
            f"agent_num must be a positive perfect square (agents are pooled on a grid), got {agent_num}"
        )
    return side


class AgentAttentionBase(nn.Module):
    """Biases, agent pooling, DWC and output projection of one agent-attention layer.

    ``kv_size`` is the (H, W) grid of the keys/values and ``q_size`` the grid of the queries at the
    training resolution; they fix the shapes of the separable biases. ``backend`` is passed to
    :func:`visattn.kernels.agent_attention` (``"auto"``: Triton on CUDA); set it on a layer to force one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int,
        q_size: tuple[int, int],
        kv_size: tuple[int, int],
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if attn_drop:
            raise ValueError("agent attention has no attention dropout (the fused op never forms the maps)")
        self.backend = "auto"
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.agent_num = agent_num
        self.pool_size = agent_pool_size(agent_num)
        self.q_size = tuple(q_size)
        self.kv_size = tuple(kv_size)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, kv_size[0], 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, kv_size[1]))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, q_size[0], 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, q_size[1], agent_num))
        for bias in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(bias, std=0.02)

    def agent_tokens(self, q: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Pool queries ``[B, H*W, C]`` on the ``size`` grid to agents ``[B, agent_num, heads, head_dim]``."""
        b, _, c = q.shape
        grid = q.reshape(b, size[0], size[1], c).permute(0, 3, 1, 2)
        agents = F.adaptive_avg_pool2d(grid, self.pool_size).reshape(b, c, -1).transpose(1, 2)
        return agents.reshape(b, self.agent_num, self.num_heads, self.head_dim)

    def position_biases(
        self, q_size: tuple[int, int] | None = None, kv_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(agent_bias [1, heads, A, Nk], query_bias [1, heads, Nq, A])`` on the query grid ``q_size`` and
        the key grid ``kv_size`` (default: the training grids). At other grids the separable biases are
        resized with :func:`resize_separable`, exactly as :func:`resize_to_model` resizes a checkpoint."""
        q_size = self.q_size if q_size is None else q_size
        kv_size = self.kv_size if kv_size is None else kv_size
        h, a = self.num_heads, self.agent_num
        ah, aw = resize_separable(self.ah_bias, 3, kv_size[0]), resize_separable(self.aw_bias, 4, kv_size[1])
        ha, wa = resize_separable(self.ha_bias, 2, q_size[0]), resize_separable(self.wa_bias, 3, q_size[1])
        agent_bias = F.interpolate(self.an_bias, size=kv_size, mode="bilinear").reshape(1, h, a, -1)
        agent_bias = agent_bias + (ah + aw).reshape(1, h, a, -1)
        query_bias = F.interpolate(self.na_bias, size=q_size, mode="bilinear").reshape(1, h, a, -1)
        query_bias = query_bias.transpose(-1, -2) + (ha + wa).reshape(1, h, -1, a)
        return agent_bias, query_bias

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        agents: torch.Tensor,
        agent_bias: torch.Tensor,
        query_bias: torch.Tensor,
    ) -> torch.Tensor:
        """q ``[B, Nq, C]``, k/v ``[B, Nk, C]``, agents ``[B, A, heads, head_dim]`` -> ``[B, Nq, C]``."""
        heads = (self.num_heads, self.head_dim)
        q4, k4, v4 = q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads)
        # fp32 parameters under autocast: the biases follow the activations
        agent_bias, query_bias = agent_bias.to(q.dtype), query_bias.to(q.dtype)
        if torch.jit.is_scripting():
            out = torch.ops.visattn.agent_attention(
                q4, k4, v4, agents, self.scale, agent_bias, query_bias, self.backend
            )
        else:
            out = agent_attention(q4, k4, v4, agents, self.scale, agent_bias, query_bias, self.backend)
        return out.flatten(-2)

    def dwc_tokens(
        self, v: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Depthwise 3x3 conv of ``v`` ``[B, h*w, C]`` laid out on the ``size`` grid, as tokens.

        With ``out_size`` the grid is first resized bilinearly (PVT keys/values at reduced resolution).
        """
        b, n, c = v.shape
        grid = v.transpose(1, 2).reshape(b, c, size[0], size[1])
        if out_size is not None and (out_size[0] != size[0] or out_size[1] != size[1]):
            grid = F.interpolate(grid, size=out_size, mode="bilinear")
        return self.dwc(grid).flatten(2).transpose(1, 2)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(x))


_SEPARABLE_BIASES = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")


def resize_separable(bias: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A separable agent bias (``ah/aw/ha/wa_bias``) linearly interpolated to ``size`` along ``dim``,
    as the official ``load_pretrained`` resizes them; unchanged if already that size."""
    if bias.shape[dim] == size:
        return bias
    moved = bias.movedim(dim, -1)
    flat = F.interpolate(moved.reshape(1, -1, moved.shape[-1]).float(), size=size, mode="linear")
    return flat.reshape(list(moved.shape[:-1]) + [size]).movedim(-1, dim).to(bias.dtype)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], prefix: int = 0) -> torch.Tensor:
    """Learned position embedding ``[1, prefix + S*S, C]`` (square ``S x S`` grid) resized bicubically to
    ``[1, prefix + h*w, C]`` for ``grid`` (h, w), prefix (class) tokens kept (timm's resampling)."""
    return resample_abs_pos_embed(pos_embed, list(grid), num_prefix_tokens=prefix)


def resize_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize resolution-bound tensors of a checkpoint to ``model``, as the official ``load_pretrained``
    does when fine-tuning at another resolution (e.g. Agent-Swin-B 224 -> 384); a ``dynamic_img_size``
    model resizes the same tensors with the same helpers on every forward.

    - separable agent biases ``ah/aw/ha/wa_bias``: :func:`resize_separable` along their spatial axis;
    - ``relative_position_bias_table``: :func:`~visattn.backbones.helpers.resize_rel_pos_table` to the
      model's window;
    - ``pos_embed*``: :func:`resize_pos_embed` to the grid of the matching ``patch_embed*``, prefix
      (class) tokens kept.

    Tensors whose non-spatial dims (heads, agents, channels) differ are left for ``load_state_dict`` to
    report.
    """
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        want = target.get(key)
        if want is not None and value.shape != want.shape and value.ndim == want.ndim:
            module, _, name = key.rpartition(".")
            if name in _SEPARABLE_BIASES:
                diff = [d for d in range(value.ndim) if value.shape[d] != want.shape[d]]
                if len(diff) == 1:
                    value = resize_separable(value, diff[0], want.shape[diff[0]])
            elif name == "relative_position_bias_table" and value.shape[1] == want.shape[1]:
                value = resize_rel_pos_table(value, model.get_submodule(module).window_size)
            elif name.startswith("pos_embed") and value.shape[-1] == want.shape[-1]:
                grid = tuple(model.get_submodule(name.replace("pos_embed", "patch_embed")).grid_size)
                prefix = want.shape[1] - grid[0] * grid[1]
                old = math.isqrt(value.shape[1] - prefix)
                if old * old == value.shape[1] - prefix:
                    value = resize_pos_embed(value, grid, prefix)
        out[key] = value
    return out


def tsinghua_file(share_id: str, file_name: str) -> tuple[str, str]:
    """timm's ``(url, file name)`` form of an official checkpoint: the share links
    (``.../f/<id>/?dl=1``) end in no file name, from which timm would take its cache folder for the file."""
    return f"https://cloud.tsinghua.edu.cn/f/{share_id}/?dl=1", file_name


def agent_cfg(url: tuple[str, str] | str = "", **kwargs) -> dict:
    """Pretrained cfg fields common to every Agent model (ImageNet-1k, 224px, bicubic, MIT);
    each family passes what differs (``pool_size``, ``first_conv``) and variants override the rest.
    ``custom_load``: timm takes the ``(url, file name)`` form only on that route; the model's
    ``load_pretrained`` hands the file back to timm's loader (see ``load_pretrained_file``)."""
    return {
        "url": url,
        "custom_load": True,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2312.08874",
        **kwargs,
    }
