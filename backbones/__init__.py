"""visattn.backbones: timm models, registered with timm when this package is imported."""
