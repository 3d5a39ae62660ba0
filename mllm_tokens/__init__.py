"""visattn.mllm_tokens: visual-token reducers for multimodal LLMs."""
