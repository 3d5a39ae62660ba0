"""Train DyVTE's exit routers (the hyper-network) on a frozen LLaVA.

    python -m visattn.recipes.dyvte --config recipes/dyvte.yml [--set key=value ...]

Each step draws one exit layer ``l`` uniformly from ``0 .. L-1`` (shared by the batch, as the
official trainer does), labels every sample with :func:`visattn.mllm_tokens.dyvte.exit_labels`
(full model vs. the image removed after layer ``l``) and takes an AdamW step on router ``l``'s
cross-entropy; the language model stays frozen and the router inputs are detached. Writes
``<output>/routers.safetensors`` (load with ``DyVTERouters.load`` or ``DyVTE(hypernet=path)``) and
``<output>/metrics.jsonl``.

Data: a LLaVA-format JSON list (``{"image": file, "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": ...}]}``, first turn used, prompt in the llava-hf
``USER: ... ASSISTANT:`` template, tokenised by the model's ``AutoProcessor``), or ``synthetic``:
generated prompts (text, one image of random pixels, text) with random answers, for smoke tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from visattn.mllm_tokens.dyvte import DyVTERouters, exit_labels

DEFAULT_CONFIG = Path(__file__).resolve().parent / "dyvte.yml"


@dataclass
class DyVTERecipe:
    """Hyper-parameters of a router-training run (see recipes/dyvte.yml)."""

    model: str = "llava-hf/llava-1.5-7b-hf"
    attn_implementation: str = "sdpa"
    data: str = "synthetic"
    image_root: str = ""
    num_samples: int = 64
    epochs: int = 1
    batch_size: int = 16
    lr: float = 6e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    router_dim: int = 2048
    agreement: float = 0.99
    loss_ratio: float = 1.03
    max_length: int = 2048
    amp: str = "bf16"
    seed: int = 0
    output: str = "runs/dyvte"
    log_every: int = 10

    def validate(self) -> DyVTERecipe:
        for name in ("num_samples", "epochs", "batch_size", "router_dim", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"dyvte recipe: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("dyvte recipe: need lr > 0, weight_decay >= 0 and 0 <= warmup_ratio < 1")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"dyvte recipe: amp must be 'none' or 'bf16', got {self.amp!r}")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DyVTERecipe:
    """Read a recipe YAML (``yaml.safe_load``) and apply ``key=value`` overrides."""
    with open(path or DEFAULT_CONFIG, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"dyvte recipe: overrides look like key=value, got {item!r}")
        data[key.strip()] = yaml.safe_load(value)
    fields = {f.name: f for f in dataclasses.fields(DyVTERecipe)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"dyvte recipe: unknown keys {unknown}; valid keys: {sorted(fields)}")
    typed = {k: type(getattr(DyVTERecipe(), k))(v) for k, v in data.items()}
    return DyVTERecipe(**typed).validate()


def synthetic_samples(model, count: int, seed: int) -> list[dict]:
    """Generated image-text samples: ``[BOS] text <image x patches> text answer`` with random ids."""
    cfg = model.config
    vision = cfg.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    vocab = cfg.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    specials = {cfg.image_token_id, 0, 1}
    pool = torch.tensor([t for t in range(vocab) if t not in specials])
    samples = []
    for _ in range(count):
        lengths = torch.randint(2, 6, (3,), generator=g).tolist()
        before, after, answer = (pool[torch.randint(len(pool), (n,), generator=g)] for n in lengths)
        ids = torch.cat(
            [torch.tensor([1]), before, torch.full((patches,), cfg.image_token_id), after, answer]
        )
        labels = torch.full_like(ids, -100)
        labels[-len(answer) :] = answer
        pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=g)
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return samples


def llava_json_samples(cfg: DyVTERecipe) -> list[dict]:
    """Tokenise a LLaVA-format JSON with the model's processor (first human/gpt turn of each entry)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(cfg.model)
    with open(cfg.data, encoding="utf-8") as f:
        entries = json.load(f)
    samples = []
    for entry in entries:
        turns = entry.get("conversations", [])
        if "image" not in entry or len(turns) < 2:
            continue
        question = turns[0]["value"].replace("<image>", "").strip()
        prompt = f"USER: <image>\n{question} ASSISTANT:"
        image = Image.open(Path(cfg.image_root) / entry["image"]).convert("RGB")
        full = processor(images=image, text=f"{prompt} {turns[1]['value']}", return_tensors="pt")
        prompt_len = processor(images=image, text=prompt, return_tensors="pt")["input_ids"].shape[1]
        ids = full["input_ids"][0][: cfg.max_length]
        labels = ids.clone()
        labels[:prompt_len] = -100
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": full["pixel_values"]})
    if not samples:
        raise ValueError(f"dyvte recipe: no usable image-text samples in {cfg.data}")
    return samples


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a list of samples into a batch (``input_ids``, ``attention_mask``, ``labels``, pixels)."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, length - n :], labels[i, length - n :], mask[i, length - n :] = s["input_ids"], s["labels"], 1
    pixels = torch.cat([s["pixel_values"] for s in samples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(cfg: DyVTERecipe, model=None) -> dict:
    """Run the recipe; ``model`` (a LlavaForConditionalGeneration) skips loading ``cfg.model``."""
    from transformers import LlavaForConditionalGeneration

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        dtype = torch.bfloat16 if cfg.amp == "bf16" and device.type == "cuda" else torch.float32
        model = LlavaForConditionalGeneration.from_pretrained(
            cfg.model, dtype=dtype, attn_implementation=cfg.attn_implementation
        )
    model = model.to(device).eval().requires_grad_(False)
    samples = synthetic_samples(model, cfg.num_samples, cfg.seed) if cfg.data == "synthetic" else (
        llava_json_samples(cfg)
    )  # fmt: skip
    routers = DyVTERouters.for_model(model, cfg.router_dim).to(device)
    optimizer = torch.optim.AdamW(routers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_ratio * total)) if cfg.warmup_ratio > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
    num_layers = model.config.text_config.num_hidden_layers
    pad_id = model.config.text_config.pad_token_id or 0
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    losses = []
    step = 0
    with open(out_dir / "metrics.jsonl", "w", encoding="utf-8") as log:
        for epoch in range(cfg.epochs):
            order = list(range(len(samples)))
            random.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                batch = collate([samples[i] for i in order[start : start + cfg.batch_size]], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                layer = random.randint(0, num_layers - 1)
                features, labels = exit_labels(
                    model, layer, batch["input_ids"], batch["pixel_values"].to(model.dtype), batch["labels"],
                    batch["attention_mask"], cfg.agreement, cfg.loss_ratio,
                )  # fmt: skip
                logits = routers(layer, features.detach())
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                record = {
                    "step": step, "epoch": epoch, "layer": layer, "loss": loss.item(),
                    "label_rate": labels.float().mean().item(),
                    "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
                    "lr": scheduler.get_last_lr()[0],
                }  # fmt: skip
                log.write(json.dumps(record) + "\n")
                if step % cfg.log_every == 0:
                    print(f"step {step}/{total} layer {layer} loss {loss.item():.4f}", flush=True)
                step += 1
    path = out_dir / "routers.safetensors"
    routers.save(path)
    return {"losses": losses, "routers": str(path), "steps": step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visattn.recipes.dyvte", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="recipe YAML (default: recipes/dyvte.yml)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    args = parser.parse_args(argv)
    summary = train(load_config(args.config, args.set))
    print(f"routers written to {summary['routers']} after {summary['steps']} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
