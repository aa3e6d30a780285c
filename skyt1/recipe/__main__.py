"""python -m skyt1.recipe <command>: the Sky-T1 data recipe.

Each command lives in its own module, listed in COMMANDS; a module provides add_arguments(parser) and
main(args) -> exit code, and its docstring's first line is the command's help.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "generate": "skyt1.recipe.generate",
    "reformat": "skyt1.recipe.reformat",
    "verify": "skyt1.recipe.verify",
    "export": "skyt1.recipe.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m skyt1.recipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or name).strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
