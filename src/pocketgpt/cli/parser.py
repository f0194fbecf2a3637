"""The argparse tree of `pocketgpt`: every subcommand's options, and nothing that runs them."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import KEY_SECTION, list_presets
from ..errors import PocketError
from ..sampling import DEFAULTS as SAMPLING_DEFAULTS
from ..version import __version__


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, **kwargs: Any) -> Parser:
        p = sub.add_parser(name, allow_abbrev=False, **kwargs)
        parser.commands[name] = p
        return p

    p = command("prepare", help="tokenize text files into a data folder",
                description="Tokenize text files (or the bundled Tiny Shakespeare) into train.bin, val.bin, "
                            "tokenizer.json and meta.json.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, folders (*.txt inside), globs or http(s) URLs; none: bundled")
    p.add_argument("--out", help="data folder to write (default data/<name of the first input>)")
    add_prepare_options(p)

    _add_train(command)

    p = command("sample", help="generate text from a trained model")
    add_sampling(p, 500)
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples, generated as one batch")

    p = command("chat", help="type prompts, watch continuations stream")
    add_sampling(p, 200)

    _add_eval(command)

    p = command("info", help="what a run folder holds")
    p.add_argument("--model", required=True, help="a run folder")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--json", action="store_true")
    add_vocab(p)

    p = command("tokenize", help="show how a text is cut into tokens (JSON)")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--model", help="a run folder")
    p.add_argument("--data", help="a prepared data folder")
    p.add_argument("--tokenizer", help="char (the bundled corpus's characters) or gpt2")

    p = command("plot", help="draw a run's training curves, or compare runs",
                description="One run: (re)draw RUN_DIR/plots/*.png and RUN_DIR/report.md. Several runs: "
                            "overlay their losses against iterations and tokens seen in one picture.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (the --out of train)")
    p.add_argument("--out", help="the comparison picture (default runs-compare.png); given with one run, "
                                 "draws that run's losses there instead of plots/")

    from .export import add_export  # export's options live with cmd_export (cli/export.py)

    add_export(command)

    from .push import add_push  # push's options live with cmd_push (cli/push.py)

    add_push(command)

    from .serve import add_serve  # serve's options live with cmd_serve (cli/serve.py)

    add_serve(command)
    return parser


def _add_train(command: Any) -> None:
    presets = "\n".join(f"  {k:18s} {v}" for k, v in list_presets().items())
    presets += f"\n  {'auto':18s} sized to the data, --max-time (default 10m) and --max-memory, with the reasons printed"
    p = command(
        "train", help="train a model (default: the 5-minute CPU demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT. With no INPUT and no --data, trains on the bundled Tiny Shakespeare.",
        epilog=f"presets:\n{presets}\n\nconfig keys (as --key VALUE or --key=VALUE; - or _ both work):\n  "
               + ", ".join(sorted(k for k in KEY_SECTION if k not in ("vocab_size", "max_time")))
               + "\n\nprecedence: defaults < --preset < --config FILE < command-line keys",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="text files/folders/globs to prepare and train on")
    p.add_argument("--data", help="a folder made by `pocketgpt prepare`")
    p.add_argument("--out", help="run folder (default runs/<preset or input name>)")
    p.add_argument("--preset", help="a shipped preset (default demo), or auto: size the model to the data, "
                                    "--max-time and --max-memory")
    p.add_argument("--max-memory", help="--preset auto: memory cap, e.g. 4GB or 512MB (default half the RAM, "
                                        "80%% of a GPU's)")
    p.add_argument("--config", help="a TOML file of config keys")
    p.add_argument("--init-from", metavar="SRC",
                   help="fine-tune: start from this model (a run folder, a Hugging Face GPT-2 folder or hub name, "
                        "or a nanoGPT checkpoint); its shape and tokenizer are kept; default --preset finetune")
    add_vocab(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--max-time", help="wall-clock budget: seconds or 90s / 10m / 2h; the schedule fits it")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="train even when the memory estimate is beyond this machine's (or GPU's) memory")
    add_prepare_options(p)


def add_vocab(p: argparse.ArgumentParser) -> None:
    """--vocab, for a nanoGPT char checkpoint whose meta.pkl is not beside ckpt.pt."""
    p.add_argument("--vocab", metavar="FILE",
                   help="nanoGPT char checkpoints: its meta.pkl, or the text it was prepared from (input.txt), "
                        "when meta.pkl is not beside ckpt.pt")


def _add_eval(command: Any) -> None:
    p = command("eval", help="loss, perplexity and bits per byte")
    p.add_argument("--model", required=True, help="a run folder")
    p.add_argument("--data", help="a prepared data folder (default: the run's own); its val split is used "
                                  "(its train split with --memorization)")
    p.add_argument("--file", help="a UTF-8 text file to evaluate instead")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--memorization", action="store_true",
                   help="how much of the TRAIN text (or --file) the model continues verbatim from prompts taken from it")
    p.add_argument("--prompts", type=int, default=None, help="--memorization: prompts, evenly spaced (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="--memorization: tokens per prompt (default half the context, at most 128)")
    p.add_argument("--continuation-tokens", type=int, default=None,
                   help="--memorization: greedy tokens compared with the text (default 32)")
    add_vocab(p)


def add_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    d = SAMPLING_DEFAULTS
    p.add_argument("--model", required=True,
                   help="a run folder (the --out of train), a Hugging Face GPT-2 folder or hub name "
                        "(gpt2, user/repo), or a nanoGPT ckpt.pt or out_dir")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="best: lowest val loss (default); last: the most recent save")
    add_vocab(p)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy; default {d.temperature}")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="> 1 makes tokens already in the text less likely; 1 = off")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable); TEXT itself is not printed")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="BPE models: stop at the end-of-text token <|endoftext|>")
    p.add_argument("--seed", type=int, default=None, help="make the output reproducible")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")


def add_prepare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="char",
                   help="char (default): one token per character; gpt2: GPT-2's BPE (50,257 tokens); "
                        "bpe: byte-level BPE trained on your text")
    p.add_argument("--vocab-size", type=int, default=0, help="tokens for --tokenizer bpe (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text, from the end, for val")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the inputs (default utf-8)")
    p.add_argument("--strip-gutenberg", action="store_true",
                   help="drop Project Gutenberg's licence header and footer (the *** START/END OF lines)")
