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
