"""Try every hostile input from the reliability issue against the real CLI; print a markdown table.

    python bench/reliability.py > docs/reliability-table.md

Each row: what was tried, the exit code, the first line on stderr, and whether a traceback appeared.
Runs in a temporary folder; takes about a minute (it trains two tiny models).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--sample-tokens", "0", "--max-time", "0"]


def cli(*args: str, cwd: Path, stdin: str | None = None) -> tuple[int, str]:
    res = subprocess.run(common.pocketgpt_cmd(*args), capture_output=True, text=True, cwd=cwd, input=stdin,
                         timeout=600)
    return res.returncode, res.stderr


def setup(d: Path) -> None:
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("  \n\t \n")
    (d / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    (d / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me ".encode("latin-1") * 50)
    (d / "short.txt").write_text("tiny text. " * 5)
    (d / "nofolder").mkdir()
    (d / "nofolder" / "readme.md").write_text("no txt here")
    (d / "notrun").mkdir()
    (d / "notrun" / "a.txt").write_text("hello")
    (d / "book.txt").write_text(Path(__file__).resolve().parents[1].joinpath("README.md").read_text() * 3)
    (d / "bad.toml").write_text("[model]\nn_layers = 4\n")
    (d / "badtype.toml").write_text("n_layer = 'four'\n")


def cases(d: Path) -> list[tuple[str, list[str]]]:
    run = str(d / "run")
    return [
        ("missing path", ["prepare", "nope.txt"]),
        ("empty file", ["prepare", "empty.txt"]),
        ("whitespace-only file", ["prepare", "blank.txt"]),
        ("binary file", ["prepare", "image.txt"]),
        ("non-UTF-8 file", ["prepare", "latin1.txt"]),
        ("corpus shorter than block_size + 1", ["train", "short.txt", "--out", "r-short", *TINY[:-2], "--block-size", "64"]),
        ("folder with no .txt", ["prepare", "nofolder"]),
        ("run dir that is not a run dir", ["sample", "--model", "notrun"]),
        ("truncated model.safetensors", ["sample", "--model", run, "--max-new-tokens", "5"]),
        ("checkpoint from another format version", ["info", "--model", run + "-v"]),
        ("config file with an unknown key", ["train", "book.txt", "--out", "r2", "--config", "bad.toml"]),
        ("config file with a wrong type", ["train", "book.txt", "--out", "r2", "--config", "badtype.toml"]),
        ("negative learning rate", ["train", "book.txt", "--out", "r2", "--learning-rate", "-0.1"]),
        ("n_embd not divisible by n_head", ["train", "book.txt", "--out", "r2", "--n-embd", "100", "--n-head", "3"]),
        ("block_size 0", ["train", "book.txt", "--out", "r2", "--block-size", "0"]),
        ("max_new_tokens < 0", ["sample", "--model", run + "-ok", "--max-new-tokens", "-5"]),
        ("top_p outside (0, 1]", ["sample", "--model", run + "-ok", "--top-p", "1.5"]),
        ("prompt longer than the context", ["sample", "--model", run + "-ok", "--prompt", "x" * 40]),
        ("prompt character not in the vocabulary", ["sample", "--model", run + "-ok", "--prompt", "\u2603"]),
        ("--resume with a changed model shape", ["train", "--out", run + "-ok", "--resume", "--n-embd", "32"]),
        ("existing run dir without --resume", ["train", "book.txt", "--out", run + "-ok", *TINY]),
        ("unknown option (typo)", ["train", "--n-layers", "4"]),
    ]


def main() -> None:
    with common.scratch() as d:
        setup(d)
        for name in ("run", "run-ok", "run-v"):
            code, err = cli("train", "book.txt", "--out", name, *TINY, cwd=d)
            assert code == 0, err
        data = (d / "run" / "model.safetensors").read_bytes()
        (d / "run" / "model.safetensors").write_bytes(data[: len(data) // 3])
        cfg = (d / "run-v" / "config.json").read_text().replace('"format_version": 1', '"format_version": 7', 1)
        (d / "run-v" / "config.json").write_text(cfg)
        common.markdown_header("hostile input", "exit", "what the user sees (stderr)", "traceback")
        for label, args in cases(d):
            code, err = cli(*args, cwd=d)
            first = (err.strip().splitlines() or [""])[-1].replace(str(d) + os.sep, "").replace("|", "\\|")
            print(f"| {label} | {code} | {first} | {'yes' if 'Traceback' in err else 'no'} |")


if __name__ == "__main__":
    main()
