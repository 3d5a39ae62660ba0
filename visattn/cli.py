"""The visattn command line. Run "visattn COMMAND --help" for the options of a command.

A mistake in the arguments, a missing or unreadable file, or a full disk ends the command with
exit status 2 and one line "visattn COMMAND: error: ..." that says what to change; Ctrl-C ends it
with exit status 130 and one line (for train: the step it stopped at and how to resume); --debug
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

import visattn
from visattn.devices import parse_device

# What a user can cause (bad names, values, files, devices, a full disk): one line, exit status 2.
# Anything else is a bug of visattn and keeps its traceback.
USER_ERRORS = (ValueError, OSError)

_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`")


def plain(text: str) -> str:
    """Docstring text as terminal help: reST roles and literals lose their markup."""
    text = _RST_ROLE.sub(lambda m: m.group(1), text)
    return _RST_LITERAL.sub(lambda m: m.group(1) or m.group(2), text)


def _cmd_list(args: argparse.Namespace) -> int:
    for name in visattn.list_models(args.pattern):
        print(name)
    return 0


def _debug_flag() -> argparse.ArgumentParser:
    """``--debug`` accepted after every subcommand too (``visattn train --debug``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )
    return parent


class _BenchParser(argparse.ArgumentParser):
    """The parser of one benchmark: its module (and with it torch) is imported, and its options added,
    only when the command line names it, so ``visattn --help`` and ``visattn bench --help`` stay fast."""

    def __init__(self, *args, module: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._module = module

    def parse_known_args(self, args=None, namespace=None):
        if self._module:
            module, self._module = importlib.import_module(self._module), ""
            module.add_arguments(self)
            self.set_defaults(func=module.run)
        return super().parse_known_args(args, namespace)


def _add_bench(sub: argparse._SubParsersAction, common: list[argparse.ArgumentParser]) -> None:
    from visattn import bench

    parser = sub.add_parser("bench", help="run a benchmark and print its table", parents=common)
    kinds = parser.add_subparsers(dest="bench", required=True, metavar="NAME", parser_class=_BenchParser)
    for name, doc in sorted(bench.described().items()):
        doc = plain(doc.strip())
        kinds.add_parser(
            name, help=doc.splitlines()[0], description=doc, parents=common, module=f"{bench.__name__}.{name}"
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="visattn", description=plain(__doc__))
    parser.add_argument("--version", action="version", version=f"visattn {visattn.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = [_debug_flag()]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the timm models visattn registers", parents=common)
    p.add_argument("pattern", nargs="?", default="*", help="glob filter, e.g. 'nat*'")
    p.set_defaults(func=_cmd_list)

    _add_bench(sub, common)

    from visattn.recipes.cli import add_parsers

    add_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            args.device = parse_device(args.device)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        print(f"visattn {args.command}: {exc or 'stopped (Ctrl-C)'}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        print(f"visattn {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
