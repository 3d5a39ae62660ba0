"""The ``visattn`` lmms-eval model (visattn/integrations/lmms_eval.py) through lmms-eval's own command line,
on tiny random checkpoints of every supported family (tests/lmms_eval_tiny.py) and the local task
tests/lmms_eval_task/ (6 generated images, exact match). Needs ``visattn[eval]`` (.ci/lmms_eval.sh builds
that environment); skipped without lmms-eval.

Per family: lmms-eval's own class, the keep-everything reducer and a reducer that removes tokens at batch
1; the same two reducers at batch 2 where the base batches, and the refusal where it does not. The runs
go two at a time (one thread each), before the first test of the module."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed (.ci/lmms_eval.sh installs it)", allow_module_level=True)

from tests.lmms_eval_tiny import DEPTH, FAMILIES, TASK_DIR, save_tiny  # noqa: E402
from visattn.integrations.lmms_eval import BASES  # noqa: E402

LMMS_EVAL = str(Path(sys.executable).parent / "lmms-eval")
KEEP_ALL = "reducer=FastV,keep=1.0"
# family -> a reducer that removes tokens, and the visual tokens each of the DEPTH decoder layers must see
# for a sample of n visual tokens (the reducer's budget rule, docs/mllm_tokens.md)
REDUCING = {
    # 4 dominant + 2 contextual tokens replace the image before the LLM
    "llava": ("reducer=VisionZip,dominant=4,contextual=2", lambda n: [6] * DEPTH),
    # layers 0, 1 see all; from layer 2 on, half (rounded)
    "llava_next": ("reducer=FastV,layer=2,keep=0.5", lambda n: [n] * 2 + [round(n * 0.5)] * (DEPTH - 2)),
    # a quarter (rounded) before the LLM
    "llava_onevision": ("reducer=DivPrune,keep=0.25", lambda n: [round(n * 0.25)] * DEPTH),
    # from layer 2 on: the 2 image pivots, and each of the 4 pivots adds int(n * 0.5 / 4) tokens
    "qwen2_vl": (
        "reducer=DART,layer=2,keep=0.5,pivots_image=2,pivots_text=2",
        lambda n: [n] * 2 + [2 + 4 * int(n * 0.5 / 4)] * (DEPTH - 2),
    ),
    # stage 1 keeps int(n / 2), stage 2 int(n / 4)
    "qwen2_5_vl": (
        "reducer=PyramidDrop,layers=[1,2],ratio=0.5",
        lambda n: [n, int(n * 0.5)] + [int(n * 0.25)] * (DEPTH - 2),
    ),
}
BAD = "reducer=FastV,kep=1"
BATCHING = [family for family, (base, *_) in FAMILIES.items() if BASES[base][1] is None]
NOT_BATCHING = [family for family in FAMILIES if family not in BATCHING]


def _planned() -> list[tuple[str, str, int]]:
    runs = [(family, setting, 1) for family in FAMILIES for setting in ("plain", "keep", "reduce")]
    runs += [(family, setting, 2) for family in BATCHING for setting in ("keep", "reduce")]
    # the refusal is decided from base and batch_size before loading: one family of the base shows it
    return runs + [(NOT_BATCHING[0], "reduce", 2), ("llava", "bad", 1)]


class Run:
    """One lmms-eval run: its output, results file, logged samples and visattn stats file."""

    def __init__(self, out: Path, proc: subprocess.CompletedProcess):
        self.out, self.log = out, proc.stdout + proc.stderr
        results = sorted(out.glob("*/*_results.json"))
        self.results = json.loads(results[0].read_text()) if results else None
        samples = sorted(out.glob("*/*_samples_visattn_tiny.jsonl"))
        rows = [json.loads(line) for line in samples[0].read_text().splitlines()] if samples else []
        self.samples = sorted(rows, key=lambda r: r["doc_id"])
        stats = out / "visattn_stats.json"
        self.stats = json.loads(stats.read_text()) if stats.exists() else None

    @property
    def answers(self) -> list[str]:
        assert len(self.samples) == 6, self.log[-3000:]
        return [r["filtered_resps"] for r in self.samples]

    @property
    def rows(self) -> list[dict]:
        """The per-sample reducer stats of the task, in the order lmms-eval ran the samples."""
        assert self.stats is not None, self.log[-3000:]
        return self.stats["samples"]["visattn_tiny"]


def _command(family: str, setting: str, batch: int, checkpoint: Path, out: Path) -> list[str]:
    base, _, base_args = FAMILIES[family]
    model_args = f"pretrained={checkpoint},{base_args}"
    if setting != "plain":
        reducer = {"reduce": REDUCING[family][0], "keep": KEEP_ALL, "bad": BAD}[setting]
        model_args = f"base={base},{model_args},{reducer}"
    cmd = [
        LMMS_EVAL, "--model", base if setting == "plain" else "visattn", "--model_args", model_args,
        "--tasks", "visattn_tiny", "--include_path", str(TASK_DIR), "--device", "cpu",
        "--batch_size", str(batch), "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    if setting == "plain":
        cmd.append("--force_simple")  # the class visattn delegates to (llava_hf also has a chat one)
    return cmd


def _errors(run: Run) -> list[str]:
    """The plugin's error lines of a failed run (lmms-eval prints the traceback, then logs the message)."""
    lines = [line for line in run.log.splitlines() if line.startswith("ValueError: visattn:")]
    logged = [line for line in run.log.splitlines() if "Error during evaluation: visattn:" in line]
    assert len(logged) == len(lines), run.log[-3000:]
    return lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str, int], Run]:
    """Every planned lmms-eval run, by ``(family, setting, batch_size)``."""
    root = tmp_path_factory.mktemp("lmms_eval")
    checkpoints = {family: save_tiny(family, root / family) for family in FAMILIES}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"))
    env["OMP_NUM_THREADS"] = "1"  # two runs at a time on two cores

    def run(key: tuple[str, str, int]) -> Run:
        family, setting, batch = key
        out = root / f"{family}-{setting}-b{batch}"
        cmd = _command(family, setting, batch, checkpoints[family], out)
        proc = subprocess.run(cmd, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=600)
        return Run(out, proc)

    planned = _planned()
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(planned, pool.map(run, planned)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reduced_run_keeps_what_the_reducer_should(runs, family):
    run, kept_all = runs[family, "reduce", 1], runs[family, "keep", 1]
    assert run.results is not None, run.log[-3000:]
    scores = [r["exact_match"] for r in run.samples]
    assert scores == [float(r["filtered_resps"] == r["target"]) for r in run.samples]
    assert run.results["results"]["visattn_tiny"]["exact_match,none"] == pytest.approx(sum(scores) / 6)
    assert run.stats["reducer"].startswith(REDUCING[family][0].split(",")[0].removeprefix("reducer="))
    rows, expected = run.rows, REDUCING[family][1]
    assert len(rows) == 6
    # the same images reach the model as with the keep-everything reducer, and each keeps its budget
    tokens_in = [r["visual_tokens_in"] for r in rows]
    assert sorted(tokens_in) == sorted(r["visual_tokens_in"] for r in kept_all.rows) and min(tokens_in) > 0
    assert [r["kept_per_layer"] for r in rows] == [expected(n) for n in tokens_in]
    assert all(0 < r["prefill_flops_saved"] < r["prefill_flops"] for r in rows)
    means = run.stats["means"]["all"]
    assert means == run.stats["means"]["tasks"]["visattn_tiny"] and means["samples"] == 6
    for key in ("visual_tokens_in", "prefill_flops_saved", "prefill_flops_saved_ratio"):
        assert means[key] == pytest.approx(sum(r[key] for r in rows) / 6)
    kept = sum(sum(expected(n)) for n in tokens_in) / (6 * DEPTH)
    assert means["visual_tokens_kept"] == pytest.approx(kept)
    row = f"| visattn_tiny | 6 | {means['visual_tokens_in']:.1f} | {kept:.1f} |"
    assert row in run.log  # the printed table


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_everything_answers_as_the_plain_lmms_eval_model(runs, family):
    plain, kept = runs[family, "plain", 1], runs[family, "keep", 1]
    assert plain.stats is None and plain.results is not None, plain.log[-3000:]
    assert kept.answers == plain.answers
    rows = kept.rows
    assert len(rows) == 6 and all(r["kept_per_layer"] == [r["visual_tokens_in"]] * DEPTH for r in rows)
    assert all(r["prefill_flops_saved"] == 0 for r in rows)


@pytest.mark.parametrize("setting", ["keep", "reduce"])
@pytest.mark.parametrize("family", BATCHING)
def test_batch_2_answers_as_batch_1(runs, family, setting):
    one, two = runs[family, setting, 1], runs[family, setting, 2]
    assert two.answers == one.answers
    assert sorted(map(json.dumps, two.rows)) == sorted(map(json.dumps, one.rows))
    if setting == "keep":
        assert two.answers == runs[family, "plain", 1].answers


def test_a_base_that_does_not_batch_refuses_batch_2(runs):
    run = runs[NOT_BATCHING[0], "reduce", 2]
    assert run.results is None and run.stats is None
    (line,) = _errors(run)
    assert line.startswith("ValueError: visattn: base llava_hf (lmms-eval's LlavaHf) runs batch_size <= 1")
    assert line.endswith("got 2; bases that batch: qwen2_vl, qwen2_5_vl")


def test_bad_model_args_is_one_line_error(runs):
    run = runs["llava", "bad", 1]
    assert run.results is None
    (line,) = _errors(run)
    assert line.startswith("ValueError: visattn: unknown argument kep; FastV takes layer: int")
    assert "llava_hf takes" in line and "pretrained" in line


def test_bad_bases_reducers_and_batches_fail_before_loading():
    from lmms_eval.models import get_model

    visattn = get_model("visattn")
    cases = {
        "base=llava,reducer=FastV": r"unknown base 'llava'; valid bases: llava_hf \(LLaVA-1.5, .*qwen2_5_vl",
        "base=qwen2_vl": r"give reducer=<name>; valid reducers: CDPruner, DART, .*VisionZip",
        "base=qwen2_vl,reducer=Nope": r"unknown reducer 'Nope'; valid reducers: CDPruner, DART, .*ToMe",
        "base=qwen2_vl,reducer=FastV,keep=lots": r"FastV: keep='lots' is not of type int \| float",
        "base=llava_hf,reducer=FastV,batch_size=2": r"batch_size <= 1, got 2; bases that batch: qwen2_vl",
    }
    for args, message in cases.items():
        with pytest.raises(ValueError, match=message):
            visattn.create_from_arg_string(args, {"device": "cpu"})
