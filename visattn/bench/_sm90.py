"""Compile Triton kernels for an H100 (sm_90) on any machine, GPU or not, and read their budgets.

:func:`compile_only` replaces Triton's driver by a stand-in whose target is sm_90 and turns every
kernel launch into a compile-only warmup, so running a public op with ``backend="triton"`` on CPU
tensors lowers each of its kernels to a cubin with the arguments and constexprs its launcher really
picks (the tensors stay unwritten). Each compilation is recorded with what ``ptxas -v`` reports under
Triton's own flags (registers, spill bytes) and Triton's shared-memory size. Needs a process without
``TRITON_INTERPRET`` (the interpreter never lowers kernels).
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from dataclasses import dataclass

from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# Hopper (sm_90) per-SM limits, CUDA occupancy calculator: 64 K registers in 4 sub-partitions,
# allocated per warp in units of 256; 228 KB of shared memory with 1 KB reserved per block;
# 64 resident warps and 32 resident blocks.
SM90_REGS_PER_PARTITION = 16384
SM90_SHARED_PER_SM = 233472
SM90_SHARED_RESERVED = 1024
SM90_MAX_WARPS = 64
SM90_MAX_BLOCKS = 32


@dataclass
class Compiled:
    """One kernel lowered for sm_90: ``ptxas -v`` registers and spills, shared memory, warps."""

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    warps: int

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM allowed by registers, shared memory and warps (the smallest)."""
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = 4 * (SM90_REGS_PER_PARTITION // regs_per_warp) // self.warps
        by_smem = SM90_SHARED_PER_SM // (self.shared + SM90_SHARED_RESERVED)
        return min(by_regs, by_smem, SM90_MAX_WARPS // self.warps, SM90_MAX_BLOCKS)


class _StandInGPU:
    """The part of a Triton driver that compilation asks for: an sm_90 target, device 0."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _parse(log: str, kernel, name: str) -> Compiled:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"{name}: no register/spill line in the ptxas log:\n{log}")
    meta = kernel.metadata
    return Compiled(name, int(regs[1]), int(spills[1]), int(spills[2]), int(meta.shared), int(meta.num_warps))


def compile_only(record: list[Compiled] | None = None) -> None:
    """From now on, launches in this process compile for sm_90 instead of running; each launch
    appends its kernel's :class:`Compiled` to ``record`` (a cached kernel repeats its first entry)."""
    driver.set_active(_StandInGPU())
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's -v output after each compilation
    knobs.cache.dir = tempfile.mkdtemp(prefix="visattn-sm90-")  # a cache hit would run no ptxas
    run = JITFunction.run
    seen: dict[int, Compiled] = {}

    def warmup(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if "cubin" not in kernel.asm:
            raise RuntimeError(f"{self.fn.__name__}: no cubin")
        if id(kernel) not in seen:
            seen[id(kernel)] = _parse(log.getvalue(), kernel, self.fn.__name__)
        if record is not None:
            record.append(seen[id(kernel)])
        return kernel

    JITFunction.run = warmup
