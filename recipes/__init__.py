"""visattn.recipes: training recipes (YAML, shipped as package data) and the trainer.

- ``config``: the :class:`~visattn.recipes.config.Recipe` schema, ``load_recipe(name, overrides)``,
  ``list_recipes()``; files in ``imagenet/`` (one per paper recipe) and ``digits.yaml`` (the default).
- ``trainer``: ``train(recipe, data_dir, output, resume)`` — one process or torchrun DDP.
- ``data`` (datasets, transforms, samplers), ``image_files`` (folder/tar images; an unreadable one is
  named), ``checkpoint`` (atomic save, resume), ``evaluate``
  (``visattn eval``), ``plot`` (``visattn plot``), ``cli`` (the ``train``/``eval``/``plot`` commands).

See docs/training.md.
"""
