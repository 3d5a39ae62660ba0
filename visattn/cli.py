"""The ``visattn`` command line: ``visattn --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    import visattn

    for name in visattn.list_models(args.pattern):
        print(name)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from visattn import bench

    parser = sub.add_parser("bench", help="run a benchmark and print its table")
    kinds = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, module in sorted(bench.available().items()):
        doc = (module.__doc__ or name).strip()
        p = kinds.add_parser(name, help=doc.splitlines()[0], description=doc)
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="visattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the timm models visattn registers")
    p.add_argument("pattern", nargs="?", default="*", help="glob filter, e.g. 'nat*'")
    p.set_defaults(func=_cmd_list)

    _add_bench(sub)

    from visattn.recipes.cli import add_parsers

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
