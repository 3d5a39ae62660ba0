"""The ``visattn`` console script: --help, list, bench discovery."""

from importlib.metadata import entry_points

import pytest

from visattn.cli import main


def test_console_script_is_installed():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "visattn"]
    assert script.value == "visattn.cli:main"


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("list", "bench", "train", "eval"):
        assert f"    {command} " in text, text


def test_list_prints_the_registered_models(capsys):
    assert main(["list", "*nat_mini"]) == 0
    assert capsys.readouterr().out.split() == ["dinat_mini", "nat_mini"]
    assert main(["list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"nat_tiny", "dinat_base", "biformer_s"} <= set(names) and names == sorted(names)
    assert not any(name.startswith("resnet") for name in names)  # timm's own models are not listed


def test_bench_discovers_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "    na " in text and "    bra " in text, text
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "no-such-benchmark"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------------- user mistakes
def _fails(argv, capsys, *expected: str) -> str:
    """``main(argv)`` exits 2 with one ``visattn <cmd>: error: ...`` line that contains ``expected``."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"visattn {argv[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_eval_mistakes_are_one_line(tmp_path, capsys):
    import torch

    (tmp_path / "notes.pth").write_text("hello, not a checkpoint")
    _fails(
        ["eval", "--model", "agent_swin_tinny", "--checkpoint", "x.pth"],
        capsys,
        "did you mean agent_swin_tiny",
    )
    _fails(
        ["eval", "--model", "van_b0", "--checkpoint", str(tmp_path / "missing.pth")], capsys, "does not exist"
    )
    _fails(
        ["eval", "--model", "van_b0", "--checkpoint", str(tmp_path / "notes.pth")],
        capsys,
        "is not a readable PyTorch checkpoint",
    )
    other = {"format": "visattn-train-v1", "model_name": "nat_mini", "model": {}}
    torch.save(other, tmp_path / "nat.pth")
    _fails(
        ["eval", "--model", "van_b0", "--checkpoint", str(tmp_path / "nat.pth")],
        capsys,
        "use --model nat_mini",
    )


def test_plot_and_recipe_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails(["plot", "runs/nope"], capsys, "not a visattn run directory")
    (tmp_path / "tag.yaml").write_text('model: !!python/object/apply:os.system ["echo pwned"]\n')
    _fails(["train", "--recipe", "tag.yaml"], capsys, "is not plain YAML")
    _fails(["train", "--recipe", "no_such_recipe"], capsys, "unknown recipe")
    _fails(["train", "--set", "no_such_key=1"], capsys, "unknown recipe key")
    _fails(["train", "--set", "lr=fast"], capsys, "cannot read 'fast'")
    for name in ("../../../../x", "/tmp/abs", "a/b", ".."):
        _fails(["train", "--set", f"name={name}"], capsys, "must be a plain folder name")
    (tmp_path / "escape.yaml").write_text("name: ../../escape\nmodel: agent_swin_tiny\ndataset: digits\n")
    _fails(["train", "--recipe", "escape.yaml"], capsys, "must be a plain folder name")
    # the digits recipe with --data-dir: refused, and the failed run leaves no folder behind
    _fails(["train", "--data-dir", str(tmp_path), "--no-progress"], capsys, "--recipe nat_tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.yaml", "tag.yaml"]


@pytest.mark.parametrize("value", ["0", "-5", "two"])
def test_max_steps_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--max-steps", value])
    assert exit_info.value.code == 2
    assert "argument --max-steps" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _fails(["bench", "na", "--device", "cuda"], capsys, "use --device cpu")
    _fails(["train", "--device", "cuda"], capsys, "use --device cpu")


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "cpu:0", "CUDA"])
def test_unknown_devices_are_one_line_for_every_command(device, capsys, tmp_path):
    """One parser for every --device: ``tpu`` or ``gpu`` once trained on CPU (exit 0) or ended in a
    PyTorch traceback (bench)."""
    for argv in (
        ["train", "--output", str(tmp_path / "run"), "--no-progress"],
        ["bench", "na"],
        ["eval", "--model", "van_b0", "--checkpoint", "x.pth"],
    ):
        _fails([*argv, "--device", device], capsys, f"--device {device}", "cpu, cuda, cuda:N")
    assert not (tmp_path / "run").exists()


def test_device_parser_accepts_the_torch_forms():
    import torch

    from visattn.devices import parse_device

    assert parse_device("cpu") == "cpu"
    assert parse_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert parse_device("cuda:0") == "cuda:0"
        with pytest.raises(ValueError, match="cuda:99"):
            parse_device("cuda:99")
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            parse_device("cuda:0")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main(["--debug", "plot", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main(["plot", str(tmp_path), "--debug"])


def test_version_and_plain_text_help(capsys):
    import visattn

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"visattn {visattn.__version__}"
    for argv in (["--help"], ["bench", "--help"], ["bench", "na", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text and ":mod:" not in text, text


def test_full_disk_during_training_is_one_line_and_leaves_no_run(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the first checkpoint: one line naming the file, and the run folder is gone."""
    from pathlib import Path

    from visattn.recipes import checkpoint

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: open("/dev/full", "wb"), raising=False)  # noqa: SIM115
    run = tmp_path / "run"
    argv = [
        "train",
        "--output",
        str(run),
        "--max-steps",
        "1",
        "--no-progress",
        "--set",
        "batch_size=16",
        "workers=0",
    ]
    _fails(argv, capsys, "cannot write checkpoint", "ckpt-00000001.pth", "No space left on device")
    assert not run.exists()


def test_model_kwargs_that_do_not_build_the_model_are_one_line(capsys, tmp_path):
    _fails(
        ["train", "--output", str(tmp_path / "run"), "--set", "model_kwargs={embed_dims: 8}"],
        capsys,
        "agent_swin_tiny",
        "embed_dims",
        "model_kwargs",
    )
    assert not (tmp_path / "run").exists()


def test_ctrl_c_is_one_line_with_the_step_and_keeps_the_newest_checkpoint(tmp_path, capsys, monkeypatch):
    """Ctrl-C inside ``torch.save`` of the step-3 checkpoint (once a C++ ``inline_container.cc`` error and
    a traceback): one line with the step and the resume hint; checkpoints 1 and 2 stay, no temp file."""
    import builtins

    from visattn.recipes import checkpoint

    class InterruptedFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(path, *args, **kwargs):
        f = builtins.open(path, *args, **kwargs)  # noqa: SIM115  (closed by the caller)
        return InterruptedFile(f) if "ckpt-00000003" in str(path) else f

    monkeypatch.setattr(checkpoint, "open", open_, raising=False)
    run = tmp_path / "run"
    argv = ["train", "--output", str(run), "--no-progress", "--set", "batch_size=16", "workers=0"]
    assert main([*argv, "ckpt_interval_steps=1"]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "inline_container" not in captured.err
    (line,) = captured.err.strip().splitlines()
    newest = run / "ckpt-00000002.pth"
    assert line == f"visattn train: stopped at step 3 (Ctrl-C); resume with --resume auto (from {newest})"
    assert sorted(p.name for p in run.iterdir() if ".pth" in p.name) == [
        "ckpt-00000001.pth",
        "ckpt-00000002.pth",
    ]


def test_unknown_recipe_key_suggests_the_closest(capsys):
    line = _fails(["train", "--set", "epoch=3"], capsys, "unknown recipe key(s) epoch")
    assert "did you mean epochs?" in line


def test_eval_without_data_dir_names_its_own_option(tmp_path, capsys):
    """An ImageNet checkpoint evaluated without --data-dir: eval has no --recipe option to suggest."""
    import timm
    import torch

    torch.save(timm.create_model("van_b0", num_classes=3).state_dict(), tmp_path / "van.pth")
    line = _fails(
        ["eval", "--model", "van_b0", "--checkpoint", str(tmp_path / "van.pth")], capsys, "--data-dir"
    )
    assert "--recipe" not in line


def test_plot_prints_the_absolute_path_of_the_png(tmp_path, capsys, monkeypatch):
    """As ``train`` prints its paths: ``visattn plot runs/x`` from anywhere names the file it wrote."""
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 2.0, "lr": 0.1}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "runs/x"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(run.resolve() / "curves.png") and (run / "curves.png").is_file()


_PROBE = """
import sys
from visattn.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "timm", "transformers", "visattn.bench.na") if m in sys.modules)
print("exit", code, "heavy", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["bench", "--help"]])
def test_help_and_version_import_neither_torch_nor_the_benchmarks(argv):
    """The top-level help lists every command and benchmark without importing them (it took ~4 s)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "exit 0 heavy []", done.stdout + done.stderr
    if argv != ["--version"]:
        assert "    train " in done.stdout or "    na " in done.stdout, done.stdout


def test_a_benchmark_help_still_shows_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "na", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--iters" in text and "--flex-compile" in text and "neighborhood" in text.lower(), text
