"""Adapters to other libraries (diffusers, open_clip).

- :mod:`visattn.integrations.diffusers`: ``apply_agent_attention(pipe_or_unet)`` /
  ``remove_agent_attention(...)`` install AgentSD (agent attention + token merging) on a
  ``UNet2DConditionModel`` through diffusers' attention-processor API.
- :mod:`visattn.integrations.open_clip`: importing it registers open_clip model configs
  (``visattn-biformer-s``, ``visattn-van-b2``, ``visattn-agent-swin-t``, ...) whose vision
  tower is a visattn timm backbone.
"""
