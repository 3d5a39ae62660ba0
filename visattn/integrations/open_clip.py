"""open_clip model configs whose vision tower is a visattn timm backbone.

Each entry of :data:`TOWERS` becomes an open_clip model config: a timm vision tower
(``vision_cfg.timm_model_name``, built by open_clip's ``TimmModel``: the backbone without its classifier,
its own global pooling, then a linear projection to ``embed_dim``) and open_clip's standard text
transformer (CLIP BPE tokenizer, 77 tokens) of a width matching the tower's size class, the pairing
open_clip uses for its own timm towers (``convnext_*``, ``swin_base_patch4_window7_224``)::

    import open_clip
    import visattn.integrations.open_clip  # registers the configs (idempotent)

    model, _, preprocess = open_clip.create_model_and_transforms("visattn-van-b2")
    tokenizer = open_clip.get_tokenizer("visattn-van-b2")

Nothing is downloaded: the towers start from random weights (``pretrained_image=True`` would ask timm
for the backbone's ImageNet weights). Only towers whose timm model is registered when :func:`register`
runs are added, so a family that is not importable simply has no config; call :func:`register` again
after registering more timm models. To add a tower, add a :class:`TowerSpec` line to :data:`TOWERS`.

Registration goes through open_clip's public ``add_model_config(path)``: the configs are written as JSON
files to a temporary directory, open_clip reads them into its registry, and the directory is removed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import timm

import visattn.backbones  # noqa: F401  (registers the visattn backbones with timm)

__all__ = ["TOWERS", "TowerSpec", "model_config", "register", "registered"]


@dataclass(frozen=True)
class TowerSpec:
    """One open_clip model: ``name`` uses timm model ``timm_model`` as its vision tower.

    ``embed_dim`` is the joint embedding width; the text tower is ``text_layers`` transformer blocks of
    width ``text_width`` with ``text_heads`` heads. ``pool=""`` keeps the backbone's own global pooling;
    ``drop_path`` is the backbone's stochastic-depth rate for contrastive training.
    """

    name: str
    timm_model: str
    embed_dim: int = 512
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    image_size: int = 224
    pool: str = ""
    proj: str = "linear"
    drop_path: float = 0.1


_BASE = dict(embed_dim=640, text_width=640, text_heads=10)  # like open_clip's swin_base config

TOWERS: tuple[TowerSpec, ...] = (
    TowerSpec("visattn-biformer-t", "biformer_t"),
    TowerSpec("visattn-biformer-s", "biformer_s"),
    TowerSpec("visattn-biformer-b", "biformer_b", **_BASE),
    TowerSpec("visattn-van-b0", "van_b0"),
    TowerSpec("visattn-van-b1", "van_b1"),
    TowerSpec("visattn-van-b2", "van_b2"),
    TowerSpec("visattn-van-b3", "van_b3"),
    TowerSpec("visattn-agent-swin-t", "agent_swin_tiny"),
    TowerSpec("visattn-agent-swin-s", "agent_swin_small"),
    TowerSpec("visattn-agent-swin-b", "agent_swin_base", **_BASE),
    TowerSpec("visattn-agent-pvt-s", "agent_pvt_small"),
    TowerSpec("visattn-nat-mini", "nat_mini"),
    TowerSpec("visattn-nat-tiny", "nat_tiny"),
    TowerSpec("visattn-nat-small", "nat_small"),
    TowerSpec("visattn-nat-base", "nat_base", **_BASE),
    TowerSpec("visattn-dinat-tiny", "dinat_tiny"),
)


def model_config(spec: TowerSpec) -> dict[str, Any]:
    """The open_clip model config (the JSON open_clip's ``model_configs/`` files hold) of ``spec``."""
    return {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {
            "timm_model_name": spec.timm_model,
            "timm_model_pretrained": False,
            "timm_pool": spec.pool,
            "timm_proj": spec.proj,
            "timm_drop": 0.0,
            "timm_drop_path": spec.drop_path,
            "image_size": spec.image_size,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": spec.text_width,
            "heads": spec.text_heads,
            "layers": spec.text_layers,
        },
    }


def registered() -> list[str]:
    """Names of the :data:`TOWERS` configs that open_clip currently knows."""
    known = set(open_clip.list_models())
    return [spec.name for spec in TOWERS if spec.name in known]


def register() -> list[str]:
    """Add the configs of every :data:`TOWERS` entry whose timm model is registered; idempotent.

    Returns the names of the visattn configs open_clip knows afterwards.
    """
    names = [spec.name for spec in TOWERS]
    if len(set(names)) != len(names):
        raise ValueError(f"visattn open_clip towers: duplicate names in TOWERS: {names}")
    pending = {
        spec.name: model_config(spec)
        for spec in TOWERS
        if timm.is_model(spec.timm_model) and open_clip.get_model_config(spec.name) != model_config(spec)
    }
    if pending:
        with tempfile.TemporaryDirectory(prefix="visattn_open_clip_") as folder:
            for name, config in pending.items():
                (Path(folder) / f"{name}.json").write_text(json.dumps(config, indent=2))
            open_clip.add_model_config(folder)
    return registered()


register()
