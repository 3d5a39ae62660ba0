"""Test set-up: Triton kernels run under the CPU interpreter when there is no GPU."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: kernels decorated afterwards run interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs tiny models in two xdist workers on a 2-core machine: intra-op threads only
# spin on such small ops (measured 4x slower with 2 threads per worker), so use one per worker.
torch.set_num_threads(1)

# Outputs of the official implementations on reduced configs (README.md there says how they were made).
CONFORMANCE_DIR = Path(__file__).resolve().parent / "fixtures" / "conformance"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def conformance_dir() -> Path:
    """``tests/fixtures/conformance``: official-model fixtures shipped with the repository."""
    return CONFORMANCE_DIR


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def attn(request, monkeypatch) -> str:
    """Attention implementation of the tiny LLaVA tests (parametrize ``attn`` with ``indirect=True``).

    ``"flash_attention_2"`` runs transformers' flash path on the torch kernels of tests/flash_reference.py.
    """
    if request.param.startswith("flash_attention"):
        from tests import flash_reference

        flash_reference.install(monkeypatch)
    return request.param
