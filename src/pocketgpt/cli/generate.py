"""`pocketgpt sample` and `pocketgpt chat`: flags into one SamplingSettings, text streamed out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import PocketError
from ..sampling import DEFAULTS as SAMPLING_DEFAULTS
from .options import AddCommand, add_checkpoint, add_vocab
from .output import say


def add_sample(command: AddCommand) -> None:
    p = command("sample", help="generate text from a trained model")
    add_sampling(p, 500)
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples, generated as one batch")


def add_chat(command: AddCommand) -> None:
    p = command("chat", help="talk to a model (one with a chat template keeps the conversation)")
    add_sampling(p, 200)
    p.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation (a model with a "
                                                    "chat template; /reset keeps it)")


def add_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The model and sampling flags of sample and chat (read back by settings_from)."""
    d = SAMPLING_DEFAULTS
    p.add_argument("--model", required=True,
                   help="a run folder (the --out of train), a Hugging Face GPT-2 folder or hub name "
                        "(gpt2, user/repo), or a nanoGPT ckpt.pt or out_dir")
    add_checkpoint(p, help="best: lowest val loss (default); last: the most recent save")
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
                   help="BPE models: stop at the end-of-text token <|endoftext|> (a pretrained Llama / Qwen "
                        "model always stops at its end-of-sequence tokens)")
    p.add_argument("--seed", type=int, default=None, help="make the output reproducible")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")


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
    # a model with a chat template hears the whole conversation each turn; one without continues each line
    has_template = bool(getattr(model.tokenizer, "chat_template", None))
    if args.system is not None and not has_template:
        raise PocketError("--system needs a model with a chat template (an instruct model, or a run fine-tuned on "
                          "conversations); this one continues text")
    start = [{"role": "system", "content": args.system}] if args.system else []
    conversation: list[dict[str, str]] | None = list(start) if has_template else None
    if interactive:
        what = "a message" if has_template else "a prompt"
        extra = "; end a line with \\ to go on to the next; /reset starts over" if has_template else ""
        say(f"chatting with {args.model}: type {what} and press Enter{extra}; /exit or Ctrl-D ends.")
    trimmed = False
    while True:
        try:
            line = _read_message(interactive)
        except EOFError:
            break
        command = line.strip().lower()
        if command in ("/exit", "exit", "quit"):
            break
        if command == "/reset" and conversation is not None:
            conversation = list(start)
            say("(a new conversation)")
            continue
        if not line.strip():
            continue
        try:
            if conversation is None:
                print_stream(model, line, settings)
                continue
            conversation.append({"role": "user", "content": line})
            conversation, dropped = _fitted(model, conversation, settings)
            if dropped and not trimmed:
                trimmed = True
                say(f"(the conversation outgrew the model's context of {model.block_size} tokens: its oldest turns "
                    "are left out from here on)")
            conversation.append({"role": "assistant", "content": _reply(model, conversation, settings)})
        except PocketError as e:  # a bad prompt should not end the conversation
            if conversation and conversation[-1]["role"] == "user":
                conversation.pop()  # the turn that failed is not part of it
            print(f"error: {e}", file=sys.stderr, flush=True)
    return 0


def _read_message(interactive: bool) -> str:
    """One message; a line ending in a backslash goes on on the next line (a message of several lines)."""
    line = input("> " if interactive else "")
    while line.endswith("\\"):
        try:
            line = line[:-1] + "\n" + input("... " if interactive else "")
        except EOFError:
            return line[:-1]
    return line


def _fitted(model: Any, conversation: list[dict[str, str]], settings: Any) -> tuple[list[dict[str, str]], int]:
    """The conversation trimmed from its oldest exchange so the prompt leaves room for a reply."""
    from ..chat import fit_conversation

    room = model.block_size - min(settings.max_new_tokens, model.block_size // 2)
    return fit_conversation(model.tokenizer, conversation, room)


def _reply(model: Any, messages: list[dict[str, str]], settings: Any) -> str:
    """The model's reply to the conversation, streamed as it comes (its chat template makes the prompt)."""
    reply = []
    for piece in model.chat_stream(messages, settings):
        say(piece, end="")
        reply.append(piece)
    say()
    return "".join(reply)
