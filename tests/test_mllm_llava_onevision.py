"""The reducers on a tiny random LLaVA-OneVision (an anyres image whose tile grid is shrunk, two images
of one prompt, a video), against references that take the model's own input embeddings and find the
newline tokens by comparing them with ``image_newline``, not through the adapter's layout."""

import pytest
import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from tests.test_mllm_llava_next import fastv_rule, left_pad
from tests.test_mllm_tokens import ATTENTION, FLASH, manual_logits
from visattn.mllm_tokens import VAR, VTCCLS, DyVTE, FastV, attach
from visattn.mllm_tokens.fastv import keep_budgets

IMG, VID = 100, 101
PATCHES = 16  # a 32x32 view in 8x8 patches; a video frame is pooled to 2x2 = 4 tokens
# sample 0: one (32, 64) image, anyres: 16 base + the 4x8 unpadded tile grid shrunk (anyres_max_1) to
# 2x5 with 2 newlines; then a 2-frame video (8 tokens + 1 newline). Sample 1: two images, one view and
# one newline each. Units (reducers' images): [image, frame, frame] and [image, image].
UNIT_TOKENS = [[26, 4, 4], [16, 16]]
NEWLINES = [3, 2]


def tiny_onevision(
    attn: str = "eager", layers: int = 4, seed: int = 0
) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8,
    )  # fmt: skip
    text = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
    )  # fmt: skip
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=IMG, video_token_id=VID,
        image_grid_pinpoints=[[64, 64]], vision_aspect_ratio="anyres_max_1",
    )  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = attn  # flash: on tests/flash_reference.py (the ``attn`` fixture)
    return model


def tiny_inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(3, 5, 3, 32, 32, generator=g)
    sizes = torch.tensor([[32, 64], [32, 32], [32, 32]])
    per_sample = torch.tensor([1, 2])
    videos = torch.randn(1, 2, 3, 32, 32, generator=g)
    with torch.no_grad():
        feats = model.model.get_image_features(pix, sizes, batch_num_images=per_sample).pooler_output
    n = [len(f) for f in feats]

    def text(k):
        return torch.randint(2, 100, (k,), generator=g).tolist()

    rows = [
        [1, *text(2), *[IMG] * n[0], *text(1), *[VID] * 9, *text(3)],
        [1, *text(2), *[IMG] * n[1], *text(1), *[IMG] * n[2], *text(2)],
    ]
    return dict(
        left_pad(rows), pixel_values=pix, image_sizes=sizes, batch_num_images=per_sample,
        pixel_values_videos=videos,
    )  # fmt: skip


def sample(inputs, b):
    """Sample ``b`` without padding, with its own images (and video)."""
    keep = inputs["attention_mask"][b].bool()
    images = slice(0, 1) if b == 0 else slice(1, 3)
    out = dict(
        input_ids=inputs["input_ids"][b : b + 1, keep], pixel_values=inputs["pixel_values"][images],
        image_sizes=inputs["image_sizes"][images], batch_num_images=inputs["batch_num_images"][b : b + 1],
    )  # fmt: skip
    if b == 0:
        out["pixel_values_videos"] = inputs["pixel_values_videos"]
    return out


@torch.no_grad()
def reference_layout(model, inputs):
    """``(embeds [1, L, D], visual [L])`` of one sample: the model's own LLM input; newline tokens are
    the rows equal to ``image_newline``."""
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        hook.remove()
    embeds, ids = seen["embeds"], inputs["input_ids"][0]
    newline = (embeds[0] == model.model.image_newline).all(-1)
    return embeds, ((ids == IMG) | (ids == VID)) & ~newline


def budget(keep, b):
    return int(keep_budgets(keep, torch.tensor(UNIT_TOKENS[b]), PATCHES).sum())


@torch.no_grad()
def fastv_keep(eager, inputs, layer, keep, b, scoring="last"):
    _, visual = reference_layout(eager, inputs)
    attention = eager(**inputs, output_attentions=True).attentions[layer - 1]
    return fastv_rule(attention, visual, scoring, budget(keep, b))


@torch.no_grad()
def greedy_reference(eager, inputs, kept_prompt, steps, from_layer):
    ids = inputs["input_ids"]
    tokens = ids
    for _ in range(steps):
        emb, _ = reference_layout(eager, dict(inputs, input_ids=tokens))
        keep = torch.cat([kept_prompt, torch.arange(ids.shape[1], tokens.shape[1])])
        logits = manual_logits(eager, emb, keep, from_layer=from_layer)
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens[0, ids.shape[1] :]


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_keep_everything_matches_unattached_and_remove_restores(attn):
    model = tiny_onevision(attn)
    inputs = tiny_inputs(model)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        for reducer in (FastV(keep=1.0), FastV(keep=PATCHES, scoring="all")):
            with attach(model, reducer) as handle:
                out = model(**inputs).logits
                assert [s["visual_tokens_in"] for s in handle.stats] == [34, 32]  # newlines not counted
                assert [s["kept_per_layer"] for s in handle.stats] == [[34] * 4, [32] * 4]
            torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        with attach(model, FastV(keep=3)):
            pruned = model(**inputs).logits
        assert not {"get_image_features", "get_video_features"} & set(model.model.__dict__)
        assert pruned.shape[1] < ref.shape[1]
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize(
    "attn,scoring,keep", [("sdpa", "last", 0.5), ("eager", "all", 5), (FLASH, "last", 5)], indirect=["attn"]
)
def test_fastv_matches_manual_rerun_of_later_layers(attn, scoring, keep):
    model, eager = tiny_onevision(attn), tiny_onevision("eager")
    inputs = tiny_inputs(model)
    with torch.no_grad(), attach(model, FastV(layer=2, keep=keep, scoring=scoring)) as handle:
        out = model(**inputs).logits
    # by hand: 0.5 -> 13 + 2 + 2 | 8 + 8; 5 per 16 tokens -> round(8.125) + 1 + 1 | 5 + 5
    expected = {0.5: [17, 16], 5: [10, 10]}[keep]
    for b in range(2):
        one = sample(inputs, b)
        kept = fastv_keep(eager, one, 2, keep, b, scoring)
        ref = manual_logits(eager, reference_layout(eager, one)[0], kept, from_layer=2)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [[34, 32][b]] * 2 + [expected[b]] * 2


@pytest.mark.parametrize("attn", ["sdpa", FLASH], indirect=True)
def test_generate_with_cache_matches_cache_free_reference(attn):
    model, eager = tiny_onevision(attn), tiny_onevision("eager")
    inputs = tiny_inputs(model)
    gen = dict(inputs, max_new_tokens=3, do_sample=False)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**gen)
        with attach(model, FastV(layer=2, keep=5)) as handle:
            fastv = model.generate(**gen)[:, n:]
            assert [s["kept_per_layer"] for s in handle.stats] == [[34, 34, 10, 10], [32, 32, 10, 10]]
            # generate encodes image and video once and repeats them per returned sequence
            beams = dict(sample(inputs, 0), max_new_tokens=3, num_beams=2, num_return_sequences=2)
            assert model.generate(**beams).shape[0] == 2
            assert [s["kept_per_layer"] for s in handle.stats] == [[34, 34, 10, 10]] * 2
        for reducer in (DyVTE(exit_layer=1), VAR(sink_dims=(3, 7), tau=1.0)):
            with attach(model, reducer):
                cached = model.generate(**gen)
                assert torch.equal(cached, model.generate(**gen, use_cache=False))
        assert torch.equal(model.generate(**gen), plain)  # every reducer removed without a trace
        configs = (model.config.text_config, model.config.vision_config)
        assert [c._attn_implementation for c in configs] == [attn, attn]
    for b in range(2):
        one = sample(inputs, b)
        kept = fastv_keep(eager, one, 2, 5, b)
        assert torch.equal(fastv[b], greedy_reference(eager, one, kept, 3, from_layer=2))


def test_dyvte_keeps_the_newlines_and_vtc_cls_is_refused():
    model = tiny_onevision("sdpa")
    inputs = tiny_inputs(model)
    with torch.no_grad(), attach(model, DyVTE(exit_layer=1)) as handle:
        model(**inputs)
        where = handle.output_positions
    assert [s["kept_per_layer"] for s in handle.stats] == [[34, 34, 0, 0], [32, 32, 0, 0]]
    for b in range(2):
        kept_ids = inputs["input_ids"][b, where[b][where[b] >= 0]]
        assert int(((kept_ids == IMG) | (kept_ids == VID)).sum()) == NEWLINES[b]
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        attach(model, VTCCLS(keep=4, start_layer=0))
    assert model.config.text_config._attn_implementation == "sdpa"
