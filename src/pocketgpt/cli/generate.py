"""`pocketgpt sample` and `pocketgpt chat`: flags into one SamplingSettings, text streamed out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import PocketError
from .output import say


def settings_from(args: argparse.Namespace) -> Any:
    """The sampling flags as one validated SamplingSettings; a bad value is named by its flag."""
    from ..sampling import InvalidSetting, SamplingSettings

    try:
        return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                                stop_at_eos=args.stop_at_eos, repetition_penalty=args.repetition_penalty,
                                num_samples=getattr(args, "num_samples", 1))
    except InvalidSetting as e:
        raise PocketError(e.as_flag()) from None


def print_stream(model: Any, prompt: str, settings: Any) -> None:
    """The prompt, then each piece of the continuation as it comes (a bad prompt fails before any output)."""
    stream = model.stream(prompt, settings)
    say(prompt, end="")
    for pieces in stream:
        if pieces[0]:
            say(pieces[0], end="")
    say()


def cmd_sample(args: argparse.Namespace) -> int:
    from ..loading import load

    settings = settings_from(args)
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PocketError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    model = load(args.model, checkpoint=args.checkpoint, device=args.device, vocab=args.vocab)
    if args.num_samples == 1:
        print_stream(model, prompt, settings)
        return 0
    from ..metrics import terminal_progress

    # N samples come out together at the end: on a terminal a bar shows the way there
    start = time.perf_counter()
    with terminal_progress(args.max_new_tokens, f"sampling {args.num_samples} at once") as update:
        done = model.complete(prompt, settings, on_step=update, num_samples=args.num_samples)
    seconds = time.perf_counter() - start
    for i, c in enumerate(done):
        say(("" if i == 0 else "-" * 40 + "\n") + prompt + c.text)
    # on stderr, so stdout stays the samples alone: what a batch buys over one sample at a time
    tokens = sum(c.completion_tokens for c in done)
    print(f"{len(done)} samples, {tokens:,} new tokens in {seconds:.1f}s: "
          f"{tokens / max(seconds, 1e-9):,.0f} tokens/s together", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ..loading import load

    settings = settings_from(args)
    model = load(args.model, checkpoint=args.checkpoint, device=args.device, vocab=args.vocab)
    interactive = sys.stdin.isatty()
    if interactive:
        say(f"chatting with {args.model}: type a prompt and press Enter; 'exit', 'quit' or Ctrl-D ends.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip().lower() in ("exit", "quit"):
            break
        if not line.strip():
            continue
        try:
            print_stream(model, line, settings)
        except PocketError as e:  # a bad prompt should not end the conversation
            print(f"error: {e}", file=sys.stderr, flush=True)
    return 0
