"""SparseVLM through ``attach`` on a tiny random LLaVA, against an unbatched loop written from the official
v1.5 code (raters, ``attn_postprocess_topk``, recycling with ``cluster_and_merge`` minus its jitter)."""

import pytest
import torch

from tests.test_mllm_pyramiddrop import head_mean_attention
from tests.test_mllm_tokens import ATTENTION, IMG, PATCHES, embed, sample, tiny_inputs, tiny_llava
from visattn.mllm_tokens import SparseVLM, attach
from visattn.mllm_tokens.sparsevlm import dpc_knn_merge


def official_cluster_and_merge(x, cluster_num):
    """The official ``cluster_and_merge`` on ``x [1, N, C]`` without the density jitter; also the
    cluster centres (``index_down``)."""
    c = x.shape[2]
    dist = (x[:, :, None] - x[:, None]).norm(dim=-1) / c**0.5
    dist_nearest = dist.topk(cluster_num, dim=-1, largest=False).values
    density = (-(dist_nearest**2).mean(-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).to(x.dtype)
    dist_max = dist.flatten(1).max(-1)[0][:, None, None]
    parent, _ = (dist * mask + dist_max * (1 - mask)).min(-1)
    index_down = (parent * density).topk(cluster_num, dim=-1).indices
    idx_cluster = dist[0, index_down[0]].argmin(0)
    idx_cluster[index_down[0]] = torch.arange(cluster_num)
    weight = torch.zeros(cluster_num, 1).index_add_(0, idx_cluster, torch.ones(x.shape[1], 1)) + 1e-6
    merged = torch.zeros(cluster_num, c).index_add_(0, idx_cluster, x[0] / weight[idx_cluster])
    return merged, index_down[0]


@torch.no_grad()
def sparsevlm_reference(model, ids, pix, sparse, recycle=True, prompt_len=None, rank_rule=None):
    """Logits of one unpadded one-image sample. ``sparse`` maps a sparse layer to its count. The raters
    come from the first ``prompt_len`` tokens (a cache-free decode step keeps the prompt's raters).
    ``rank_rule=(scale, bias)``: v1.0's ``attn_postprocess_rank`` count instead of ``sparse``'s."""
    vis = ids[0] == IMG
    unit = torch.where(vis, 0, -1)
    return sparsevlm_rule(model, embed(model, ids, pix), unit, sparse, recycle, prompt_len, rank_rule)


@torch.no_grad()
def sparsevlm_rule(model, hidden, unit, sparse, recycle=True, prompt_len=None, rank_rule=None):
    """:func:`sparsevlm_reference` on the LLM input ``hidden [1, n, D]`` of one unpadded sample whose
    visual tokens belong to the images ``unit [n]`` (-1: not visual); each image is ranked, recycled
    and compacted into its own first slots."""
    lm = model.model.language_model
    vis = unit >= 0
    end = int(vis.nonzero()[-1]) + 1
    prompt_len = hidden.shape[1] if prompt_len is None else prompt_len
    v, t = hidden[0, vis], hidden[0, end:prompt_len]
    rel = (v @ t.T).softmax(1).mean(0)
    raters = torch.zeros(hidden.shape[1], dtype=torch.bool)
    raters[end:prompt_len] = rel > rel.mean()
    for i, layer in enumerate(lm.layers):
        n = hidden.shape[1]
        pos = torch.arange(n)[None]  # truncated (re-numbered) position ids
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        out = layer(
            hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, pos), position_ids=pos
        )
        if i in sparse:
            relation = head_mean_attention(lm, i, hidden, pos)[raters]
            keep, new = ~vis, out.clone()
            for image in unit[vis].unique().tolist():
                slots = (unit == image).nonzero()[:, 0]
                score, count = relation[:, slots].mean(0), sparse[i]
                if rank_rule is not None:
                    rank = int(torch.linalg.matrix_rank(relation[:, slots].float()))
                    if rank == slots.numel():
                        keep[slots] = True
                        continue
                    count = int(rank * rank_rule[0] + rank_rule[1])
                top = score.topk(min(count, slots.numel() - 1)).indices.sort().values
                deleted = torch.ones(slots.numel(), dtype=torch.bool)
                deleted[top] = False
                parts = [out[0, slots[top]]]
                if recycle:
                    chosen = score[deleted].topk(int(int(deleted.sum()) * 0.3) + 1).indices
                    parts.append(
                        official_cluster_and_merge(
                            out[:, slots[deleted][chosen]], int(chosen.numel() / 10) + 1
                        )[0]
                    )
                content = torch.cat(parts)
                new[0, slots[: content.shape[0]]] = content
                keep[slots[: content.shape[0]]] = True
            out, unit, raters = new[:, keep], unit[keep], raters[keep]
            vis = unit >= 0
        hidden = out
    return model.lm_head(lm.norm(hidden))


def test_dpc_knn_merge_matches_official_cluster_and_merge():
    g = torch.Generator().manual_seed(0)
    for n, clusters in ((30, 4), (7, 1), (12, 12)):
        x = torch.randn(n, 16, generator=g)
        merged, centres = dpc_knn_merge(x, clusters)
        official, official_centres = official_cluster_and_merge(x[None], clusters)
        torch.testing.assert_close(merged, official)
        assert torch.equal(centres, official_centres)


@pytest.mark.parametrize(
    "attn,recycle", [("eager", True), ("sdpa", False), (ATTENTION[2], True)], indirect=["attn"]
)
def test_sparsevlm_matches_official_loop(attn, recycle):
    model, eager = tiny_llava(attn, layers=5), tiny_llava("eager", layers=5)
    ids, mask, pix = tiny_inputs(text_after=(6, 3))
    reducer = SparseVLM(counts=(9, 5, 2), layers=(0, 1, 3), recycle=recycle)
    with torch.no_grad(), attach(model, reducer) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        stats = handle.stats
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b)
        ref = sparsevlm_reference(eager, sid, spix, {0: 9, 1: 5, 3: 2}, recycle)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
    # 16 -> 9 kept + recycled from 7 deleted (int(2.1) + 1 = 3 chosen, 1 cluster) -> 10 -> 5 + 1 -> 6 -> 2 + 1
    assert stats[0]["kept_per_layer"] == ([16, 10, 6, 6, 3] if recycle else [16, 9, 5, 5, 2])


@pytest.mark.parametrize("attn", ["eager", "sdpa"], indirect=True)
def test_sparsevlm_v1_rank_rule_matches_official_loop(attn):
    model, eager = tiny_llava(attn, layers=5), tiny_llava("eager", layers=5)
    ids, mask, pix = tiny_inputs(text_after=(6, 3))
    reducer = SparseVLM(layers=(0, 1, 3), rank_rule=(1.5, 1.0))
    with torch.no_grad(), attach(model, reducer) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        kept = [s["kept_per_layer"] for s in handle.stats]
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b)
        sparse = {0: None, 1: None, 3: None}
        ref = sparsevlm_reference(eager, sid, spix, sparse, rank_rule=(1.5, 1.0))
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
    assert kept[0] != kept[1] and all(k[-1] < 16 for k in kept), kept  # adaptive: per-sample counts
    assert SparseVLM(128, rank_rule=True).rank_rule == (9.0, 6.0)
    assert handle.reducer.layers == (0, 1, 3) and SparseVLM(rank_rule=True).layers[-1] == 19 / 32


def test_sparsevlm_batch_of_two_images_equals_each_sample_alone():
    model = tiny_llava("sdpa", layers=5)
    ids, mask, pix = tiny_inputs(images=2, text_after=(6, 3))
    reducer = SparseVLM(counts=(9, 5, 2), layers=(0, 1, 3))
    with torch.no_grad(), attach(model, reducer) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        for b in range(2):
            sid, spix = sample(ids, mask, pix, b, images=2)
            alone = model(input_ids=sid, pixel_values=spix).logits
            torch.testing.assert_close(out[b, -alone.shape[1] :], alone[0], atol=1e-5, rtol=1e-4)
            assert handle.stats[0]["kept_per_layer"] == [2 * n for n in (16, 10, 6, 6, 3)]


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_sparsevlm_generate_with_cache_matches_cache_free_reference(attn):
    model, eager = tiny_llava(attn, layers=5), tiny_llava("eager", layers=5)
    ids, mask, pix = tiny_inputs(text_after=(6, 3))
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=3, do_sample=False)
    with torch.no_grad(), attach(model, SparseVLM(counts=(9, 5, 2), layers=(0, 1, 3))):
        out = model.generate(**gen, return_dict_in_generate=True, output_logits=True)
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b)
        tokens = sid
        for step in range(3):
            logits = sparsevlm_reference(eager, tokens, spix, {0: 9, 1: 5, 3: 2}, prompt_len=sid.shape[1])
            torch.testing.assert_close(out.logits[step][b], logits[0, -1], atol=1e-5, rtol=1e-4)
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(out.sequences[b, ids.shape[1] :], tokens[0, sid.shape[1] :])


def test_sparsevlm_keep_all_is_identity_remove_restores_and_invalid_arguments():
    model = tiny_llava("sdpa")
    ids, mask, pix = tiny_inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        # no no-op setting: the official count rule keeps at most n - 1 visual tokens
        with attach(model, SparseVLM(counts=(PATCHES,), layers=(2,), recycle=False)) as handle:
            model(input_ids=ids, attention_mask=mask, pixel_values=pix)
            assert handle.stats[0]["kept_per_layer"] == [PATCHES] * 3 + [PATCHES - 1]
        with attach(model, SparseVLM(counts=(4, 2), layers=(0, 1))):
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=2)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref)
    assert SparseVLM(64).counts == (66, 30, 17) and SparseVLM(128).counts == (303, 110, 36)
    with attach(tiny_llava(layers=32), SparseVLM(counts=(16, 8, 4))) as handle:  # the default layers
        assert handle.reducer._count == {2: 16, 6: 8, 15: 4}
    for kwargs, match in (
        (dict(tokens=100), "presets"),
        (dict(counts=(3,)), "one per sparse layer"),
        (dict(counts=(0, 1, 1)), "ints >= 1"),
        (dict(layers=(1.5,), counts=(2,)), "fractions"),
        (dict(layers=()), "non-empty"),
        (dict(recycle=1), "bool"),
        (dict(rank_rule=(1.0,)), "rank_rule"),
        (dict(tokens=96, rank_rule=True), "rank_rule=True"),
    ):
        with pytest.raises(ValueError, match=match):
            SparseVLM(**kwargs)
    for layers in ((1, 1), (2, 3)):
        with pytest.raises(ValueError, match="strictly increasing"):
            attach(model, SparseVLM(counts=(2, 2), layers=layers))
