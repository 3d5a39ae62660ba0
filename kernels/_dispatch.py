"""Backend selection shared by every op in :mod:`visattn.kernels`.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the PyTorch
reference everywhere else. ``backend="triton"`` on CPU tensors is honoured only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before the first
``import triton``), which is how the test-suite runs the kernels without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> str:
    """Turn a user ``backend`` argument into ``"triton"`` or ``"torch"``.

    Raises ``ValueError`` with the reason when the requested backend cannot run
    on the given tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError(f"{op}: backend='triton' needs the 'triton' package, which is not installed")
    if on_cuda:
        return "triton"
    if interpreter_enabled() and all(t.device.type == "cpu" for t in tensors):
        return "triton"
    devices = sorted({str(t.device) for t in tensors})
    raise ValueError(
        f"{op}: backend='triton' needs CUDA tensors (got {', '.join(devices)}); on CPU it runs only under "
        "the Triton interpreter (set TRITON_INTERPRET=1 before importing triton), otherwise use "
        "backend='torch' or 'auto'"
    )
