"""`visattn bench all --json` and `visattn bench report` on CPU: the dry run (small shapes, one
iteration) of every benchmark, so that the one-command GPU run cannot rot unnoticed."""

import argparse
import json

import pytest
import torch

from visattn.bench import available
from visattn.bench.all import DRY_PLAN, PLANS
from visattn.cli import main


def test_bench_all_dry_run_and_report(tmp_path, capsys):
    results, report = tmp_path / "results.json", tmp_path / "benchmarks.md"
    assert main(["bench", "all", "--json", str(results), "--device", "cpu"]) == 0
    data = json.loads(results.read_text())
    assert data["dry_run"] and [r["bench"] for r in data["results"]] == [name for name, _ in DRY_PLAN]
    for run in data["results"]:
        assert run["error"] is None, run["error"]
        assert run["tables"] and all(t["rows"] for t in run["tables"]), run["bench"]
        assert all(len(row) == len(t["headers"]) for t in run["tables"] for row in t["rows"])
    assert main(["bench", "report", str(results), "--out", str(report)]) == 0
    text = report.read_text()
    assert text.startswith("## visattn bench all: CPU") and "dry run" in text
    for name, argv in DRY_PLAN:
        assert f"### `visattn bench {name} {' '.join(argv)}`" in text
    first = data["results"][0]["tables"][0]
    assert "| " + " | ".join(first["headers"]) + " |" in text
    assert "| " + " | ".join(first["rows"][0]) + " |" in text


def test_report_refuses_a_file_that_is_not_bench_all_output(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('{"results": 3}')
    try:
        main(["bench", "report", str(bad)])
    except SystemExit as exit_:
        assert "cannot read" in str(exit_.code)
    else:
        raise AssertionError("report accepted a malformed file")


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_every_plan_entry_parses_with_its_benchmark(plan):
    """Plans that only run on a GPU or for minutes (full, cpu-goals) still name arguments that exist."""
    benches = available()
    for name, argv in PLANS[plan]:
        parser = argparse.ArgumentParser(prog=f"visattn bench {name}")
        benches[name].add_arguments(parser)
        parser.parse_args([*argv, "--device", "cpu"])


def test_cpu_peak_memory_counts_what_one_call_holds_at_once():
    """Two 4 MiB buffers alive together, a third after one is freed: the peak is 8 MiB, not 12."""
    from visattn.bench._timing import cpu_peak_mib, measure

    def step():
        a = torch.ones(1 << 20)  # 4 MiB of fp32
        b = a * 2
        del a
        return (b + 1).sum()

    assert cpu_peak_mib(step) == pytest.approx(8.0, abs=0.01)
    assert measure(step, "cpu", warmup=1, iters=2).peak_mib == pytest.approx(8.0, abs=0.01)


def test_side_by_side_times_a_far_slower_step_on_its_own():
    """Steps take turns, except one ISOLATE_FACTOR times slower than the fastest: its timed calls all come
    after the others' (a long call leaves the machine cold for the next one); failing steps get a note."""
    import time

    from visattn.bench._timing import ISOLATE_FACTOR, measure_side_by_side

    calls = []

    def step(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)

        return run

    long = "FlexAttention does not support backward on CPU. Please set the input requires_grad to False"

    def broken():
        raise RuntimeError(f"{long}\nsecond line")

    fast = 0.001
    steps = [step("a", fast), step("slow", fast * ISOLATE_FACTOR * 3), "needs CUDA", broken, step("b", fast)]
    results, notes = measure_side_by_side(steps, "cpu", warmup=1, iters=3)
    # why a step did not run, and the whole first line of an error (a note was cut at 70 characters)
    assert notes == ["", "", "skipped: needs CUDA", f"n/a: RuntimeError: {long}", ""]
    assert results[2] is None and results[3] is None
    assert results[1].ms > results[0].ms * ISOLATE_FACTOR and results[4].ms < results[1].ms
    # warmup (1), iters (3, every other round backwards) and one peak-memory call each: a and b in
    # turns, then slow alone
    assert calls[-(2 * 5 + 5) :] == ["a", "b", "a", "b", "b", "a", "a", "b", "a", "b"] + ["slow"] * 5
