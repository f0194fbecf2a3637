"""Option groups that several command files share; the floor of cli/ (it imports no command file).

Every other option is defined next to the command that reads it: `add_<cmd>` beside `cmd_<cmd>` in
that command's file. A group that one file alone uses stays in that file, beside the function that
reads it (the sampling flags beside generate.settings_from, prepare's beside train.prepare_config).
"""

from __future__ import annotations

import argparse
from typing import Callable

# build_parser's subcommand factory: command(name, help=..., description=...) -> that command's parser
AddCommand = Callable[..., argparse.ArgumentParser]

CHECKPOINTS = ["best", "last"]


def add_vocab(p: argparse.ArgumentParser) -> None:
    """--vocab, for a nanoGPT char checkpoint whose meta.pkl is not beside ckpt.pt."""
    p.add_argument("--vocab", metavar="FILE",
                   help="nanoGPT char checkpoints: its meta.pkl, or the text it was prepared from (input.txt), "
                        "when meta.pkl is not beside ckpt.pt")


def add_checkpoint(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--checkpoint best|last: which of a run folder's weights to load."""
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help=help)
