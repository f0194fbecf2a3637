"""`pocketgpt push`: export a model as a Hugging Face folder and upload it to the hub (pocketgpt.share)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .export import load_exportable, run_stats
from .options import AddCommand, add_checkpoint, add_vocab
from .output import say


def add_push(command: AddCommand) -> None:
    """The push subcommand's options."""
    p = command("push", help="upload a model to the Hugging Face hub (private by default)",
                description="Export a model as a Hugging Face GPT-2 folder (what `export --format hf` writes: "
                            "weights, config, tokenizer, model card) and upload it to a hub repo, created "
                            "private if it does not exist (an existing repo keeps its visibility).")
    p.add_argument("--model", required=True, help="a run folder (or any model `sample` loads)")
    p.add_argument("--repo", required=True, help="the hub repo: owner/name (a bare name goes under your user)")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="create the repo private (default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    p.add_argument("--token", help="a Hugging Face token with write access (default: HF_TOKEN, else the "
                                   "login stored by `hf auth login`)")
    add_checkpoint(p)
    add_vocab(p)
    p.add_argument("--license", default="other", help="the license in the model card's header (default other)")
    p.add_argument("--message", help="the commit message (default: Upload NAME with pocketgpt)")
    p.add_argument("--dry-run", action="store_true",
                   help="export and list what would be uploaded (files and sizes); no token, no network")


def cmd_push(args: argparse.Namespace) -> int:
    from ..share import check_repo_id, human_size, push

    check_repo_id(args.repo)  # a typo is said before the model loads
    loaded = load_exportable(args.model, args.checkpoint, args.vocab)
    up = push(loaded.model, loaded.tokenizer, args.repo, private=args.private, token=args.token,
              dry_run=args.dry_run, stats=run_stats(Path(args.model)), license=args.license, message=args.message)
    for note in up.notes:
        say(f"note: {note}")
    kind = "private" if up.private else "public"
    head = f"would upload to {up.repo_id} ({kind} if created)" if args.dry_run else f"uploaded to {up.url}"
    say(f"{head}: {len(up.files)} files, {human_size(up.total_bytes)}")
    width = max(len(n) for n, _ in up.files)
    for name, size in up.files:
        say(f"  {name:<{width}}  {human_size(size):>9}")
    return 0
