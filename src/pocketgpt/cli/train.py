"""`pocketgpt prepare` and `pocketgpt train`: flags in, one call out (launch.launch for train)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from ..config import PrepareConfig
from ..launch import TrainRequest, launch, suggest_prompt
from .generate import print_stream
from .output import say

EXIT_INTERRUPTED = 130


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
        init_from=args.init_from, vocab=args.vocab,
    )
    done = launch(req)
    result, out = done.result, done.out
    if result.interrupted:
        return EXIT_INTERRUPTED
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone reports (and samples) the run
        return 0
    say(f"done: {result.iters} iters in {result.seconds:.0f}s, best val loss {result.best_val_loss:.4f}; "
        f"weights in {out / 'model.safetensors'}")
    prompt = suggest_prompt(done.data_dir) or "\n"
    if done.cfg.run.sample_tokens:
        _print_final_sample(out, done.cfg.run.sample_tokens, done.cfg.run.seed)
    say(f"more: pocketgpt sample --model {shlex.quote(str(out))} --prompt {shlex.quote(prompt)}")
    return 0


def _print_final_sample(out: Path, n_tokens: int, seed: int) -> None:
    from ..loading import load
    from ..sampling import SamplingSettings

    model = load(out)
    settings = SamplingSettings(max_new_tokens=n_tokens, seed=seed)
    say(f"\nsample from {out} ({n_tokens} tokens, temperature {settings.temperature}):\n" + "-" * 40)
    print_stream(model, "\n", settings)
    say("-" * 40)
