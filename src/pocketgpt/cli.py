"""The `pocketgpt` command: argparse subcommands, each building a typed config and calling one function.

Only torch-free modules are imported here at start, so `pocketgpt --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .config import (
    KEY_SECTION,
    PrepareConfig,
    _FIELD_TYPES,
    build_train_config,
    list_presets,
    normalize_key,
    parse_cli_overrides,
)
from .errors import PocketError, TrainingDiverged

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def _out(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


# ---------------------------------------------------------------- prepare

def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare, read_meta

    out = prepare(prepare_config(args, args.out or ""))
    meta = read_meta(out)
    sp = meta["splits"]
    _out(f"prepared {out}: {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, "
         f"train {sp['train']['tokens']:,} tokens, val {sp['val']['tokens']:,} tokens "
         f"from {len(meta['sources'])} file(s)")
    return 0


def prepare_config(args: argparse.Namespace, out: str) -> PrepareConfig:
    """The prepare options (shared by `prepare` and `train INPUT...`) as a PrepareConfig."""
    return PrepareConfig(inputs=args.inputs, out=out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         val_fraction=args.val_fraction, encoding=args.encoding,
                         strip_gutenberg=args.strip_gutenberg)


# ---------------------------------------------------------------- train

def split_config_flags(argv: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """Separate `--<config key> VALUE` pairs from the rest so argparse never mistakes a value for INPUT."""
    rest, config = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = normalize_key(arg.split("=", 1)[0]) if arg.startswith("--") else ""
        if name and name in KEY_SECTION and name != "vocab_size" and arg.split("=", 1)[0] not in known:
            config.append(arg)
            takes_value = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if takes_value and (_FIELD_TYPES[name] is not bool or argv[i + 1].lower() in BOOL_WORDS):
                config.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, config


def cmd_train(args: argparse.Namespace, config_flags: list[str]) -> int:
    from .data import prepare
    from .metrics import check_loggers
    from .runtime import resolve
    from .trainer import check_run_dir, data_dir_of, read_run_config, train

    overrides: dict[str, Any] = parse_cli_overrides(config_flags)
    if args.max_time is not None:
        overrides["max_time"] = args.max_time
    if args.max_memory is not None and args.preset != "auto":
        raise PocketError("--max-memory sizes the model of --preset auto; add --preset auto or drop it")
    out = Path(args.out or default_run_dir(args))
    if args.resume:
        if args.inputs or args.preset:
            raise PocketError("--resume continues a run as it was set up; drop INPUT and --preset")
        check_run_dir(out, resume=True, overwrite=False)
        saved, raw = read_run_config(out)
        cfg = build_train_config(None, args.config, overrides, base=saved)
        data_dir = Path(args.data) if args.data else data_dir_of(out, raw)
    else:
        auto = args.preset == "auto"
        # auto sizes the model from the data, so it is built after preparing; this checks keys first
        cfg = build_train_config(None if auto else args.preset or "demo", args.config, overrides)
        check_loggers(cfg.run.loggers)
        resolve(cfg.run.device, cfg.run.dtype)  # a device or dtype this machine lacks fails before a long prepare
        check_run_dir(out, resume=False, overwrite=args.overwrite)
        if args.data and args.inputs:
            raise PocketError("give either INPUT files or --data, not both")
        if args.data:
            data_dir = Path(args.data)
        else:  # INPUT files, or the bundled corpus: prepared into the run folder
            data_dir = prepare(prepare_config(args, str(out / "data")))
        if auto:
            cfg = _auto_config(args, data_dir, overrides, cfg)
    result = train(cfg, data_dir, out, resume=args.resume, overwrite=args.overwrite)
    if result.interrupted:
        return EXIT_INTERRUPTED
    _out(f"done: {result.iters} iters in {result.seconds:.0f}s, best val loss {result.best_val_loss:.4f}; "
         f"weights in {out / 'model.safetensors'}")
    if cfg.run.sample_tokens:
        _print_final_sample(out, cfg.run.sample_tokens, cfg.run.seed)
    return 0


def _auto_config(args: argparse.Namespace, data_dir: Path, overrides: dict[str, Any], keys_only: Any) -> Any:
    """--preset auto: sizing.plan_auto's choice, under --config and command-line keys; prints why.

    keys_only is the config of those keys alone: it names the device and dtype the run will use.
    """
    import torch

    from .config import TrainConfig, apply_overrides, parse_duration
    from .data import read_meta
    from .runtime import matmul_flops, resolve
    from .sizing import DEFAULT_SECONDS, parse_memory, plan_auto, training_flops

    meta = read_meta(data_dir)
    splits = meta["splits"]
    runtime = resolve(keys_only.run.device, keys_only.run.dtype)
    seconds = parse_duration(args.max_time) if args.max_time is not None else DEFAULT_SECONDS
    memory = parse_memory(args.max_memory) if args.max_memory is not None else _default_memory_mb(runtime)
    probe_flops = matmul_flops(runtime)
    flops = training_flops(probe_flops, runtime.device.type, runtime.dtype == torch.bfloat16)
    plan = plan_auto(int(splits["train"]["tokens"]), int(splits["val"]["tokens"]), int(meta["vocab_size"]),
                     seconds, memory, flops)
    base = TrainConfig()
    apply_overrides(base, plan.keys)
    for line in plan.reasons:
        _out(line)
    _out(f"auto: assumed {flops / 1e9:,.0f} GFLOP/s of training throughput on {runtime.device} "
         f"(a {probe_flops / 1e9:,.0f} GFLOP/s matmul probe x the share small GPTs reach, sizing.py)")
    return build_train_config(None, args.config, overrides, base=base)


def _default_memory_mb(runtime: Any) -> float:
    """Half of this machine's RAM (CPU, MPS) or 80% of the GPU's memory (CUDA)."""
    import os

    if runtime.is_cuda:
        import torch

        return 0.8 * torch.cuda.get_device_properties(runtime.device).total_memory / 2**20
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest laptop
        ram = 8 * 2**30
    return 0.5 * ram / 2**20


def default_run_dir(args: argparse.Namespace) -> str:
    if args.inputs:
        return str(Path("runs") / (Path(args.inputs[0].rstrip("/")).stem or "run"))
    return str(Path("runs") / (args.preset or "demo"))


def _print_final_sample(out: Path, n_tokens: int, seed: int) -> None:
    from .loading import load

    model = load(out)
    _out(f"\nsample from {out} ({n_tokens} tokens, temperature 0.8):\n" + "-" * 40)
    _stream_sample(model, "\n", n_tokens, dict(temperature=0.8, top_k=0, top_p=1.0, seed=seed))
    _out("-" * 40 + f"\nmore: pocketgpt sample --model {out} --prompt 'ROMEO:'")


# ---------------------------------------------------------------- sample / chat

def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _stream_sample(model: Any, prompt: str, max_new_tokens: int, kw: dict[str, Any]) -> None:
    stream = model.stream(prompt, max_new_tokens, 1, **kw)  # raises on a bad prompt before printing
    _out(prompt, end="")
    for pieces in stream:
        if pieces[0]:
            _out(pieces[0], end="")
    _out()


def cmd_sample(args: argparse.Namespace) -> int:
    from .engine import check_sampling
    from .loading import load

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.num_samples < 1:
        raise PocketError(f"--num-samples must be at least 1, got {args.num_samples}")
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PocketError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    model = load(args.model, checkpoint=args.checkpoint, device=args.device)
    if args.num_samples == 1:
        _stream_sample(model, prompt, args.max_new_tokens, _sampling(args))
        return 0
    from .metrics import terminal_progress

    # N samples come out together at the end: on a terminal a bar shows the way there
    with terminal_progress(args.max_new_tokens, f"sampling {args.num_samples} at once") as update:
        texts = model.generate_many(prompt, args.max_new_tokens, num_samples=args.num_samples,
                                    on_step=update, **_sampling(args))
    for i, text in enumerate(texts):
        _out(("" if i == 0 else "-" * 40 + "\n") + text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .engine import check_sampling
    from .loading import load

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    model = load(args.model, checkpoint=args.checkpoint, device=args.device)
    interactive = sys.stdin.isatty()
    if interactive:
        _out(f"chatting with {args.model}: type a prompt and press Enter; 'exit', 'quit' or Ctrl-D ends.")
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
            _stream_sample(model, line, args.max_new_tokens, _sampling(args))
        except PocketError as e:  # a bad prompt should not end the conversation
            print(f"error: {e}", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------- eval / info / tokenize

def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_tokens
    from .loading import load
    from .metrics import terminal_progress
    from .runtime import resolve

    if not args.memorization and (args.prompts is not None or args.prompt_tokens is not None
                                  or args.continuation_tokens is not None):
        raise PocketError("--prompts, --prompt-tokens and --continuation-tokens go with --memorization")

    model = load(args.model, checkpoint=args.checkpoint, device=args.device)
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
        return _memorization(args, model, tokens, what)
    with terminal_progress(max(len(tokens) - 1, 0), "eval") as update:
        result = evaluate_tokens(model.model, tokens, tok.token_bytes(), resolve(args.device, "float32"),
                                 on_batch=update)
    if args.json:
        _out(json.dumps(result))
    else:
        _out(f"{what}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
             f"{result['bits_per_byte']:.4f} bits/byte | {result['tokens']:,} tokens")
    return 0


def _memorization(args: argparse.Namespace, model: Any, tokens: Any, what: str) -> int:
    from .memorize import DEFAULT_CONTINUATION, DEFAULT_PROMPTS, memorization
    from .metrics import terminal_progress

    n = DEFAULT_PROMPTS if args.prompts is None else args.prompts
    s = DEFAULT_CONTINUATION if args.continuation_tokens is None else args.continuation_tokens
    with terminal_progress(max(n, 0), "memorization", unit="prompt") as update:
        r = memorization(model.model, tokens, n, args.prompt_tokens, s, on_prompt=update)
    r["text"] = what
    if args.json:
        _out(json.dumps(r))
    else:
        _out(f"{what}: {r['exact_match']:.1%} of {r['prompts']} continuations exact | matching prefix "
             f"{r['mean_prefix_tokens']:.1f} of {r['continuation_tokens']} tokens ({r['mean_prefix_share']:.1%}) | "
             f"token accuracy {r['token_accuracy']:.1%} | prompts of {r['prompt_tokens']} tokens, greedy")
    return 0


def _split_tokens(args: argparse.Namespace, model: Any, split: str) -> Any:
    from .data import open_tokens
    from .tokenizer import load_tokenizer
    from .trainer import data_dir_of, read_run_config

    if args.data:
        data_dir = Path(args.data)
        if load_tokenizer(data_dir / "tokenizer.json").to_dict() != model.tokenizer.to_dict():
            raise PocketError(f"{data_dir} was prepared with a different tokenizer than {args.model}")
    else:
        data_dir = data_dir_of(Path(args.model), read_run_config(Path(args.model))[1])
    tokens, _ = open_tokens(data_dir / f"{split}.bin")
    return tokens


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import read_json, resume_dir
    from .loading import load

    model = load(args.model, checkpoint=args.checkpoint)
    run = Path(args.model)
    last = resume_dir(run)
    state = read_json(last / "state.json", "resume state") if last else {}
    info = {
        "model": str(run),
        "parameters": model.model.num_params(),
        "config": model.config.to_dict(),
        "tokenizer": {"kind": model.tokenizer.kind, "vocab_size": model.tokenizer.vocab_size},
        "iters": state.get("iter"),
        "tokens_seen": state.get("tokens_seen"),
        "best_val_loss": state.get("best_val_loss"),
        "best_val_bpb": _best_bpb(run, state.get("best_iter")),
        "best_iter": state.get("best_iter"),
        "files": {str(p.relative_to(run)): p.stat().st_size for p in sorted(run.rglob("*")) if p.is_file()},
    }
    if args.json:
        _out(json.dumps(info, indent=2))
        return 0
    m = info["config"]["model"]
    _out(f"{run}: {info['parameters']:,} parameters ({m['n_layer']} layers, {m['n_head']} heads, "
         f"{m['n_embd']} wide, context {m['block_size']}), {info['tokenizer']['kind']} tokenizer "
         f"with {info['tokenizer']['vocab_size']} tokens")
    best, bpb = info["best_val_loss"], info["best_val_bpb"]
    _out(f"trained {info['iters']} iters, {info['tokens_seen'] or 0:,} tokens seen; "
         f"best val loss {best if best is None else round(best, 4)}"
         f"{'' if bpb is None else f' ({bpb:.4f} bits/byte)'} at iter {info['best_iter']}")
    for name, size in info["files"].items():
        _out(f"  {name:40s} {size:>12,} bytes")
    return 0


def _best_bpb(run: Path, best_iter: int | None) -> float | None:
    """val_bpb of the eval line at the best iteration in metrics.jsonl (None for runs without one)."""
    from .metrics import read_metrics

    evals = [m for m in read_metrics(run / "metrics.jsonl")
             if "val_bpb" in m and isinstance(m.get("val_loss"), (int, float))]
    at_best = [m for m in evals if m.get("iter") == best_iter] or sorted(evals, key=lambda m: m["val_loss"])[:1]
    value = at_best[-1]["val_bpb"] if at_best else None
    return value if isinstance(value, (int, float)) else None


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .data import builtin_tokenizer
    from .tokenizer import load_tokenizer, token_piece

    if sum(bool(x) for x in (args.model, args.data, args.tokenizer)) != 1:
        raise PocketError("give exactly one of --model RUN_DIR, --data DATA_DIR or --tokenizer char|gpt2")
    if args.tokenizer:
        tok = builtin_tokenizer(args.tokenizer)
    else:
        tok = load_tokenizer(Path(args.model or args.data) / "tokenizer.json")
    ids = tok.encode(args.text)
    # A byte-level token may hold part of a character: its text then shows U+FFFD, and "bytes"
    # (hex, one entry per token) says exactly what it holds.
    _out(json.dumps({"ids": ids, "tokens": [tok.decode([i]) for i in ids],
                     "bytes": [token_piece(tok, i).hex() for i in ids]}, ensure_ascii=False))
    return 0


# ---------------------------------------------------------------- plot

def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import compare_runs, write_plots
    from .report import write_report

    runs = [Path(r) for r in args.runs]
    if len(runs) > 1 or args.out:  # several runs (or a chosen file): one comparison picture
        _out(str(compare_runs(runs, Path(args.out or "runs-compare.png"))))
        return 0
    paths = write_plots(runs[0])
    if not paths:
        _out(f"{runs[0]}: nothing logged yet in metrics.jsonl, so no plots")
    paths.append(write_report(runs[0]))
    for path in paths:
        _out(str(path))
    return 0


# ---------------------------------------------------------------- parser

def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--model", required=True, help="a run folder (the --out of train)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="best: lowest val loss (default); last: the most recent save")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; default 0.8")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="make the output reproducible")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one line (exit 2) instead of usage + message."""

    def error(self, message: str) -> Any:
        raise PocketError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pocketgpt", allow_abbrev=False,
        description="Train a small GPT from scratch on your own text, then sample, chat and evaluate.",
        epilog="Start with `pocketgpt train` (5 minutes on a CPU, bundled Shakespeare), then "
               "`pocketgpt sample --model runs/demo`.",
    )
    parser.add_argument("--version", action="version", version=f"pocketgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", allow_abbrev=False, help="tokenize text files into a data folder",
                       description="Tokenize text files (or the bundled Tiny Shakespeare) into train.bin, val.bin, "
                                   "tokenizer.json and meta.json.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, folders (*.txt inside), globs or http(s) URLs; none: bundled")
    p.add_argument("--out", help="data folder to write (default data/<name of the first input>)")
    _add_prepare_options(p)

    presets = "\n".join(f"  {k:18s} {v}" for k, v in list_presets().items())
    presets += f"\n  {'auto':18s} sized to the data, --max-time (default 10m) and --max-memory, with the reasons printed"
    p = sub.add_parser(
        "train", allow_abbrev=False, help="train a model (default: the 5-minute CPU demo)",
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
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--max-time", help="wall-clock budget: seconds or 90s / 10m / 2h; the schedule fits it")
    _add_prepare_options(p)

    p = sub.add_parser("sample", allow_abbrev=False, help="generate text from a trained model")
    _add_sampling(p, 500)
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples, generated as one batch")

    p = sub.add_parser("chat", allow_abbrev=False, help="type prompts, watch continuations stream")
    _add_sampling(p, 200)

    p = sub.add_parser("eval", allow_abbrev=False, help="loss, perplexity and bits per byte")
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

    p = sub.add_parser("info", allow_abbrev=False, help="what a run folder holds")
    p.add_argument("--model", required=True, help="a run folder")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tokenize", allow_abbrev=False, help="show how a text is cut into tokens (JSON)")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--model", help="a run folder")
    p.add_argument("--data", help="a prepared data folder")
    p.add_argument("--tokenizer", help="char (the bundled corpus's characters) or gpt2")

    p = sub.add_parser("plot", allow_abbrev=False, help="draw a run's training curves, or compare runs",
                       description="One run: (re)draw RUN_DIR/plots/*.png and RUN_DIR/report.md. Several runs: "
                                   "overlay their losses against iterations and tokens seen in one picture.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (the --out of train)")
    p.add_argument("--out", help="the comparison picture (default runs-compare.png); given with one run, "
                                 "draws that run's losses there instead of plots/")
    return parser


def _add_prepare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="char",
                   help="char (default): one token per character; gpt2: GPT-2's BPE (50,257 tokens); "
                        "bpe: byte-level BPE trained on your text")
    p.add_argument("--vocab-size", type=int, default=0, help="tokens for --tokenizer bpe (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text, from the end, for val")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the inputs (default utf-8)")
    p.add_argument("--strip-gutenberg", action="store_true",
                   help="drop Project Gutenberg's licence header and footer (the *** START/END OF lines)")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare, "sample": cmd_sample, "chat": cmd_chat,
    "eval": cmd_eval, "info": cmd_info, "tokenize": cmd_tokenize, "plot": cmd_plot,
}


def run(argv: list[str]) -> int:
    parser = build_parser()
    config_flags: list[str] = []
    if argv and argv[0] == "train":
        train_parser = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
        known = {s for a in train_parser._actions for s in a.option_strings}
        rest, config_flags = split_config_flags(argv[1:], known)
        argv = ["train", *rest]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise PocketError(_unknown_message(parser, args.command, unknown[0]))
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "train":
        return cmd_train(args, config_flags)
    return COMMANDS[args.command](args)


def _unknown_message(parser: argparse.ArgumentParser, command: str | None, arg: str) -> str:
    """Name the unknown option and the nearest one this command (or the config) knows."""
    from .config import USER_KEYS, nearest

    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    sub = choices.get(command) if command else parser
    options = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    if command == "train":
        options += ["--" + k.replace("_", "-") for k in USER_KEYS]
    name = arg.split("=", 1)[0]
    return f"unknown option {name}{nearest(name, options)}" if name.startswith("-") else f"unexpected argument {arg!r}"


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except PocketError as e:
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
