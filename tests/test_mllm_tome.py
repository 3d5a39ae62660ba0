"""ToMe through ``attach`` on a tiny random LLaVA-1.5, against a CLIP forward that merges unique tokens
the way facebookresearch/ToMe does (bipartite soft matching on the head-mean keys after the attention's
residual add, [CLS] protected, ``merge_wavg`` with carried sizes, proportional attention) on each sample
alone; refused on the other families."""

import math

import pytest
import torch

from tests.test_mllm_random import LLAVA_IMAGES, batch_of, check_no_op_and_restore, model_of, view
from tests.test_mllm_tokens import manual_logits
from visattn.mllm_tokens import ToMe, attach
from visattn.mllm_tokens.tome import bipartite_matching, merge_rows


def official_merge(metric: torch.Tensor, r: int):
    """``tome.merge.bipartite_soft_matching(metric, r, class_token=True)``'s merge function, written out."""
    r = min(r, (metric.shape[1] - 1) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True)[..., None]
    unm, src = edges[:, r:].sort(dim=1).values, edges[:, :r]
    dst = node_idx[..., None].gather(1, src)

    def merge(x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        n, t1, c = a.shape
        kept = a.gather(1, unm.expand(n, t1 - r, c))
        b = b.scatter_reduce(1, dst.expand(n, r, c), a.gather(1, src.expand(n, r, c)), reduce="sum")
        return torch.cat([kept, b], dim=1)

    return merge


@torch.no_grad()
def official_features(eager, pix, rs):
    """``[images, 1 + m, Dv]``: CLIP's tokens after layers ``0..len(rs) - 1`` of ToMe on unique tokens,
    ``rs[i]`` merged in layer i."""
    tower = eager.model.vision_tower
    vm = getattr(tower, "vision_model", tower)  # with or without the wrapper, as clip_layers
    x = vm.pre_layrnorm(vm.embeddings(pix))
    size = torch.ones(*x.shape[:2], 1)
    for layer, r in zip(vm.encoder.layers, rs):
        attn, h = layer.self_attn, layer.layer_norm1(x)
        q, k, v = (
            p(h).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        scores = q @ k.transpose(-1, -2) * attn.scale + size.log()[:, None, None, :, 0]  # prop_attn
        x = x + attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))
        merge = official_merge(k.mean(1), r)
        x, size = merge(x * size), merge(size)
        x = x / size
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


@torch.no_grad()
def tome_prompt(eager, inputs, b, rs):
    """LLM input of sample ``b`` alone: each image's tokens replaced by its projected ToMe tokens."""
    embeds, unit, _ = view("llava", eager, inputs, b)
    first = sum(LLAVA_IMAGES[:b])
    pix = inputs["pixel_values"][first : first + LLAVA_IMAGES[b]]
    tokens = eager.model.multi_modal_projector(official_features(eager, pix, rs)[:, 1:])
    parts, at = [], 0
    for u in range(LLAVA_IMAGES[b]):
        slots = (unit == u).nonzero()[:, 0]
        parts += [embeds[0, at : slots[0]], tokens[u]]
        at = int(slots[-1]) + 1
    return torch.cat([*parts, embeds[0, at:]])[None]


def test_matching_and_merge_equal_the_official_functions():
    g = torch.Generator().manual_seed(0)
    metric, x = torch.randn(3, 17, 8, generator=g), torch.randn(3, 17, 5, generator=g)
    for r in (1, 4, 8):
        unmerged, merged, into = bipartite_matching(metric.clone(), r)
        assert torch.equal(merge_rows(x, unmerged, merged, into), official_merge(metric.clone(), r)(x))
        assert not bool((merged == 0).any())  # [CLS] is never merged


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batch_matches_unique_token_tome_on_each_sample_alone(attn):
    model, eager = model_of("llava", attn), model_of("llava", "eager")
    inputs = batch_of("llava", model)
    with torch.no_grad(), attach(model, ToMe(r=3)) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    for b in range(2):
        ref = manual_logits(eager, tome_prompt(eager, inputs, b, [3] * 3))  # contiguous positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        # 17 tokens -> 14 -> 11 -> 8: 7 patch tokens per image reach the LLM
        assert stats[b]["kept_per_layer"] == [7 * LLAVA_IMAGES[b]] * 4


def test_generate_with_cache_matches_cache_free_greedy_rule():
    model, eager = model_of("llava"), model_of("llava", "eager")
    inputs, steps = batch_of("llava", model), 3
    start = inputs["input_ids"].shape[1]
    gen = dict(inputs, max_new_tokens=steps, do_sample=False)
    with torch.no_grad(), attach(model, ToMe(r=[4, 2, 1])):
        cached = model.generate(**gen)
        assert torch.equal(cached, model.generate(**gen, use_cache=False))
    words = eager.get_input_embeddings()
    for b in range(2):
        prompt = tome_prompt(eager, inputs, b, [4, 2, 1])
        new = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(steps):
            logits = manual_logits(eager, torch.cat([prompt, words(new)], 1))
            new = torch.cat([new, logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached[b, start:], new[0])


def test_no_merge_equals_the_unattached_model_and_remove_restores():
    stats = check_no_op_and_restore("llava", ToMe(r=0), ToMe(r=16))
    # capped at half the tokens in every layer: 16 -> 8 -> 4 -> 2
    assert [s["kept_per_layer"][0] for s in stats] == [2 * n for n in LLAVA_IMAGES]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_refused_on_the_other_families(family):
    with pytest.raises(
        ValueError, match="ToMe merges tokens inside the vision tower, which the .* not support"
    ):
        attach(model_of(family), ToMe(r=2))


def test_invalid_arguments():
    for kwargs in ({"r": -1}, {"r": 1.5}, {"r": True}, {"r": []}, {"r": [2, -1, 0]}, {"layers": 0}):
        with pytest.raises(ValueError, match="ToMe"):
            ToMe(**kwargs)
    model = model_of("llava")
    with pytest.raises(ValueError, match="r lists 2 counts for 3 merging vision layers"):
        attach(model, ToMe(r=[1, 2]))
    with pytest.raises(ValueError, match="exceeds the 4-layer vision encoder"):
        attach(model, ToMe(layers=5))
    with pytest.raises(ValueError, match="vision_feature_layer=-2; merge up to the layer it takes"):
        attach(model, ToMe(layers=2))  # the features are layer 2's output, merged only in 0..1
