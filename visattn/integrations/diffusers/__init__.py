"""Agent attention for Stable Diffusion UNets in diffusers (AgentSD, done with diffusers' processor API).

AgentSD (Han et al., "Agent Attention", ECCV 2024, section on Stable Diffusion; official code
LeapLabTHU/Agent-Attention, ``agentsd/``) accelerates a pretrained Stable Diffusion model without
training. It builds on ToMe for SD (Bolya & Hoffman, tomesd). In the self-attention of the
highest-resolution transformer blocks:

1. The block input ``x [B, N, C]`` is split into *dst* tokens (one per ``sy x sx`` cell of the latent
   grid, chosen at random when ``use_rand``) and *src* tokens (the rest). Every src token is matched
   to its most similar dst token (cosine similarity); the ``r = int(N * ratio)`` best-matched src tokens
   are averaged into their dst (bipartite soft matching). The self-attention runs on the ``N - r``
   merged tokens and its output is copied back to all ``N`` tokens.
2. The same matching with ``agent_r = int(N * agent_ratio)`` merges gives ``N - agent_r`` *agent
   tokens*. They are used only while ``2 * (N - agent_r) < N - r``; otherwise the step falls back to
   plain softmax attention on the merged tokens (ToMe only).
3. With ``Q, K, V`` of the merged tokens, ``A = to_q(agent tokens)`` and ``s = head_dim ** -0.5``::

       out = softmax(Q A^T * s ** k_scale2) softmax(A K^T * s) V + k_shortcut * V

   i.e. the query->agent softmax has its own, softer temperature (``k_scale2 = 0.3``) and the value
   shortcut ``k_shortcut = 0.075`` adds back part of ``V``.
4. The official usage re-patches the model during sampling: steps 0-19 use ``sx = sy = 4,
   ratio = 0.4, agent_ratio = 0.95``; from step 20 on ``sx = sy = 2, ratio = 0.4, agent_ratio = 0.5``
   (which leaves ToMe only at SD 1.5's 64x64 latents). :data:`AGENTSD_SCHEDULE` encodes that.

The official ``agentsd`` package swaps classes of LDM modules and never supported diffusers. Here the
same computation is installed with ``Attention.set_processor`` on the chosen ``attn1`` modules only;
two kinds of PyTorch forward pre-hooks collect what a processor cannot see by itself (the latent size
from the UNet input, and the transformer-block input that AgentSD uses as the matching metric; why
hooks: :mod:`~visattn.integrations.diffusers.processor`). The
step schedule follows a step counter that the pipeline's ``callback_on_step_end`` advances::

    handle = apply_agent_attention(pipe)
    image = pipe(prompt, num_inference_steps=50, callback_on_step_end=handle.callback).images[0]
    remove_agent_attention(pipe)          # original processors back, bit-identical outputs

Agent attention itself is :func:`visattn.kernels.agent_attention`. That op has one ``scale`` for both
softmaxes; AgentSD's second temperature is applied by scaling the queries before the call:
``(Q * s ** (k_scale2 - 1)) A^T * s == Q A^T * s ** k_scale2``.

Differences from the official code, all deliberate: agent tokens are also formed when ``ratio == 0``
(agent attention without token merging; AgentSD returns before forming agents when nothing is merged);
the random dst choice draws from a CPU generator (seeded by ``seed``, or forked from the global RNG like
AgentSD); a self-attention call that carries an attention mask runs the original processor unchanged
(AgentSD prints "Mask not supported yet!" and ignores the mask).

The parts: :mod:`~visattn.integrations.diffusers.schedule` (phases, step counter),
:mod:`~visattn.integrations.diffusers.token_merging` (ToMe's bipartite matching),
:mod:`~visattn.integrations.diffusers.agent_sd` (the attention maths),
:mod:`~visattn.integrations.diffusers.processor` (the attention processor) and
:mod:`~visattn.integrations.diffusers.install` (apply / remove, the handle).
"""

from visattn.integrations.diffusers.agent_sd import agentsd_attention
from visattn.integrations.diffusers.install import (
    AgentSDHandle,
    agent_attention_targets,
    apply_agent_attention,
    remove_agent_attention,
)
from visattn.integrations.diffusers.processor import AgentSDAttnProcessor
from visattn.integrations.diffusers.schedule import AGENTSD_SCHEDULE, AgentSDPhase
from visattn.integrations.diffusers.token_merging import TokenMatching, bipartite_token_matching

__all__ = [
    "AGENTSD_SCHEDULE",
    "AgentSDAttnProcessor",
    "AgentSDHandle",
    "AgentSDPhase",
    "TokenMatching",
    "agent_attention_targets",
    "agentsd_attention",
    "apply_agent_attention",
    "bipartite_token_matching",
    "remove_agent_attention",
]
