"""`visattn bench mllm` runs end to end on tiny CPU sizes (timings are not asserted)."""

import argparse

from visattn.bench import mllm


def test_bench_mllm_runs_on_cpu(capsys):
    parser = argparse.ArgumentParser()
    mllm.add_arguments(parser)
    args = parser.parse_args(
        [
            "--device",
            "cpu",
            "--hidden",
            "64",
            "--layers",
            "3",
            "--batches",
            "1",
            "--keep",
            "64",
            "--decode-tokens",
            "2",
            "--score-tokens",
            "64",
            "--warmup",
            "0",
            "--iters",
            "1",
        ]
    )
    assert mllm.run(args) == 0
    out = capsys.readouterr().out
    methods = ("unreduced", "FastV K=2 keep=64", "VTC-CLS keep=64", "DyVTE", "VAR", "key-mass last")
    for method in (
        *methods,
        "DivPrune keep=64",
        "DART K=2 keep=64",
        "VisionZip 54+10",
        "PyramidDrop",
        "SparseVLM 64",
    ):
        assert method in out
