"""Markdown tables from a ``visattn bench all --json`` file, for docs/benchmarks.md.

``visattn bench report results.json [--out FILE]``: one section per benchmark run, its tables as
markdown, headed by the device, the torch version and the date the results were measured.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="JSON written by `visattn bench all --json`")
    parser.add_argument("--out", default=None, help="write the markdown here (default: print it)")


def _table(table: dict) -> list[str]:
    lines = [f"**{table['title']}**", ""] if table["title"] else []
    lines.append("| " + " | ".join(table["headers"]) + " |")
    lines.append("|" + "---|" * len(table["headers"]))
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    return lines + [""]


def markdown(results: dict) -> str:
    """The report of one ``bench all`` run."""
    kind = "dry run (small shapes, 1 iteration: not a measurement)" if results["dry_run"] else "measured"
    lines = [
        f"## visattn bench all: {results['device']}",
        "",
        f"{kind}; torch {results['torch']}; {results['date']}.",
        "",
    ]
    for run in results["results"]:
        command = " ".join(["visattn bench", run["bench"], *run["args"]])
        lines += [f"### `{command}`", ""]
        if run["error"]:
            lines += ["failed:", "", "```", run["error"].rstrip(), "```", ""]
        for table in run["tables"]:
            lines += _table(table)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.results) as f:
            results = json.load(f)
        text = markdown(results)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"visattn bench report: cannot read {args.results}: {err}") from None
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0
