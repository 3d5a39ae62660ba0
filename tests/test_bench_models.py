"""`visattn bench models`: the official-style twins compute what the visattn models compute (same
weights, every attention core swapped), so the throughput ratios compare like with like."""

import importlib.util

import pytest
import timm
import torch

import visattn  # noqa: F401
from visattn.bench.models import official_twin
from visattn.bench.train import tiny_kwargs
from visattn.cli import main

TWINNED = ["biformer_s", "van_b2", "agent_swin_tiny", "agent_pvt_tiny", "agent_deit_tiny"]


@pytest.mark.parametrize("name", TWINNED)
def test_official_twin_swaps_every_core_and_matches_logits(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **tiny_kwargs(name, 64)).eval()
    twin, label = official_twin(model)
    assert label == "official-style"
    ours = [type(m).__name__ for m in model.modules()]
    swapped = [type(m).__name__ for m in twin.modules()]
    changed = [(a, b) for a, b in zip(ours, swapped) if a != b]
    assert changed and all("OfficialStyle" in b for _, b in changed), changed
    assert not any("OfficialStyle" in n for n in ours)  # the visattn model itself is untouched
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-4, atol=1e-5)


def test_nat_twin_is_natten_or_named_as_missing():
    model = timm.create_model("nat_tiny", **tiny_kwargs("nat_tiny", 64))
    twin, label = official_twin(model)
    if importlib.util.find_spec("natten") is None:
        assert (twin, label) == (None, "NATTEN not installed")
    else:
        assert label == "NATTEN na2d (no rpb)" and twin is not model


def test_cli_prints_the_table(capsys):
    argv = ["bench", "models", "--model", "van_b2", "nat_tiny", "--tiny", "--img-size", "64", "--batch", "1",
            "--warmup", "0", "--iters", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "swin_tiny_patch4_window7_224" in out and "official-style" in out
    assert "n/a (NATTEN not installed)" in out or "NATTEN na2d" in out


def test_cli_compile_table_has_both_peers_and_the_model(capsys):
    """``--compile``: one row per timm peer and per model, eager and inductor-compiled speeds, compile
    seconds, and the compiled logits equal to eager."""
    argv = ["bench", "models", "--compile", "--model", "nat_tiny", "--tiny", "--img-size", "32",
            "--batch", "1", "--warmup", "0", "--iters", "1"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "compiled img/s" in lines[1] and "compile s" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line.strip()}
    assert list(rows) == ["swin_tiny_patch4_window7_224", "convnext_tiny", "nat_tiny"]
    for cells in rows.values():
        eager, compiled, _, seconds, diff = map(lambda c: float(c.rstrip("x")), cells[2:])
        assert eager > 0 and compiled > 0 and seconds > 0 and diff < 1e-4


def test_cli_train_compile_table_has_both_peers_and_the_model(capsys):
    """``bench train --compile``: eager and inductor-compiled training steps of the timm peers and the
    model, with the compile seconds."""
    argv = ["bench", "train", "--compile", "--model", "van_b0", "--tiny", "--device", "cpu",
            "--img-size", "32", "--batch-size", "2", "--warmup", "0", "--iters", "1"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "compiled img/s" in lines[1] and "compile s" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line.strip()}
    assert list(rows) == ["swin_tiny_patch4_window7_224", "convnext_tiny", "van_b0"]
    for cells in rows.values():
        eager, compiled, speedup, seconds = map(lambda c: float(c.rstrip("x")), cells[3:])
        assert cells[2] == "32" and eager > 0 and compiled > 0 and seconds > 0
        assert speedup == pytest.approx(compiled / eager, rel=0.05)
