"""Adapters to other libraries (diffusers, open_clip, lmms-eval).

- :mod:`visattn.integrations.diffusers`: ``apply_agent_attention(pipe_or_unet)`` /
  ``remove_agent_attention(...)`` install AgentSD (agent attention + token merging) on a
  ``UNet2DConditionModel`` through diffusers' attention-processor API.
- :mod:`visattn.integrations.handles`: ``HandleRegistry``, how an integration finds the handle it
  installed on a model again (weakly, nothing set on the model).
- :mod:`visattn.integrations.open_clip`: importing it registers open_clip model configs
  (``visattn-biformer-s``, ``visattn-van-b2``, ``visattn-agent-swin-t``, ...) whose vision
  tower is a visattn timm backbone.
- :mod:`visattn.integrations.lmms_eval`: the ``visattn`` model of lmms-eval (entry point
  ``lmms_eval.models``; needs ``visattn[eval]``): lmms-eval's model class of a family with a reducer
  attached, reducer statistics beside the results (docs/lmms_eval.md).
- :mod:`visattn.integrations.reducer_args`: any ``visattn.mllm_tokens`` reducer built from text
  arguments, typed from its signature.
"""
