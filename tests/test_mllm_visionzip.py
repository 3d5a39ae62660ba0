"""VisionZip through ``attach`` on a tiny random LLaVA, against a transcription of the official
``CLIPVisionTower_VisionZip.forward`` on the encoder's own attention maps (``output_attentions``)."""

import pytest
import torch

from tests.test_mllm_tokens import (
    ATTENTION,
    IMG,
    PATCHES,
    manual_logits,
    sample,
    tiny_inputs,
    tiny_llava,
)
from visattn.mllm_tokens import VisionZip, attach


def official_visionzip(model, pix, dominant, contextual):
    """The official selection and merge on eager CLIP outputs, then the projector: ``[I, d + c, D]``."""
    return official_visionzip_indexed(model, pix, dominant, contextual)[0]


@torch.no_grad()
def official_visionzip_indexed(model, pix, dominant, contextual):
    """:func:`official_visionzip` and its ``all_indices`` ``[I, d]`` ([CLS] 0, then the top patches + 1)."""
    tower = model.model.vision_tower
    out = tower(pix, output_hidden_states=True, output_attentions=True)
    attn, hidden = out.attentions[-2], out.hidden_states[-2]
    encoder = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder  # 5.4 nests it
    layer = encoder.layers[-2]
    x = layer.layer_norm1(out.hidden_states[-3])
    heads = layer.self_attn.num_heads
    metric = layer.self_attn.k_proj(x).view(*x.shape[:2], heads, -1).mean(2)  # raw keys, mean over heads
    b, n, dim = hidden.shape
    top = attn[:, :, 0, 1:].sum(1).topk(dominant - 1, dim=1).indices + 1
    idx = torch.cat([torch.zeros(b, 1, dtype=top.dtype), top], dim=1)
    mask = torch.ones(b, n, dtype=torch.bool).scatter_(1, idx, False)
    dom = hidden.masked_select(~mask[..., None]).view(b, dominant, dim)
    m = metric[mask].view(b, n - dominant, -1)
    h = hidden.masked_select(mask[..., None]).view(b, n - dominant, dim)
    m = m / m.norm(dim=-1, keepdim=True)
    step = max(1, m.shape[1] // contextual)
    targets = torch.arange(0, m.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(m.shape[1]), targets)
    sim = torch.bmm(m[:, others], m[:, targets].transpose(1, 2))
    one_hot = torch.zeros(b, int(others.sum()), contextual).scatter_(2, sim.argmax(2)[..., None], 1)
    counts = one_hot.sum(1).clamp(min=1)[..., None]
    merged = h[:, targets] + torch.bmm(one_hot.transpose(1, 2), h[:, others]) / counts
    return model.model.multi_modal_projector(torch.cat([dom, merged], dim=1)), idx


def visionzip_embeds(model, sid, spix, dominant, contextual):
    """The LLM input of one unpadded sample: each image's patch tokens replaced by its VisionZip tokens."""
    tokens = official_visionzip(model, spix, dominant, contextual)
    emb = model.get_input_embeddings()(sid)[0]
    parts, start = [], 0
    visual = (sid[0] == IMG).nonzero()[:, 0].view(-1, PATCHES)
    for image, first in zip(tokens, visual[:, 0].tolist()):
        parts += [emb[start:first], image]
        start = first + PATCHES
    return torch.cat([*parts, emb[start:]])[None]


@pytest.mark.parametrize("attn,images", [("eager", 1), ("sdpa", 2), (ATTENTION[2], 2)], indirect=["attn"])
def test_visionzip_matches_official_transcription(attn, images):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images)
    with torch.no_grad(), attach(model, VisionZip(dominant=6, contextual=4)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        stats = handle.stats
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        ref = manual_logits(eager, visionzip_embeds(eager, sid, spix, 6, 4))  # contiguous positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert stats[b]["kept_per_layer"] == [10 * images] * 4


def test_visionzip_generate_with_cache_matches_cache_free_reference():
    model, eager = tiny_llava("sdpa"), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=2, text_after=(5, 3))
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, VisionZip(dominant=5, contextual=3)):
        out = model.generate(**gen, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**gen, use_cache=False)
    assert torch.equal(out.sequences, uncached)
    cached = out.sequences[:, ids.shape[1] :]
    embed_words = eager.get_input_embeddings()
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images=2)
        prompt = visionzip_embeds(eager, sid, spix, 5, 3)
        tokens = torch.zeros(1, 0, dtype=torch.long)
        for step in range(4):
            logits = manual_logits(eager, torch.cat([prompt, embed_words(tokens)], dim=1))
            torch.testing.assert_close(out.logits[step][b], logits[0, -1], atol=1e-5, rtol=1e-4)
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(cached[b], tokens[0])


def test_visionzip_presets_remove_restores_and_invalid_arguments():
    assert (VisionZip().dominant, VisionZip().contextual) == (54, 10)
    assert (VisionZip(128).dominant, VisionZip(192).contextual) == (108, 30)
    model = tiny_llava("sdpa")
    ids, mask, pix = tiny_inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        with attach(model, VisionZip(dominant=4, contextual=2)):
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=2)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref)
    for kwargs, match in (
        (dict(tokens=100), "presets"),
        (dict(tokens=128, dominant=4, contextual=2), "either"),
        (dict(dominant=4), "either"),
        (dict(dominant=0, contextual=2), "dominant"),
        (dict(dominant=4, contextual=-1), "contextual"),
    ):
        with pytest.raises(ValueError, match=match):
            VisionZip(**kwargs)
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, VisionZip())  # 64 > 16 patches
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, VisionZip(dominant=PATCHES, contextual=1))
