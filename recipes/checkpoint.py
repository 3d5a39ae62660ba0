"""Atomic checkpoints: write to a temp file, fsync, ``os.replace``; keep the last N and the best.

Checkpoints hold only what ``torch.load(..., weights_only=True)`` accepts (tensors, numbers,
strings, lists, dicts): RNG states are stored as tensors. Files in a run directory:
``ckpt-<step>.pth`` (the last ``keep_last`` of them) and ``best.pth`` (model weights of the
best validation top-1).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt-(\d+)\.pth$")


def capture_rng() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states, as tensors and plain numbers."""
    py_version, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": int(py_version),
        "python_keys": torch.tensor(py_keys, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    random.setstate(
        (state["python_version"], tuple(int(k) for k in state["python_keys"]), state["python_gauss"])
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` so that a reader sees the old file or the complete new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the step checkpoints in ``run_dir``, newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


class CheckpointManager:
    """Write step checkpoints and ``best.pth`` into ``run_dir``; keep the newest ``keep_last``."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``ckpt-<step>.pth``, then drop older step checkpoints beyond ``keep_last`` and temp
        files left by a writer that was killed mid-write."""
        path = atomic_save(state, self.run_dir / f"ckpt-{step:08d}.pth")
        for _, old in list_checkpoints(self.run_dir)[self.keep_last :]:
            old.unlink(missing_ok=True)
        for stale in self.run_dir.glob(".ckpt-*.pth.tmp*"):
            stale.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        return atomic_save(state, self.run_dir / "best.pth")

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, or ``None`` when there is none."""
        errors = []
        for _, path in list_checkpoints(self.run_dir):
            try:
                return path, load(path, map_location)
            except Exception as exc:  # a damaged file: fall back to the previous one
                errors.append(f"{path.name}: {exc}")
        if errors:
            raise RuntimeError(f"no loadable checkpoint in {self.run_dir}: " + "; ".join(errors))
        return None
