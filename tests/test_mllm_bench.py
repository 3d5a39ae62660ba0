"""`visattn bench mllm` runs end to end on tiny CPU sizes for every family (timings are not asserted)."""

import argparse
import re

import pytest

from visattn.bench import mllm


def run_bench(capsys, *argv: str) -> dict[str, list[str]]:
    """Run the bench; ``{method: cells after the method}`` of the batch-1 rows, plus the raw output."""
    parser = argparse.ArgumentParser()
    mllm.add_arguments(parser)
    common = ["--device", "cpu", "--batches", "1", "--decode-tokens", "2", "--score-tokens", "64"]
    assert mllm.run(parser.parse_args([*common, "--warmup", "0", "--iters", "1", *argv])) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 2 and cells[0] == "1":
            rows[cells[1]] = cells[2:]
    return rows | {"__out__": out}


def test_bench_mllm_llava_cpu_size(capsys):
    """The CPU size keeps LLaVA's 576 visual tokens (hence SparseVLM's official 64-token schedule)."""
    rows = run_bench(capsys, "--hidden", "64", "--layers", "3", "--keep", "64")
    for method in (
        "unreduced",
        "FastV K=2 keep=64",
        "VTC-CLS keep=64",
        "DivPrune keep=64",
        "CDPruner keep=64",
        "VisPruner keep=64",
        "HiPrune keep=64",
        "SCOPE keep=64",
        "DART K=2 keep=64",
        "VisionZip 54+10",
        "DyVTE exit after layer 2",
        "VAR (no pruning)",
    ):
        assert method in rows and not rows[method][0].startswith("refused"), method
    assert any(m.startswith("SparseVLM 64") for m in rows) and any(m.startswith("PyramidDrop") for m in rows)
    assert rows["FastV K=2 keep=64"][5] == "576"  # visual tokens in, from handle.stats
    assert "key-mass last" in rows["__out__"]


# reducers each family must refuse (a row "refused [n]" and its reason, not a crash)
REFUSED = {
    "llava": (),
    "llava_next": (),
    "llava_onevision": ("VTC-CLS keep=8", "VisionZip 7+1"),
    "qwen2_vl": ("VTC-CLS keep=8", "VisionZip 7+1"),
    "qwen2_5_vl": ("VTC-CLS keep=8", "VisionZip 7+1"),
}


@pytest.mark.parametrize("family", mllm.FAMILIES)
def test_bench_mllm_every_family_tiny(capsys, family):
    rows = run_bench(capsys, "--family", family, "--size", "tiny", "--keep", "8")
    assert rows["unreduced"][-1] == "0.0%"
    runs = ("FastV K=2 keep=8", "DivPrune keep=8", "DART K=2 keep=8", "PyramidDrop 1..2 lambda=0.5")
    for method in (*runs, "DyVTE exit after layer 2", "VAR (no pruning)"):
        cells = rows[method]
        assert not cells[0].startswith("refused"), (method, cells)
        assert float(cells[-1].rstrip("%")) >= 0.0
    # DivPrune keeps 8 of each image's tokens from the first layer on: FLOPs are saved
    assert float(rows["DivPrune keep=8"][-1].rstrip("%")) > 0.0
    if family == "llava_next":  # VisionZip runs per crop there (the official anyres order)
        assert not rows["VisionZip 7+1"][0].startswith("refused"), rows["VisionZip 7+1"]
    for method in REFUSED[family]:
        note = re.fullmatch(r"refused \[(\d+)\]", rows[method][0])
        assert note, (method, rows[method])
        assert f"refused [{note[1]}]: " in rows["__out__"]


def test_bench_mllm_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        mllm.build("llava_2", "tiny", "cpu", None)


LLAMA_7B, QWEN2_7B = (4096, 32, 32, 32, 11008), (3584, 28, 28, 4, 18944)


@pytest.mark.parametrize(
    ("family", "text", "vision_width", "billions"),
    [  # parameter counts of the released checkpoints
        ("llava", LLAMA_7B, 1024, 7.06),  # LLaVA-1.5-7B
        ("llava_next", LLAMA_7B, 1024, 7.06),  # LLaVA-NeXT (v1.6) Vicuna-7B
        ("llava_onevision", QWEN2_7B, 1152, 8.03),  # LLaVA-OneVision Qwen2-7B
        ("qwen2_vl", QWEN2_7B, 1280, 8.29),  # Qwen2-VL-7B
        ("qwen2_5_vl", QWEN2_7B, 1280, 8.29),  # Qwen2.5-VL-7B
    ],
)
def test_bench_mllm_full_size_has_7b_shapes(family, text, vision_width, billions):
    """``--size full`` has the real 7B shapes (built on the meta device: no memory, no weights)."""
    import torch

    cls, cfg = mllm.model_config(family, "full")
    with torch.device("meta"):
        model = cls._from_config(cfg, dtype=torch.bfloat16)
    t, v = cfg.text_config, cfg.vision_config
    dims = (
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.intermediate_size,
    )
    assert dims == text
    assert getattr(v, "embed_dim", v.hidden_size) == vision_width
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.02)
