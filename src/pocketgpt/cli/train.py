"""`pocketgpt prepare` and `pocketgpt train`: flags in, one call out (launch.launch for train)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..config import KEY_SECTION, PrepareConfig, list_presets
from ..launch import TrainRequest, launch, suggest_prompt
from .generate import print_stream
from .options import AddCommand, add_vocab
from .output import EXIT_INTERRUPTED, say


def add_prepare(command: AddCommand) -> None:
    p = command("prepare", help="tokenize text files into a data folder",
                description="Tokenize text files (or the bundled Tiny Shakespeare) into train.bin, val.bin, "
                            "tokenizer.json and meta.json.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, folders (*.txt inside), globs or http(s) URLs; none: bundled")
    p.add_argument("--out", help="data folder to write (default data/<name of the first input>)")
    add_prepare_options(p)


def add_train(command: AddCommand) -> None:
    p = command(
        "train", help="train a model (default: the 5-minute CPU demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT. With no INPUT and no --data, trains on the bundled Tiny Shakespeare.",
        epilog=_train_epilog(),
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
    p.add_argument("--data-format", default="auto", metavar="auto|chat|text",
                   help="chat: INPUT holds conversations (JSONL: messages, ShareGPT, prompt/completion or Alpaca "
                        "lines), trained on the assistant's answers only, with --init-from a model that has a chat "
                        "template; text: train on it as text; auto (default): chat for .jsonl inputs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--max-time", help="wall-clock budget: seconds or 90s / 10m / 2h; the schedule fits it")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="train even when the memory estimate is beyond this machine's (or GPU's) memory")
    add_prepare_options(p)


def _train_epilog() -> str:
    """The presets, the config keys train takes as flags, and which setting wins."""
    presets = "\n".join(f"  {k:18s} {v}" for k, v in list_presets().items())
    presets += f"\n  {'auto':18s} sized to the data, --max-time (default 10m) and --max-memory, with the reasons printed"
    return (f"presets:\n{presets}\n\nconfig keys (as --key VALUE or --key=VALUE; - or _ both work):\n  "
            + ", ".join(sorted(k for k in KEY_SECTION if k not in ("vocab_size", "max_time")))
            + "\n\nprecedence: defaults < --preset < --config FILE < command-line keys")


def add_prepare_options(p: argparse.ArgumentParser) -> None:
    """How text becomes tokens, for `prepare` and `train INPUT...` alike (read back by prepare_config)."""
    p.add_argument("--tokenizer", default="char",
                   help="char (default): one token per character; gpt2: GPT-2's BPE (50,257 tokens); "
                        "bpe: byte-level BPE trained on your text")
    p.add_argument("--vocab-size", type=int, default=0, help="tokens for --tokenizer bpe (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text, from the end, for val")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the inputs (default utf-8)")
    p.add_argument("--strip-gutenberg", action="store_true",
                   help="drop Project Gutenberg's licence header and footer (the *** START/END OF lines)")


def prepare_config(args: argparse.Namespace, out: str) -> PrepareConfig:
    """The prepare options (shared by `prepare` and `train INPUT...`) as a PrepareConfig."""
    return PrepareConfig(inputs=list(args.inputs), out=out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         val_fraction=args.val_fraction, encoding=args.encoding,
                         strip_gutenberg=args.strip_gutenberg)


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..corpus import prepare
    from ..data import read_meta

    out = prepare(prepare_config(args, args.out or ""))
    meta = read_meta(out)
    sp = meta["splits"]
    say(f"prepared {out}: {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, "
        f"train {sp['train']['tokens']:,} tokens, val {sp['val']['tokens']:,} tokens "
        f"from {len(meta['sources'])} file(s)")
    return 0


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    req = TrainRequest(
        inputs=list(args.inputs), data=args.data, out=args.out, preset=args.preset, config_file=args.config,
        overrides=overrides, resume=args.resume, overwrite=args.overwrite, max_time=args.max_time,
        max_memory=args.max_memory, prepare=prepare_config(args, ""), memory_check=not args.skip_memory_check,
        init_from=args.init_from, vocab=args.vocab, data_format=args.data_format,
    )
    done = launch(req)
    result, out = done.result, done.out
    if result.interrupted:
        return EXIT_INTERRUPTED
    if _rank() != 0:  # under torchrun rank 0 alone reports (and samples) the run
        return 0
    say(f"done: {result.iters} iters in {result.seconds:.0f}s, best val loss {result.best_val_loss:.4f}; "
        f"weights in {out / 'model.safetensors'}")
    from ..arch import export_note

    note = export_note(done.cfg.model)
    if note:
        say(note)
    from ..data import is_chat_data, read_meta

    if is_chat_data(read_meta(done.data_dir)):  # it answers now: talk to it rather than continue text
        say(f"more: pocketgpt chat --model {shlex.quote(str(out))}")
        return 0
    prompt = suggest_prompt(done.data_dir) or "\n"
    if done.cfg.run.sample_tokens:
        _print_final_sample(out, done.cfg.run.sample_tokens, done.cfg.run.seed)
    say(f"more: pocketgpt sample --model {shlex.quote(str(out))} --prompt {shlex.quote(prompt)}")
    return 0


def _rank() -> int:
    from ..distributed import world_from_env  # torch is loaded by now: training ran

    return world_from_env()[0]


def _print_final_sample(out: Path, n_tokens: int, seed: int) -> None:
    from ..loading import load
    from ..sampling import SamplingSettings

    model = load(out)
    settings = SamplingSettings(max_new_tokens=n_tokens, seed=seed)
    say(f"\nsample from {out} ({n_tokens} tokens, temperature {settings.temperature}):\n" + "-" * 40)
    print_stream(model, "\n", settings)
    say("-" * 40)
