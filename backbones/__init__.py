"""visattn.backbones: timm models, registered with timm when this package is imported.

One module per model family: NAT/DiNAT (``nat``), BiFormer (``biformer``), VAN (``van``),
Agent-DeiT / Agent-PVT / Agent-Swin (``agent_deit``, ``agent_pvt``, ``agent_swin``).
"""

from visattn.backbones import agent_deit, agent_pvt, agent_swin, biformer, nat, van

__all__ = ["agent_deit", "agent_pvt", "agent_swin", "biformer", "nat", "van"]
