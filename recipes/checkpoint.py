"""Atomic checkpoints: write to a temp file, fsync, ``os.replace``; keep the last N and the best.

Checkpoints hold only what ``torch.load(..., weights_only=True)`` accepts (tensors, numbers,
strings, lists, dicts): RNG states are stored as tensors. Files in a run directory:
``ckpt-<step>.pth`` (the last ``keep_last`` of them) and ``best.pth`` (model weights of the
best validation top-1).

Checkpoints written by :class:`CheckpointManager` carry ``tensor_sha256``, a SHA-256 over every
tensor (and every other value) they hold; :func:`load` verifies it, so a file damaged after it was
written (a flipped block on disk, a bad copy) is refused with its name instead of training on.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt-(\d+)\.pth$")
CHECKSUM_KEY = "tensor_sha256"


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


def content_digest(obj: Any) -> str:
    """SHA-256 over ``obj``'s nested dicts/lists: key paths, tensor dtypes, shapes and bytes, other values'
    ``repr`` (dict order counts; ``torch.save``/``torch.load`` keep it)."""
    digest = hashlib.sha256()

    def feed(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{where}={t.dtype}{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key, item in value.items():
                feed(item, f"{where}/{key!r}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                feed(item, f"{where}[{i}]")
        else:
            digest.update(f"{where}={value!r};".encode())

    feed(obj, "")
    return digest.hexdigest()


def with_checksum(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` plus its :func:`content_digest` under ``tensor_sha256`` (verified by :func:`load`)."""
    body = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    return {**body, CHECKSUM_KEY: content_digest(body)}


def _cause_in(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The ``kind`` exception behind ``exc``: torch.save reports a failed write, and a Ctrl-C inside one,
    as a RuntimeError from its C++ writer (``enforce fail at inline_container.cc``) on top."""
    while exc is not None:
        if isinstance(exc, kind) and (kind is not OSError or exc.errno is not None):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` so that a reader sees the old file or the complete new one, never half.

    A failed write (disk full, no permission) raises ``OSError`` naming the file and the cause.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            if _cause_in(exc, KeyboardInterrupt) is not None:
                raise KeyboardInterrupt from None
            cause = _cause_in(exc, OSError)
            if cause is None:
                raise
            hint = (
                "; free disk space or write the run elsewhere (--output)"
                if cause.errno == errno.ENOSPC
                else ""
            )
            raise OSError(cause.errno, f"cannot write checkpoint {path}: {cause.strerror}{hint}") from exc
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


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; ``ValueError`` naming ``path`` when it is not a checkpoint
    (text, a truncated or foreign file) or when its ``tensor_sha256`` does not match its content."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors: all mean "not a checkpoint we can read"
        problem = " ".join(str(exc).split())[:300]
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {problem}); "
            "expected a file written by torch.save (visattn train, or a paper's release)"
        ) from exc
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
        if content_digest(body) != obj[CHECKSUM_KEY]:
            raise ValueError(
                f"checkpoint {path} is damaged: its content does not match the checksum written with it "
                "(use an older checkpoint, or retrain)"
            )
    return obj


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
        path = atomic_save(with_checksum(state), self.run_dir / f"ckpt-{step:08d}.pth")
        for _, old in list_checkpoints(self.run_dir)[self.keep_last :]:
            old.unlink(missing_ok=True)
        for stale in self.run_dir.glob(".ckpt-*.pth.tmp*"):
            stale.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        return atomic_save(with_checksum(state), self.run_dir / "best.pth")

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, or ``None`` when there is none. A damaged newer one is
        skipped with a warning that names it; ``ValueError`` when every one is damaged."""
        errors = []
        for _, path in list_checkpoints(self.run_dir):
            try:
                found = path, load(path, map_location)
            except ValueError as exc:  # a damaged file: fall back to the previous one
                errors.append(str(exc))
                continue
            for message in errors:
                warnings.warn(f"--resume auto skipped a damaged checkpoint: {message}", stacklevel=2)
            return found
        if errors:
            raise ValueError(f"no loadable checkpoint in {self.run_dir}: " + "; ".join(errors))
        return None
