"""Recipe files and the recipe schema: every shipped recipe parses, names a registered model, is sane."""

from __future__ import annotations

import sys

import pytest
import timm
import yaml

import visattn
from visattn.cli import main as cli_main
from visattn.recipes.config import (
    FIELDS,
    RECIPE_ROOT,
    Recipe,
    apply_overrides,
    list_recipes,
    load_recipe,
    recipe_from_dict,
)

RECIPE_DIR = RECIPE_ROOT
IMAGENET_RECIPES = sorted((RECIPE_DIR / "imagenet").glob("*.yaml"))
ALL_RECIPES = IMAGENET_RECIPES + sorted(RECIPE_DIR.glob("*.yaml"))


def _family(model: str) -> str:
    return sys.modules[timm.models.model_entrypoint(model).__module__].__name__


def test_recipes_exist():
    assert IMAGENET_RECIPES, "no recipes/imagenet/*.yaml shipped"
    assert "digits" in list_recipes()


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_names_a_registered_model(path):
    recipe = load_recipe(path)
    registered = visattn.list_models()
    assert recipe.model in registered, (
        f"{path.name} names model {recipe.model!r}, which visattn does not register "
        f"(registered: {', '.join(registered) or 'none'}); the recipe's family has not landed"
    )
    assert recipe.name == path.stem
    # keys in the file are exactly schema keys (no silently ignored typos)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(FIELDS)


@pytest.mark.parametrize("path", IMAGENET_RECIPES, ids=lambda p: p.stem)
def test_imagenet_recipe_values_are_sane(path):
    r = load_recipe(path)
    assert "/" in r.source and "@" in r.source, f"{path.name}: source must name repository@commit and files"
    assert path.read_text().startswith("# "), f"{path.name}: starts with a comment naming paper and source"
    assert r.lr > 0 and 0 <= r.warmup_epochs < r.epochs and r.epochs >= 30
    assert 0 <= r.min_lr < r.lr and r.weight_decay > 0
    assert r.drop_path is not None and 0 <= r.drop_path <= 0.5
    assert r.reference_batch % r.batch_size == 0, "reference_batch = batch_size x GPUs"
    assert r.input_size >= 224 and 0.8 <= r.crop_pct <= 1.0
    in22k = path.stem.endswith("_in22k")
    assert r.dataset == "" and r.num_classes in ((21841,) if in22k else (None, 1000))
    assert r.opt == "adamw" and r.opt_eps == pytest.approx(1e-8)
    lr, warmup_lr, min_lr = r.scaled_lrs(r.reference_batch // (r.batch_size * r.accum_steps))
    if r.init_checkpoint is None:  # from scratch
        assert 1e-4 <= lr <= 5e-3, (
            f"{path.name}: lr {lr} at the paper's batch is out of the usual AdamW range"
        )
        total = r.epochs + (r.warmup_epochs if r.warmup_prefix else 0)
        assert total >= (90 if in22k else 100) and r.warmup_epochs > 0
    else:  # fine-tuning from released weights, or from the run of a shipped 22K pre-training recipe
        pretrain = f"runs/{r.model}_in22k/best.pth"
        assert r.init_checkpoint.startswith("https://") or r.init_checkpoint == pretrain, (
            "fine-tunes name the official weights they start from, or the 22K run they continue"
        )
        if r.init_checkpoint == pretrain:
            assert load_recipe(f"{r.model}_in22k").num_classes == 21841
        assert 1e-6 <= lr <= 1e-4 and r.epochs <= 100
    assert warmup_lr < lr and min_lr < lr
    if r.mixup_active:
        assert r.batch_size % 2 == 0


# registered models for which the official sources give no training recipe. The DiNAT ImageNet-22K
# classifiers: SHI-Labs/Neighborhood-Attention-Transformer@d334f5b (newest) classification/DiNAT.md, section
# "Training on ImageNet-22K", says only "Details will be released soon", and classification/configs/
# holds ImageNet-1K configs only.
# (Their 22K -> 1K fine-tunes have recipes: dinat_large*.yaml, dinat_s_large*.yaml.)
_NO_22K_SETTINGS = "ImageNet-22K classifier; the official 22K pre-training settings were never published"
NO_OFFICIAL_RECIPE = {
    "dinat_large_21k": _NO_22K_SETTINGS,
    "dinat_large_21k_11x11": _NO_22K_SETTINGS + " (the 11x11 kernel is interpolated from the 7x7 weights)",
    "dinat_s_large_21k": _NO_22K_SETTINGS,
}


def test_every_registered_model_has_a_recipe():
    """A new model gets its recipe (or an entry above saying why the papers give none)."""
    have = {load_recipe(p).model for p in IMAGENET_RECIPES}
    missing = [m for m in visattn.list_models() if m not in have and m not in NO_OFFICIAL_RECIPE]
    assert not missing, f"registered models without a recipes/imagenet/*.yaml: {missing}"
    stale = sorted(set(NO_OFFICIAL_RECIPE) - (set(visattn.list_models()) - have))
    assert not stale, f"exempt models that now have a recipe or are not registered: {stale}"


def test_every_backbone_family_has_a_recipe():
    families = {_family(m) for m in visattn.list_models()}
    covered = {
        _family(load_recipe(p).model)
        for p in IMAGENET_RECIPES
        if load_recipe(p).model in visattn.list_models()
    }
    assert families, "no visattn backbone registered"
    assert families <= covered, f"families without an ImageNet recipe: {sorted(families - covered)}"


def test_yaml_scalars_are_typed():
    r = recipe_from_dict(
        yaml.safe_load("model: van_b0\nlr: 5e-4\nepochs: '10'\nclip_grad: null\nscale: [0.5, 1]\n")
    )
    assert isinstance(r.lr, float) and r.lr == 5e-4  # PyYAML reads 5e-4 as a string
    assert r.epochs == 10 and r.clip_grad is None and r.scale == [0.5, 1.0]


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: van_b0\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown recipe key.*learning_rate.*Valid keys:.*lr.*warmup_epochs"):
        load_recipe(path)
    with pytest.raises(ValueError, match="--set: unknown recipe key.*nope.*Valid keys"):
        apply_overrides(Recipe(model="van_b0"), ["nope=1"])


def test_cli_reports_recipe_errors_without_a_traceback(capsys):
    assert cli_main(["train", "--set", "lr=5e-4", "learning_rate=1"]) == 2
    err = capsys.readouterr().err
    # no "did you mean decay_rate?": a key that only shares a suffix gets no hint
    assert err.startswith("visattn train: error: --set: unknown recipe key(s) learning_rate; Valid keys:")
    assert "Traceback" not in err and "warmup_epochs" in err
    assert cli_main(["train", "--recipe", "van_b0", "--set", "warmup_epochs=400"]) == 2
    assert "warmup_epochs must be in [0, epochs)" in capsys.readouterr().err


def test_overrides_are_converted_to_the_field_type():
    base = Recipe(model="van_b0", epochs=300, warmup_epochs=5)
    r = apply_overrides(
        base,
        [
            "lr=5e-4",
            "epochs=100",
            "amp=bf16",
            "clip_grad=none",
            "scale=0.5,1.0",
            "model_ema=true",
            "model_kwargs={depths: [1, 1], embed_dims: [8, 16]}",
            "opt_betas=[0.9, 0.95]",
            "drop-path=0.1",
        ],
    )
    assert r.lr == 5e-4 and r.epochs == 100 and r.amp == "bf16" and r.clip_grad is None
    assert r.scale == [0.5, 1.0] and r.model_ema is True and r.drop_path == 0.1
    assert r.model_kwargs == {"depths": [1, 1], "embed_dims": [8, 16]} and r.opt_betas == [0.9, 0.95]
    assert base.lr == 1e-3, "overrides return a copy"
    with pytest.raises(ValueError, match="'epochs'.*int"):
        apply_overrides(base, ["epochs=abc"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(base, ["epochs"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("warmup_epochs=300", "warmup_epochs"),
        ("lr=0", "lr must be > 0"),
        ("amp=fp8", "amp must be one of"),
        ("drop_path=1.5", "drop_path"),
        ("min_lr=1", "min_lr"),
    ],
)
def test_insane_values_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(Recipe(model="van_b0", epochs=300, warmup_epochs=5), [override])


def test_global_batch_and_lr_scaling():
    r = Recipe(
        model="x",
        lr=5e-4,
        lr_scaling="linear",
        lr_base_batch=512,
        batch_size=128,
        accum_steps=2,
        warmup_lr=1e-6,
        min_lr=1e-5,
    )
    assert r.global_batch(8) == 2048
    assert r.scaled_lrs(8) == pytest.approx((2e-3, 1e-6, 1e-5))
    r.scale_warmup_min_lr = True
    assert r.scaled_lrs(8) == pytest.approx((2e-3, 4e-6, 4e-5))
    r.lr_scaling = "sqrt"
    assert r.scaled_lrs(2)[0] == pytest.approx(5e-4)  # 128 * 2 * 2 = 512: factor 1
    r.lr_scaling = "none"
    assert r.scaled_lrs(8)[0] == 5e-4


def test_unknown_recipe_name():
    with pytest.raises(ValueError, match="unknown recipe 'no_such'.*digits"):
        load_recipe("no_such")


def test_list_recipes_cli(capsys):
    assert cli_main(["train", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    for path in ALL_RECIPES:
        assert path.stem in out
