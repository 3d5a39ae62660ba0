"""Datasets, transforms, samplers and loaders for the trainer.

Where the images come from (:func:`build_datasets`):

* ``dataset: digits`` — scikit-learn's handwritten digits (1,797 real 8x8 scans shipped inside
  the scikit-learn wheel), upsampled to ``input_size`` RGB, stratified 80/20 train/val split.
  Used when no ``--data-dir`` is given, so the main command needs no download.
* ``dataset: ""`` (the default) — an ImageNet-style folder: ``DIR/train/<class>/*.jpg`` and
  ``DIR/val/<class>/*.jpg`` (``validation/`` also accepted), or image tars ``DIR/train.tar`` and
  ``DIR/val.tar`` holding ``<class>/<image>`` members; listed by timm's reader, decoded by
  :class:`~visattn.recipes.image_files.ImageFiles` (an unreadable image is skipped and named once).
* any other map-style timm dataset kind (``torch/cifar10``, ``torch/image_folder``, ``hfds/<name>``,
  ...) — passed to ``timm.data.create_dataset(kind, root=DIR, split=...)``.
* ``wds/<name>`` — WebDataset shards read by timm's ``ReaderWds`` (``pip install visattn[wds]``):
  ``DIR/_info.json`` lists each split's shards and sample counts, or the split is a brace pattern
  (``train_split: "imagenet-train-{0000..1023}.tar"``, optionally ``|<samples>``); the train split's
  sample count must be known (``_info.json``, ``|<samples>`` or the recipe's ``train_samples``).
  The other streaming kinds are refused with a clear error: ``tfds/`` (TensorFlow is not a
  dependency) and ``hfids/`` (use the map-style ``hfds/``).

Map-style augmentation is made deterministic per sample: the sampler yields ``(index, seed)``
pairs where the seed depends on (recipe seed, epoch, position of the sample in the global order),
and :class:`SeededDataset` seeds ``random``/``numpy``/``torch`` from it before the timm
transform runs. A sample therefore gets the same augmentation whatever the number of
workers or devices, and a resumed run sees exactly the batches an uninterrupted one would.

WebDataset epochs (:class:`SeededStream`) are deterministic too, for a fixed world size, worker
count and batch size: timm shuffles the shard list from (seed, epoch) and deals shards to the
``world x workers`` readers; each reader's sample shuffle buffer is re-seeded from (seed, epoch,
reader) every epoch and each sample's augmentation from (seed, epoch, reader, position). A
resumed run re-opens the epoch, reads (and decodes, without augmenting) the samples already
consumed and drops them, and rotates the worker order so batches arrive in the original order:
it sees the same batches as an uninterrupted run. With another world size or worker count the
shards are dealt differently: the epoch restarts its stream and skips only the count of batches.
"""

from __future__ import annotations

import contextlib
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_dataset, create_transform
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    get_worker_info,
)

from visattn.recipes.config import Recipe
from visattn.recipes.image_files import ImageFiles

IMG_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
# timm dataset kinds that stream (IterableDataset): HF streaming, TFDS, WebDataset; only wds/ is read
STREAMING_PREFIXES = ("hfids", "tfds", "wds")


def _streaming_message(kind: str) -> str:
    why = {
        "tfds": "TensorFlow Datasets, which needs TensorFlow (not a visattn dependency)",
        "hfids": "Hugging Face streaming; the map-style hfds/<name> reads the same data sets",
    }.get(kind.partition("/")[0].lower(), "a streaming (iterable) timm dataset")
    return (
        f"dataset kind {kind!r} is refused: it is {why}. Use WebDataset shards (wds/<name>) or a "
        "map-style kind: an ImageNet-style folder or train.tar/val.tar (dataset ''), torch/<name> or "
        "hfds/<name>"
    )


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as RGB PIL images of ``size`` x ``size`` pixels.

    ``split`` is ``"train"`` (1,437 images) or ``"validation"`` (360 images), a stratified
    split with a fixed seed. Items are ``(PIL.Image, int label)``.
    """

    def __init__(self, split: str = "train", size: int = 32) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
        idx = np.arange(len(images))
        train_idx, val_idx = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=0)
        chosen = train_idx if split == "train" else val_idx
        self.images = [
            Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            for i in chosen
        ]
        self.targets = [int(digits.target[i]) for i in chosen]
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.targets[index]


def _find_split_dir(root: Path, split: str) -> Path:
    """The folder ``root/<split>`` or the image tar ``root/<split>.tar`` (``val``/``validation`` alike)."""
    names = {"train": ["train"], "validation": ["val", "validation"], "val": ["val", "validation"]}.get(
        split, [split]
    )
    for name in names:
        if (root / name).is_dir():
            return root / name
        if (root / f"{name}.tar").is_file():
            return root / f"{name}.tar"
    expected = ", ".join(f"{root / n} or {root / n}.tar" for n in names)
    raise FileNotFoundError(f"data dir {root} has no '{split}' split: expected {expected}")


def _tar_classes(path: Path) -> list[str]:
    """Class names of an image tar (``<class>/<image>`` members, the layout timm's tar reader labels)."""
    with tarfile.open(path) as tf:
        classes = {
            os.path.basename(os.path.dirname(m.name))
            for m in tf.getmembers()
            if m.isfile() and os.path.splitext(m.name)[1].lower() in IMG_EXTENSIONS
        }
    if not classes:
        raise FileNotFoundError(f"{path} holds no images (expected <class>/<image> members)")
    return sorted(classes)


def check_image_folder(split_dir: Path) -> list[str]:
    """Class names of an ImageNet-style split folder (or image tar); raise if it has no classes or an
    empty class."""
    if split_dir.is_file():
        return _tar_classes(split_dir)
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"{split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>)"
        )
    empty = []
    for name in classes:
        has_image = any(
            os.path.splitext(f)[1].lower() in IMG_EXTENSIONS
            for _, _, files in os.walk(split_dir / name)
            for f in files
        )
        if not has_image:
            empty.append(name)
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"{split_dir}: {len(empty)} class folder(s) contain no images: {shown}")
    return classes


def build_datasets(recipe: Recipe, data_dir: str | Path | None) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` for ``recipe``; datasets return ``(PIL image, label)``."""
    kind = recipe.dataset
    if kind == "digits":
        if data_dir is not None:
            raise ValueError(
                f"recipe {recipe.name!r} uses the embedded digits dataset, so --data-dir {data_dir} would be "
                "ignored: pick an ImageNet recipe (--recipe nat_tiny, see --list-recipes) or --set dataset=''"
            )
        train, val = DigitsDataset("train", recipe.input_size), DigitsDataset("validation", recipe.input_size)
        return train, val, 10
    if data_dir is None:
        raise ValueError(
            f"recipe {recipe.name!r} trains on {kind or 'an ImageNet-style folder'}: pass --data-dir DIR "
            "(or use --recipe digits, the embedded dataset)"
        )
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data dir {root} does not exist")
    if kind in ("", "folder", "imagefolder"):
        train_dir = _find_split_dir(root, recipe.train_split)
        val_dir = _find_split_dir(root, recipe.val_split)
        classes = check_image_folder(train_dir)
        val_classes = check_image_folder(val_dir)
        missing = sorted(set(val_classes) - set(classes))
        if missing:
            raise ValueError(f"{val_dir} has classes absent from {train_dir}: {', '.join(missing[:10])}")
        class_map = {c: i for i, c in enumerate(classes)}
        return ImageFiles(train_dir, class_map), ImageFiles(val_dir, class_map), len(classes)
    prefix = kind.partition("/")[0].lower() if "/" in kind else ""
    if prefix == "wds":
        return _build_wds(recipe, root, kind)
    if prefix in STREAMING_PREFIXES:
        raise ValueError(_streaming_message(kind))
    train = create_dataset(kind, root=str(root), split=recipe.train_split, is_training=True, download=False)
    val = create_dataset(kind, root=str(root), split=recipe.val_split, is_training=False, download=False)
    for ds in (train, val):
        if isinstance(ds, IterableDataset):
            raise ValueError(_streaming_message(kind))
    num_classes = recipe.num_classes or _count_classes(train)
    return train, val, num_classes


def _build_wds(recipe: Recipe, root: Path, kind: str) -> tuple[Dataset, Dataset, int]:
    """timm's ``IterableImageDataset`` + ``ReaderWds`` for the train and val shards under ``root``."""
    try:
        import webdataset  # noqa: F401  (timm's reader needs it)
    except ImportError as exc:
        raise ImportError(
            f"dataset kind {kind!r} needs the webdataset package: pip install 'visattn[wds]'"
        ) from exc
    common = dict(root=str(root), batch_size=recipe.batch_size, seed=recipe.seed)
    datasets = []
    for split, training in ((recipe.train_split, True), (recipe.val_split, False)):
        try:
            datasets.append(
                create_dataset(
                    kind,
                    split=split,
                    is_training=training,
                    num_samples=recipe.train_samples if training else None,
                    **common,
                )
            )
        except RuntimeError as exc:
            if "num_samples" in str(exc):
                raise ValueError(
                    f"{kind} split {split!r} under {root}: its number of samples is unknown (no _info.json "
                    "giving it, no '|<samples>' after the shard pattern); set train_samples "
                    "(--set train_samples=N), it fixes the steps per epoch"
                ) from exc
            hint = (
                f"; name a split of {root / '_info.json'} or a shard pattern such as "
                "'<name>-train-{0000..0099}.tar|<samples>' (train_split / val_split)"
                if "not found in info" in str(exc)
                else ""
            )
            raise ValueError(f"{kind} split {split!r} under {root}: {exc}{hint}") from exc
    train, val = datasets
    num_classes = recipe.num_classes or train.reader.info.get("num_classes")
    if not num_classes:
        raise ValueError(
            f"cannot tell the number of classes of {kind}: set num_classes in the recipe "
            f"(--set num_classes=N) or 'num_classes' in {root / '_info.json'}"
        )
    return train, val, int(num_classes)


def dataset_size(dataset: Dataset) -> int | None:
    """Number of samples of a split (``None`` when a stream does not know it)."""
    if isinstance(dataset, IterableDataset):
        return getattr(getattr(dataset, "reader", None), "num_samples", None) or None
    return len(dataset)


def build_eval_dataset(recipe: Recipe, data_dir: str | Path | None) -> tuple[Dataset, int]:
    """``(val, num_classes)`` for evaluation; a train folder, when present, fixes the class order."""
    if recipe.dataset in ("", "folder", "imagefolder") and data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data dir {root} does not exist")
        val_dir = _find_split_dir(root, recipe.val_split)
        try:
            classes = check_image_folder(_find_split_dir(root, recipe.train_split))
        except FileNotFoundError:
            classes = check_image_folder(val_dir)
        check_image_folder(val_dir)
        return ImageFiles(val_dir, {c: i for i, c in enumerate(classes)}), len(classes)
    _, val, num_classes = build_datasets(recipe, data_dir)
    return val, num_classes


def _count_classes(dataset: Dataset) -> int:
    reader = getattr(dataset, "reader", None)
    for obj in (dataset, reader, getattr(dataset, "dataset", None)):
        classes = getattr(obj, "classes", None)
        if classes is not None and len(classes):
            return len(classes)
        class_to_idx = getattr(obj, "class_to_idx", None)
        if class_to_idx:
            return len(class_to_idx)
    raise ValueError("cannot tell the number of classes of this dataset: set num_classes in the recipe")


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for ``bits_to_keep <= 0`` (keep no bit: a black image).

    timm's ``PosterizeIncreasing`` yields 0 bits at RandAugment level 10 (reached by
    ``rand-m9-mstd0.5``), which Pillow 13 rejects with a ValueError; older Pillow returned black.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform) -> None:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize_any_bits


def build_transforms(recipe: Recipe):
    """``(train_transform, eval_transform)`` from timm's ``create_transform``."""
    common = dict(input_size=recipe.input_size, mean=tuple(recipe.mean), std=tuple(recipe.std))
    train = create_transform(
        is_training=True,
        scale=tuple(recipe.scale),
        ratio=tuple(recipe.ratio),
        hflip=recipe.hflip,
        color_jitter=recipe.color_jitter or None,
        auto_augment=recipe.aa,
        interpolation=recipe.train_interpolation,
        re_prob=recipe.reprob,
        re_mode=recipe.remode,
        re_count=recipe.recount,
        **common,
    )
    _fix_posterize(train)
    val = create_transform(
        is_training=False, interpolation=recipe.interpolation, crop_pct=recipe.crop_pct, **common
    )
    return train, val


def _unwrap_image_dataset(dataset: Dataset) -> Dataset:
    """Turn off a timm dataset's own transform: :class:`SeededDataset` applies it."""
    if hasattr(dataset, "transform"):
        dataset.transform = None
    return dataset


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed ``random``/``numpy``/``torch`` with ``seed``; in the main process restore them afterwards, so
    data loading with ``workers=0`` leaves the training RNG untouched."""
    in_main = get_worker_info() is None
    if in_main:
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        if in_main:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SeededDataset(Dataset):
    """Apply ``transform`` to ``dataset[index]`` after seeding the RNGs with the sample's seed.

    Indexed with ``(index, seed)`` pairs (from :class:`SeededSampler`) or a plain index (no seeding).
    In the main process the global RNG states are saved and restored around the call, so data
    loading with ``workers=0`` leaves the training RNG untouched.
    """

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset = _unwrap_image_dataset(dataset)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            img, target = self.dataset[item]
            return self.transform(img), target
        index, seed = item
        with _seeded_rngs(seed):
            img, target = self.dataset[index]
            return self.transform(img), target


class SeededSampler(Sampler):
    """Wrap a per-rank sampler: yield ``(index, seed)`` and optionally skip the first ``skip`` items.

    The seed of the sample at global position ``p`` (``p = local_position * world + rank``, the
    same order ``DistributedSampler`` deals indices in) is a hash of (seed, epoch, p), so it
    does not depend on the number of devices.
    """

    def __init__(self, inner: Sampler, seed: int, rank: int, world: int) -> None:
        self.inner, self.seed, self.rank, self.world = inner, seed, rank, world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 2_147_483_647
        for pos, index in enumerate(self.inner):
            if pos < self.skip:
                continue
            yield int(index), (base + pos * self.world + self.rank) % (2**63 - 1)


class ShardSampler(Sampler):
    """Deterministic evaluation sharding without padding: rank ``r`` reads items ``r, r+world, ...``."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class SeededStream(IterableDataset):
    """timm's WebDataset stream (an ``IterableImageDataset`` over ``ReaderWds``) with deterministic,
    resumable epochs; yields ``(image tensor [3, H, W], label)``.

    Training (``training=True``): each of the ``world x workers`` readers gets its shards from timm
    (shard order from (seed, epoch), dealt round-robin) and yields ``len(self) / workers`` samples per
    epoch (timm's ``with_epoch``: a reader whose shards run out starts over on them). Per epoch the
    reader's sample shuffle buffer is re-seeded from (seed, epoch, reader) and every sample's
    augmentation from (seed, epoch, reader, position), so an epoch is a function of (seed, epoch,
    world size, workers, batch size). ``set_epoch(epoch, skip)`` with ``skip`` = samples this rank
    already consumed re-opens the epoch there: each reader drops its consumed samples (reading and
    decoding them, not augmenting them) and the worker order is rotated so that the DataLoader's
    round-robin over workers continues with the next batch of the original order.

    Evaluation (``training=False``): every sample of the split exactly once over all ranks and workers
    (each reader reads its shards once, no padding), transformed by ``transform``.
    """

    def __init__(self, dataset: Dataset, transform, seed: int, batch_size: int, training: bool) -> None:
        self.dataset = _unwrap_image_dataset(dataset)
        self.reader = dataset.reader
        self.transform, self.seed, self.batch_size, self.training = transform, seed, batch_size, training
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start ``epoch``, after the first ``skip`` samples of this rank (a multiple of the batch size)."""
        if skip % self.batch_size:
            raise ValueError(f"skip={skip} is not a multiple of batch_size={self.batch_size}")
        self.epoch, self.skip_batches = epoch, skip // self.batch_size
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        """Samples this rank reads per epoch (training: timm's count, rounded up to whole batches)."""
        return len(self.dataset)

    def _open_reader(self) -> int:
        """(Re)build the reader's pipeline for this worker and epoch; return the worker's logical id."""
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        logical = ((info.id if info is not None else 0) + self.skip_batches) % workers
        r = self.reader
        r.worker_info = info  # not None in a worker: timm's _lazy_init then keeps the ids set here
        r.worker_id, r.num_workers = logical, workers
        r.global_num_workers = r.dist_num_replicas * workers
        r.global_worker_id = r.dist_rank * workers + logical
        r.worker_seed = ((self.seed * 1_000_003 + self.epoch) * 65_537 + r.global_worker_id) % 2**63
        r.ds = None
        r._lazy_init()
        return logical

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        logical = self._open_reader()
        if not self.training:
            for sample in self.reader.ds:  # each reader's shards once: exact metrics, no padding
                yield self.transform(sample["image"]), sample["target"]
            return
        workers = self.reader.num_workers
        skip = len(range(logical, self.skip_batches, workers)) * self.batch_size
        base = (
            (self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + self.reader.global_worker_id
        ) * 1_000_003
        for pos, (img, target) in enumerate(self.reader):
            if pos < skip:
                continue
            with _seeded_rngs((base + pos) % (2**63 - 1)):
                yield self.transform(img), target


def _build_stream_loaders(recipe: Recipe, train: Dataset, val: Dataset, device: torch.device):
    """Loaders over :class:`SeededStream`; workers restart each epoch so they see its epoch and skip."""
    train_tf, val_tf = build_transforms(recipe)
    if recipe.aug_repeats > 0:
        raise ValueError("aug_repeats (repeated augmentation) needs a map-style dataset, not wds/")
    reader = train.reader
    readers = reader.dist_num_replicas * max(recipe.workers, 1)
    shards = len(reader.split_info.filenames)
    if shards < readers:
        raise ValueError(
            f"the {recipe.train_split!r} split has {shards} shard(s) for {reader.dist_num_replicas} "
            f"process(es) x {max(recipe.workers, 1)} loader worker(s): every reader needs a shard of its "
            "own; lower workers or write more, smaller shards"
        )
    for ds in (train, val):
        ds.set_loader_cfg(num_workers=recipe.workers)
    common = dict(batch_size=recipe.batch_size, num_workers=recipe.workers, pin_memory=device.type == "cuda")
    train_loader = DataLoader(
        SeededStream(train, train_tf, recipe.seed, recipe.batch_size, training=True),
        drop_last=True,
        generator=torch.Generator().manual_seed(recipe.seed),  # iterators must not draw from the global RNG
        **common,
    )
    val_loader = DataLoader(
        SeededStream(val, val_tf, recipe.seed, recipe.batch_size, training=False),
        generator=torch.Generator().manual_seed(recipe.seed),
        **common,
    )
    if len(train_loader) < recipe.accum_steps:
        raise ValueError(
            f"the training stream gives {len(train_loader)} batch(es) of {recipe.batch_size} per device, "
            f"fewer than accum_steps={recipe.accum_steps}: lower batch_size"
        )
    return train_loader, val_loader


def build_loaders(recipe: Recipe, train: Dataset, val: Dataset, rank: int, world: int, device: torch.device):
    """``(train_loader, val_loader)``; the train loader's sampler is a :class:`SeededSampler`, or, for a
    WebDataset, its dataset is a :class:`SeededStream` (both have ``set_epoch(epoch, skip)``)."""
    if isinstance(train, IterableDataset):
        return _build_stream_loaders(recipe, train, val, device)
    train_tf, val_tf = build_transforms(recipe)
    if recipe.aug_repeats > 0:
        from timm.data.distributed_sampler import RepeatAugSampler

        inner = RepeatAugSampler(train, num_replicas=world, rank=rank, num_repeats=recipe.aug_repeats)
    else:
        inner = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=recipe.seed)
    sampler = SeededSampler(inner, recipe.seed, rank, world)
    pin = device.type == "cuda"
    workers = recipe.workers
    train_loader = DataLoader(
        SeededDataset(train, train_tf),
        batch_size=recipe.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(recipe.seed),  # iterators must not draw from the global RNG
    )
    val_loader = DataLoader(
        SeededDataset(val, val_tf),
        batch_size=recipe.batch_size,
        sampler=ShardSampler(len(val), rank, world),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    if len(train_loader) < recipe.accum_steps:
        raise ValueError(
            f"the training set gives {len(train_loader)} batch(es) of {recipe.batch_size} per device, "
            f"fewer than accum_steps={recipe.accum_steps}: lower batch_size"
        )
    return train_loader, val_loader


def build_mixup(recipe: Recipe, num_classes: int) -> Mixup | None:
    """timm's batch-level ``Mixup`` (mixup/cutmix + label smoothing) or ``None`` when off."""
    if not recipe.mixup_active:
        return None
    return Mixup(
        mixup_alpha=recipe.mixup,
        cutmix_alpha=recipe.cutmix,
        prob=recipe.mixup_prob,
        switch_prob=recipe.mixup_switch_prob,
        mode=recipe.mixup_mode,
        label_smoothing=recipe.smoothing,
        num_classes=num_classes,
    )
