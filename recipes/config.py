"""The recipe schema: one typed dataclass, loaded from YAML and overridden from the command line.

A recipe file is a flat YAML mapping whose keys are the fields of :class:`Recipe`
(``yaml.safe_load``; unknown keys are an error that lists the valid ones). Values
are converted to the field's type, so ``lr: 5e-4`` (a string to YAML 1.1) is a float.
``--set key=value`` overrides go through the same conversion.

Recipes ship as package data: ``recipes/<name>.yaml`` (small built-in recipes such as
``digits``) and ``recipes/imagenet/<name>.yaml`` (one per paper recipe).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPE_ROOT = Path(__file__).resolve().parent
RECIPE_DIRS = (RECIPE_ROOT, RECIPE_ROOT / "imagenet")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

AMP_CHOICES = ("none", "bf16", "fp16")
LR_SCALING_CHOICES = ("none", "linear", "sqrt")
SCHED_CHOICES = ("cosine", "tanh", "step", "multistep", "poly", "plateau", "wsd", "none")
CLIP_MODES = ("norm", "value", "agc")


@dataclass
class Recipe:
    """Every hyper-parameter of a training run; see docs/training.md for the meaning of each key."""

    # -- identity
    name: str = ""
    source: str = ""
    model: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    init_strict: bool = True
    num_classes: int | None = None
    # -- data
    dataset: str = ""
    train_split: str = "train"
    val_split: str = "validation"
    train_samples: int | None = None
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    train_interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    workers: int = 4
    # -- batch and learning rate
    epochs: int = 300
    batch_size: int = 128
    accum_steps: int = 1
    reference_batch: int = 1024
    lr: float = 1e-3
    lr_scaling: str = "none"
    lr_base_batch: int = 512
    scale_warmup_min_lr: bool = False
    # -- schedule
    sched: str = "cosine"
    sched_on_updates: bool = False
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    warmup_prefix: bool = False
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    decay_epochs: float = 30.0
    decay_rate: float = 0.1
    # -- optimizer
    opt: str = "adamw"
    opt_eps: float | None = 1e-8
    opt_betas: list[float] | None = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    wd_exclude_1d: bool = True
    wd_exclude: list[str] = field(default_factory=list)
    clip_grad: float | None = None
    clip_mode: str = "norm"
    # -- regularisation and augmentation
    drop_path: float | None = None
    drop_rate: float = 0.0
    aa: str | None = None
    color_jitter: float = 0.0
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0
    aug_repeats: int = 0
    # -- EMA
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # -- precision and speed
    threads: int = 0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    # -- run bookkeeping
    seed: int = 0
    log_interval: int = 50
    ckpt_interval_steps: int = 0
    keep_last: int = 2

    # ------------------------------------------------------------------ derived values
    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step: per-device batch x devices x accumulation steps."""
        return self.batch_size * world_size * self.accum_steps

    def lr_factor(self, world_size: int) -> float:
        """Multiplier applied to ``lr`` (and to warmup/min lr when ``scale_warmup_min_lr``)."""
        ratio = self.global_batch(world_size) / self.lr_base_batch
        return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    def scaled_lrs(self, world_size: int) -> tuple[float, float, float]:
        """``(lr, warmup_lr, min_lr)`` after the batch-size scaling rule."""
        f = self.lr_factor(world_size)
        g = f if self.scale_warmup_min_lr else 1.0
        return self.lr * f, self.warmup_lr * g, self.min_lr * g

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ checks
    def validate(self) -> Recipe:
        """Raise ``ValueError`` naming the first insane value; return ``self``."""
        checks = [
            (bool(self.model), "model must name a timm model"),
            (
                is_run_name(self.name or self.model),
                f"name {self.name!r} must be a plain folder name (no '/', '\\', '..' or absolute path); "
                "it names the run directory runs/<name>-<time>",
            ),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (
                0 <= self.warmup_epochs < self.epochs,
                f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}",
            ),
            (self.cooldown_epochs >= 0, "cooldown_epochs must be >= 0"),
            (self.batch_size > 0 and self.accum_steps > 0, "batch_size and accum_steps must be > 0"),
            (
                self.reference_batch > 0 and self.lr_base_batch > 0,
                "reference_batch and lr_base_batch must be > 0",
            ),
            (0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}"),
            (0 <= self.warmup_lr <= self.lr or self.warmup_epochs == 0, "warmup_lr must be in [0, lr]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (
                self.drop_path is None or 0 <= self.drop_path < 1,
                f"drop_path must be in [0, 1), got {self.drop_path}",
            ),
            (0 <= self.drop_rate < 1, "drop_rate must be in [0, 1)"),
            (0 <= self.smoothing < 1, "smoothing must be in [0, 1)"),
            (0 <= self.reprob <= 1 and 0 <= self.hflip <= 1, "reprob and hflip are probabilities"),
            (self.mixup >= 0 and self.cutmix >= 0 and 0 <= self.mixup_prob <= 1, "mixup/cutmix must be >= 0"),
            (not self.mixup_active or self.batch_size % 2 == 0, "mixup/cutmix need an even batch_size"),
            (0 < self.model_ema_decay < 1, "model_ema_decay must be in (0, 1)"),
            (self.input_size > 0 and 0 < self.crop_pct <= 1, "input_size > 0 and crop_pct in (0, 1]"),
            (len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values"),
            (len(self.scale) == 2 and len(self.ratio) == 2, "scale and ratio need 2 values"),
            (self.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}, got {self.amp!r}"),
            (self.lr_scaling in LR_SCALING_CHOICES, f"lr_scaling must be one of {LR_SCALING_CHOICES}"),
            (self.sched in SCHED_CHOICES, f"sched must be one of {SCHED_CHOICES}, got {self.sched!r}"),
            (self.clip_mode in CLIP_MODES, f"clip_mode must be one of {CLIP_MODES}"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 or null"),
            (self.aug_repeats >= 0 and self.workers >= 0, "aug_repeats and workers must be >= 0"),
            (self.threads >= 0, "threads must be >= 0 (0: PyTorch's default)"),
            (self.keep_last >= 1 and self.log_interval >= 1, "keep_last and log_interval must be >= 1"),
            (self.ckpt_interval_steps >= 0, "ckpt_interval_steps must be >= 0"),
            (self.train_samples is None or self.train_samples > 0, "train_samples must be > 0 or null"),
        ]
        for ok, message in checks:
            if not ok:
                where = f"recipe {self.name!r}: " if self.name else ""
                raise ValueError(where + message)
        return self


def is_run_name(name: str) -> bool:
    """Whether ``name`` can name a folder inside ``runs/``: one path component, not ``.``/``..``."""
    return (
        bool(name)
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0:")
        and not name.startswith("~")
        and not Path(name).is_absolute()
    )


FIELDS: dict[str, Any] = {f.name: f for f in dataclasses.fields(Recipe)}
_HINTS = typing.get_type_hints(Recipe)


def _unknown_key_error(keys: list[str], where: str) -> ValueError:
    import difflib

    # cutoff 0.8: typos and plural slips (epoch, batchsize, modle), not keys that share a suffix
    # (learning_rate -> decay_rate at difflib's default 0.6)
    close = [m for k in sorted(keys) for m in difflib.get_close_matches(k, FIELDS, n=1, cutoff=0.8)]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    valid = ", ".join(sorted(FIELDS))
    return ValueError(f"{where}: unknown recipe key(s) {', '.join(sorted(keys))}; {hint}Valid keys: {valid}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if origin is list:
            if isinstance(value, str):
                text = value.strip()
                value = (
                    yaml.safe_load(text)
                    if text.startswith("[")
                    else [v for v in text.split(",") if v.strip()]
                )
            if not isinstance(value, list | tuple):
                raise ValueError(value)
            return [_convert(args[0], v, key) for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    else:
        raise TypeError(f"unsupported recipe field type {tp!r} for {key}")
    raise ValueError(f"recipe key {key!r}: cannot read {value!r} as {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from a mapping (unknown keys -> ``ValueError``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of recipe keys, got {type(data).__name__}")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise _unknown_key_error(unknown, where)
    values = {k: _convert(_HINTS[k], v, k) for k, v in data.items()}
    return Recipe(**values)


def apply_overrides(recipe: Recipe, overrides: list[str] | None) -> Recipe:
    """Return a copy of ``recipe`` with ``key=value`` strings applied (typed like the field)."""
    changes: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in FIELDS:
            raise _unknown_key_error([key], "--set")
        changes[key] = _convert(_HINTS[key], value, key)
    return dataclasses.replace(recipe, **changes).validate()


def list_recipes() -> dict[str, Path]:
    """Recipe name -> file, for every recipe shipped with the package."""
    found: dict[str, Path] = {}
    for folder in RECIPE_DIRS:
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a shipped recipe by name (``nat_tiny``) or any YAML file by path, then apply overrides."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = list_recipes()
        if str(name_or_path) not in shipped:
            raise ValueError(
                f"unknown recipe {str(name_or_path)!r}; shipped recipes: {', '.join(shipped)} "
                "(or give a .yaml path)"
            )
        path = shipped[str(name_or_path)]
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:  # a syntax error, or a tag (!!python/...) that safe_load refuses
        problem = " ".join(str(exc).split())
        raise ValueError(f"recipe file {path} is not plain YAML (keys and values only): {problem}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"recipe file {path} is not UTF-8 text: {exc}") from exc
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    recipe = recipe_from_dict(data, where=str(path)).validate()
    return apply_overrides(recipe, overrides)


# What a resumed run may change: the schedule's length (re-planned from the current step) and bookkeeping.
RESUMABLE = ("epochs", "cooldown_epochs", "log_interval", "ckpt_interval_steps", "keep_last")


def resumed_recipe(saved: Recipe, recipe: Recipe, overrides: list[str] | None, where: str) -> Recipe:
    """The recipe a resumed run continues with: its own ``saved`` one (from its checkpoint) with the
    ``--set`` ``overrides`` of the resume, or, when ``overrides`` is None, ``recipe`` as given. A change to
    a key outside :data:`RESUMABLE` is a ``ValueError`` naming each such key (``where``: the run)."""
    new = apply_overrides(saved, overrides) if overrides is not None else recipe
    refused = [k for k in FIELDS if k not in RESUMABLE and getattr(new, k) != getattr(saved, k)]
    if refused:
        changes = ", ".join(f"{k}={getattr(new, k)!r} (the run has {getattr(saved, k)!r})" for k in refused)
        raise ValueError(
            f"{changes}: a resumed run keeps the recipe of {where}; on resume only "
            f"{', '.join(RESUMABLE)} may change (a longer schedule is re-planned from the current step). "
            "Start a new run (another --output) to change the others"
        )
    return new


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write ``recipe`` as YAML (every key, so a run directory records exactly what ran); atomically, so
    an interrupted rewrite leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
