"""DART, PyramidDrop and SparseVLM through ``attach`` on tiny random Qwen2-VL / Qwen2.5-VL models (dynamic
resolution images, videos, M-RoPE), against unbatched references of each rule that re-run the language
model's layers with every kept token at its original ``(t, h, w)`` ids (DART's official Qwen2-VL code;
the extension used for PyramidDrop and SparseVLM, which have no official Qwen path)."""

import pytest
import torch
from transformers import AttentionInterface

import tests.test_mllm_qwen2_vl as qw
from tests.test_mllm_dart import official_selection
from tests.test_mllm_sparsevlm import official_cluster_and_merge
from tests.test_mllm_tokens import FLASH
from visattn.mllm_tokens import DART, PyramidDrop, SparseVLM, attach

RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (q [1, H, n, D], k [1, Hkv, n, D])


def recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that also records each layer's q and k (after M-RoPE)."""
    RECORDED[module.layer_idx] = (query, key)
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    probs = ((query @ k.transpose(-1, -2)) * scaling + attention_mask).softmax(-1)
    return (probs @ v).transpose(1, 2), probs


AttentionInterface.register("visattn_test_recording", recording_attention)


def causal(n: int) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]


def head_mean_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` causal softmax attention of ``q [1, H, n, D]`` on ``k [1, Hkv, n, D]``, float32, mean over
    heads."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5 + causal(q.shape[2])
    return logits.softmax(-1).mean(1)[0]


def layer_qk(lm, i: int, hidden: torch.Tensor, pos: torch.Tensor):
    """q and k of decoder layer ``i`` on its input ``hidden [1, n, D]`` at M-RoPE ids ``pos [3, 1, n]``."""
    layer = lm.layers[i]
    layer.self_attn(
        hidden_states=layer.input_layernorm(hidden), attention_mask=causal(hidden.shape[1]),
        position_embeddings=lm.rotary_emb(hidden, pos),
    )  # fmt: skip
    return RECORDED[i]


@torch.no_grad()
def rule_reference(model, row, units, rule, new=None):
    """``(logits [1, L', V], visual tokens each layer saw)`` of one unpadded sample: prompt ``row`` (whose
    images / videos have ``units`` visual tokens each) plus generated tokens ``new [1, T]``. Before layer
    ``i``, ``rule(i, hidden, pos, unit, index)`` sees the prompt's current slots (``hidden [1, p, D]``,
    M-RoPE ids ``pos [3, 1, p]``, ``unit [p]`` the image of each visual slot or -1, ``index [p]`` their
    prompt positions) and may return ``(slots, replaced)``: the prompt slots that continue (generated
    tokens always do) and new hidden states for the prompt slots (or None). Tokens keep their ids."""
    lm = model.model.language_model
    embeds, pos = qw.lm_inputs(model, qw.with_tokens(row, new) if new is not None else row)
    ids = row["input_ids"][0]
    prompt = ids.shape[0]
    unit = torch.full((embeds.shape[1],), -1)
    unit[((ids == qw.IMG) | (ids == qw.VID)).nonzero()[:, 0]] = torch.repeat_interleave(
        torch.arange(len(units)), torch.tensor(units)
    )
    index, hidden, seen = torch.arange(embeds.shape[1]), embeds, []
    impl, lm.config._attn_implementation = lm.config._attn_implementation, "visattn_test_recording"
    try:
        for i, layer in enumerate(lm.layers):
            p = int((index < prompt).sum())
            step = rule(i, hidden[:, :p], pos[:, :, index[:p]], unit[index[:p]], index[:p])
            if step is not None:
                slots, replaced = step
                if replaced is not None:
                    hidden = torch.cat([replaced, hidden[:, p:]], 1)
                slots = torch.cat([slots, torch.arange(p, hidden.shape[1])])
                index, hidden = index[slots], hidden[:, slots]
            seen.append(int((unit[index] >= 0).sum()))
            pe = lm.rotary_emb(hidden, pos[:, :, index])
            hidden = layer(hidden, attention_mask=causal(hidden.shape[1]), position_embeddings=pe)
        return model.lm_head(lm.norm(hidden)), seen
    finally:
        lm.config._attn_implementation = impl


# ------------------------------------------------------------------------------------------ the rules
def dart_rule(model, layer, keep, p_img, p_txt):
    """Official ``get_retained_image_token`` before layer ``layer``: keys of layer ``layer - 1``; tokens per
    pivot ``int(n x keep / pivots)`` (the official Qwen2-VL budget) or ``images x keep // pivots``."""
    lm = model.model.language_model

    def rule(i, hidden, pos, unit, index):
        if i != layer:
            return None
        n = hidden.shape[1]
        keys = RECORDED[layer - 1][1][0, :, :n].transpose(0, 1).reshape(n, -1)
        visual = (unit >= 0).nonzero()[:, 0]
        pivots = p_img + p_txt
        images = int(unit.max()) + 1
        top = int(visual.numel() * keep / pivots) if isinstance(keep, float) else images * keep // pivots
        return official_selection(keys, lm.norm(hidden)[0], visual, top, p_img, p_txt), None

    return rule


def pdrop_rule(model, stages):
    """``pdrop_rank_drop`` at each stage layer: that layer's q/k on its input, the last prompt token's row;
    ``int(visual tokens x ratio)`` kept."""
    lm = model.model.language_model
    total = {}

    def rule(i, hidden, pos, unit, index):
        visual = unit >= 0
        total.setdefault("n", int(visual.sum()))
        if i not in stages:
            return None
        score = head_mean_probs(*layer_qk(lm, i, hidden, pos))[-1]
        keep = ~visual
        keep[score.masked_fill(~visual, float("-inf")).topk(int(total["n"] * stages[i])).indices] = True
        return keep.nonzero()[:, 0], None

    return rule


def sparsevlm_rule(sparse, recycle=True):
    """SparseVLM v1.5 after each sparse layer (``sparse``: layer -> count per image): raters from the
    layer-0 input, the raters' mean attention of that layer, ``min(count, n - 1)`` kept per image;
    recycled tokens (official ``cluster_and_merge``) at their cluster centres' slots and ids."""
    raters = {}

    def rule(i, hidden, pos, unit, index):
        visual = unit >= 0
        if i == 0:
            after = int(visual.nonzero()[-1]) + 1
            relation = (hidden[0, visual] @ hidden[0, after:].T).softmax(1).mean(0)
            raters["at"] = index[after:][relation > relation.mean()]
        if i - 1 not in sparse:
            return None
        n = hidden.shape[1]
        q, k = RECORDED[i - 1]
        score = head_mean_probs(q[:, :, :n], k[:, :, :n])[torch.isin(index, raters["at"])].mean(0)
        keep, replaced = ~visual, hidden.clone()
        for u in unit[visual].unique().tolist():
            slots = (unit == u).nonzero()[:, 0]
            top = score[slots].topk(min(sparse[i - 1], slots.numel() - 1)).indices
            keep[slots[top]] = True
            if recycle:
                deleted = slots[~torch.isin(slots, slots[top])]
                chosen = deleted[score[deleted].topk(int(deleted.numel() * 0.3) + 1).indices]
                merged, centres = official_cluster_and_merge(hidden[:, chosen], int(chosen.numel() / 10) + 1)
                replaced[0, chosen[centres]] = merged
                keep[chosen[centres]] = True
        return keep.nonzero()[:, 0], replaced

    return rule


# (reducer, layout, rule factory (model -> rule), visual tokens each layer sees per sample)
CASES = {
    "dart_fraction": (
        lambda: DART(layer=2, keep=0.75, pivots_image=1, pivots_text=2),
        qw.WITH_VIDEO,
        lambda m: dart_rule(m, 2, 0.75, 1, 2),
        [[14, 14, 10, 10], [4, 4, 4, 4]],  # int(14 x 0.75 / 3) = 3 per pivot: 1 + 3 x 3; 4: all
    ),
    "dart_count": (
        lambda: DART(layer=1, keep=2, pivots_image=1, pivots_text=1),
        qw.IMAGES_ONLY,
        lambda m: dart_rule(m, 1, 2, 1, 1),
        [[6, 3, 3, 3], [10, 5, 5, 5]],  # one image: 1 + 2 x 1; two: 1 + 2 x 2
    ),
    "pyramiddrop": (
        lambda: PyramidDrop(layers=(1, 2), ratio=(0.75, 0.5)),
        qw.WITH_VIDEO,
        lambda m: pdrop_rule(m, {1: 0.75, 2: 0.5}),
        [[14, 10, 7, 7], [4, 3, 2, 2]],
    ),
    "sparsevlm": (
        lambda: SparseVLM(counts=(4, 2), layers=(0, 1)),
        qw.WITH_VIDEO,
        lambda m: sparsevlm_rule({0: 4, 1: 2}),
        [[14, 10, 6, 6], [4, 4, 3, 3]],  # per unit: 8 or 6 -> 4 + 1 -> 2 + 1; 4 -> 3 + 1 -> 2 + 1
    ),
    "sparsevlm_no_recycling": (
        lambda: SparseVLM(counts=(4, 2), layers=(0, 1), recycle=False),
        qw.IMAGES_ONLY,
        lambda m: sparsevlm_rule({0: 4, 1: 2}, recycle=False),
        [[6, 4, 2, 2], [10, 7, 4, 4]],
    ),
}


@pytest.mark.parametrize(
    "family,attn,case",
    [
        ("qwen2_vl", "eager", "dart_fraction"),
        ("qwen2_5_vl", "sdpa", "dart_count"),
        ("qwen2_vl", "sdpa", "pyramiddrop"),
        ("qwen2_5_vl", "eager", "pyramiddrop"),
        ("qwen2_vl", "sdpa", "sparsevlm"),
        ("qwen2_5_vl", "eager", "sparsevlm"),
        ("qwen2_vl", FLASH, "sparsevlm_no_recycling"),
    ],
    indirect=["attn"],
)
def test_batch_matches_rule_reference_with_original_mrope_ids(family, attn, case):
    make, layout, rule, kept = CASES[case]
    model, eager = qw.tiny_qwen(family, attn), qw.tiny_qwen(family, "eager")
    inputs, rows = qw.tiny_inputs(layout)  # left padded, images / videos of different sizes and counts
    with torch.no_grad(), attach(model, make()) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    assert [s["kept_per_layer"] for s in stats] == kept
    for b, row in enumerate(rows):
        ref, seen = rule_reference(eager, row, qw.units_of(layout[b]), rule(eager))
        assert seen == kept[b]
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["dart_fraction", "pyramiddrop", "sparsevlm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"], indirect=True)
def test_generate_with_cache_matches_cache_free_reference(case, attn):
    make, layout, rule, _ = CASES[case]
    model, eager = qw.tiny_qwen("qwen2_vl", attn), qw.tiny_qwen("qwen2_vl", "eager")
    inputs, rows = qw.tiny_inputs(layout)
    start = inputs["input_ids"].shape[1]
    gen = dict(inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), attach(model, make()):
        out = model.generate(**gen)
    for b, row in enumerate(rows):
        new = torch.zeros(1, 0, dtype=torch.long)
        for step in range(3):
            # every step re-runs the whole sequence; the prompt's choices are made on the prompt alone
            logits, _ = rule_reference(eager, row, qw.units_of(layout[b]), rule(eager), new)
            torch.testing.assert_close(out.logits[step][b], logits[0, -1], atol=1e-5, rtol=1e-4)
            new = torch.cat([new, logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(out.sequences[b, start:], new[0])


@pytest.mark.parametrize("family", qw.FAMILIES)
def test_keep_everything_matches_unattached(family):
    model = qw.tiny_qwen(family, "sdpa")
    inputs, _ = qw.tiny_inputs(qw.WITH_VIDEO)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        # DART without text pivots at keep=1.0: the image pivots take every token; PyramidDrop at ratio 1
        for reducer in (DART(keep=1.0, pivots_image=3, pivots_text=0), PyramidDrop(layers=(1, 2), ratio=1.0)):
            with attach(model, reducer) as handle:
                out = model(**inputs).logits
                assert [s["kept_per_layer"] for s in handle.stats] == [[14] * 4, [4] * 4]
            torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        # SparseVLM has no no-op setting: the official count rule keeps at most n - 1 per image
        with attach(model, SparseVLM(counts=(100,), layers=(1,), recycle=False)) as handle:
            model(**inputs)
            assert [s["kept_per_layer"] for s in handle.stats] == [[14, 14, 12, 12], [4, 4, 3, 3]]


def test_dart_count_budget_that_an_image_cannot_meet_is_refused():
    model = qw.tiny_qwen("qwen2_vl", "sdpa")
    inputs, _ = qw.tiny_inputs(qw.IMAGES_ONLY)  # sample 0: one image of 6 tokens
    match = r"needs 7 visual tokens, but sample 0 has 6.*fractional keep"
    with attach(model, DART(keep=6, pivots_image=1, pivots_text=1)), pytest.raises(ValueError, match=match):
        model(**inputs)
    for keep in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"fractional keep must be in \(0, 1\]"):
            DART(keep=keep)
