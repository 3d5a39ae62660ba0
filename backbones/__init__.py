"""visattn.backbones: timm models, registered with timm when this package is imported."""

import visattn.backbones.agent_deit  # noqa: F401
import visattn.backbones.agent_pvt  # noqa: F401
import visattn.backbones.agent_swin  # noqa: F401
import visattn.backbones.nat  # noqa: F401
from visattn.backbones import biformer  # noqa: F401
from visattn.backbones import van  # noqa: F401
