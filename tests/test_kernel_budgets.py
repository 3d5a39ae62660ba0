"""Resource budget of every Triton kernel on an H100 (sm_90), from the compiler, without a GPU.

``python -m visattn.bench.kernels --check`` compiles each op's kernels at the benchmark shapes
(bf16, forward and backward) and reads registers and spills from ``ptxas -v`` (Triton's flags) and
the shared memory from Triton: no kernel may spill or fit fewer than two blocks per SM unless it
is listed in ``visattn.bench.kernels.EXCEPTIONS`` with its measured reason, and no listed exception
may be stale. A subprocess, because this one runs Triton interpreted.
"""

import os
import subprocess
import sys
from pathlib import Path

from tests.test_triton_gpu_compile import KERNELS

LKA_KERNELS = {"_dw_chain_kernel", "_pointwise_gate_kernel", "_dwconv_kernel", "_dwconv_wgrad_kernel"}


def test_every_kernel_within_budget_at_benchmark_shapes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "visattn.bench.kernels", "--check"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "`" in line]
    compiled = {cells[2].strip().strip("`") for cells in rows}
    assert compiled == set().union(*KERNELS.values()) | LKA_KERNELS
    cases = {cells[1].split()[0] for cells in rows}
    assert cases == {"na", "bra", "lka", "agent", "key-mass", "visual-sink"}
