"""DyVTE: routers, exit inference through ``attach``, label derivation and the training recipe."""

import json

import pytest
import torch

from tests.test_mllm_tokens import (
    ATTENTION,
    IMG,
    embed,
    manual_logits,
    sample,
    tiny_inputs,
    tiny_llava,
)
from visattn.mllm_tokens import DyVTE, DyVTERouters, attach
from visattn.mllm_tokens.dyvte import exit_labels, router_features
from visattn.recipes import dyvte as recipe


def random_routers(model, seed=3, margin=30.0):
    torch.manual_seed(seed)
    routers = DyVTERouters.for_model(model, router_dim=32)
    with torch.no_grad():
        for r in routers.routers:
            r.w2.weight.mul_(margin)  # clear decisions, no near-ties
    return routers


@torch.no_grad()
def reference_exit(model, sid, spix, routers):
    """Unbatched official loop: route after every layer until the first exit, then drop the image."""
    lm = model.model.language_model
    hidden = embed(model, sid, spix)
    visual = sid == IMG
    for i, layer in enumerate(lm.layers[:-1]):
        hidden = manual_layer(lm, layer, hidden)
        feats = router_features(hidden, visual, torch.ones_like(visual))
        logits = routers(i, feats)
        if logits[0, 1] > logits[0, 0]:
            return i
    return -1


def manual_layer(lm, layer, hidden):
    n = hidden.shape[1]
    pos = torch.arange(n)[None]
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    return layer(
        hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, pos), position_ids=pos
    )


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_exit_matches_reference_and_generate_matches_cache_free(attn):
    model, eager = tiny_llava(attn, layers=5), tiny_llava("eager", layers=5)  # same weights
    ids, mask, pix = tiny_inputs(images=2, text_after=(5, 3))
    samples = [sample(ids, mask, pix, b, images=2) for b in range(2)]
    # routers whose reference exits differ per sample (random weights differ across transformers releases)
    for seed in range(50):
        routers = random_routers(model, seed=seed)
        exits = [reference_exit(eager, sid, spix, routers) for sid, spix in samples]
        if exits[0] != exits[1] and all(0 <= e < 4 for e in exits):
            break
    else:
        pytest.fail("no router seed gives the two samples different exits")
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=3, do_sample=False)
    with torch.no_grad(), attach(model, DyVTE(hypernet=routers)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        stats = handle.stats
        generated = model.generate(**gen)[:, ids.shape[1] :]
    for b, (sid, spix) in enumerate(samples):
        exit_at = exits[b]
        text = (sid[0] != IMG).nonzero()[:, 0]
        ref = manual_logits(eager, embed(eager, sid, spix), text, from_layer=exit_at + 1)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        expected = [32 if layer <= exit_at else 0 for layer in range(5)]
        assert stats[b]["kept_per_layer"] == expected
        tokens = sid
        for _ in range(3):  # cache-free reference with the prefill's decision
            keep = torch.cat([text, torch.arange(sid.shape[1], tokens.shape[1])])
            logits = manual_logits(eager, embed(eager, tokens, spix), keep, from_layer=exit_at + 1)
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(generated[b], tokens[0, sid.shape[1] :])


def test_exit_labels_last_layer_agrees_and_features_match():
    model = tiny_llava()
    ids, mask, pix = tiny_inputs()
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    feats, lab = exit_labels(model, 3, ids, pix, labels, mask)
    assert lab.tolist() == [1, 1]  # removing the image after the last layer changes nothing
    layer1 = {}
    handle = model.model.language_model.layers[1].register_forward_hook(
        lambda m, a, o: layer1.setdefault("h", o)
    )
    model(input_ids=ids, attention_mask=mask, pixel_values=pix)
    handle.remove()
    feats1, _ = exit_labels(model, 1, ids, pix, labels, mask)
    end = torch.full((2,), ids.shape[1] - 3)
    torch.testing.assert_close(feats1, router_features(layer1["h"], ids == IMG, mask.bool(), end))


@torch.no_grad()
def test_exit_labels_match_a_by_hand_comparison():
    """Label 1 iff the image-less continuation after ``layer`` keeps > 99% of the full model's top-1
    answer predictions and under 1.03x its answer loss (official rule), per sample."""
    model = tiny_llava()
    ids, mask, pix = tiny_inputs()
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    seen = set()
    for layer in (0, 1):
        _, got = exit_labels(model, layer, ids, pix, labels, mask)
        for b in range(2):
            sid, spix = sample(ids, mask, pix, b)
            emb = embed(model, sid, spix)
            text = (sid[0] != IMG).nonzero()[:, 0]
            full = manual_logits(model, emb)[0, -4:-1]  # predictions of the 3 answer tokens
            pruned = manual_logits(model, emb, text, from_layer=layer + 1)[0, -4:-1]
            target = sid[0, -3:]
            agree = (full.argmax(-1) == pruned.argmax(-1)).float().mean()
            ratio = torch.nn.functional.cross_entropy(pruned, target) / torch.nn.functional.cross_entropy(
                full, target
            )
            assert int(got[b]) == int(bool(agree > 0.99) and bool(ratio < 1.03)), (layer, b)
            seen.add(int(got[b]))
    assert seen == {0, 1}  # both outcomes are exercised


def test_recipe_trains_saves_and_loads(tmp_path):
    model = tiny_llava("sdpa")
    model.save_pretrained(tmp_path / "model")
    cfg_file = tmp_path / "dyvte.yml"
    cfg_file.write_text(f"model: {tmp_path / 'model'}\ndata: synthetic\namp: none\n")
    cfg = recipe.load_config(
        cfg_file,
        [
            "num_samples=8",
            "batch_size=4",
            "epochs=12",
            "lr=3e-3",
            "router_dim=32",
            f"output={tmp_path / 'run'}",
        ],
    )
    summary = recipe.train(cfg)
    losses = summary["losses"]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
    loaded = DyVTERouters.load(summary["routers"])
    assert (loaded.hidden_size, loaded.num_layers, loaded.router_dim) == (64, 4, 32)
    ids, mask, pix = tiny_inputs()
    with torch.no_grad(), attach(model, DyVTE(hypernet=summary["routers"])) as handle:
        model(input_ids=ids, attention_mask=mask, pixel_values=pix)
        assert len(handle.stats) == 2
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 24


def test_routers_save_load_round_trip(tmp_path):
    routers = DyVTERouters(64, 4, 8)
    routers.save(tmp_path / "r.safetensors")
    loaded = DyVTERouters.load(tmp_path / "r.safetensors")
    assert (loaded.hidden_size, loaded.num_layers, loaded.router_dim) == (64, 4, 8)
    for name, value in routers.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    feats = torch.randn(3, 128)
    assert torch.equal(loaded(2, feats), routers(2, feats))


def _routers_file(path, meta, tensors):
    from safetensors.torch import save_file

    raw = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(tensors, str(path), metadata={"dyvte": raw})
    return path


@pytest.mark.parametrize(
    "meta,tensors,match",
    [
        # 168-byte file asking for ~6.7 TB: refused from the header, nothing is allocated
        ({"hidden_size": 4096, "num_layers": 100000, "router_dim": 2048}, {}, r"num_layers must be .*1024"),
        ({"hidden_size": 64, "num_layers": 3, "router_dim": 8}, {}, "tensors do not match"),
        ({"hidden_size": 64, "num_layers": 1, "router_dim": 8, "extra": 1}, {}, "exactly the keys"),
        ({"hidden_size": 64, "num_layers": 1}, {}, "exactly the keys"),
        ({"hidden_size": True, "num_layers": 1, "router_dim": 8}, {}, "hidden_size must be an int"),
        ("{not json", {}, "not valid JSON"),
        ("[1, 2]", {}, "exactly the keys"),
        (
            {"hidden_size": 4, "num_layers": 1, "router_dim": 8},
            {"routers.0.w1.weight": torch.zeros(8, 16), "routers.0.w2.weight": torch.zeros(2, 8)},
            "another shape",
        ),
        (
            {"hidden_size": 4, "num_layers": 1, "router_dim": 8},
            {
                "routers.0.w1.weight": torch.zeros(8, 8, dtype=torch.int64),
                "routers.0.w2.weight": torch.zeros(2, 8),
            },
            "not floating point",
        ),
    ],
)
def test_routers_load_rejects_hostile_files(tmp_path, meta, tensors, match):
    path = _routers_file(tmp_path / "r.safetensors", meta, tensors)
    with pytest.raises(ValueError, match=match):
        DyVTERouters.load(path)


def test_routers_load_checks_before_allocating(tmp_path, monkeypatch):
    """A metadata/tensor mismatch is found from the header: no router module is ever built."""
    routers = DyVTERouters(16, 2, 8)
    routers.save(tmp_path / "r.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "r.safetensors"))
    path = _routers_file(
        tmp_path / "big.safetensors", {"hidden_size": 16, "num_layers": 900, "router_dim": 8}, tensors
    )
    monkeypatch.setattr(DyVTERouters, "__init__", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(ValueError, match="1796 missing"):
        DyVTERouters.load(path)
    (tmp_path / "text.safetensors").write_text("hello, not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DyVTERouters.load(tmp_path / "text.safetensors")


def test_invalid_arguments(tmp_path):
    model = tiny_llava()
    with pytest.raises(ValueError, match="hypernet"):
        DyVTE()
    with pytest.raises(ValueError, match="outside"):
        attach(model, DyVTE(exit_layer=4))
    with pytest.raises(ValueError, match="routers are for"):
        attach(model, DyVTE(hypernet=DyVTERouters(32, 4, 8)))
    with pytest.raises(ValueError, match="positive int"):
        DyVTERouters(0, 4)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="metadata"):
        DyVTERouters.load(tmp_path / "other.safetensors")
    (tmp_path / "bad.yml").write_text("model: x\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        recipe.load_config(tmp_path / "bad.yml")


def _tiny_processor(path):
    """An offline LlavaProcessor: word-level tokenizer (``<image>`` = id 100) and a 32 px CLIP processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>"] + [f"w{i}" for i in range(2, 100)] + ["<image>", "USER:", "ASSISTANT:", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    ).save_pretrained(path)  # fmt: skip


def test_recipe_reads_llava_json(tmp_path):
    import json

    from PIL import Image

    model = tiny_llava("sdpa")
    model.save_pretrained(tmp_path / "model")
    _tiny_processor(tmp_path / "model")
    entries = []
    for i in range(4):
        Image.new("RGB", (40, 36), color=(40 * i, 90, 200)).save(tmp_path / f"{i}.png")
        turns = [{"from": "human", "value": f"<image>\nw{5 + i} w9"}, {"from": "gpt", "value": "w7 w8"}]
        entries.append({"image": f"{i}.png", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(entries))
    cfg = recipe.DyVTERecipe(
        model=str(tmp_path / "model"), data=str(tmp_path / "data.json"), image_root=str(tmp_path),
        batch_size=2, router_dim=16, amp="none", output=str(tmp_path / "run"),
    ).validate()  # fmt: skip
    samples = recipe.llava_json_samples(cfg)
    assert len(samples) == 4
    first = samples[0]
    assert int((first["input_ids"] == IMG).sum()) == 16
    assert first["labels"][first["labels"] != -100].tolist() == [7, 8]
    assert first["pixel_values"].shape == (1, 3, 32, 32)
    assert recipe.train(cfg)["steps"] == 2
