"""Model forward throughput (img/s): each visattn model beside its official-style twin and timm's Swin-T.

The twin is the same model with the same weights whose attention core is swapped for the computation
the official code runs, written here: BiFormer's per-region gather (``bench bra``), VAN's three
``nn.Conv2d`` and gate (``bench lka``), Agent attention's sequence of matmuls and softmaxes with
repeated biases (``bench agent``). The official NAT / DiNAT run NATTEN, which has no official-style
twin here: their rows are compared with NATTEN's fused ``na2d`` when NATTEN is installed (it has no
relative position bias, so that row is an upper bound for the official speed) and read "n/a"
otherwise. ``timm``'s ``swin_tiny_patch4_window7_224`` is the peer every row is also compared with.

Each twin's logits are checked against the visattn model's before timing (``max |diff|`` column),
so a row can only be fast by computing the same thing. ``--compile`` prints another table instead:
every model eager and under ``torch.compile`` (inductor, :mod:`visattn.bench._compile`), beside
timm's Swin-T and ConvNeXt-T compiled the same way, with the compile seconds. Defaults follow the CPU
goal of the project: batch 4, 224x224, 2 threads, fp32, ``torch.no_grad``; ``--tiny`` shrinks every
model to a toy for smoke runs (not for numbers).
"""

from __future__ import annotations

import argparse
import copy
import platform
from functools import partial

import timm
import torch

import visattn  # noqa: F401  (registers the models)
from visattn.backbones.agent_family import AgentAttentionBase
from visattn.backbones.biformer import BiLevelRoutingAttention
from visattn.backbones.nat import NeighborhoodAttention2D
from visattn.backbones.van import LargeKernelAttention
from visattn.bench._compile import COMPILE_HEADERS, compare_compiled
from visattn.bench._timing import measure, measure_interleaved, print_table, ratio
from visattn.bench.agent import official_style as official_style_agent
from visattn.bench.bra import _OfficialStyleBRA
from visattn.bench.train import COMPILE_PEERS, tiny_kwargs

PEER = COMPILE_PEERS[0]
MODELS = ("nat_tiny", "dinat_tiny", "biformer_s", "van_b2", "agent_swin_tiny")


class _OfficialStyleLKA(LargeKernelAttention):
    """VAN's ``AttentionModule`` as the official code runs it: three ``nn.Conv2d`` then ``u * attn``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone() * self.conv1(self.conv_spatial(self.conv0(x)))


class _OfficialStyleAgent(AgentAttentionBase):
    """The agent layer with its fused op swapped for the official sequence of ops (mixed into the
    layer's own class, so only :meth:`attend` changes)."""

    def attend(self, q, k, v, agents, agent_bias, query_bias):
        heads = (self.num_heads, self.head_dim)
        out = official_style_agent(
            q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads), agents,
            agent_bias.to(q.dtype), query_bias.to(q.dtype),
        )  # fmt: skip
        return out.flatten(-2)


class _NattenNA(NeighborhoodAttention2D):
    """NAT's layer on NATTEN's fused ``na2d`` (no relative position bias: NATTEN dropped it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import natten

        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h, w, 3, self.num_heads, self.head_dim).unbind(3)
        out = natten.na2d(q, k, v, kernel_size=self.kernel_size, dilation=self.dilation, scale=self.scale)
        return self.proj_drop(self.proj(out.reshape(b, h, w, c)))


def _swap(module: torch.nn.Module) -> type | None:
    """The official-style class for one attention module of ours, or None to keep it."""
    if isinstance(module, BiLevelRoutingAttention):
        return _OfficialStyleBRA
    if isinstance(module, LargeKernelAttention):
        return _OfficialStyleLKA
    if isinstance(module, AgentAttentionBase):  # Swin / PVT / DeiT layers differ only outside attend()
        return type(f"OfficialStyle{type(module).__name__}", (_OfficialStyleAgent, type(module)), {})
    if isinstance(module, NeighborhoodAttention2D):
        return _NattenNA
    return None


def official_twin(model: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """A deep copy of ``model`` with every attention core swapped for its official-style computation
    and the name of that baseline; ``(None, reason)`` when the model has none here."""
    twin = copy.deepcopy(model)
    names = set()
    for module in twin.modules():
        cls = _swap(module)
        if cls is _NattenNA:
            try:
                import natten  # noqa: F401
            except ImportError:
                return None, "NATTEN not installed"
        if cls is not None:
            module.__class__ = cls
            names.add(cls.__name__)
    if not names:
        return None, "no attention core of ours in this model"
    return twin, "NATTEN na2d (no rpb)" if "_NattenNA" in names else "official-style"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="toy-size models (smoke runs, not numbers)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="eager vs torch.compile (inductor) of every model and of swin_tiny / convnext_tiny",
    )


def _build(name: str, args: argparse.Namespace, device: str) -> torch.nn.Module:
    kwargs = tiny_kwargs(name, args.img_size) if args.tiny else {}
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).to(device).eval()


def _forward(model: torch.nn.Module, images: torch.Tensor):
    def step():
        with torch.no_grad():
            return model(images)

    return step


def _where(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def _run_compile(args: argparse.Namespace, images: torch.Tensor, timing: dict) -> int:
    """The ``--compile`` table: eager vs inductor for the timm peers, then every model asked for."""
    rows = []
    for name in (*COMPILE_PEERS, *args.model):
        build = partial(_build, name, args, args.device)
        result = compare_compiled(build, partial(_forward, images=images), **timing)
        source = "timm" if name in COMPILE_PEERS else "visattn"
        rows.append([name, source, *result.cells(args.batch), f"{result.max_diff:.1e}"])
    print_table(
        ["model", "from", *COMPILE_HEADERS, "max |diff|"],
        rows,
        title=f"model forward{' (tiny models)' if args.tiny else ''}, eager vs torch.compile (inductor), "
        f"batch {args.batch}, {args.img_size}x{args.img_size}, fp32, no_grad, on {_where(args.device)} "
        "(compile s: the compiled copy's first call)",
    )  # fmt: skip
    return 0


def run(args: argparse.Namespace) -> int:
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    timing = {"device": device, "warmup": args.warmup, "iters": args.iters}
    if args.compile:
        return _run_compile(args, images, timing)
    peer = measure(_forward(_build(PEER, args, device), images), **timing)
    rows = [[PEER, "timm", f"{args.batch / (peer.ms / 1e3):.1f}", f"{peer.ms:.1f}", "-", "1.00x", "-"]]
    for name in args.model:
        model = _build(name, args, device)
        twin, label = official_twin(model)
        if twin is None:
            ours = measure(_forward(model, images), **timing)
            rows.append([name, "visattn", f"{args.batch / (ours.ms / 1e3):.1f}", f"{ours.ms:.1f}",
                         f"n/a ({label})", ratio(peer, ours), "-"])  # fmt: skip
            continue
        with torch.no_grad():
            diff = (model(images) - twin(images)).abs().max().item()
        # the two take turns, so the ratio holds on a machine whose speed drifts
        ours, base = measure_interleaved([_forward(model, images), _forward(twin, images)], **timing)
        for impl, m, vs in (("visattn", ours, ratio(base, ours)), (label, base, "1.00x")):
            rows.append([name, impl, f"{args.batch / (m.ms / 1e3):.1f}", f"{m.ms:.1f}", vs, ratio(peer, m),
                         f"{diff:.1e}"])  # fmt: skip
        del model, twin
    where = _where(device)
    print_table(
        ["model", "implementation", "img/s", "ms/batch", "vs official", f"vs {PEER.split('_patch')[0]}",
         "max |diff|"],
        rows,
        title=f"model forward{' (tiny models)' if args.tiny else ''}, batch {args.batch}, "
        f"{args.img_size}x{args.img_size}, fp32, no_grad, on {where} (vs official: speed-up over the "
        "official-style twin with the same weights)",
    )  # fmt: skip
    return 0
