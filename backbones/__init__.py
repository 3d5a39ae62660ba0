"""visattn.backbones: timm models, registered with timm when this package is imported."""

from visattn.backbones import biformer  # noqa: F401
