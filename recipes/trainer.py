"""The trainer: one process (CPU or one GPU) or ``torchrun`` DDP over many GPUs and nodes.

Built from timm's pieces: ``create_transform`` + a ``DataLoader`` over a ``DistributedSampler``
(or timm's ``RepeatAugSampler``; WebDataset shards stream through timm's ``ReaderWds``, sharded
over ranks and loader workers by timm, see :class:`~visattn.recipes.data.SeededStream`),
``Mixup``, ``create_optimizer_v2`` (weight-decay exclusions from ``no_weight_decay()`` /
``no_weight_decay_keywords()``), ``create_scheduler_v2`` (stepped per optimizer update or per
epoch, as the recipe says), ``ModelEmaV3``, timm's losses and ``accuracy``.

Batch and learning rate: ``global batch = batch_size x world_size x accum_steps``; the
recipe's ``lr`` is scaled by ``global_batch / lr_base_batch`` (``lr_scaling: linear``), its
square root (``sqrt``) or not at all (``none``). Total epochs = ``epochs + cooldown_epochs``
(timm's convention: the schedule runs ``epochs``, then ``cooldown_epochs`` at ``min_lr``).

A run directory holds ``recipe.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per log
step and per epoch), ``metrics.csv`` (per epoch), ``ckpt-<step>.pth`` (last ``keep_last``),
``best.pth`` and ``curves.png``. ``resume="auto"`` continues from the newest checkpoint
exactly: epoch, position inside the epoch, optimizer, scheduler, scaler, EMA and RNG states.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, dispatch_clip_grad
from torch import nn

from visattn.devices import parse_device
from visattn.recipes import checkpoint as ckpt
from visattn.recipes.config import Recipe, dump_recipe, is_run_name, recipe_from_dict, resumed_recipe
from visattn.recipes.data import SeededStream, build_datasets, build_loaders, build_mixup, dataset_size

CKPT_FORMAT = "visattn-train-v1"
EPOCH_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_val_top1",
    "img_per_s",
    "epoch_s",
]


# ---------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); init the process group.

    ``device``: what :func:`~visattn.devices.parse_device` takes (``None``: CUDA when available); under
    torchrun a CUDA process uses the GPU of its ``LOCAL_RANK``. The backend is NCCL on CUDA, else gloo.
    """
    dev = torch.device(parse_device(device))
    use_cuda = dev.type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------- model pieces
def check_model_name(name: str) -> None:
    """Raise ``ValueError`` when ``name`` is not a registered timm model (visattn's register on import),
    suggesting the closest registered names."""
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(
            f"model {name!r} is not registered with timm; {hint}`visattn list` prints the visattn models"
        )


def create_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the recipe's drop path / drop rate and ``model_kwargs``; a ``ValueError``
    naming the model and ``model_kwargs`` when those do not build it (an unknown keyword, an argument
    timm's blocks assert on)."""
    check_model_name(recipe.model)
    kwargs = dict(recipe.model_kwargs)
    if recipe.drop_path is not None:
        kwargs.setdefault("drop_path_rate", recipe.drop_path)
    if recipe.drop_rate:
        kwargs.setdefault("drop_rate", recipe.drop_rate)
    try:
        return timm.create_model(recipe.model, num_classes=num_classes, **kwargs)
    except (TypeError, AssertionError) as exc:
        raise ValueError(
            f"model {recipe.model!r} cannot be built with model_kwargs {recipe.model_kwargs}: "
            f"{exc or type(exc).__name__}; fix model_kwargs (--set model_kwargs=...)"
        ) from exc


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier named by the model's pretrained cfg (timm's ``classifier``)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


def load_init_checkpoint(model: nn.Module, model_name: str, source: str, strict: bool = True) -> list[str]:
    """Initialise ``model`` from ``source`` (a file or an http(s) URL, cached by torch.hub) for fine-tuning.

    Trainer checkpoints and official files (wrapped under ``model``/``state_dict`` or bare) go through
    the model module's ``checkpoint_filter_fn``. Classifier tensors whose shape differs from the model's
    (another label set) are dropped and keep their fresh init; any other shape difference (another width
    or depth of the model) is a ``ValueError`` listing them, unless ``strict=False`` (recipe key
    ``init_strict: false``), which drops those too. Returns the dropped keys; ``ValueError`` if any other
    key is missing or unexpected.
    """
    if source.startswith(("http://", "https://")):
        import hashlib

        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{model_name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.pth"
        if not path.exists():
            torch.hub.download_url_to_file(source, str(path))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"init_checkpoint {source} does not exist")
    obj = ckpt.load(path)
    _check_same_model(obj, model_name, str(path))
    state = obj
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None and "format" not in obj:
        state = filter_fn(state, model)
    own = model.state_dict()
    dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    head = classifier_keys(model)
    body = [k for k in dropped if k not in head]
    if body and strict:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in body[:5])
        raise ValueError(
            f"init_checkpoint {source} does not fit {model_name!r}: {len(body)} non-classifier "
            f"tensor(s) have another shape ({shapes}{', ...' if len(body) > 5 else ''}); check "
            "model_kwargs, or set init_strict=false to start those from scratch"
        )
    state = {k: v for k, v in state.items() if k not in dropped}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in dropped]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"init_checkpoint {source} does not fit {model_name!r}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return dropped


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Weight-decay groups: 1-d params/biases (``wd_exclude_1d``), ``no_weight_decay()`` names,
    ``no_weight_decay_keywords()`` substrings and the recipe's ``wd_exclude`` globs get none."""
    names = set(getattr(model, "no_weight_decay", set)())
    keywords = set(getattr(model, "no_weight_decay_keywords", set)())
    patterns = names | {f"*{k}*" for k in keywords} | set(recipe.wd_exclude)
    return param_groups_weight_decay(model, recipe.weight_decay, recipe.wd_exclude_1d, sorted(patterns))


def create_optimizer(model: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {}
    if recipe.opt_eps is not None:
        kwargs["eps"] = recipe.opt_eps
    if recipe.opt_betas is not None:
        kwargs["betas"] = tuple(recipe.opt_betas)
    return create_optimizer_v2(
        model,
        opt=recipe.opt,
        lr=lr,
        weight_decay=recipe.weight_decay,
        momentum=recipe.momentum,
        param_group_fn=lambda m: param_groups(m, recipe),
        **kwargs,
    )


def create_scheduler(optimizer, recipe: Recipe, warmup_lr: float, min_lr: float, steps_per_epoch: int):
    """``(scheduler or None, total_epochs)`` from timm's ``create_scheduler_v2``."""
    if recipe.sched == "none":
        return None, recipe.epochs + recipe.cooldown_epochs
    return create_scheduler_v2(
        optimizer,
        sched=recipe.sched,
        num_epochs=recipe.epochs,
        decay_epochs=recipe.decay_epochs,
        decay_rate=recipe.decay_rate,
        cooldown_epochs=recipe.cooldown_epochs,
        min_lr=min_lr,
        warmup_lr=warmup_lr,
        warmup_epochs=recipe.warmup_epochs,
        warmup_prefix=recipe.warmup_prefix,
        step_on_epochs=not recipe.sched_on_updates,
        updates_per_epoch=steps_per_epoch,
    )


def to_channels_last(model: nn.Module) -> None:
    """Channels-last storage for every 4-D parameter/buffer (``Module.to`` refuses models that
    also hold 5-D tensors, such as Agent attention's biases)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)


def match_param_layout_to_grads(model: nn.Module, recipe: Recipe, device: torch.device) -> list[str]:
    """Store each parameter with the strides its gradient comes back with; return the names changed.

    DDP builds its gradient buckets from the parameters' strides, and autograd may hand back a gradient
    whose strides differ only in size-1 dimensions (a depthwise conv weight ``[C, 1, k, k]`` fed a
    channels-last input gets channels-last gradients), which DDP then copies every step, with a "Grad
    strides do not match bucket view strides" warning. One eval-mode forward/backward of a random batch
    (no running statistics change) shows the layouts; call this before wrapping the model in DDP.
    """
    x = torch.randn(
        2, recipe.model_kwargs.get("in_chans", 3), recipe.input_size, recipe.input_size, device=device
    )
    if recipe.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    training = model.training
    model.eval()
    try:
        with amp_context(recipe.amp, device):
            out = model(x)
        out.float().sum().backward()
    finally:
        model.train(training)
    changed = []
    for name, p in model.named_parameters():
        g, p.grad = p.grad, None
        dense = g is not None and (g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last))
        if dense and g.shape == p.shape and g.stride() != p.stride():
            p.data = torch.empty_strided(p.shape, g.stride(), dtype=p.dtype, device=p.device).copy_(p.data)
            changed.append(name)
    return changed


def amp_context(amp: str, device: torch.device):
    """``torch.autocast`` for ``bf16``/``fp16``, a null context for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    info: DistInfo,
    amp: str = "none",
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the whole loader, summed exactly across ranks."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, correct@1, correct@5, count
    for x, y in loader:
        x = x.to(info.device, non_blocking=True)
        y = y.to(info.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_context(amp, info.device):
            out = model(x)
        out = out.float()
        k5 = min(5, out.shape[1])
        top1, top5 = accuracy(out, y, topk=(1, k5))
        n = y.shape[0]
        sums[0] += loss_fn(out, y).item()
        sums[1] += round(top1.item() * n / 100)
        sums[2] += round(top5.item() * n / 100)
        sums[3] += n
    loss, c1, c5, count = _all_reduce_sum(sums, info)
    count = max(count, 1)
    return {"loss": loss / count, "top1": 100 * c1 / count, "top5": 100 * c5 / count, "count": int(count)}


# ---------------------------------------------------------------------------------- metrics
class MetricsWriter:
    """Append-only ``metrics.jsonl`` (+ per-epoch ``metrics.csv``), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records newer than ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.jsonl.exists():
            return
        kept = [
            ln for ln in self.jsonl.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        self.jsonl.write_text("".join(ln + "\n" for ln in kept))
        rows = [json.loads(ln) for ln in kept]
        self._rewrite_csv([r for r in rows if r.get("kind") == "epoch"])

    def _rewrite_csv(self, rows: list[dict[str, Any]]) -> None:
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("kind") == "epoch":
            new = not self.csv.exists()
            with open(self.csv, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(record)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True, leave=False
    )


# ---------------------------------------------------------------------------------- run directory
def resolve_run_dir(recipe: Recipe, output: str | None, resume: str | None, info: DistInfo) -> Path:
    """``output`` if given; with ``resume="auto"`` and no output, the newest ``runs/<recipe>-*``;
    else a fresh ``runs/<recipe>-<UTC time>``. Decided on rank 0 and broadcast."""
    if not is_run_name(recipe.name or recipe.model):
        raise ValueError(f"recipe name {recipe.name!r} must be a plain folder name (runs/<name>-<time>)")
    choice = None
    if info.is_main:
        if output:
            choice = Path(output)
        else:
            runs = sorted(Path("runs").glob(f"{recipe.name or recipe.model}-*")) if resume == "auto" else []
            runs = [r for r in runs if ckpt.list_checkpoints(r)]
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            choice = runs[-1] if runs else Path("runs") / f"{recipe.name or recipe.model}-{stamp}"
        choice = str(choice.resolve())
    return Path(_broadcast_object(choice, info))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------- training
def train(
    recipe: Recipe,
    data_dir: str | None = None,
    output: str | None = None,
    resume: str | None = None,
    device: str | None = None,
    progress: bool | None = None,
    max_steps: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train ``recipe``; return a summary (run dir, best/final top-1, steps, wall time).

    ``resume``: ``"auto"`` (newest checkpoint in the run dir, or a fresh start when there is
    none) or a checkpoint path. A resumed run continues with the recipe of its checkpoint: with the
    ``--set`` ``overrides`` that made ``recipe`` applied to it (the CLI), or ``recipe`` itself when
    ``overrides`` is None; either may change only ``config.RESUMABLE`` keys (``ValueError`` naming any
    other), and a changed ``epochs``/``cooldown_epochs`` re-plans the schedule from the current step
    and is written to the run's ``recipe.yaml``. ``progress``: tqdm bars (default: only on a TTY, rank 0).
    ``max_steps`` stops after that many optimizer steps in total (checkpointing first), as if the
    run were interrupted there.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    info = setup_distributed(device)
    threads = torch.get_num_threads()
    attempt = _Attempt()
    try:
        return _train(recipe, data_dir, output, resume, info, progress, max_steps, attempt, overrides)
    except KeyboardInterrupt as exc:
        if info.is_main:
            _remove_failed_run(attempt.created)
        raise TrainingInterrupted(attempt) from exc
    except BaseException:
        if info.is_main:
            _remove_failed_run(attempt.created)
        raise
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed()


@dataclass
class _Attempt:
    """What one ``train`` call has done so far, for the clean-up or report when it fails."""

    created: list[Path] = field(default_factory=list)  # folders it made (removed if no checkpoint)
    run_dir: Path | None = None
    step: int = 0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: says the step it stopped at and what ``--resume auto`` continues from."""

    def __init__(self, attempt: _Attempt) -> None:
        newest = ckpt.list_checkpoints(attempt.run_dir) if attempt.run_dir else []
        where = (
            f"resume with --resume auto (from {newest[0][1]})"
            if newest
            else "no checkpoint was written yet, so nothing is kept to resume"
        )
        super().__init__(f"stopped at step {attempt.step} (Ctrl-C); {where}")


def _remove_failed_run(created: list[Path]) -> None:
    """Delete the run directory of a run that failed before writing any checkpoint (nothing in it
    could be resumed or evaluated), then its parent if this run made it and it is empty now."""
    run_dir, *parents = created or [None]
    if run_dir is None or ckpt.list_checkpoints(run_dir) or (run_dir / "best.pth").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in parents:
        with contextlib.suppress(OSError):  # not empty: another run lives there
            parent.rmdir()


def _train(
    recipe, data_dir, output, resume, info: DistInfo, progress, max_steps, attempt: _Attempt, overrides
) -> dict[str, Any]:
    start_time = time.perf_counter()
    check_model_name(recipe.model)
    run_dir = resolve_run_dir(recipe, output, resume, info)
    loaded = _load_resume(resume, run_dir)
    saved = None
    if loaded is not None:
        saved = recipe_from_dict(loaded[1]["recipe"], where=f"the recipe in {loaded[0]}")
        recipe = resumed_recipe(saved, recipe, overrides, where=str(loaded[0].parent))
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    if info.is_main:
        attempt.created.extend(p for p in (run_dir, *run_dir.parents)[:2] if not p.exists())
        run_dir.mkdir(parents=True, exist_ok=True)
    attempt.run_dir = run_dir
    _seed_all(recipe.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)

    train_ds, val_ds, num_classes = build_datasets(recipe, data_dir)
    if recipe.num_classes is not None and recipe.num_classes != num_classes:
        raise ValueError(
            f"recipe says num_classes={recipe.num_classes} but the dataset has {num_classes} classes"
        )
    train_loader, val_loader = build_loaders(recipe, train_ds, val_ds, info.rank, info.world, info.device)
    # what set_epoch(epoch, skip) goes to: the index sampler, or a WebDataset stream itself
    epoch_source = (
        train_loader.dataset if isinstance(train_loader.dataset, SeededStream) else train_loader.sampler
    )
    accum = recipe.accum_steps
    batches_per_epoch = (len(train_loader) // accum) * accum
    steps_per_epoch = batches_per_epoch // accum
    global_batch = recipe.global_batch(info.world)
    lr, warmup_lr, min_lr = recipe.scaled_lrs(info.world)

    model = create_model(recipe, num_classes)
    if recipe.init_checkpoint and loaded is None:
        dropped = load_init_checkpoint(model, recipe.model, recipe.init_checkpoint, recipe.init_strict)
        if info.is_main:
            print(
                f"initialised from {recipe.init_checkpoint}"
                + (f"; {len(dropped)} tensor(s) start fresh: {', '.join(dropped)}" if dropped else "")
            )
    if recipe.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(info.device)
    if recipe.channels_last:
        to_channels_last(model)
    core = model  # unwrapped module: what checkpoints and EMA see
    optimizer = create_optimizer(core, recipe, lr)
    scheduler, total_epochs = create_scheduler(optimizer, recipe, warmup_lr, min_lr, steps_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type) if recipe.amp == "fp16" else None
    if info.distributed:
        match_param_layout_to_grads(core, recipe, info.device)  # before DDP sizes its buckets
        ids = [info.local_rank] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ema = ModelEmaV3(core, decay=recipe.model_ema_decay) if recipe.model_ema else None
    fwd = torch.compile(model) if recipe.compile else model
    mixup_fn = build_mixup(recipe, num_classes)
    if mixup_fn is not None:
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif recipe.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=recipe.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    manager = CheckpointManagerFor(run_dir, recipe.keep_last, info)
    metrics = MetricsWriter(run_dir, info.is_main)
    epoch, batch_in_epoch, step, best_top1 = 0, 0, 0, -1.0
    resumed_loss: tuple[float, int] = (0.0, 0)
    _seed_all(recipe.seed + info.rank)  # per-rank randomness (drop path, mixup) from here on
    if loaded is not None:
        path, state = loaded
        _check_same_model(state, recipe.model, str(path))
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        replanned = (recipe.epochs, recipe.cooldown_epochs) != (saved.epochs, saved.cooldown_epochs)
        if replanned and total_epochs < state["epoch"]:
            raise ValueError(
                f"epochs={recipe.epochs}, cooldown_epochs={recipe.cooldown_epochs} ({total_epochs} in all): "
                f"the run has trained {state['epoch']} epochs already; a resumed schedule cannot end before"
            )
        if scheduler is not None and replanned:  # the new schedule, at the point the run has reached
            if recipe.sched_on_updates:
                scheduler.step_update(num_updates=state["step"])
            else:
                scheduler.step(state["epoch"])
        elif scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("model_ema") is not None:
            ema.load_state_dict(state["model_ema"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        attempt.step = step
        best_top1 = state.get("best_top1", -1.0)
        rngs = state["rng"]
        if len(rngs) == info.world:
            ckpt.restore_rng(rngs[info.rank])
            resumed_loss = tuple(state["epoch_loss"][info.rank])
        elif info.is_main:
            print(
                f"note: checkpoint written by {len(rngs)} process(es), now {info.world}: RNG streams restart"
            )
        metrics.truncate_after(step)
        if info.is_main:
            if recipe != saved:
                dump_recipe(recipe, run_dir / "recipe.yaml")
            plan = f"; re-planned for {total_epochs} epochs" if replanned else ""
            print(f"resumed from {path} (epoch {epoch}, step {step}){plan}", flush=True)
    elif info.is_main:
        dump_recipe(recipe, run_dir / "recipe.yaml")

    if info.is_main:
        print(
            f"run dir {run_dir} | model {recipe.model} | {dataset_size(train_ds)} train / "
            f"{dataset_size(val_ds) or '?'} val images, "
            f"{num_classes} classes | world {info.world} x batch {recipe.batch_size} x accum {accum} = "
            f"global batch {global_batch} | lr {lr:.3g} | {_epochs_text(recipe, total_epochs)} x "
            f"{steps_per_epoch} steps "
            f"| device {info.device}",
            flush=True,
        )
    show_progress = info.is_main and (sys.stderr.isatty() if progress is None else progress)
    last_eval: dict[str, float] = {}

    def state_dict(epoch_: int, batch_: int, partial_loss: tuple[float, int] = (0.0, 0)) -> dict[str, Any]:
        rng = _gather_object(ckpt.capture_rng(), info)
        return {
            "format": CKPT_FORMAT,
            "model_name": recipe.model,
            "model_kwargs": dict(recipe.model_kwargs),
            "num_classes": num_classes,
            "recipe": recipe.to_dict(),
            "model": core.state_dict(),
            "model_ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch_,
            "batch_in_epoch": batch_,
            "step": step,
            "best_top1": best_top1,
            "epoch_loss": _gather_object([float(partial_loss[0]), int(partial_loss[1])], info),
            "world_size": info.world,
            "rng": rng,
        }

    stopped = False
    while epoch < total_epochs and not stopped:
        epoch_start = time.perf_counter()
        epoch_source.set_epoch(epoch, skip=batch_in_epoch * recipe.batch_size)
        model.train()
        bar = _progress(
            batches_per_epoch * recipe.batch_size * info.world,
            batch_in_epoch * recipe.batch_size * info.world,
            f"epoch {epoch + 1}/{total_epochs}",
            show_progress,
        )
        loss_sum = torch.tensor(resumed_loss[0], dtype=torch.float64, device=info.device)
        loss_count = resumed_loss[1]
        resumed_loss = (0.0, 0)
        window_loss = torch.zeros((), dtype=torch.float64, device=info.device)
        window_n, window_start = 0, time.perf_counter()
        epoch_imgs_start = batch_in_epoch
        it = iter(train_loader)
        for b in range(batch_in_epoch, batches_per_epoch):
            x, y = next(it)
            x = x.to(info.device, non_blocking=True)
            y = y.to(info.device, non_blocking=True)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            if recipe.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_micro = (b + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or not info.distributed else model.no_sync()
            with sync:
                with amp_context(recipe.amp, info.device):
                    out = fwd(x)
                    loss = criterion(out, y)
                scaled = loss / accum
                if scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_sum += loss.detach().double()
            window_loss += loss.detach().double()
            loss_count += 1
            window_n += 1
            if bar is not None:
                bar.update(recipe.batch_size * info.world)
            if not last_micro:
                continue
            if scaler is not None:
                if recipe.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    dispatch_clip_grad(core.parameters(), recipe.clip_grad, mode=recipe.clip_mode)
                scaler.step(optimizer)
                scaler.update()
            else:
                if recipe.clip_grad is not None:
                    dispatch_clip_grad(core.parameters(), recipe.clip_grad, mode=recipe.clip_mode)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            attempt.step = step
            if ema is not None:
                ema.update(core, step=step)
            if scheduler is not None and recipe.sched_on_updates:
                scheduler.step_update(num_updates=step)
            if step % recipe.log_interval == 0:
                wl, wn = _all_reduce_sum([window_loss.item(), float(window_n)], info)
                elapsed = time.perf_counter() - window_start
                rate = window_n * recipe.batch_size * info.world / max(elapsed, 1e-9)
                cur_lr = optimizer.param_groups[0]["lr"]
                metrics.log(
                    {
                        "kind": "step",
                        "epoch": epoch,
                        "step": step,
                        "loss": wl / max(wn, 1),
                        "lr": cur_lr,
                        "img_per_s": rate,
                    }
                )
                if bar is not None:
                    bar.set_postfix(loss=f"{wl / max(wn, 1):.3f}", lr=f"{cur_lr:.2e}")
                window_loss.zero_()
                window_n, window_start = 0, time.perf_counter()
            mid_epoch = b + 1 < batches_per_epoch
            hit_max = max_steps is not None and step >= max_steps
            if mid_epoch and (
                hit_max or (recipe.ckpt_interval_steps and step % recipe.ckpt_interval_steps == 0)
            ):
                state = state_dict(epoch, b + 1, (loss_sum.item(), loss_count))
                manager.save(state, step)
            if hit_max and mid_epoch:
                stopped = True
                break
        if bar is not None:
            bar.close()
        if stopped:
            break
        # ---- end of epoch: schedule, evaluate, checkpoint
        epoch_time = time.perf_counter() - epoch_start
        total_loss, total_n = _all_reduce_sum([loss_sum.item(), float(loss_count)], info)
        if scheduler is not None and not recipe.sched_on_updates:
            scheduler.step(epoch + 1)
        # the unwrapped model: DDP forwards are collectives, and shards may differ by one batch
        last_eval = evaluate(core, val_loader, info, recipe.amp, recipe.channels_last)
        record = {
            "kind": "epoch",
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": total_loss / max(total_n, 1),
            "val_loss": last_eval["loss"],
            "val_top1": last_eval["top1"],
            "val_top5": last_eval["top5"],
            "img_per_s": (batches_per_epoch - epoch_imgs_start) * recipe.batch_size * info.world / epoch_time,
            "epoch_s": epoch_time,
            "world_size": info.world,
            "global_batch": global_batch,
        }
        if ema is not None:
            ema_eval = evaluate(ema.module, val_loader, info, recipe.amp, recipe.channels_last)
            record["ema_val_top1"] = ema_eval["top1"]
            record["ema_val_top5"] = ema_eval["top5"]
        metrics.log(record)
        is_best = last_eval["top1"] > best_top1
        best_top1 = max(best_top1, last_eval["top1"])
        epoch += 1
        batch_in_epoch = 0
        state = state_dict(epoch, 0)
        manager.save(state, step)
        if is_best:
            manager.save_best(_weights_only(state, last_eval))
        if info.is_main:
            ema_txt = f" | ema top-1 {record['ema_val_top1']:.2f}" if ema is not None else ""
            print(
                f"epoch {epoch}/{total_epochs} | step {step} | train loss {record['train_loss']:.4f} | "
                f"val loss {last_eval['loss']:.4f} | top-1 {last_eval['top1']:.2f} | "
                f"top-5 {last_eval['top5']:.2f}"
                f"{ema_txt} | {_rate_text(record['img_per_s'])} img/s | {epoch_time:.1f}s",
                flush=True,
            )
        if max_steps is not None and step >= max_steps:
            break

    wall = time.perf_counter() - start_time
    summary = {
        "run_dir": str(run_dir),
        "epoch": epoch,
        "step": step,
        "best_top1": best_top1,
        "final_top1": last_eval.get("top1"),
        "final_top5": last_eval.get("top5"),
        "wall_s": wall,
        "world_size": info.world,
        "global_batch": global_batch,
        "lr": lr,
    }
    if info.is_main:
        if epoch >= total_epochs:
            head = f"finished in {wall:.0f}s | best top-1 {best_top1:.2f}"
        else:
            head = (
                f"stopped at step {step} (epoch {epoch + 1}) after {wall:.0f}s; continue with --resume auto"
            )
        print(f"{head} | run dir {run_dir}", flush=True)
        if (run_dir / "metrics.jsonl").exists():  # none yet when it stops before the first log step
            from visattn.recipes.plot import plot_run

            png = plot_run(run_dir)
            best = f" | best weights: {run_dir / 'best.pth'}" if best_top1 >= 0 else ""
            print(f"  metrics: {run_dir / 'metrics.jsonl'} (+ metrics.csv) | plot: {png}{best}", flush=True)
    return summary


def _epochs_text(recipe: Recipe, total: int) -> str:
    """``"12 epochs (2 + 10 cooldown at min_lr)"``: how timm's scheduler made up the total (a warmup
    prefix and the cooldown are added to ``epochs``)."""
    warmup = recipe.warmup_epochs if recipe.warmup_prefix else 0
    if total != recipe.epochs and total == warmup + recipe.epochs + recipe.cooldown_epochs:
        parts = [f"{warmup} warmup"] if warmup else []
        parts.append(str(recipe.epochs))
        if recipe.cooldown_epochs:
            parts.append(f"{recipe.cooldown_epochs} cooldown at min_lr")
        return f"{total} epochs ({' + '.join(parts)})"
    return f"{total} epochs"


def _rate_text(rate: float) -> str:
    """Throughput with the digits that matter: ``1234``, ``57.3``, ``0.42``."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def _weights_only(state: dict[str, Any], evaluation: dict[str, float]) -> dict[str, Any]:
    keep = (
        "format",
        "model_name",
        "model_kwargs",
        "num_classes",
        "recipe",
        "model",
        "model_ema",
        "epoch",
        "step",
    )
    out = {k: state[k] for k in keep}
    out["val_top1"] = evaluation["top1"]
    out["val_top5"] = evaluation["top5"]
    return out


class CheckpointManagerFor(ckpt.CheckpointManager):
    """A :class:`~visattn.recipes.checkpoint.CheckpointManager` that only rank 0 writes through."""

    def __init__(self, run_dir: Path, keep_last: int, info: DistInfo) -> None:
        super().__init__(run_dir, keep_last)
        self.info = info

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = super().save(state, step) if self.info.is_main else self.run_dir / f"ckpt-{step:08d}.pth"
        if self.info.distributed:
            dist.barrier()
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        return super().save_best(state) if self.info.is_main else self.run_dir / "best.pth"


def _load_resume(resume: str | None, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    if not resume:
        return None
    if resume == "auto":
        return ckpt.CheckpointManager(run_dir).load_latest()
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path, ckpt.load(path)


def _check_same_model(state: dict[str, Any], model_name: str, where: str) -> None:
    found = state.get("model_name")
    if found is not None and found != model_name:
        raise ValueError(
            f"checkpoint {where} was trained for model {found!r}, not {model_name!r} (use --model {found})"
        )
