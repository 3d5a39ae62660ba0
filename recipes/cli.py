"""``visattn train`` / ``visattn eval`` / ``visattn plot``: argument parsers and command functions."""

from __future__ import annotations

import argparse
import json

DEFAULT_RECIPE = "digits"


def _cmd_train(args: argparse.Namespace) -> int:
    from visattn.recipes.config import list_recipes, load_recipe

    if args.list_recipes:
        import yaml

        for name, path in list_recipes().items():
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
            print(f"{name:24s} {data.get('model', ''):22s} {path.parent.name}/{path.name}")
        return 0
    recipe = load_recipe(args.recipe, args.set)
    from visattn.recipes.trainer import train

    summary = train(
        recipe,
        data_dir=args.data_dir,
        output=args.output,
        resume=args.resume,
        device=args.device,
        progress=False if args.no_progress else None,
        max_steps=args.max_steps,
        overrides=args.set,
    )
    if args.summary_json and summary.get("run_dir"):
        with open(args.summary_json, "w") as f:
            json.dump(summary, f)
    return 0


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_train_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        parents=parents,
        help="train a model from a recipe (default: the embedded digits recipe, no download)",
        description="Train from a recipe. Single process, or many with torchrun "
        "(torchrun --nproc_per_node=8 -m visattn.cli train ...). See docs/training.md.",
    )
    p.add_argument(
        "--recipe", default=DEFAULT_RECIPE, help=f"recipe name or YAML path (default {DEFAULT_RECIPE})"
    )
    p.add_argument(
        "--data-dir", default=None, help="dataset root (ImageNet layout: DIR/train/<class>, DIR/val/<class>)"
    )
    p.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="override recipe keys"
    )
    p.add_argument(
        "--resume", default=None, help="'auto' (newest checkpoint of the run dir) or a checkpoint path"
    )
    p.add_argument("--output", default=None, help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help="stop (with a checkpoint) after this many optimizer steps in total (>= 1)",
    )
    p.add_argument("--summary-json", default=None, help="also write the final summary to this JSON file")
    p.set_defaults(func=_cmd_train)


def _cmd_eval(args: argparse.Namespace) -> int:
    from visattn.recipes.evaluate import run_eval

    result = run_eval(
        args.model,
        args.checkpoint,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        device=args.device,
        use_ema=args.ema,
        workers=args.workers,
    )
    print(
        f"{args.model} | {result['count']} images | top-1 {result['top1']:.2f} | top-5 {result['top5']:.2f} "
        f"| loss {result['loss']:.4f}"
    )
    return 0


def add_eval_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a validation set", parents=parents)
    p.add_argument("--model", required=True, help="registered model name, e.g. nat_tiny")
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint or official state dict")
    p.add_argument("--data-dir", default=None, help="dataset root with a val/ split (omit for digits runs)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (0: in this one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.set_defaults(func=_cmd_eval)


def _cmd_plot(args: argparse.Namespace) -> int:
    from visattn.recipes.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def add_plot_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plot", help="write PNG curves (loss, lr, top-1) of a run directory", parents=parents)
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] = ()) -> None:
    """Register ``train``, ``eval`` and ``plot`` on the ``visattn`` sub-command parser (``parents``: shared
    options such as ``--debug``)."""
    add_train_parser(sub, list(parents))
    add_eval_parser(sub, list(parents))
    add_plot_parser(sub, list(parents))
