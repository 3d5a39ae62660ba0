"""Timing and memory measurement shared by the benchmarks, and a plain-text table printer."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

# measure_side_by_side times a step this many times slower than the fastest on its own
ISOLATE_FACTOR = 20.0


@dataclass
class Measurement:
    """Median wall time of one call in milliseconds and the peak memory it allocated."""

    ms: float
    peak_mib: float

    def __str__(self) -> str:
        return f"{self.ms:.3f} ms / {self.peak_mib:.1f} MiB"


def measure(
    fn: Callable[[], object], device: torch.device | str, warmup: int = 3, iters: int = 10
) -> Measurement:
    """Run ``fn`` ``warmup`` times, then time ``iters`` calls; report the median and the peak memory
    one more call allocates above what was allocated before it (the CUDA allocator's peak; on CPU
    the profiler's, ``cpu_peak_mib``). CUDA calls are synchronised."""
    return measure_interleaved([fn], device, warmup=warmup, iters=iters)[0]


def measure_interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device | str, warmup: int = 3, iters: int = 10
) -> list[Measurement]:
    """:func:`measure` for several implementations at once, their calls taking turns (forwards, then
    backwards), so that a slow spell of a shared machine hits every one of them alike; one
    :class:`Measurement` per function."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(iters):
        # every other round runs backwards, so no implementation always runs right after the same one
        for i in range(len(fns)) if round_ % 2 == 0 else reversed(range(len(fns))):
            times[i].append(_call_ms(fns[i], device))
    return [
        Measurement(ms=sorted(spent)[len(spent) // 2], peak_mib=_peak_mib(fn, device))
        for fn, spent in zip(fns, times)
    ]


def _call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in milliseconds (CUDA work synchronised on both sides)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def error_note(exc: BaseException) -> str:
    """``"n/a: <type>: <first line of the message>"``, whole (a table widens for it rather than cut it)."""
    lines = str(exc).splitlines()
    return f"n/a: {type(exc).__name__}" + (f": {lines[0]}" if lines else "")


def measure_side_by_side(
    steps: Sequence[Callable[[], object] | str], device: torch.device | str, warmup: int = 3, iters: int = 10
) -> tuple[list[Measurement | None], list[str]]:
    """:func:`measure_interleaved` over the implementations of one case that can run it: each step is
    called once first; a string in place of a step is the reason it is not run (note ``"skipped:
    <reason>"``), and a step that raises is left out (its measurement ``None``, :func:`error_note` as its
    note; a baseline that cannot run a case is reported, not fatal). Steps ``ISOLATE_FACTOR`` times
    slower than the fastest take turns among themselves, after the others."""
    notes = [f"skipped: {step}" if isinstance(step, str) else "" for step in steps]
    for i, step in enumerate(steps):
        if notes[i]:
            continue
        try:
            step()
        except Exception as exc:  # any failure of a baseline is a row of the table, not a crash
            notes[i] = error_note(exc)
    running = [i for i, note in enumerate(notes) if not note]
    # one more call each, timed, to set apart the steps far slower than the fastest: they are timed on
    # their own, after the others, since such a call leaves the machine cold for whoever runs next (on 2
    # CPU cores, the two calls after a 13 ms flex_attention eager call took 1.5-3x their time)
    probe = {i: _call_ms(steps[i], torch.device(device)) for i in running}
    fastest = min(probe.values(), default=0.0)
    slow = [i for i in running if probe[i] > ISOLATE_FACTOR * fastest]
    together = [i for i in running if i not in slow]
    timed = measure_interleaved([steps[i] for i in together], device, warmup=warmup, iters=iters)
    timed += measure_interleaved([steps[i] for i in slow], device, warmup=warmup, iters=iters)
    results: list[Measurement | None] = [None] * len(steps)
    for i, m in zip(together + slow, timed):
        results[i] = m
    return results, notes


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory one call of ``fn`` allocates above what was allocated before it, in MiB."""
    if device.type != "cuda":
        return cpu_peak_mib(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


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
        print(f"  {error_note(err)}", flush=True)
        return None


def fmt_ms(m: Measurement | None) -> str:
    """Milliseconds with 3 decimals, ``n/a`` for a case that did not run."""
    return "n/a" if m is None else f"{m.ms:.3f}"


def time_mem_cells(m: Measurement | None) -> list[str]:
    """``[ms with 3 decimals, whole MiB]`` table cells, ``-`` for a provider not run."""
    if m is None:
        return ["-", "-"]
    return [f"{m.ms:.3f}", f"{m.peak_mib:.0f}"]


def fmt_mem(m: Measurement | None) -> str:
    """Peak MiB, ``n/a`` for a case that did not run."""
    return "n/a" if m is None else f"{m.peak_mib:.1f}"
