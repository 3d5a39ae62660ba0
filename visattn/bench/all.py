"""Run every benchmark in one process and save all their tables as JSON (``--json results.json``).

On a GPU (the default when CUDA is available) each benchmark runs at its own default, full-size
shapes: the ops (neighborhood, bi-level routing, agent and large-kernel attention, each beside its
baselines: SDPA, flex_attention, the official-style implementations, NATTEN when installed; forward
and forward+backward, time and peak memory), the LLaVA token reducers, the Stable Diffusion agent
patch, model training steps and model forward throughput beside the official-style twins.
``--plan dry`` (the default on CPU) runs the same code at small shapes and one iteration, a check
that nothing has rotted rather than a measurement; ``--plan cpu-goals`` measures the CPU goals at
their real shapes. A benchmark that fails is recorded with its error and the run goes on.
``visattn bench report results.json`` turns the file into markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback

import torch

from visattn.bench._timing import collect_tables

MODELS = ("swin_tiny_patch4_window7_224", "nat_tiny", "dinat_tiny", "biformer_s", "van_b2", "agent_swin_tiny")

# (benchmark, its arguments): full size on a GPU ...
GPU_PLAN: list[tuple[str, list[str]]] = [
    ("na", []),
    ("na", ["--rpb"]),
    ("bra", []),
    ("agent", []),
    ("lka", []),
    *[
        ("mllm", ["--family", family])
        for family in ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
    ],
    ("sd", []),
    ("train", ["--model", *MODELS, "--batch-size", "64", "--iters", "5"]),
    ("models", ["--batch", "64", "--iters", "10"]),
]
# ... and small, one iteration, on CPU.
DRY_PLAN: list[tuple[str, list[str]]] = [
    ("na", ["--case", "nat 7x7", "--iters", "1"]),
    ("bra", ["--img-size", "112", "--model-batch", "1", "--iters", "1"]),
    ("agent", ["--case", "pvt-t s4", "--batch", "1", "--iters", "1"]),
    ("lka", ["--img-size", "32", "--batch", "1", "--warmup", "0", "--iters", "1"]),
    ("mllm", ["--batches", "1", "--keep", "64", "--decode-tokens", "2", "--warmup", "0", "--iters", "1"]),
    ("sd", ["--batch", "1", "--latent", "16", "--warmup", "0", "--iters", "1"]),
    (
        "train",
        ["--model", "nat_tiny", "van_b2", "--tiny", "--batch-size", "2", "--warmup", "0", "--iters", "1"],
    ),
    (
        "models",
        ["--model", "biformer_s", "van_b2", "--tiny", "--img-size", "64", "--batch", "1", "--iters", "1"],
    ),
]
# ... and the project's CPU goals at their real shapes (``--plan cpu-goals``): NA's torch path beside dense
# SDPA, BRA's torch path beside the official-style gather at every BiFormer-S stage, model forward
# throughput (batch 4, 224x224, 2 threads) beside the official-style twins and timm's Swin-T; more timed
# iterations than the CPU defaults, so the medians hold on a machine with neighbours.
CPU_GOALS_PLAN: list[tuple[str, list[str]]] = [
    ("na", ["--iters", "15"]),
    ("bra", ["--img-size", "224", "--skip-model", "--iters", "15"]),
    ("models", ["--iters", "10"]),
]
PLANS = {"full": GPU_PLAN, "dry": DRY_PLAN, "cpu-goals": CPU_GOALS_PLAN}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--plan",
        choices=sorted(PLANS),
        help="full: every benchmark at full size (the default on CUDA); dry: small shapes, one iteration "
        "(the default on CPU); cpu-goals: the CPU goals at their real shapes",
    )
    parser.add_argument(
        "--dry-run", action="store_const", const="dry", dest="plan", help="same as --plan dry"
    )
    parser.add_argument("--only", default="", help="comma-separated benchmark names to run (default: all)")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run(args: argparse.Namespace) -> int:
    from visattn.bench import available

    benches = available()
    plan_name = args.plan or ("full" if args.device.startswith("cuda") else "dry")
    plan, dry = PLANS[plan_name], plan_name == "dry"
    only = {name for name in args.only.split(",") if name}
    unknown = only - {name for name, _ in plan}
    if unknown:
        raise SystemExit(f"visattn bench all: --only names no benchmark of this plan: {sorted(unknown)}")
    results = []
    for name, argv in plan:
        if only and name not in only:
            continue
        parser = argparse.ArgumentParser(prog=f"visattn bench {name}")
        benches[name].add_arguments(parser)
        bench_args = parser.parse_args([*argv, "--device", args.device])
        print(f"== visattn bench {name} {' '.join(argv)}", flush=True)
        start, error = time.perf_counter(), None
        with collect_tables() as tables:
            try:
                benches[name].run(bench_args)
            except Exception:  # recorded, and the remaining benchmarks still run
                error = traceback.format_exc(limit=3)
                print(error, flush=True)
        seconds = round(time.perf_counter() - start, 1)
        results.append({"bench": name, "args": argv, "seconds": seconds, "error": error, "tables": tables})
    header = {
        "device": _device_name(args.device),
        "dry_run": dry,
        "plan": plan_name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(args.json, "w") as f:
        json.dump({**header, "results": results}, f, indent=1)
    failed = [r["bench"] for r in results if r["error"]]
    print(f"wrote {args.json}: {len(results)} benchmarks, {len(failed)} failed {failed or ''}".rstrip())
    return 1 if failed else 0
