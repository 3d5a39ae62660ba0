"""Install layout (one ``visattn`` namespace from the repo-root folders); the torch/torchvision pair."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]


def test_torchvision_compiled_ops_load_against_this_torch():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_repo_folders_install_as_visattn_subpackages_only(tmp_path):
    """The repo-root folders import as ``visattn.*``; outside the checkout no top-level ``backbones``,
    ``mllm_tokens`` or ``recipes`` exists, and a top-level ``kernels``, if any, is not our folder."""
    import visattn.backbones
    import visattn.kernels
    import visattn.kernels.ops
    import visattn.kernels.reference
    import visattn.kernels.triton
    import visattn.mllm_tokens
    import visattn.recipes

    for module in (visattn.backbones, visattn.mllm_tokens, visattn.recipes):
        assert Path(module.__file__) == REPO / module.__name__.split(".")[1] / "__init__.py"
    # visattn.kernels holds the public names; its sub-packages are the folders of kernels/
    assert Path(visattn.kernels.__file__) == REPO / "visattn" / "kernels" / "__init__.py"
    for module in (visattn.kernels.ops, visattn.kernels.reference, visattn.kernels.triton):
        assert Path(module.__file__) == REPO / "kernels" / module.__name__.split(".")[-1] / "__init__.py"
    code = (
        "import importlib.util as u\n"
        "for top in ('kernels', 'backbones', 'mllm_tokens', 'recipes'):\n"
        "    spec = u.find_spec(top)\n"
        "    print(top, None if spec is None else spec.origin)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    found = dict(line.split(" ", 1) for line in out if line)
    assert set(found) == {"kernels", "backbones", "mllm_tokens", "recipes"}
    for top, origin in found.items():
        # a third-party package of that name may exist; it must not be our folder
        assert origin == "None" or not _inside(origin, REPO / top), found


def _inside(origin: str, path: Path) -> bool:
    """Whether a module's ``origin`` is the repo-root entry ``path`` or lies inside it."""
    return Path(origin).resolve().is_relative_to(path.resolve())


def _importable_root_entries() -> dict[str, Path]:
    """The names under which ``import NAME`` could find something in the repo root: its folders and
    ``.py`` files whose names are identifiers."""
    entries = {}
    for path in REPO.iterdir():
        name = path.stem if path.suffix == ".py" else path.name
        if (path.is_dir() or path.suffix == ".py") and name.isidentifier():
            entries[name] = path
    return entries


def test_no_repo_root_folder_shadows_an_installed_distribution():
    """Fails the day a repo-root folder or file has the name of an installed distribution's top-level
    module and Python, started in the root, would import ours: every command run from the root (``python
    -m``, pytest's rootdir insertion, a REPL) puts the root first on ``sys.path``. A folder without
    ``__init__.py`` is a namespace portion there, which the distribution's regular package wins over."""
    distributions = importlib.metadata.packages_distributions()
    clashes = {
        name: path
        for name, path in _importable_root_entries().items()
        if set(distributions.get(name, ["visattn"])) != {"visattn"}
    }
    assert "kernels" in clashes  # transformers >= 5.25 installs the ``kernels`` distribution
    code = (
        "import importlib.util as u, sys\n"
        f"for top in {sorted(clashes)!r}:\n"
        "    print(top, u.find_spec(top).origin)\n"
    )
    # ``-c`` puts the working directory first on sys.path, as a REPL and ``python -m`` do
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    found = dict(line.split(" ", 1) for line in out if line)
    for name, origin in found.items():
        assert origin != "None" and not _inside(origin, clashes[name]), (
            f"the repo-root {clashes[name].name!r} stands in for the installed distribution "
            f"{distributions[name]} (import {name} -> {origin}): remove its __init__.py"
        )


REPO_ROOT_IMPORTS = """
import kernels
from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
import timm
import visattn
from visattn.kernels import neighborhood_attention
from visattn.mllm_tokens import FastV, attach
print(kernels.__file__)
print(timm.is_model("nat_tiny"), callable(neighborhood_attention), callable(attach))
"""


def test_transformers_diffusers_and_visattn_import_together_from_the_repo_root(tmp_path):
    """What a user's first REPL in the checkout does (``-c`` and a module run with ``-m`` put the root
    first on ``sys.path``): the real ``kernels`` distribution, not our folder, reaches transformers."""
    (tmp_path / "repo_root_imports.py").write_text(REPO_ROOT_IMPORTS)
    runs = {
        "-c": [sys.executable, "-c", REPO_ROOT_IMPORTS],
        "-m": [sys.executable, "-m", "repo_root_imports"],
    }
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # where -m finds the module, after the root
    for how, command in runs.items():
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
        assert result.returncode == 0, (how, result.stderr[-3000:])
        kernels_file, checks = result.stdout.split("\n")[-3:-1]
        assert not _inside(kernels_file, REPO / "kernels"), (how, kernels_file)
        assert checks == "True True True", (how, checks)


def _fresh_python(code: str, tmp_path) -> list[str]:
    """Run ``code`` in a new interpreter (outside the checkout); its printed lines."""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


HEAVY = ("timm", "open_clip", "transformers", "diffusers")


def test_importing_the_kernels_pulls_in_no_model_library(tmp_path):
    code = f"import sys, visattn.kernels\nprint(*[m for m in {HEAVY!r} if m in sys.modules])"
    assert _fresh_python(code, tmp_path) == []


def test_import_visattn_registers_the_models_in_either_order(tmp_path):
    """The backbones reach timm's registry whether timm is imported before or after visattn; the
    integrations load only on use, and nothing imports visattn from inside its own __init__."""
    check = "print(timm.is_model('nat_tiny'), timm.is_model('van_b0'), len(visattn.list_models()) > 40)"
    heavy = f"print(*[m for m in {HEAVY[1:]!r} if m in sys.modules] or ['none'])"
    for order in ("import visattn, timm", "import timm, visattn", "import visattn.kernels, timm, visattn"):
        lines = _fresh_python(f"import sys\n{order}\n{check}\n{heavy}", tmp_path)
        assert lines == ["True", "True", "True", "none"], (order, lines)
    # the integrations load on first use: attribute access imports them, no cycle through visattn
    code = (
        "import sys, visattn\nprint('open_clip' in sys.modules)\n"
        "import visattn.integrations.open_clip as oc\nprint('visattn-van-b0' in oc.registered())\n"
        "print(visattn.mllm_tokens.__name__)"
    )
    assert _fresh_python(code, tmp_path) == ["False", "True", "visattn.mllm_tokens"]
