"""Command line: ``python -m circuitbench COMMAND`` / ``circuitbench COMMAND``.

Each sub-command lives in its own module under ``circuitbench.commands`` and exposes
``add_parser(subparsers)`` (which registers the parser and sets ``func``). A `UserError` anywhere
becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# One module per sub-command; order is the order of `circuitbench --help`.
COMMANDS = [
    "graph",
    "bench",
    "run",
    "results",
    "methods",
    "tasks",
    "evaluate",
    "report",
    "casestudy",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage + message; keep it to one line
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="circuitbench", description="Benchmark harness for automated circuit discovery.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"circuitbench.commands.{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
