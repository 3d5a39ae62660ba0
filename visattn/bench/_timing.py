"""Timing and memory measurement shared by the benchmarks, and a plain-text table printer."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Measurement:
    """Median wall time of one call in milliseconds and the peak memory it allocated."""

    ms: float
    peak_mib: float | None

    def __str__(self) -> str:
        mem = "-" if self.peak_mib is None else f"{self.peak_mib:.1f}"
        return f"{self.ms:.3f} ms / {mem} MiB"


def measure(
    fn: Callable[[], object], device: torch.device | str, warmup: int = 3, iters: int = 10
) -> Measurement:
    """Run ``fn`` ``warmup`` times, then time ``iters`` calls; report the median.

    On CUDA the calls are synchronised and the peak memory above what was
    allocated before the first timed call is reported; on CPU one more, untimed call
    runs under the profiler to find its peak (``cpu_peak_mib``).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else cpu_peak_mib(fn)
    return Measurement(ms=times[len(times) // 2], peak_mib=peak)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (the profiler's C++ side logs every start and stop there)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Peak CPU memory one call of ``fn`` allocates above what was allocated before it, in MiB: the
    running sum of the allocation and free events ``torch.profiler`` records."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _stderr_silenced(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


_COLLECTED: list[list[dict]] = []  # one list per active collect_tables() block


@contextlib.contextmanager
def collect_tables() -> Iterator[list[dict]]:
    """Within the block every :func:`print_table` call is also recorded, as
    ``{"title", "headers", "rows"}`` (cells as strings), in the list this yields."""
    tables: list[dict] = []
    _COLLECTED.append(tables)
    try:
        yield tables
    finally:
        _COLLECTED.remove(tables)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """Print (and return) a left-aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for tables in _COLLECTED:
        tables.append({"title": title or "", "headers": cells[0], "rows": cells[1:]})
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for i, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def ratio(baseline: Measurement | None, candidate: Measurement | None) -> str:
    """``baseline.ms / candidate.ms`` formatted as a speed-up, or ``-`` when either is missing."""
    if baseline is None or candidate is None or candidate.ms == 0:
        return "-"
    return f"{baseline.ms / candidate.ms:.2f}x"


def measure_or_none(fn: Callable[[], Measurement]) -> Measurement | None:
    """``fn()``, or None (after printing why) when the implementation cannot run this case."""
    try:
        return fn()
    except (RuntimeError, ValueError, torch.OutOfMemoryError) as err:
        print(f"  n/a: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)
        return None


def fmt_ms(m: Measurement | None) -> str:
    """Milliseconds with 3 decimals, ``n/a`` for a case that did not run."""
    return "n/a" if m is None else f"{m.ms:.3f}"


def fmt_mem(m: Measurement | None) -> str:
    """Peak MiB, ``-`` where memory is not measured, ``n/a`` for a case that did not run."""
    return "n/a" if m is None else ("-" if m.peak_mib is None else f"{m.peak_mib:.1f}")
