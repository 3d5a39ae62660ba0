"""visattn.backbones.helpers: what every family shares (drop-path rates, checkpoint unwrapping, tables)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath

import visattn  # noqa: F401  (registers the backbones)
from visattn.backbones.helpers import resize_rel_pos_table, unwrap_checkpoint

# each family's blocks get linear drop-path rates from 0 to drop_path_rate over all blocks in float32
# (torch.linspace, as every official repo and timm's calculate_drop_path_rates compute them)
RATE_MODELS = (
    "agent_deit_tiny",
    "agent_pvt_tiny",
    "agent_swin_tiny",
    "biformer_t",
    "van_b0",
    "nat_mini",
    "nat_isotropic_small",
)


@pytest.mark.parametrize("name", RATE_MODELS)
def test_drop_path_rates_are_the_official_linear_ones(name):
    model = timm.create_model(name, drop_path_rate=0.3, device="meta")
    paths = [  # one per block: ours name it drop_path, timm's Swin/ViT blocks drop_path1 (and 2, same rate)
        getattr(m, "drop_path", None) or m.drop_path1
        for m in model.modules()
        if isinstance(getattr(m, "drop_path", getattr(m, "drop_path1", None)), torch.nn.Module)
    ]
    rates = [p.drop_prob if isinstance(p, DropPath) else 0.0 for p in paths]
    assert len(rates) >= 4
    assert rates == torch.linspace(0, 0.3, len(rates)).tolist()


@pytest.mark.parametrize(
    "wrap", [lambda sd: sd, lambda sd: {"model": sd, "epoch": 3}, lambda sd: {"state_dict": sd}]
)
def test_unwrap_checkpoint_takes_the_wrapped_state_dict_and_strips_ddp_prefixes(wrap):
    sd = {"a.weight": torch.zeros(1), "b": torch.ones(1)}
    assert unwrap_checkpoint(wrap(sd)) == sd
    assert unwrap_checkpoint(wrap({f"module.{k}": v for k, v in sd.items()})) == sd
    both = {"model": {"m": torch.zeros(1)}, "state_dict": {"s": torch.zeros(1)}}
    assert list(unwrap_checkpoint(both)) == ["m"]
    assert list(unwrap_checkpoint(both, containers=("state_dict", "model"))) == ["s"]
    with pytest.raises(ValueError, match="checkpoint dict"):
        unwrap_checkpoint([torch.zeros(1)])


def test_resize_rel_pos_table_is_bicubic_interpolation_of_the_table():
    torch.manual_seed(0)
    swin = torch.randn(13 * 13, 3)  # 7x7 window -> 12x10 window
    by_hand = F.interpolate(swin.T.reshape(1, 3, 13, 13), size=(23, 19), mode="bicubic")
    resized = resize_rel_pos_table(swin, (12, 10))
    assert torch.equal(resized, by_hand.reshape(3, -1).T)
    nat = torch.randn(4, 13, 13, dtype=torch.float64)  # kernel 7 -> 11, computed in float32
    by_hand = F.interpolate(nat[None].float(), size=(21, 21), mode="bicubic", align_corners=False)[0]
    assert torch.equal(resize_rel_pos_table(nat, (11, 11)), by_hand.double())
    assert resize_rel_pos_table(swin, (7, 7)) is swin and resize_rel_pos_table(nat, (7, 7)) is nat
