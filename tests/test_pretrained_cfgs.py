"""Every pretrained cfg of every visattn model resolves to a real cache file (downloads are stubbed)."""

from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg, list_pretrained, load_pretrained

import visattn
from tests.test_agent_models import TINY as AGENT_TINY

PRETRAINED = [p for p in list_pretrained() if p.split(".")[0] in set(visattn.list_models())]


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """Downloads write an empty state dict under ``tmp_path`` (the torch hub dir); returns their paths."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    written: list[Path] = []

    def fake_download(url, dst, *args, **kwargs):
        written.append(Path(dst))
        torch.save({}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(timm.models._hub, "download_url_to_file", fake_download)
    return written


class Probe(torch.nn.Module):
    """Stands in for a model: records what timm's loader hands it."""

    loaded = None

    def load_pretrained(self, path):  # the custom_load route
        self.loaded = path

    def load_state_dict(self, state_dict, strict=True, assign=False):  # the generic route
        self.loaded = state_dict
        return super().load_state_dict(state_dict, strict, assign)


def test_the_families_all_have_pretrained_cfgs():
    families = {timm.models.model_entrypoint(p.split(".")[0]).__module__ for p in PRETRAINED}
    assert {f.rsplit(".", 1)[1] for f in families} == {
        "agent_deit",
        "agent_pvt",
        "agent_swin",
        "biformer",
        "nat",
        "van",
    }


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_cfg_reaches_the_loader_with_a_file(name, downloads):
    cfg = get_pretrained_cfg(name).to_dict()
    probe = Probe()
    load_pretrained(probe, cfg, num_classes=cfg["num_classes"])
    assert probe.loaded is not None, f"{name}: timm's loader never reached the model"
    (path,) = downloads
    assert path.is_file() and path.suffix in (".pth", ".tar"), f"{name}: cached as {path}"


def test_pretrained_cache_files_are_distinct(downloads):
    for name in PRETRAINED:
        cfg = get_pretrained_cfg(name).to_dict()
        load_pretrained(Probe(), cfg, num_classes=cfg["num_classes"])
    names = [p.name for p in downloads]
    assert len(set(names)) == len(PRETRAINED), "two variants would share (and load) one cache file"


@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny"])
def test_agent_pretrained_true_loads_the_downloaded_file(name, tmp_path, monkeypatch):
    """``pretrained=True`` on an Agent model: the official file (``{"model": ...}``) is fetched to a
    named cache file and loaded through the family's checkpoint filter; another head and ``in_chans=1``
    are adapted as timm's loader does for every other family."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    kwargs = dict(AGENT_TINY[name], num_classes=1000)  # the cfg's head: loaded too
    official = timm.create_model(name, **kwargs).state_dict()

    def fake_download(url, dst, *args, **kw):
        torch.save({"model": official}, dst)

    monkeypatch.setattr(timm.models._hub, "download_url_to_file", fake_download)
    model = timm.create_model(name, pretrained=True, **kwargs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key
    assert list((tmp_path / "hub" / "checkpoints").iterdir())[0].name == f"{name}_in1k.pth"
    gray = timm.create_model(name, pretrained=True, **dict(kwargs, in_chans=1, num_classes=3))
    conv = get_pretrained_cfg(f"{name}.in1k").first_conv + ".weight"
    torch.testing.assert_close(gray.state_dict()[conv], official[conv].sum(1, keepdim=True))
    assert gray.get_classifier().out_features == 3
