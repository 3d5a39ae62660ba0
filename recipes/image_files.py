"""The images of an ImageNet-style folder or tar, decoded here rather than in timm's dataset.

timm's ``ImageDataset`` replaces an image it cannot decode by the next one and logs ``Skipped sample
(index 41). Truncated File Read``: no file, and again every epoch. :class:`ImageFiles` keeps that
replacement but names the file, once per run.
"""

from __future__ import annotations

import io
import os
import warnings

import torch
from PIL import Image
from timm.data import create_dataset
from torch.utils.data import Dataset

# as timm's dataset: this many unreadable images in a row end the run instead of being skipped
MAX_CONSECUTIVE = 10


class ImageFiles(Dataset):
    """``(RGB PIL image, class index)`` of the images under ``root`` (a ``<class>/<image>`` folder or a tar
    of such members), listed by timm's reader in timm's order.

    An image that PIL cannot decode (truncated, corrupt) is replaced by the next one of the split, as timm
    does, with a ``UserWarning`` naming the file once per process, however many epochs and loader workers
    meet it (the flags are in shared memory, which the workers share).
    """

    def __init__(self, root: str | os.PathLike, class_map: dict[str, int]) -> None:
        self.files = create_dataset(
            "", root=str(root), search_split=False, class_map=class_map, load_bytes=True
        )
        self.reader = self.files.reader
        self.reported = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.files)

    def filename(self, index: int) -> str:
        """The image's path; ``TAR: MEMBER`` inside a tar."""
        name = self.files.filename(index, absolute=True)
        return f"{self.reader.root}: {name}" if os.path.isfile(self.reader.root) else name

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for step in range(min(MAX_CONSECUTIVE, len(self))):
            i = (index + step) % len(self)
            data, target = self.files[i]
            try:
                with Image.open(io.BytesIO(data)) as img:
                    return img.convert("RGB"), target
            except OSError as exc:
                if not self.reported[i]:
                    self.reported[i] = True
                    warnings.warn(
                        f"unreadable image {self.filename(i)} ({exc}): skipped, the next image of the split "
                        "takes its place (said once per run)",
                        stacklevel=2,
                    )
        raise OSError(
            f"{MAX_CONSECUTIVE} images in a row from {self.filename(index)} on cannot be read: "
            "is the dataset damaged?"
        )
