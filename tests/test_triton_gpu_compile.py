"""Every Triton kernel compiles for an H100 (sm_90), checked on this GPU-less machine.

The CPU interpreter checks the kernels' arithmetic but never lowers them, and the CUDA tests only run
where a GPU is lent: a kernel that only the GPU compiler rejects (a dot shape or layout it cannot
lower, too much shared memory) would go unnoticed. ``tests/sm90_compile.py`` compiles each op's
kernels, forward and backward, in bf16 and fp32, with the configurations their launchers choose.
(Large-kernel attention has its own such test, in tests/test_large_kernel_attention.py.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton.backends

KERNELS = {
    "neighborhood_attention": {"_na_fwd_kernel", "_na_bwd_dq_kernel", "_na_bwd_dkdv_kernel"},
    "bilevel_routing_attention": {"_bra_fwd_kernel", "_bra_bwd_dq_kernel", "_bra_bwd_dkdv_kernel"},
    "agent_attention": {"_aggregate_fwd", "_broadcast_fwd", "_broadcast_bwd", "_aggregate_bwd"},
    "attention_with_key_mass": {"_key_mass_fwd", "_key_mass_accumulate"},
    "visual_sink_attention": {"_visual_sink_fwd"},
}


@pytest.mark.parametrize("op", sorted(KERNELS))
def test_kernels_compile_for_sm90(op):
    if "nvidia" not in triton.backends.backends:
        pytest.fail("triton has no NVIDIA backend here: it is needed to compile for a GPU target")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the parent runs interpreted
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sm90_compile", op],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        word, name = line.split()
        if word == "dtype":
            current = compiled.setdefault(name, set())
        else:
            current.add(name)
    assert compiled == {"bfloat16": KERNELS[op], "float32": KERNELS[op]}
