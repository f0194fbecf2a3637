"""Prepare throughput (issue 5): MB/s and peak RSS of `prepare` for each tokenizer.

The corpus is the bundled Tiny Shakespeare repeated to --mb megabytes. Each tokenizer runs in a
fresh process, so its peak RSS is its own. The bpe time includes learning the merges; a repeated
text has few distinct words, so BPE training (and the word cache of `tokenizers`) have it easier
than on a real corpus of that size.

    python bench/prepare_bench.py --mb 100 [--kinds char gpt2 bpe] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402


def make_corpus(path: Path, mb: float) -> int:
    """The bundled text repeated until the file holds `mb` megabytes; returns its size in bytes."""
    text = common.bundled_bytes()
    target = int(mb * 1e6)
    with open(path, "wb") as f:
        written = 0
        while written < target:
            part = text[: target - written]
            f.write(part)
            written += len(part)
    return written


def run_one(kind: str, corpus: Path, out: Path, vocab_size: int) -> dict:
    """Prepare once in this process; the numbers as a dict."""
    from pocketgpt.config import PrepareConfig
    from pocketgpt.data import read_meta
    from pocketgpt.corpus import prepare

    started = time.perf_counter()
    prepare(PrepareConfig(inputs=[str(corpus)], out=str(out), tokenizer=kind,
                          vocab_size=vocab_size if kind == "bpe" else 0))
    seconds = time.perf_counter() - started
    meta = read_meta(out)
    mb = corpus.stat().st_size / 1e6
    return {
        "tokenizer": kind,
        "mb": round(mb, 1),
        "seconds": round(seconds, 2),
        "mb_per_s": round(mb / seconds, 2),
        "tokens": sum(s["tokens"] for s in meta["splits"].values()),
        "vocab_size": meta["vocab_size"],
        "peak_rss_mb": round(common.peak_rss_mb(), 1),
    }


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (default 100)")
    ap.add_argument("--kinds", nargs="+", default=["char", "gpt2", "bpe"])
    ap.add_argument("--vocab-size", type=int, default=8192, help="for bpe")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one tokenizer, JSON on stdout
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, Path(args.corpus), Path(args.out), args.vocab_size)))
        return
    with common.scratch() as tmp:
        corpus = tmp / "corpus.txt"
        make_corpus(corpus, args.mb)
        print(f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
              f"python {platform.python_version()}")
        common.markdown_header("tokenizer", "MB", "seconds", "MB/s", "tokens", "vocab", "peak RSS MB")
        for kind in args.kinds:
            child = subprocess.run(
                [sys.executable, __file__, "--one", kind, "--corpus", str(corpus), "--out", str(tmp / kind),
                 "--vocab-size", str(args.vocab_size)],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"| {r['tokenizer']} | {r['mb']} | {r['seconds']} | {r['mb_per_s']} | {r['tokens']:,} | "
                  f"{r['vocab_size']:,} | {r['peak_rss_mb']} |", flush=True)


if __name__ == "__main__":
    main()
