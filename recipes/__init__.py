"""visattn.recipes: training recipes (YAML, shipped as package data) and the trainer."""
