"""Install layout (one ``visattn`` namespace from the repo-root folders); the torch/torchvision pair."""

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
    """Outside the checkout, the folders import only under ``visattn.`` (no top-level ``kernels`` etc.)."""
    import visattn.backbones
    import visattn.kernels
    import visattn.mllm_tokens
    import visattn.recipes

    for module in (visattn.kernels, visattn.backbones, visattn.mllm_tokens, visattn.recipes):
        assert Path(module.__file__) == REPO / module.__name__.split(".")[1] / "__init__.py"
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
    for origin in found.values():
        # a third-party package of that name may exist; it must not be our folder
        assert origin == "None" or not origin.startswith(str(REPO)), found
