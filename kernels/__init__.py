"""visattn.kernels: the attention ops shared by the backbones and the token reducers.

Every op takes ``backend="auto" | "triton" | "torch"`` (see :mod:`._dispatch`) and
uses the layout ``[batch, *spatial, heads, head_dim]`` unless its docstring says otherwise.
"""

from visattn.kernels import scriptable  # noqa: F401  (registers torch.ops.visattn.* for TorchScript)
from visattn.kernels._dispatch import BACKENDS, interpreter_enabled, resolve_backend, triton_available
from visattn.kernels.agent_attention import agent_attention
from visattn.kernels.attention_with_key_mass import attention_with_key_mass
from visattn.kernels.bilevel_routing_attention import bilevel_routing_attention
from visattn.kernels.large_kernel_attention import large_kernel_attention
from visattn.kernels.neighborhood_attention import neighborhood_attention
from visattn.kernels.visual_sink_attention import visual_sink_attention

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
