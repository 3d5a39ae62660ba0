"""The ``visattn`` model of lmms-eval: lmms-eval's own model class of a family, with a reducer attached.

::

    lmms-eval --model visattn --tasks mme,pope --batch_size 8 --output_path out/ \\
        --model_args base=qwen2_5_vl,pretrained=<dir>,reducer=VisionZip,dominant=54,contextual=10

lmms-eval (>= 0.7.3, ``pip install visattn[eval]``) finds it through the entry-point group
``lmms_eval.models`` (pyproject.toml). ``base`` names the lmms-eval model (:data:`BASES`) that loads the
checkpoint and runs the requests, unchanged; ``reducer`` is any reducer ``visattn.mllm_tokens`` exports
(:func:`visattn.integrations.reducer_args.reducers`), attached with ``visattn.mllm_tokens.attach`` once
the base has loaded the model. The other ``--model_args`` go to the reducer when its constructor takes
them (typed from its signature), otherwise to the base class; any other name is an error listing both.

Per sample, ``handle.stats`` (visual tokens in, kept per decoder layer, prefill FLOPs saved) is collected
per task; when lmms-eval finishes the requests (``clean()``), the means are printed and written with
the samples to ``stats_path`` (default ``<--output_path>/visattn_stats.json``, read from the lmms-eval
command line; nothing is written without either).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import sys
from pathlib import Path

from lmms_eval.api.model import lmms

from visattn.integrations.reducer_args import (
    build_reducer,
    describe_parameters,
    reducer_class,
    reducer_parameters,
    reducers,
)
from visattn.mllm_tokens import attach

__all__ = ["BASES", "VisattnModel", "manifest", "summarize"]

# lmms-eval model id -> the transformers families its class loads that visattn.mllm_tokens supports, and
# the largest batch_size its generate_until accepts (None: any)
BASES: dict[str, tuple[str, int | None]] = {
    "llava_hf": ("LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision", 1),
    "qwen2_vl": ("Qwen2-VL", None),
    "qwen2_5_vl": ("Qwen2.5-VL", None),
}
STATS_FILE = "visattn_stats.json"
_MEANS = ("visual_tokens_in", "prefill_flops", "prefill_flops_saved", "prefill_flops_saved_ratio")


def _bases_text() -> str:
    return "; ".join(f"{name} ({families})" for name, (families, _) in BASES.items())


@functools.cache
def _with_base(base: str) -> type:
    """``VisattnModel`` over lmms-eval's simple model class ``base``."""
    from lmms_eval.models import get_model  # not at import: lmms_eval.models loads this module

    base_cls = get_model(base, force_simple=True)
    return type(f"Visattn{base_cls.__name__}", (VisattnModel, base_cls), {"base_class": base_cls})


class VisattnModel(lmms):
    """``VisattnModel(base=..., reducer=..., **args)`` is an instance of ``Visattn<Base>``, a subclass of
    this class and of lmms-eval's class for ``base``: the base's own loading and request handling run
    unchanged, with the reducer attached to its model."""

    is_simple = True
    base_class: type  # lmms-eval's class, set on each Visattn<Base>

    def __new__(cls, base: str | None = None, **kwargs):
        if cls is not VisattnModel:
            return super().__new__(cls)
        if base not in BASES:
            raise ValueError(f"visattn: unknown base {base!r}; valid bases: {_bases_text()}")
        return super().__new__(_with_base(base))

    def __init__(self, base: str, reducer: str | None = None, stats_path: str | None = None, **kwargs):
        if reducer is None:
            raise ValueError(f"visattn: give reducer=<name>; valid reducers: {', '.join(reducers())}")
        reducer_cls = reducer_class(reducer)
        reducer_args = {k: kwargs.pop(k) for k in list(kwargs) if k in reducer_parameters(reducer_cls)}
        base_cls = self.base_class
        base_params = {
            name
            for name, p in inspect.signature(base_cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        unknown = sorted(set(kwargs) - base_params)
        if unknown:
            raise ValueError(
                f"visattn: unknown argument {', '.join(unknown)}; {reducer_cls.__name__} takes "
                f"{describe_parameters(reducer_cls)}; {base} takes {', '.join(sorted(base_params))}"
            )
        limit = BASES[base][1]
        if limit is not None and int(kwargs.get("batch_size", 1)) > limit:
            raise ValueError(
                f"visattn: base {base} (lmms-eval's {base_cls.__name__}) runs batch_size <= {limit}, "
                f"got {kwargs['batch_size']}; bases that batch: "
                + ", ".join(name for name, (_, cap) in BASES.items() if cap is None)
            )
        self._visattn_reducer = build_reducer(reducer, reducer_args)  # before the (slow) model loading
        self._visattn_base = base
        self._visattn_stats_path = stats_path
        super().__init__(**kwargs)
        if base == "qwen2_vl":
            # generate continues each row of a batch from its last position, so a batch must pad on the
            # left; lmms-eval's llava_hf sets that and its qwen2_5_vl passes it per call, its qwen2_vl
            # pads on the checkpoint tokenizer's side (right by default), which corrupts the shorter rows
            self.processor.tokenizer.padding_side = "left"
        self._visattn_handle = attach(self.model, self._visattn_reducer)
        self._visattn_samples: dict[str, list[dict]] = {}
        self._visattn_task = ""
        self._visattn_seen = self._visattn_handle.stats
        self.model.register_forward_hook(self._visattn_record)

    def _visattn_record(self, module, args, output) -> None:
        # the adapter replaces handle.stats at every prefill (decode steps leave it): a new list is a new
        # prefill, one entry per sample (none for a prefill without images)
        stats = self._visattn_handle.stats
        if stats is not self._visattn_seen:
            self._visattn_seen = stats
            self._visattn_samples.setdefault(self._visattn_task, []).extend(dict(s) for s in stats)

    def _by_task(self, run, requests: list) -> list:
        """``run`` on the requests of each task in turn, so each sample's stats land under its task."""
        results = [None] * len(requests)
        order: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            order.setdefault(request.task_name, []).append(i)
        for task, indices in order.items():
            self._visattn_task = task
            for i, result in zip(indices, run([requests[i] for i in indices])):
                results[i] = result
        return results

    def generate_until(self, requests):
        return self._by_task(super().generate_until, requests)

    def loglikelihood(self, requests):
        return self._by_task(super().loglikelihood, requests)

    def clean(self):
        """lmms-eval's end of the requests: report the stats, then the base's own clean-up."""
        self._visattn_report()
        super().clean()

    def _visattn_report(self) -> None:
        samples = self._visattn_samples
        means = {
            "all": summarize([row for rows in samples.values() for row in rows]),
            "tasks": {task: summarize(rows) for task, rows in samples.items()},
        }
        print(format_means(str(self._visattn_reducer), means))
        path = _stats_path(self._visattn_stats_path)
        if path is None:
            print("visattn: no stats_path and no --output_path: the per-sample stats were not written")
            return
        if self.world_size > 1:
            path = path.with_name(f"{path.stem}_rank{self.rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "base": self._visattn_base,
            "reducer": str(self._visattn_reducer),
            "means": means,
            "samples": samples,
        }
        path.write_text(json.dumps(record, indent=2))
        print(f"visattn: reducer stats written to {path}")


def _stats_path(given: str | None) -> Path | None:
    if given is not None:
        return Path(given)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path")
    output = parser.parse_known_args(sys.argv[1:])[0].output_path
    return None if output is None else Path(output) / STATS_FILE


def summarize(samples: list[dict]) -> dict:
    """Means over ``handle.stats`` entries: the scalars, ``kept_per_layer`` per layer, and its mean over
    layers (``visual_tokens_kept``: the visual tokens an average decoder layer sees)."""
    n = len(samples)
    if n == 0:
        return {"samples": 0}
    out: dict = {"samples": n}
    for key in _MEANS:
        out[key] = sum(s[key] for s in samples) / n
    per_layer = [sum(column) / n for column in zip(*(s["kept_per_layer"] for s in samples))]
    out["visual_tokens_kept"] = sum(per_layer) / len(per_layer)
    out["kept_per_layer"] = per_layer
    return out


def format_means(reducer: str, means: dict) -> str:
    """``{"all": ..., "tasks": {task: ...}}`` means as a Markdown table, one row per task, then all."""
    head = "| task | samples | visual tokens in | kept (mean over layers) | prefill FLOPs saved |"
    lines = [f"visattn {reducer}", head, "|---|---|---|---|---|"]
    for task, m in [*means["tasks"].items(), ("all", means["all"])]:
        if m["samples"] == 0:
            lines.append(f"| {task} | 0 | - | - | - |")
            continue
        lines.append(
            f"| {task} | {m['samples']} | {m['visual_tokens_in']:.1f} | {m['visual_tokens_kept']:.1f} "
            f"| {100 * m['prefill_flops_saved_ratio']:.1f}% |"
        )
    return "\n".join(lines)


def manifest():
    """The entry point's payload: the ``visattn`` model's lmms-eval manifest. A function, so that this module
    imports no ``lmms_eval.models``: that package loads the entry points while it initializes, and would
    find this module half-imported if importing it had started that."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="visattn", simple_class_path=f"{__name__}.VisattnModel")
