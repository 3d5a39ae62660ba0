"""The one ``--device`` parser of every command (train, eval, bench) and of ``visattn.recipes.train``."""

from __future__ import annotations

import re

_FORM = re.compile(r"(cpu|mps|cuda)(?::(\d+))?")


def parse_device(text: str | None) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (where this torch build has it), checked against this
    machine; ``None``/``"auto"`` picks ``"cuda"`` when there is a GPU, else ``"cpu"``. Anything else is a
    ``ValueError`` naming the accepted forms."""
    import torch

    if text in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = _FORM.fullmatch(text)
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_built()
    forms = "cpu, cuda, cuda:N" + (", mps" if has_mps else "")
    if match is None or (match[1] != "cuda" and match[2] is not None) or (match[1] == "mps" and not has_mps):
        raise ValueError(f"--device {text}: not a device; use one of {forms}")
    kind, index = match[1], match[2]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: this machine has no CUDA device; use --device cpu")
        if index is not None and int(index) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"--device {text}: {count} CUDA device(s) here, up to cuda:{count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    return text
