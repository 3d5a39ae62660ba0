"""visattn.kernels: the attention ops shared by the backbones and the token reducers.

This file holds the package's public names only; the code is in the repo-root folder ``kernels/``,
installed as the sub-packages ``visattn.kernels.ops`` (the public functions, their autograd and
``torch.library`` registration, backend dispatch), ``visattn.kernels.reference`` (readable PyTorch) and
``visattn.kernels.triton`` (the Triton kernels). ``kernels/`` itself has no ``__init__.py``: ``kernels``
is also the top-level package of a distribution that transformers imports, and a folder without
``__init__.py`` on ``sys.path`` is only a namespace portion, which any installed regular package of that
name wins over (docs/layout.md).

Every op takes ``backend="auto" | "reference" | "torch" | "triton"`` (see
:mod:`visattn.kernels.ops.dispatch`; docs/kernels.md says what each runs per op) and uses the layout
``[batch, *spatial, heads, head_dim]`` unless its docstring says otherwise.
"""

from visattn.kernels.ops import scriptable  # noqa: F401  (registers torch.ops.visattn.* for TorchScript)
from visattn.kernels.ops.agent_attention import agent_attention
from visattn.kernels.ops.attention_with_key_mass import attention_with_key_mass
from visattn.kernels.ops.bilevel_routing_attention import bilevel_routing_attention
from visattn.kernels.ops.dispatch import BACKENDS, interpreter_enabled, resolve_backend, triton_available
from visattn.kernels.ops.large_kernel_attention import large_kernel_attention
from visattn.kernels.ops.neighborhood_attention import neighborhood_attention
from visattn.kernels.ops.visual_sink_attention import visual_sink_attention

__all__ = [
    "BACKENDS",
    "agent_attention",
    "attention_with_key_mass",
    "bilevel_routing_attention",
    "interpreter_enabled",
    "large_kernel_attention",
    "neighborhood_attention",
    "resolve_backend",
    "triton_available",
    "visual_sink_attention",
]
