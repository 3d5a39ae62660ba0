"""Tiny random checkpoints of each family lmms-eval's model classes load, saved with a processor built here
(a word-level tokenizer whose special tokens sit at the tiny models' ids, and the family's own image
processor), for the lmms-eval plugin tests. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from tests.test_mllm_llava_next import tiny_next
from tests.test_mllm_llava_onevision import tiny_onevision
from tests.test_mllm_qwen2_vl import tiny_qwen
from tests.test_mllm_tokens import tiny_llava

TASK_DIR = Path(__file__).parent / "lmms_eval_task"
VOCAB = 128  # the tiny models' vocab_size
WORDS = 60  # w3 .. w62: the words of the task's questions and answers


def tiny_tokenizer(specials: dict[int, str], eos: str = "</s>"):
    """Word-level tokenizer over ``VOCAB`` ids: ``<pad>`` 0, ``<s>`` 1, ``eos`` 2, words ``w3`` ..., and
    ``specials`` (id -> token) kept whole."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, eos: 2, "<unk>": VOCAB - 1}
    vocab.update({token: i for i, token in specials.items()})
    free = [i for i in range(VOCAB) if i not in vocab.values()]
    vocab.update({f"w{i}": i for i in free})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token=eos, pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(specials.values())})
    return tok


# Qwen-style chat template over the tiny vocabulary: one vision block per image of a message
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
# qwen_vl_utils resizes to multiples of 28 px within these pixel bounds (below 28 px a side it fails); a
# token is 4 x 4 px (patch 2, merge 2): 98-196 tokens per image
QWEN_PIXELS = {"min_pixels": 2 * 28 * 28, "max_pixels": 4 * 28 * 28}


def _llava_processor(kind: str):
    from transformers import (
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        LlavaProcessor,
    )

    tok = tiny_tokenizer({100: "<image>", 101: "<video>"})
    crop = {"height": 32, "width": 32}
    if kind == "llava":
        images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop)
        return LlavaProcessor(
            image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )  # fmt: skip
    if kind == "llava_next":
        images = LlavaNextImageProcessor(
            size={"shortest_edge": 32}, crop_size=crop, image_grid_pinpoints=[[64, 64]]
        )
        return LlavaNextProcessor(
            image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )  # fmt: skip
    images = LlavaOnevisionImageProcessor(size=crop, image_grid_pinpoints=[[64, 64]])
    return LlavaOnevisionProcessor(
        image_processor=images, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=crop),
        num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
    )  # fmt: skip


def _qwen_processor(family: str):
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = {118: "<|vision_start|>", 119: "<|vision_end|>", 120: "<|image_pad|>", 121: "<|video_pad|>"}
    specials.update({3: "<|im_start|>", 4: "<|im_end|>"})
    tok = tiny_tokenizer(specials, eos="<|endoftext|>")
    common = {"patch_size": 2, "merge_size": 2, "temporal_patch_size": 2, **QWEN_PIXELS}
    processor_cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**common), tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**common), chat_template=QWEN_TEMPLATE,
    )  # fmt: skip


QWEN_ARGS = ",".join(["device_map=cpu", *(f"{k}={v}" for k, v in QWEN_PIXELS.items())])

DEPTH = 4  # decoder layers of every tiny model
# family -> (lmms-eval base model, builder of the tiny model from its attention implementation, the base's
# model_args for it)
FAMILIES = {
    "llava": ("llava_hf", lambda attn: tiny_llava(attn, DEPTH), "device_map=cpu"),
    "llava_next": ("llava_hf", lambda attn: tiny_next(attn, DEPTH), "device_map=cpu"),
    "llava_onevision": ("llava_hf", lambda attn: tiny_onevision(attn, DEPTH), "device_map=cpu"),
    "qwen2_vl": ("qwen2_vl", lambda attn: tiny_qwen("qwen2_vl", attn, DEPTH), QWEN_ARGS),
    "qwen2_5_vl": ("qwen2_5_vl", lambda attn: tiny_qwen("qwen2_5_vl", attn, DEPTH), QWEN_ARGS),
}


def save_tiny(family: str, folder: Path) -> Path:
    """Save the tiny ``family`` model (SDPA) and its processor to ``folder``; returns ``folder``."""
    _, build, _ = FAMILIES[family]
    model = build("sdpa")
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    processor = _qwen_processor(family) if family.startswith("qwen") else _llava_processor(family)
    processor.save_pretrained(folder)
    return folder
