"""DivPrune, DART, PyramidDrop, VisionZip and SparseVLM leave no trace after ``remove()`` and run beam search
(without the cache, DART, PyramidDrop and SparseVLM re-decide at every step from the longer text, as the
official code would; the pre-LLM methods must give the same beams either way)."""

import torch

from tests.test_mllm_tokens import tiny_inputs, tiny_llava
from visattn.mllm_tokens import DART, DivPrune, PyramidDrop, SparseVLM, VisionZip, attach


def test_remove_restores_hooks_and_logits_and_beams_match_cache_free():
    model = tiny_llava("sdpa")
    # one image per prompt: with two, transformers' own beams differ with and without the cache even
    # without a reducer (measured with transformers 5.18)
    ids, mask, pix = tiny_inputs()
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        model.generate(**gen)
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        hooks = {m: (list(m._forward_pre_hooks), list(m._forward_hooks)) for m in model.modules()}
        reducers = (
            DivPrune(keep=4), DART(keep=8, pivots_image=2, pivots_text=2),
            PyramidDrop(layers=(1, 3)), VisionZip(dominant=4, contextual=2),
            SparseVLM(counts=(6, 3), layers=(0, 2)),
        )  # fmt: skip
        for reducer in reducers:
            with attach(model, reducer):
                beams = model.generate(**gen, num_beams=2, num_return_sequences=2)
                if isinstance(reducer, (DivPrune, VisionZip)):  # decisions that ignore the text
                    uncached = model.generate(**gen, num_beams=2, num_return_sequences=2, use_cache=False)
                    assert torch.equal(beams, uncached)
            assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref)
            for m, (pre, post) in hooks.items():
                assert list(m._forward_pre_hooks) == pre and list(m._forward_hooks) == post
                assert "forward" not in m.__dict__
