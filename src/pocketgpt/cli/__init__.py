"""The `pocketgpt` command: parse, then call one function per subcommand; errors become one line.

Only torch-free modules are imported here at start, so `pocketgpt --help` answers at once.
Each command file defines its commands' options (`add_<cmd>`) beside what runs them (`cmd_<cmd>`):
  train.py      prepare and train (what a train command means lives in pocketgpt.launch)
  generate.py   sample and chat
  inspection.py eval, info, tokenize, plot
  export.py     export (hf, gguf, peft);  push.py: push;  serve.py: serve
  options.py    the option groups several command files share (--vocab, --checkpoint)
  parser.py     assembles the argparse tree from the command files' adders
  output.py     stdout and the exit codes
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from ..config import USER_KEYS, nearest, parse_config_flags
from ..errors import PocketError, TrainingDiverged
from . import export, generate, inspection, push, serve, train
from .output import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USER_ERROR
from .parser import Parser, build_parser

COMMANDS: dict[str, Callable[..., int]] = {
    "prepare": train.cmd_prepare, "train": train.cmd_train, "sample": generate.cmd_sample, "chat": generate.cmd_chat,
    "eval": inspection.cmd_eval, "info": inspection.cmd_info, "tokenize": inspection.cmd_tokenize, "plot": inspection.cmd_plot,
    "export": export.cmd_export, "push": push.cmd_push,
    "serve": serve.cmd_serve,
}

__all__ = ["main", "run", "build_parser", "prepare_config"]
prepare_config = train.prepare_config


def run(argv: list[str]) -> int:
    parser = build_parser()
    overrides: dict[str, str] = {}
    if argv and argv[0] == "train":  # config keys come out first, so a value is never taken for INPUT
        rest, overrides = parse_config_flags(argv[1:], reserved=frozenset(parser.commands["train"].option_names))
        argv = ["train", *rest]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise PocketError(_unknown_message(parser, args.command, unknown[0]))
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "train":
        return train.cmd_train(args, overrides)
    return COMMANDS[args.command](args)


def _unknown_message(parser: Parser, command: str | None, arg: str) -> str:
    """Name the unknown option and the nearest one this command (or the config) knows."""
    sub = parser.commands.get(command, parser) if command else parser
    options = sorted(n for n in sub.option_names if n.startswith("--"))
    if command == "train":
        options += ["--" + k.replace("_", "-") for k in USER_KEYS]
    name = arg.split("=", 1)[0]
    return f"unknown option {name}{nearest(name, options)}" if name.startswith("-") else f"unexpected argument {arg!r}"


def main(argv: list[str] | None = None) -> int:
    """The command's exit code; under torchrun an unexpected error's traceback also goes to the launcher."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # set by torchrun for each rank it starts
        # torchrun's summary then shows the failing rank's traceback, not "To enable traceback see ..."
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except PocketError as e:
        if not getattr(e, "quiet", False):  # quiet: the same error, printed by rank 0 of a torchrun group
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `pocketgpt sample ... | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # disk full, permissions, a file vanishing: say which, no traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr, flush=True)
        return 1
