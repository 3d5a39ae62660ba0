"""The issue-14 reducers (DivPrune, DART, PyramidDrop, VisionZip, SparseVLM) on the families beyond
LLaVA-1.5: they run where they apply (keep-everything equals the unattached model, generate() with the
KV cache agrees with generate() without it, per-image budgets follow each image's tokens) and are refused
with a clear reason where they do not."""

import pytest
import torch

import tests.test_mllm_llava_next as nxt
import tests.test_mllm_llava_onevision as ov
import tests.test_mllm_qwen2_vl as qw
from visattn.mllm_tokens import DART, DivPrune, PyramidDrop, SparseVLM, VisionZip, attach


def next_case():
    model = nxt.tiny_next("sdpa")
    return model, nxt.tiny_inputs(model)


def onevision_case():
    model = ov.tiny_onevision("sdpa")
    return model, ov.tiny_inputs(model)


def qwen_case():
    return qw.tiny_qwen("qwen2_vl", "sdpa"), qw.tiny_inputs()[0]


CASES = {"llava_next": next_case, "llava_onevision": onevision_case, "qwen2_vl": qwen_case}
RUNS = {
    "llava_next": (
        DivPrune(keep=0.5),
        DART(keep=6, pivots_image=1, pivots_text=1),
        PyramidDrop(),
        SparseVLM(counts=(20, 10, 6)),
    ),
    "llava_onevision": (
        DivPrune(keep=0.5),
        DART(keep=6, pivots_image=1, pivots_text=1),
        PyramidDrop(),
        SparseVLM(counts=(20, 10, 6)),
    ),
    "qwen2_vl": (DivPrune(keep=0.5), DivPrune(keep=2)),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_applicable_reducers_keep_everything_and_generate_with_cache(family):
    model, inputs = CASES[family]()
    real = inputs["attention_mask"].bool()
    gen = dict(inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        ref = model(**inputs).logits
        with attach(model, DivPrune(keep=1.0)):
            torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=1e-5, rtol=0)
        for reducer in RUNS[family]:
            with attach(model, reducer) as handle:
                cached = model.generate(**gen)
                stats = handle.stats
                uncached = model.generate(**gen, use_cache=False)
            # a pre-LLM choice (DivPrune) is the same at every cache-free step; methods that rank by the
            # last token's attention re-rank on each cache-free step, so only the prefill's token agrees
            agree = cached.shape[1] if isinstance(reducer, DivPrune) else inputs["input_ids"].shape[1] + 1
            assert torch.equal(cached[:, :agree], uncached[:, :agree]), reducer
            assert all(s["kept_per_layer"][-1] < s["visual_tokens_in"] for s in stats), (reducer, stats)
        assert torch.equal(model(**inputs).logits, ref)  # remove() restored the model


def test_divprune_budgets_follow_each_images_tokens():
    model, inputs = next_case()
    with torch.no_grad(), attach(model, DivPrune(keep=0.5)) as handle:
        model(**inputs)
    # crops of 16 and 8 tokens (tiles lose rows to unpadding) keep half of each
    expected = [sum(round(n * 0.5) for n in crops) for crops in nxt.CROP_TOKENS]
    assert [s["kept_per_layer"][0] for s in handle.stats] == expected


@pytest.mark.parametrize(
    "family,reducer,match",
    [
        ("qwen2_vl", VisionZip(dominant=4, contextual=2), r"\[CLS\]"),
        ("llava_onevision", VisionZip(dominant=4, contextual=2), r"\[CLS\]"),
        ("llava_next", VisionZip(dominant=4, contextual=2), "vision features"),
    ],
)
def test_refused_where_the_method_does_not_apply(family, reducer, match):
    model, inputs = CASES[family]()
    with pytest.raises(ValueError, match=match), attach(model, reducer):
        model(**inputs)
