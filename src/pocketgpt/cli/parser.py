"""The argparse tree of `pocketgpt`: the top level, and each subcommand's parser in help order.

It only assembles: every command's options are defined next to the command (`add_<cmd>` beside
`cmd_<cmd>` in its file), the groups several commands share in options.py.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from ..errors import PocketError
from ..version import __version__
from . import export, generate, inspection, push, serve, train
from .options import AddCommand

# one adder per subcommand, in the order `pocketgpt --help` lists them
ADDERS: tuple[Callable[[AddCommand], None], ...] = (
    train.add_prepare, train.add_train, generate.add_sample, generate.add_chat, inspection.add_eval,
    inspection.add_info, inspection.add_tokenize, inspection.add_plot, export.add_export, push.add_push,
    serve.add_serve,
)


class Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one line (exit 2) and remembers its option names and subcommands."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.option_names: set[str] = set()  # before super(): it adds --help through add_argument
        self.commands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        self.option_names.update(n for n in names if n.startswith("-"))
        return super().add_argument(*names, **kwargs)

    def error(self, message: str) -> Any:
        raise PocketError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> Parser:
    parser = Parser(
        prog="pocketgpt", allow_abbrev=False,
        description="Train a small GPT from scratch on your own text, then sample, chat and evaluate.",
        epilog="Start with `pocketgpt train` (5 minutes on a CPU, bundled Shakespeare), then "
               "`pocketgpt sample --model runs/demo`.",
    )
    parser.add_argument("--version", action="version", version=f"pocketgpt {__version__}")
    command = _command_factory(parser)
    for add in ADDERS:
        add(command)
    return parser


def _command_factory(parser: Parser) -> AddCommand:
    """command(name, **kwargs): a subcommand's parser, remembered in parser.commands for main's messages."""
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, **kwargs: Any) -> Parser:
        p = sub.add_parser(name, allow_abbrev=False, **kwargs)
        parser.commands[name] = p
        return p

    return command
