"""`pocketgpt export`: a trained model as a folder other tools load (today: Hugging Face GPT-2)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import PocketError
from .output import say

FORMATS = ("hf",)


def add_export(command: Any) -> None:
    """The export subcommand's options (parser.py calls this from build_parser)."""
    p = command("export", help="write a model as a Hugging Face folder (transformers loads it)",
                description="Write a trained model as a Hugging Face GPT-2 folder: config.json, "
                            "model.safetensors, generation_config.json, tokenizer files and a README.md "
                            "model card, ready for AutoModelForCausalLM.from_pretrained or the hub.")
    p.add_argument("--model", required=True, help="a run folder (or any model `sample` loads)")
    p.add_argument("--format", choices=FORMATS, default="hf", help="hf: Hugging Face GPT-2 (default)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--license", default="other", help="the license in the model card's header (default other)")


def run_stats(run: Path) -> dict[str, Any]:
    """Iterations, tokens seen, best val loss and bits per byte of a run folder; {} for other models."""
    from ..rundir import is_run_dir, summary

    return summary(run) if is_run_dir(run) else {}


def cmd_export(args: argparse.Namespace) -> int:
    from ..hf import export_hf, check_exportable
    from ..loading import load

    if args.format != "hf":  # argparse's choices already refuse; kept for callers building args by hand
        raise PocketError(f"--format must be one of {', '.join(FORMATS)}")
    loaded = load(args.model, checkpoint=args.checkpoint)
    check_exportable(loaded.model.config)  # before anything is written
    name = Path(args.model).resolve().name if Path(args.model).exists() else str(args.model)
    notes = export_hf(loaded.model, loaded.tokenizer, args.out, overwrite=args.overwrite, name=name,
                      stats=run_stats(Path(args.model)), license=args.license)
    for note in notes:
        say(f"note: {note}")
    say(f"wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0
