"""Adapters to other libraries (diffusers, open_clip)."""
