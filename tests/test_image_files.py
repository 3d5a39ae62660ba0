"""Unreadable images in an ImageNet-style folder or tar: skipped, named, and reported once per run."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visattn.recipes.config import load_recipe
from visattn.recipes.data import build_datasets


def _folder(root, truncated: str):
    """train/ and val/ with 2 classes x 4 32x32 PNGs; ``truncated`` (``split/class/name``) loses its tail."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")
    path = root / truncated
    path.write_bytes(path.read_bytes()[:200])
    return path


def _recipe(workers: int):
    overrides = [
        "dataset=",
        "input_size=32",
        "batch_size=2",
        "workers=" + str(workers),
        "aa=none",
        "reprob=0",
    ]
    return load_recipe("digits", overrides)


# in a process of its own: pytest records warnings, and its recorder is what forked loader workers inherit
_THREE_EPOCHS = """
import sys, torch
from tests.test_image_files import _recipe
from visattn.recipes.data import build_datasets, build_loaders
recipe = _recipe(workers=2)
train, val, _ = build_datasets(recipe, sys.argv[1])
loader, _ = build_loaders(recipe, train, val, rank=0, world=1, device=torch.device("cpu"))
for epoch in range(3):
    loader.sampler.set_epoch(epoch)
    print(sum(len(y) for _, y in loader))
"""


def test_a_truncated_image_is_named_once_over_epochs_and_workers(tmp_path):
    bad = _folder(tmp_path, "train/c1/2.png")
    done = subprocess.run(
        [sys.executable, "-c", _THREE_EPOCHS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8", "8", "8"]  # the skipped image's place is taken by the next one
    assert done.stderr.count(str(bad)) == 1, done.stderr
    assert "Skipped sample" not in done.stderr and "unreadable image" in done.stderr, done.stderr


def test_a_truncated_member_of_a_tar_names_the_tar_and_the_member(tmp_path):
    folder = tmp_path / "folder"
    _folder(folder, "val/c0/1.png")
    for split in ("train", "val"):
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tf:
            for cls in sorted((folder / split).iterdir()):
                tf.add(cls, arcname=cls.name)
    _, val, _ = build_datasets(_recipe(workers=0), tmp_path)
    with pytest.warns(UserWarning, match=r"unreadable image .*val\.tar: c0/1\.png") as record:
        images = [val[i] for i in range(len(val))] + [val[1]]
    assert len(record) == 1 and len(images) == 9
    np.testing.assert_array_equal(np.asarray(images[1][0]), np.asarray(val[2][0]))  # the next one, as timm
