"""``visattn plot RUN_DIR``: PNG curves (loss, learning rate, top-1/top-5) from ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(step_records, epoch_records)`` of a run; the last record wins when a step repeats."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a visattn run directory "
            "(give the folder `visattn train` printed, runs/<recipe>-<time>)"
        )
    by_key: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            key = rec.get("epoch") if rec.get("kind") == "epoch" else rec.get("step")
            by_key[(rec.get("kind", "step"), key)] = rec
    steps = sorted((r for (k, _), r in by_key.items() if k == "step"), key=lambda r: r["step"])
    epochs = sorted((r for (k, _), r in by_key.items() if k == "epoch"), key=lambda r: r["epoch"])
    return steps, epochs


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``curves.png`` (or ``out``): loss, lr and top-1/top-5 panels; return its absolute path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, epochs = read_metrics(run_dir)
    out = (Path(out) if out else Path(run_dir) / "curves.png").resolve()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss, ax_lr, ax_acc = axes
    if steps:
        ax_loss.plot(
            [r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (step)"
        )
        ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], label="lr (step)")
    if epochs:
        es = [r["step"] for r in epochs]
        ax_loss.plot(es, [r["train_loss"] for r in epochs], "o-", label="train (epoch)")
        ax_loss.plot(es, [r["val_loss"] for r in epochs], "s-", label="val")
        if not steps:
            ax_lr.plot(es, [r["lr"] for r in epochs], "o-", label="lr (epoch end)")
        ax_acc.plot(es, [r["val_top1"] for r in epochs], "o-", label="val top-1")
        ax_acc.plot(es, [r["val_top5"] for r in epochs], "s--", label="val top-5")
        if any("ema_val_top1" in r for r in epochs):
            ema = [(r["step"], r["ema_val_top1"]) for r in epochs if "ema_val_top1" in r]
            ax_acc.plot([s for s, _ in ema], [v for _, v in ema], "^-", label="EMA top-1")
    for ax, title, ylabel in (
        (ax_loss, "loss", "loss"),
        (ax_lr, "learning rate", "lr"),
        (ax_acc, "accuracy", "%"),
    ):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
