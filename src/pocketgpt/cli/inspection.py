"""`pocketgpt eval`, `info`, `tokenize` and `plot`: measure and show what a run holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import PocketError
from .options import AddCommand, add_checkpoint, add_vocab
from .output import say


def add_eval(command: AddCommand) -> None:
    p = command("eval", help="loss, perplexity and bits per byte")
    p.add_argument("--model", required=True, help="a run folder")
    p.add_argument("--data", help="a prepared data folder (default: the run's own); its val split is used "
                                  "(its train split with --memorization)")
    p.add_argument("--file", help="a UTF-8 text file to evaluate instead")
    add_checkpoint(p)
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


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import Packed, chat_windows
    from ..evaluate import evaluate_tokens, evaluate_windows
    from ..loading import load
    from ..metrics import terminal_progress
    from ..runtime import resolve

    if not args.memorization and (args.prompts is not None or args.prompt_tokens is not None
                                  or args.continuation_tokens is not None):
        raise PocketError("--prompts, --prompt-tokens and --continuation-tokens go with --memorization")

    model = load(args.model, checkpoint=args.checkpoint, device=args.device, vocab=args.vocab)
    tok = model.tokenizer
    if args.file and args.data:
        raise PocketError("give either --data or --file, not both")
    if args.file:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PocketError(f"file not found: {args.file}") from None
        except UnicodeDecodeError as e:
            raise PocketError(f"{args.file} is not valid utf-8 at byte {e.start}") from None
        tokens, what = tok.encode_array(text), args.file
    elif args.memorization:
        tokens, what = _split_tokens(args, model, "train"), "train split"
    else:
        tokens, what = _split_tokens(args, model, "val"), "val split"
    if args.memorization:
        if isinstance(tokens, Packed):
            raise PocketError(f"--memorization measures how a model continues text; {args.model} was trained on "
                              "conversations: give --file TEXT_FILE")
        return _memorization(args, model, tokens, what)
    if isinstance(tokens, Packed):  # a chat run: its answers only, as training scored them
        with terminal_progress(tokens.targets.size, "eval") as update:
            result = evaluate_windows(model.model, chat_windows(tokens), tok.token_bytes(),
                                      resolve(args.device, "float32"), on_batch=update)
        what += " (the answers)"
    else:
        with terminal_progress(max(len(tokens) - 1, 0), "eval") as update:
            result = evaluate_tokens(model.model, tokens, tok.token_bytes(), resolve(args.device, "float32"),
                                     on_batch=update)
    if args.json:
        say(json.dumps(result))
    else:
        say(f"{what}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
             f"{result['bits_per_byte']:.4f} bits/byte | {result['tokens']:,} tokens")
    return 0


def _memorization(args: argparse.Namespace, model: Any, tokens: Any, what: str) -> int:
    from ..memorize import DEFAULT_CONTINUATION, DEFAULT_PROMPTS, memorization
    from ..metrics import terminal_progress

    n = DEFAULT_PROMPTS if args.prompts is None else args.prompts
    s = DEFAULT_CONTINUATION if args.continuation_tokens is None else args.continuation_tokens
    with terminal_progress(max(n, 0), "memorization", unit="prompt") as update:
        r = memorization(model.model, tokens, n, args.prompt_tokens, s, on_prompt=update)
    r["text"] = what
    if args.json:
        say(json.dumps(r))
    else:
        say(f"{what}: {r['exact_match']:.1%} of {r['prompts']} continuations exact | matching prefix "
             f"{r['mean_prefix_tokens']:.1f} of {r['continuation_tokens']} tokens ({r['mean_prefix_share']:.1%}) | "
             f"token accuracy {r['token_accuracy']:.1%} | prompts of {r['prompt_tokens']} tokens, greedy")
    return 0


def _split_tokens(args: argparse.Namespace, model: Any, split: str) -> Any:
    from ..data import TOKENIZER, is_chat_data, open_chat_split, open_tokens, read_meta, split_path
    from ..rundir import check_is_run, data_dir_of
    from ..tokenizer import load_tokenizer

    if not args.data and model.info.get("source_kind"):  # imported: no data folder of its own
        raise PocketError(f"{args.model} is a {model.info['source_kind']} model with no data of its own; "
                          "give --file TEXT_FILE or --data DATA_DIR")
    if args.data:
        data_dir = Path(args.data)
        if load_tokenizer(data_dir / TOKENIZER).to_dict() != model.tokenizer.to_dict():
            raise PocketError(f"{data_dir} was prepared with a different tokenizer than {args.model}")
    else:
        data_dir = data_dir_of(check_is_run(args.model))
    if is_chat_data(read_meta(data_dir)):  # conversations, packed into rows of the model's context
        return open_chat_split(data_dir, split, model.block_size)[1]
    tokens, _ = open_tokens(split_path(data_dir, split))
    return tokens


def add_info(command: AddCommand) -> None:
    p = command("info", help="what a run folder holds")
    p.add_argument("--model", required=True, help="a run folder")
    add_checkpoint(p)
    p.add_argument("--json", action="store_true")
    add_vocab(p)


def cmd_info(args: argparse.Namespace) -> int:
    from ..loading import load
    from ..rundir import LOCK, summary

    model = load(args.model, checkpoint=args.checkpoint, vocab=args.vocab)
    if model.info.get("source_kind"):  # imported (Hugging Face, nanoGPT): no run folder to read
        return _foreign_info(args, model)
    run = Path(args.model)
    info = {
        "model": str(run),
        "parameters": model.model.num_params(),
        "config": model.config.to_dict(),
        "tokenizer": {"kind": model.tokenizer.kind, "vocab_size": model.tokenizer.vocab_size},
        **summary(run),  # iters, tokens_seen, best_val_loss, best_val_bpb, best_iter, init_from
        "files": {str(p.relative_to(run)): p.stat().st_size for p in sorted(run.rglob("*"))
                  if p.is_file() and p.name != LOCK},
    }
    if args.json:
        say(json.dumps(info, indent=2))
        return 0
    m = info["config"]["model"]
    say(f"{run}: {info['parameters']:,} parameters ({m['n_layer']} layers, {m['n_head']} heads, "
        f"{m['n_embd']} wide, context {m['block_size']}), {info['tokenizer']['kind']} tokenizer "
        f"with {info['tokenizer']['vocab_size']} tokens")
    if info["init_from"]:
        say(f"fine-tuned from {info['init_from']['source']} ({info['init_from'].get('kind', 'unknown kind')})")
    if info.get("lora"):
        lo = info["lora"]
        say(f"LoRA rank {lo['rank']} (alpha {lo['alpha']:g}) on {', '.join(lo['targets'])}: "
            f"{lo['trainable_parameters']:,} trainable parameters; model.safetensors holds the merged weights, "
            "adapter.safetensors the adapter alone")
    best, bpb = info["best_val_loss"], info["best_val_bpb"]
    say(f"trained {info['iters']} iters, {info['tokens_seen'] or 0:,} tokens seen; "
        f"best val loss {best if best is None else round(best, 4)}"
        f"{'' if bpb is None else f' ({bpb:.4f} bits/byte)'} at iter {info['best_iter']}")
    for name, size in info["files"].items():
        say(f"  {name:40s} {size:>12,} bytes")
    return 0


def _foreign_info(args: argparse.Namespace, model: Any) -> int:
    """info for an imported model: what its files say (no training state, metrics or run files)."""
    info = {
        "model": str(args.model), "source_kind": model.info["source_kind"], "source": str(model.source),
        "parameters": model.model.num_params(), "config": model.config.to_dict(),
        "tokenizer": {"kind": model.tokenizer.kind, "vocab_size": model.tokenizer.vocab_size},
        **{k: v for k, v in model.info.items() if k not in ("source_kind", "source")},
    }
    if args.json:
        say(json.dumps(info, indent=2))
        return 0
    m = info["config"]["model"]
    say(f"{args.model}: a {info['source_kind']} model from {info['source']}")
    say(f"{info['parameters']:,} parameters ({m['n_layer']} layers, {m['n_head']} heads, {m['n_embd']} wide, "
        f"context {m['block_size']}, mlp {m['mlp']}, bias {str(m['bias']).lower()}), "
        f"{info['tokenizer']['kind']} tokenizer with {info['tokenizer']['vocab_size']} tokens")
    extra = {k: v for k, v in model.info.items() if k not in ("source_kind", "source")}
    if extra:
        say(", ".join(f"{k} {v}" for k, v in extra.items()))
    return 0


def add_tokenize(command: AddCommand) -> None:
    p = command("tokenize", help="show how a text is cut into tokens (JSON)")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--model", help="a run folder")
    p.add_argument("--data", help="a prepared data folder")
    p.add_argument("--tokenizer", help="char (the bundled corpus's characters) or gpt2")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from ..corpus import builtin_tokenizer
    from ..data import TOKENIZER
    from ..rundir import TOKENIZER as RUN_TOKENIZER
    from ..rundir import is_run_dir
    from ..tokenizer import load_tokenizer, token_piece

    if sum(bool(x) for x in (args.model, args.data, args.tokenizer)) != 1:
        raise PocketError("give exactly one of --model RUN_DIR, --data DATA_DIR or --tokenizer char|gpt2")
    if args.tokenizer:
        tok = builtin_tokenizer(args.tokenizer)
    elif args.model and not is_run_dir(Path(args.model)):  # a Hugging Face folder or hub name, a nanoGPT checkpoint
        from ..loading import load

        tok = load(args.model).tokenizer
    else:
        tok = load_tokenizer(Path(args.model) / RUN_TOKENIZER if args.model else Path(args.data) / TOKENIZER)
    ids = tok.encode(args.text)
    # A byte-level token may hold part of a character: its text then shows U+FFFD, and "bytes"
    # (hex, one entry per token) says exactly what it holds.
    say(json.dumps({"ids": ids, "tokens": [tok.decode([i]) for i in ids],
                     "bytes": [token_piece(tok, i).hex() for i in ids]}, ensure_ascii=False))
    return 0


# ---------------------------------------------------------------- plot

def add_plot(command: AddCommand) -> None:
    p = command("plot", help="draw a run's training curves, or compare runs",
                description="One run: (re)draw RUN_DIR/plots/*.png and RUN_DIR/report.md. Several runs: "
                            "overlay their losses against iterations and tokens seen in one picture.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (the --out of train)")
    p.add_argument("--out", help="the comparison picture (default runs-compare.png); given with one run, "
                                 "draws that run's losses there instead of plots/")


def cmd_plot(args: argparse.Namespace) -> int:
    from ..plots import compare_runs, write_plots
    from ..report import write_report

    runs = [Path(r) for r in args.runs]
    if len(runs) > 1 or args.out:  # several runs (or a chosen file): one comparison picture
        say(str(compare_runs(runs, Path(args.out or "runs-compare.png"))))
        return 0
    paths = write_plots(runs[0])
    if not paths:
        say(f"{runs[0]}: nothing logged yet in metrics.jsonl, so no plots")
    paths.append(write_report(runs[0]))
    for path in paths:
        say(str(path))
    return 0


