"""The issue-14 reducers (DivPrune, DART, PyramidDrop, SparseVLM, VisionZip) on the families beyond
LLaVA-1.5 (LLaVA-NeXT's anyres crops with row-end newlines, LLaVA-OneVision's images and video frames,
Qwen2-VL's dynamic resolution): on a left-padded batch of 2 samples with different image / crop counts
the output equals the method's hand-written rule (tests/test_mllm_<method>.py; VisionZip on LLaVA-NeXT:
the official anyres arrangement) applied to each sample alone, whose units (crops, images, frames) the
references find on their own; generate() with the KV cache equals cache-free greedy decoding of the
same rule; the no-op settings equal the unattached model; remove() restores it bit for bit; and the
methods are refused with a clear reason where they do not apply."""

import pytest
import torch

import tests.test_mllm_llava_next as nxt
import tests.test_mllm_llava_onevision as ov
import tests.test_mllm_qwen2_vl as qw
from tests.test_mllm_dart import dart_rule
from tests.test_mllm_divprune import official_divprune
from tests.test_mllm_pyramiddrop import pdrop_rule
from tests.test_mllm_sparsevlm import sparsevlm_rule
from tests.test_mllm_tokens import manual_logits
from tests.test_mllm_visionzip import official_visionzip_indexed
from visattn.mllm_tokens import DART, DivPrune, PyramidDrop, SparseVLM, VisionZip, attach
from visattn.mllm_tokens.visionzip import anyres_order


# ------------------------------------------------------------------------------------- the families
def model_of(family, attn="sdpa"):
    return {
        "llava_next": lambda: nxt.tiny_next(attn),
        "llava_onevision": lambda: ov.tiny_onevision(attn),
        "qwen2_vl": lambda: qw.tiny_qwen("qwen2_vl", attn),
    }[family]()


def batch_of(family, model):
    """The left-padded batch of 2: NeXT one wide image | two images (5 crops each); OneVision an anyres
    image and a 2-frame video | two images; Qwen2-VL one image | two images of other sizes."""
    if family == "llava_next":
        return nxt.tiny_inputs(model)
    if family == "llava_onevision":
        return ov.tiny_inputs(model)
    return qw.tiny_inputs()[0]


def chunks(visual, sizes):
    """``[L]`` unit of every token: the visual positions cut, in order, into runs of ``sizes``."""
    unit = torch.full(visual.shape, -1, dtype=torch.long)
    unit[visual] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return unit


@torch.no_grad()
def view(family, eager, inputs, b, new=None):
    """Sample ``b`` alone (generated tokens ``new [1, T]`` appended): ``(embeds [1, L, D], unit [L],
    positions)``; ``unit`` numbers the sample's units (-1: not visual, e.g. a newline), ``positions`` is
    None (LLaVA-style 0..L-1) or the stock M-RoPE ids ``[3, 1, L]``."""
    new = torch.zeros(1, 0, dtype=torch.long) if new is None else new
    if family == "llava_next":
        ids, pix, sizes = nxt.sample(inputs, b)
        embeds, _, crop, _ = nxt.reference_layout(eager, torch.cat([ids, new], 1), pix, sizes)
        return embeds, crop, None
    if family == "llava_onevision":
        one = ov.sample(inputs, b)
        one["input_ids"] = torch.cat([one["input_ids"], new], 1)
        embeds, visual = ov.reference_layout(eager, one)
        return embeds, chunks(visual, ov.UNIT_TOKENS[b]), None
    _, rows = qw.tiny_inputs()
    embeds, pos = qw.lm_inputs(eager, qw.with_tokens(rows[b], new))
    ids = qw.with_tokens(rows[b], new)["input_ids"][0]
    return embeds, chunks((ids == qw.IMG) | (ids == qw.VID), qw.units_of(qw.IMAGES_ONLY[b])), pos


def budget(keep, n):
    """Kept tokens of a unit of ``n`` tokens: a fraction of them (rounded, at least 1) or an int count."""
    return min(keep, n) if isinstance(keep, int) else max(1, round(n * keep))


# ------------------------------------------------------------------------------ the rules, per sample
def divprune_kept(embeds, unit, keep):
    """DivPrune: each unit's tokens picked by the official greedy loop on the LLM input embeddings."""
    kept = unit < 0
    for u in unit[unit >= 0].unique().tolist():
        slots = (unit == u).nonzero()[:, 0]
        kept[slots[official_divprune(embeds[0, slots], budget(keep, slots.numel()))]] = True
    return kept.nonzero()[:, 0]


class Rule:
    """One method's rule on one sample alone: ``prompt(...)`` decides on the prompt (the state a decode
    replays), ``logits(...)`` runs the language model on a (possibly longer) sequence with it."""

    def __init__(self, reducer, prompt, logits):
        self.reducer, self.prompt, self.logits = reducer, prompt, logits


def divprune_rule(keep):
    def logits(eager, embeds, unit, pos, kept):
        index = torch.cat([kept, torch.arange(kept.max() + 1, embeds.shape[1])])
        if pos is None:  # LLaVA: contiguous positions over the kept tokens (the official code)
            return manual_logits(eager, embeds[:, index])
        return qw.manual_logits(eager, embeds, pos, index)  # Qwen2-VL: the kept tokens' own M-RoPE ids

    return Rule(
        DivPrune(keep=keep), lambda eager, embeds, unit, pos: divprune_kept(embeds, unit, keep), logits
    )


def dart_rule_of(layer, keep, p_img, p_txt):
    def prompt(eager, embeds, unit, pos):
        return dart_rule(eager, embeds, unit >= 0, len(unit[unit >= 0].unique()), layer, keep, p_img, p_txt)

    def logits(eager, embeds, unit, pos, kept):
        index = torch.cat([kept, torch.arange(kept.max() + 1, embeds.shape[1])])
        return manual_logits(eager, embeds, index, from_layer=layer)  # original positions

    return Rule(DART(layer=layer, keep=keep, pivots_image=p_img, pivots_text=p_txt), prompt, logits)


def pdrop_rule_of(layers, ratios):
    stages = dict(zip(layers, ratios))

    def prompt(eager, embeds, unit, pos):
        return pdrop_rule(eager, embeds, unit >= 0, stages)[1]

    def logits(eager, embeds, unit, pos, kept):
        return pdrop_rule(eager, embeds, unit >= 0, stages, kept=kept)[0]

    return Rule(PyramidDrop(layers=layers, ratio=ratios), prompt, logits)


def sparsevlm_rule_of(layers, counts):
    sparse = dict(zip(layers, counts))

    def logits(eager, embeds, unit, pos, prompt_len):
        return sparsevlm_rule(eager, embeds, unit, sparse, prompt_len=prompt_len)

    # the raters come from the prompt and attend causally: a longer sequence ranks the same
    return Rule(
        SparseVLM(counts=counts, layers=layers), lambda eager, embeds, unit, pos: embeds.shape[1], logits
    )


RULES = {
    "divprune": lambda: divprune_rule(0.5),
    "divprune_int": lambda: divprune_rule(2),
    "dart": lambda: dart_rule_of(2, 6, 1, 1),
    "pyramiddrop": lambda: pdrop_rule_of((1, 2), (0.5, 0.25)),
    "sparsevlm": lambda: sparsevlm_rule_of((1, 2), (6, 3)),
}
PAIRS = [
    (family, method)
    for family in ("llava_next", "llava_onevision")
    for method in ("divprune", "dart", "pyramiddrop", "sparsevlm")
] + [("qwen2_vl", "divprune"), ("qwen2_vl", "divprune_int")]


def run_kwargs(family, inputs):
    """LLaVA-style rows numbered from their first real token (DART's key norms see absolute positions);
    Qwen2-VL computes its M-RoPE ids itself."""
    if family == "qwen2_vl":
        return inputs
    return dict(inputs, position_ids=(inputs["attention_mask"].cumsum(1) - 1).clamp_min(0))


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,method", PAIRS)
def test_batch_matches_the_rule_on_each_sample_alone(family, method, attn):
    model, eager = model_of(family, attn), model_of(family, "eager")
    inputs, rule = batch_of(family, model), RULES[method]()
    with torch.no_grad(), attach(model, rule.reducer) as handle:
        out = model(**run_kwargs(family, inputs)).logits
        stats = handle.stats
    for b in range(2):
        embeds, unit, pos = view(family, eager, inputs, b)
        ref = rule.logits(eager, embeds, unit, pos, rule.prompt(eager, embeds, unit, pos))
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert stats[b]["visual_tokens_in"] == int((unit >= 0).sum())
        assert stats[b]["kept_per_layer"][-1] < stats[b]["visual_tokens_in"]


@pytest.mark.parametrize("family,method", PAIRS)
def test_generate_with_cache_matches_cache_free_greedy_rule(family, method):
    model, eager = model_of(family, "sdpa"), model_of(family, "eager")
    inputs, rule, steps = batch_of(family, model), RULES[method](), 3
    start = inputs["input_ids"].shape[1]
    with torch.no_grad(), attach(model, rule.reducer):
        cached = model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, start:]
    for b in range(2):
        embeds, unit, pos = view(family, eager, inputs, b)
        decided = rule.prompt(eager, embeds, unit, pos)
        new = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(steps):
            embeds, unit, pos = view(family, eager, inputs, b, new)
            logits = rule.logits(eager, embeds, unit, pos, decided)
            new = torch.cat([new, logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached[b], new[0]), (b, cached[b], new[0])


NO_OP = {
    "llava_next": (
        DivPrune(keep=1.0),
        PyramidDrop(layers=(1, 2), ratio=1.0),
        # one image pivot choosing 15 tokens per crop: every one of a sample's 48 / 128 tokens
        DART(keep=nxt.PATCHES - 1, pivots_image=1, pivots_text=0),
    ),
    "llava_onevision": (DivPrune(keep=1.0), PyramidDrop(layers=(1, 2), ratio=1.0)),
    "qwen2_vl": (DivPrune(keep=1.0),),
}
RUNS = {
    "llava_next": (
        DivPrune(keep=0.5),
        DART(keep=6, pivots_image=1, pivots_text=1),
        PyramidDrop(),
        SparseVLM(counts=(12, 8, 4)),  # per view of 16 tokens (a count above it is refused)
    ),
    "llava_onevision": (
        DivPrune(keep=0.5),
        DART(keep=6, pivots_image=1, pivots_text=1),
        PyramidDrop(),
        SparseVLM(counts=(12, 8, 4)),  # per view of 16 tokens (a count above it is refused)
    ),
    "qwen2_vl": (DivPrune(keep=0.5), DivPrune(keep=2)),
}


@pytest.mark.parametrize("family", sorted(NO_OP))
def test_no_op_settings_equal_the_unattached_model_and_remove_restores(family):
    model = model_of(family)
    inputs = batch_of(family, model)
    real = inputs["attention_mask"].bool()
    gen = dict(inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        ref = model(**inputs).logits
        for reducer in NO_OP[family]:
            with attach(model, reducer) as handle:
                torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=1e-5, rtol=0)
                assert all(s["prefill_flops_saved"] == 0 for s in handle.stats), reducer
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
    model = model_of("llava_next")
    inputs = batch_of("llava_next", model)
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
    ],
)
def test_refused_where_the_method_does_not_apply(family, reducer, match):
    model = model_of(family)
    inputs = batch_of(family, model)
    with pytest.raises(ValueError, match=match), attach(model, reducer):
        model(**inputs)


# --------------------------------------------------------------------------- VisionZip on LLaVA-NeXT
GRID = (2, 2)  # tiles (rows, columns) of every test image: [64, 64] is the only grid point


def official_next_image(tokens, keep_idx, rows, cols):
    """The official LLaVA-NeXT arrangement of one image's VisionZip tokens (``prepare_inputs_labels_for_
    multimodal_visionzip`` + ``restore_image_features_sorted``, 576 / 24 written as P / side): the base
    view's tokens, the tiles' dominant patches put back on the stitched grid and read in raster order
    (no unpadding, no newline), the tiles' [CLS] tokens, the tiles' contextual tokens.
    ``tokens [crops, d + c, D]``, ``keep_idx [crops, d]`` as ``CLIPVisionTower_VisionZip.forward``
    returns them."""
    side = int(nxt.PATCHES**0.5)
    base, tiles, idx = tokens[0], tokens[1:], keep_idx[1:]
    n, total, dim = tiles.shape
    num_keep = idx.shape[1]
    restore = idx.sort(dim=1).values[:, 1:] - 1
    restored = torch.zeros(n, nxt.PATCHES, dim)
    mask = torch.zeros(n, nxt.PATCHES, dtype=torch.bool).scatter_(1, restore, True)
    restored[mask] = tiles[:, 1:num_keep].reshape(-1, dim)
    restored = restored.view(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(rows * side, -1, dim)
    mask = mask.view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, -1)
    extra = tiles[:, -(total - num_keep) :].reshape(-1, dim)
    return torch.cat([base, restored[mask], tiles[:, 0], extra])


@torch.no_grad()
def next_visionzip_embeds(eager, inputs, b, dominant, contextual):
    """LLM input of sample ``b`` alone: each image's run of ``<image>`` tokens (newlines included)
    replaced by its official VisionZip tokens."""
    ids, pix, _ = nxt.sample(inputs, b)
    tokens, keep_idx = official_visionzip_indexed(eager, pix.flatten(0, 1), dominant, contextual)
    words = eager.get_input_embeddings()(ids)[0]
    image = (ids[0] == nxt.IMG).long()
    starts = ((image.diff(prepend=image[:1] * 0)) == 1).nonzero()[:, 0].tolist()
    ends = ((image.diff(append=image[-1:] * 0)) == -1).nonzero()[:, 0].tolist()
    parts, at = [], 0
    for i, (start, end) in enumerate(zip(starts, ends)):
        crops = slice(i * nxt.CROPS, (i + 1) * nxt.CROPS)
        parts += [words[at:start], official_next_image(tokens[crops], keep_idx[crops], *GRID)]
        at = end + 1
    return torch.cat([*parts, words[at:]])[None]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_visionzip_on_llava_next_matches_the_official_anyres_arrangement(attn):
    model, eager = model_of("llava_next", attn), model_of("llava_next", "eager")
    inputs = batch_of("llava_next", model)
    with torch.no_grad(), attach(model, VisionZip(dominant=4, contextual=2)) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    for b in range(2):
        ref = manual_logits(eager, next_visionzip_embeds(eager, inputs, b, 4, 2))  # contiguous positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
    # 6 tokens per crop, 5 crops per image; newlines not counted in, dropped as the official code does
    assert [s["visual_tokens_in"] for s in stats] == [48, 128]
    assert [s["kept_per_layer"] for s in stats] == [[30] * 4, [60] * 4]


def test_visionzip_on_llava_next_generate_with_cache_matches_cache_free_reference_and_remove_restores():
    model, eager = model_of("llava_next"), model_of("llava_next", "eager")
    inputs = batch_of("llava_next", model)
    start = inputs["input_ids"].shape[1]
    gen = dict(inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        ref = model(**inputs).logits
        with attach(model, VisionZip(dominant=3, contextual=3)) as handle:
            cached = model.generate(**gen)
            assert torch.equal(cached, model.generate(**gen, use_cache=False))
            # beams: generate encodes the image once and repeats its crops per returned sequence
            ids, pix, sizes = nxt.sample(inputs, 0)
            beams = dict(input_ids=ids, pixel_values=pix, image_sizes=sizes, max_new_tokens=3, num_beams=2)
            beams["num_return_sequences"] = 2
            assert torch.equal(model.generate(**beams), model.generate(**beams, use_cache=False))
            assert [s["kept_per_layer"] for s in handle.stats] == [[30] * 4] * 2
        # sample 0's image has 48 visual tokens: 5 crops x 12 tokens do not fit
        with (
            pytest.raises(ValueError, match="cannot take"),
            attach(model, VisionZip(dominant=8, contextual=4)),
        ):
            model(**inputs)
        assert torch.equal(model(**inputs).logits, ref)  # remove() restored the model
        words = eager.get_input_embeddings()
        for b in range(2):
            prompt = next_visionzip_embeds(eager, inputs, b, 3, 3)
            new = torch.zeros(1, 0, dtype=torch.long)
            for _ in range(3):
                logits = manual_logits(eager, torch.cat([prompt, words(new)], 1))
                new = torch.cat([new, logits[:, -1:].argmax(-1)], 1)
            assert torch.equal(cached[b, start:], new[0])


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (2, 3)])
def test_anyres_order_matches_the_official_arrangement_on_other_grids(grid):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    # the tiny model only has 2 x 2 grids; transformers' (rows, columns) is the order the adapter passes
    assert tuple(get_anyres_image_grid_shape((32, 64), [[32, 64]], 32)) == (1, 2)
    g = torch.Generator().manual_seed(0)
    crops, dominant, contextual = 1 + grid[0] * grid[1], 5, 3
    tokens = torch.randn(crops, dominant + contextual, 8, generator=g)
    top = torch.stack([torch.randperm(nxt.PATCHES, generator=g)[: dominant - 1] for _ in range(crops)])
    keep_idx = torch.cat([torch.zeros(crops, 1, dtype=torch.long), top + 1], 1)  # as the official forward
    ours = anyres_order(tokens, top.sort(1).values, grid, int(nxt.PATCHES**0.5))
    assert torch.equal(ours, official_next_image(tokens, keep_idx, *grid))
