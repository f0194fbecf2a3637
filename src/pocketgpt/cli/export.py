"""`pocketgpt export`: a trained model as files other tools load: a Hugging Face GPT-2 folder or a GGUF file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import PocketError
from .options import AddCommand, add_checkpoint, add_vocab
from .output import say

FORMATS = ("hf", "gguf", "peft", "ollama")


def add_export(command: AddCommand) -> None:
    """The export subcommand's options."""
    p = command("export", help="write a model as a Hugging Face folder or a GGUF file (llama.cpp)",
                description="Write a trained model as a Hugging Face GPT-2 folder (config.json, "
                            "model.safetensors, generation_config.json, tokenizer files and a README.md "
                            "model card, ready for AutoModelForCausalLM.from_pretrained or the hub), or as "
                            "one GGUF file with its tokenizer that llama.cpp runs (--format gguf).")
    p.add_argument("--model", required=True, help="a run folder (or any model `sample` loads)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: Hugging Face GPT-2 (default; a LoRA run's merged weights); gguf: one file for "
                        "llama.cpp; peft: a LoRA run's adapter alone, for Hugging Face peft; ollama: a folder "
                        "with model.gguf and a Modelfile for ollama create")
    p.add_argument("--out", required=True, help="the folder (hf, peft, ollama) or the .gguf file (gguf) to write")
    add_checkpoint(p)
    add_vocab(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.add_argument("--license", default="other", help="the license in the model card's header or the GGUF "
                                                      "metadata (default other)")
    p.add_argument("--gguf-dtype", choices=["f32", "f16"], default=None,
                   help="gguf: f32 (default; exactly pocketgpt's weights) or f16 (half the size)")


def run_stats(run: Path) -> dict[str, Any]:
    """Iterations, tokens seen, best val loss and bits per byte of a run folder; {} for other models."""
    from ..rundir import is_run_dir, summary

    return summary(run) if is_run_dir(run) else {}


def load_exportable(model: str, checkpoint: str, vocab: str | None = None) -> Any:
    """The model export and push share: loaded, and refused before anything is written if GPT-2 cannot hold it."""
    from ..hf import check_exportable
    from ..loading import load

    loaded = load(model, checkpoint=checkpoint, vocab=vocab)
    check_exportable(loaded.model.config)
    return loaded


def model_name(model: str) -> str:
    """The run folder's name (or the hub name given) for the model card and the GGUF metadata."""
    return Path(model).resolve().name if Path(model).exists() else str(model)


def cmd_export(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:  # argparse's choices already refuse; kept for callers building args by hand
        raise PocketError(f"--format must be one of {', '.join(FORMATS)}")
    if args.format not in ("gguf", "ollama") and getattr(args, "gguf_dtype", None):
        raise PocketError("--gguf-dtype applies to --format gguf and ollama only")
    if args.format in ("gguf", "ollama"):
        return _export_gguf(args)
    if args.format == "peft":
        return _export_peft(args)
    from ..hf import export_hf

    loaded = load_exportable(args.model, args.checkpoint, args.vocab)
    notes = export_hf(loaded.model, loaded.tokenizer, args.out, overwrite=args.overwrite, name=model_name(args.model),
                      stats=run_stats(Path(args.model)), license=args.license)
    for note in notes:
        say(f"note: {note}")
    say(f"wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from ..gguf_export import DEFAULT_GGUF_DTYPE, MODELFILE, export_gguf, export_ollama
    from ..loading import load

    loaded = load(args.model, checkpoint=args.checkpoint, vocab=args.vocab)
    # both refuse what llama.cpp cannot run (no family for the model, a char vocabulary) before they write anything
    write = export_ollama if args.format == "ollama" else export_gguf
    notes = write(loaded.model, loaded.tokenizer, args.out, dtype=args.gguf_dtype or DEFAULT_GGUF_DTYPE,
                  overwrite=args.overwrite, name=model_name(args.model), license=args.license)
    for note in notes:
        say(f"note: {note}")
    if args.format == "ollama":
        say(f"wrote {args.out}: cd {args.out} && ollama create NAME -f {MODELFILE} && ollama run NAME")
    else:
        say(f"wrote {args.out}: run it with llama.cpp, e.g. llama-cli -m {args.out} -p 'Once upon a time'")
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    from ..lora import export_peft

    for note in export_peft(args.model, args.out, overwrite=args.overwrite, checkpoint=args.checkpoint):
        say(f"note: {note}")
    say(f"wrote {args.out}: load it with peft.PeftModel.from_pretrained("
        f"transformers.AutoModelForCausalLM.from_pretrained(BASE), {str(args.out)!r})")
    return 0
