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
