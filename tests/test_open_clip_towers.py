"""open_clip models with visattn timm vision towers (visattn.integrations.open_clip)."""

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import timm  # noqa: E402
from PIL import Image  # noqa: E402

from visattn.integrations.open_clip import TOWERS, model_config, register, registered  # noqa: E402

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 1}


def available(*names):
    """The given tower names whose backbone is registered (other helpers' families may land later)."""
    return [n for n in names if n in registered()]


def test_configs_follow_the_registered_backbones_and_register_is_idempotent():
    assert len({s.name for s in TOWERS}) == len(TOWERS)
    expected = [s.name for s in TOWERS if timm.is_model(s.timm_model)]
    assert registered() == expected and expected  # registered on import
    paths = list(open_clip.factory._MODEL_CONFIG_PATHS)
    assert register() == expected
    assert paths == open_clip.factory._MODEL_CONFIG_PATHS  # nothing left to add: no rescan
    for spec in TOWERS:
        if spec.name in expected:
            cfg = open_clip.get_model_config(spec.name)
            assert cfg == model_config(spec)
            assert cfg["vision_cfg"]["timm_model_name"] == spec.timm_model
            assert cfg["embed_dim"] == cfg["text_cfg"]["width"] == spec.text_width


@pytest.mark.parametrize("name", registered())
def test_every_registered_tower_builds(name):
    """Construct each config on the meta device (no memory, no init cost): tower + projection shapes."""
    spec = next(s for s in TOWERS if s.name == name)
    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config(name))
    trunk = model.visual.trunk
    assert trunk.pretrained_cfg["architecture"] == spec.timm_model
    assert trunk.num_classes == 0  # classifier removed, open_clip's projection instead
    assert model.visual.head.proj.weight.shape == (spec.embed_dim, trunk.num_features)
    assert model.text_projection.shape == (spec.text_width, spec.embed_dim)


@pytest.mark.parametrize("name", available("visattn-agent-swin-t"))
def test_create_model_and_transforms_encodes_image_and_text(name):
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    spec = next(s for s in TOWERS if s.name == name)
    assert model.visual.trunk.pretrained_cfg["architecture"] == spec.timm_model
    image = preprocess(Image.fromarray(torch.randint(0, 255, (240, 320, 3), dtype=torch.uint8).numpy()))
    assert image.shape == (3, 224, 224)
    with torch.no_grad():
        img = model.encode_image(image[None], normalize=True)
        txt = model.encode_text(tokenizer(["a photo of a cat", "a diagram"]), normalize=True)
    assert img.shape == (1, spec.embed_dim) and txt.shape == (2, spec.embed_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(1))


@pytest.mark.parametrize("name, size", [(n, 64) for n in available("visattn-van-b2")])
def test_contrastive_training_step(name, size):
    model = open_clip.create_model(name, force_image_size=size, text_cfg=TINY_TEXT)
    model.train()
    tokenizer = open_clip.get_tokenizer(name)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, size, size)
    texts = tokenizer(["a red square", "two dogs in the snow"])
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(texts, normalize=True)
    loss = loss_fn(image_features, text_features, model.logit_scale.exp())
    assert torch.isfinite(loss)
    loss.backward()
    trunk_grads = [p.grad for p in model.visual.trunk.parameters() if p.requires_grad]
    assert trunk_grads and all(g is not None for g in trunk_grads)
    assert sum(g.abs().sum() for g in trunk_grads) > 0
    stem = next(model.visual.trunk.parameters())
    before = stem.detach().clone()
    optimizer.step()
    assert not torch.equal(stem, before)
