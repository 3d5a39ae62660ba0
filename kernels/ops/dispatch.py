"""Backend selection shared by every op in :mod:`visattn.kernels`: one policy for all of them.

- ``backend="reference"`` runs the op's readable PyTorch computation in ``visattn.kernels.reference``
  (the oracle the other backends are tested against).
- ``backend="torch"`` runs the op's fastest pure-PyTorch path (SDPA-based where one exists, else the
  reference; docs/kernels.md has the table).
- ``backend="auto"`` runs the Triton kernels on CUDA tensors and the ``torch`` path everywhere else, and
  also falls back to PyTorch when the inputs hit a capability limit of the kernels (a dtype, a head dim,
  a grid size): ``auto`` never raises for a limit.
- ``backend="triton"`` runs the kernels or raises a ``ValueError`` naming the limit or the missing
  device. On CPU tensors it is honoured only under the Triton interpreter (``TRITON_INTERPRET=1`` set
  before the first ``import triton``), which is how the test-suite runs the kernels without a GPU.

Each op states its limits with :func:`triton_limit` and passes the answer to :func:`resolve_backend`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Literal

import torch

Backend = Literal["auto", "reference", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_AXIS = 65535  # CUDA's limit on grid axes 1 and 2

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def cuda_tensors(*tensors: torch.Tensor) -> bool:
    """True when there are tensors and all of them live on a CUDA device."""
    return bool(tensors) and all(t.is_cuda for t in tensors)


def triton_limit(
    dtype: torch.dtype,
    head_dims: Sequence[int] = (),
    max_head_dim: int | None = None,
    grid_axis: int | None = None,
    grid_axis_name: str = "batch * heads",
) -> str | None:
    """The first capability limit of a Triton kernel that these inputs hit, phrased to follow
    ``"backend='triton' "`` in an error message, or None when the kernels can take them."""
    if dtype not in TRITON_DTYPES:
        return f"supports float16/bfloat16/float32, got {str(dtype).removeprefix('torch.')}"
    if max_head_dim is not None and head_dims and max(head_dims) > max_head_dim:
        return f"supports head dims <= {max_head_dim}, got {', '.join(map(str, head_dims))}"
    if grid_axis is not None and grid_axis > MAX_GRID_AXIS:
        return f"supports {grid_axis_name} <= {MAX_GRID_AXIS} (one grid axis), got {grid_axis}"
    return None


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str, limit: str | None = None) -> str:
    """Turn a user ``backend`` argument into ``"triton"``, ``"torch"`` or ``"reference"`` (policy in the
    module docstring; ``auto`` never picks ``reference``).

    ``limit``: why the op's Triton kernels cannot take these inputs (from :func:`triton_limit` or the
    op's own check), or None. Raises ``ValueError`` naming the reason when ``backend="triton"`` cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("reference", "torch"):
        return backend
    if backend == "auto":
        return "triton" if cuda_tensors(*tensors) and triton_available() and not limit else "torch"
    if not triton_available():
        raise ValueError(f"{op}: backend='triton' needs the 'triton' package, which is not installed")
    on_device = cuda_tensors(*tensors) or (
        interpreter_enabled() and all(t.device.type == "cpu" for t in tensors)
    )
    if not on_device:
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (got {', '.join(devices)}); on CPU it runs only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton), otherwise use "
            "backend='torch', 'reference' or 'auto'"
        )
    if limit:
        raise ValueError(f"{op}: backend='triton' {limit}; use backend='auto', 'torch' or 'reference'")
    return "triton"
