"""Eager against ``torch.compile`` (inductor) for ``bench models --compile`` and ``bench train --compile``.

Both build two copies of a model with the same weights, compile one with ``torch.compile(model)``
(inductor, the default mode, as timm's ``train.py --torchcompile`` does), time its first call (tracing
and inductor's code generation included: the compile seconds), then time the two copies taking turns
(:func:`~visattn.bench._timing.measure_interleaved`), so a ratio holds on a machine whose speed drifts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from visattn.bench._timing import Measurement, measure_interleaved, ratio

COMPILE_HEADERS = ["eager img/s", "compiled img/s", "compiled vs eager", "compile s"]


@dataclass
class CompileComparison:
    """Eager and compiled timings of one step, the compiled copy's first call in seconds, and the
    largest difference of their outputs (None when the step returns no tensor)."""

    eager: Measurement
    compiled: Measurement
    compile_s: float
    max_diff: float | None

    def cells(self, batch: int) -> list[str]:
        """The :data:`COMPILE_HEADERS` cells for ``batch`` images a step."""
        speed = [f"{batch / (m.ms / 1e3):.1f}" for m in (self.eager, self.compiled)]
        return [*speed, ratio(self.eager, self.compiled), f"{self.compile_s:.1f}"]


def compare_compiled(
    build: Callable[[], torch.nn.Module],
    step: Callable[[torch.nn.Module], Callable[[], object]],
    device: torch.device | str,
    warmup: int,
    iters: int,
) -> CompileComparison:
    """``build()`` twice (it must give the same weights each time), compile the second copy, and time
    ``step(model)()`` of both. Dynamo's caches are reset before and after, so every model compiles from
    scratch and no compiled code outlives its row."""
    device = torch.device(device)
    eager_step = step(build())
    torch._dynamo.reset()
    compiled_step = step(torch.compile(build()))
    start = time.perf_counter()
    compiled_out = compiled_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - start
    eager_out = eager_step()
    max_diff = None
    if isinstance(eager_out, torch.Tensor) and isinstance(compiled_out, torch.Tensor):
        max_diff = (eager_out.float() - compiled_out.float()).abs().max().item()
    eager, compiled = measure_interleaved([eager_step, compiled_step], device, warmup=warmup, iters=iters)
    torch._dynamo.reset()
    return CompileComparison(eager, compiled, compile_s, max_diff)
