"""``visattn eval``: top-1/top-5 of a checkpoint on a validation set.

Accepts the trainer's checkpoints (``ckpt-*.pth``, ``best.pth``; the model name is checked)
and plain state dicts such as the papers' official files (passed through the model module's
``checkpoint_filter_fn`` when it has one).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.data import DataLoader, IterableDataset

from visattn.devices import parse_device
from visattn.recipes import checkpoint as ckpt
from visattn.recipes.config import Recipe, recipe_from_dict
from visattn.recipes.data import SeededDataset, SeededStream, build_eval_dataset, build_transforms
from visattn.recipes.trainer import DistInfo, _check_same_model, check_model_name, evaluate


def _extract_state_dict(obj: dict[str, Any], use_ema: bool) -> dict[str, torch.Tensor]:
    if use_ema:
        for key in ("model_ema", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        raise ValueError("--ema: the checkpoint has no EMA weights")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def load_model_from_checkpoint(
    model_name: str, path: str | Path, num_classes: int | None = None, use_ema: bool = False
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build ``model_name`` and load ``path`` strictly; ``ValueError`` if it belongs to another model."""
    check_model_name(model_name)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = ckpt.load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} is not a state dict")
    _check_same_model(obj, model_name, str(path))
    state = _extract_state_dict(obj, use_ema)
    kwargs = dict(obj.get("model_kwargs") or {})
    if num_classes is None:
        num_classes = obj.get("num_classes")
    if num_classes is None:
        head = [v for k, v in state.items() if k.endswith("head.weight") or k.endswith("head.fc.weight")]
        num_classes = int(head[-1].shape[0]) if head else 1000
    model = timm.create_model(model_name, num_classes=num_classes, **kwargs)
    if "format" not in obj:
        module = sys.modules[timm.models.model_entrypoint(model_name).__module__]
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                state = filter_fn(state, model)
            except Exception as exc:  # the filter expects the official layout of this model
                raise ValueError(f"checkpoint {path} does not fit model {model_name!r}: {exc!r}") from exc
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes: another width, depth or class count
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc))
        raise ValueError(
            f"checkpoint {path} does not fit model {model_name!r} (another variant or model_kwargs?): {first}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not fit model {model_name!r} (from another model?): "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
        )
    return model, obj


def run_eval(
    model_name: str,
    checkpoint: str | Path,
    data_dir: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    use_ema: bool = False,
    workers: int = 2,
) -> dict[str, float]:
    """Top-1/top-5/loss of ``checkpoint`` on the validation split of ``data_dir``.

    Transforms come from the recipe stored in the checkpoint, else from the model's pretrained
    config. Without ``data_dir`` the checkpoint's recipe must use the embedded dataset.
    """
    dev = torch.device(parse_device(device))
    check_model_name(model_name)
    obj_recipe = None
    probe = ckpt.load(checkpoint)
    if not isinstance(probe, dict):
        raise ValueError(f"checkpoint {checkpoint} is not a state dict")
    _check_same_model(probe, model_name, str(checkpoint))
    if isinstance(probe.get("recipe"), dict):
        obj_recipe = recipe_from_dict(probe["recipe"], where=str(checkpoint))
    if obj_recipe is None:
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        cfg = timm.data.resolve_data_config(
            {}, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {}
        )
        obj_recipe = Recipe(
            name="eval",
            model=model_name,
            input_size=int(cfg["input_size"][-1]),
            crop_pct=float(cfg["crop_pct"]),
            interpolation=str(cfg["interpolation"]),
            mean=list(cfg["mean"]),
            std=list(cfg["std"]),
        )
    if data_dir is not None and obj_recipe.dataset == "digits":
        obj_recipe.dataset = ""
    if data_dir is None and obj_recipe.dataset != "digits":
        raise ValueError(
            f"{checkpoint} is not a run on the embedded digits dataset: pass --data-dir DIR, the dataset "
            "root with the val/ split to evaluate on"
        )
    val_ds, num_classes = build_eval_dataset(obj_recipe, data_dir)
    model, _ = load_model_from_checkpoint(model_name, checkpoint, use_ema=use_ema)
    head_classes = getattr(model, "num_classes", num_classes)
    if head_classes != num_classes:
        raise ValueError(
            f"the checkpoint's head has {head_classes} classes but the dataset has {num_classes}"
        )
    _, val_tf = build_transforms(obj_recipe)
    if isinstance(val_ds, IterableDataset):  # WebDataset shards: every sample once over the workers
        val_ds.set_loader_cfg(num_workers=workers)
        dataset = SeededStream(val_ds, val_tf, obj_recipe.seed, batch_size, training=False)
    else:
        dataset = SeededDataset(val_ds, val_tf)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    model.to(dev)
    return evaluate(model, loader, DistInfo(device=dev))
