"""What the bench scripts share: the bundled corpus, the pocketgpt CLI, run folders, timing, tables.

The scripts run as files (`python bench/NAME.py`, from the repo root or from bench/) and import this
module after putting their own folder first on sys.path:

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # noqa: E402

Nothing here imports pocketgpt or torch at module level: bench/nanogpt_baseline.py stays plain
PyTorch (pocketgpt is read only for the bundled corpus, when no --data is given), and the scripts
that drive the CLI in child processes keep their own process light.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# nanoGPT's CPU Shakespeare-char model (0.8M parameters with the 65-character vocabulary)
NANOGPT_SHAPE: dict[str, int] = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
# GPT-2 small (124M parameters with its vocabulary); the context is each script's own
GPT2_SMALL_SHAPE: dict[str, int] = dict(n_layer=12, n_head=12, n_embd=768)
GPT2_VOCAB = 50257
# train flags that keep a run from generating text along the way; NO_PLOTS also from drawing
QUIET = ["--eval-sample-tokens", "0", "--sample-tokens", "0"]
NO_PLOTS = ["--plots", "false"]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's option parser with its docstring as the --help text, line breaks kept."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def flags(**options: object) -> list[str]:
    """CLI flags from keyword options: flags(n_layer=4, bias=False) == ["--n-layer", "4", "--bias", "false"]."""
    out: list[str] = []
    for name, value in options.items():
        out += ["--" + name.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return out


# --------------------------------------------------------------------------- the bundled corpus


def bundled_bytes() -> bytes:
    """Tiny Shakespeare as shipped inside the package (pocketgpt.corpus.BUNDLED, gzipped), as bytes."""
    from pocketgpt.corpus import BUNDLED  # here, not above: only the scripts that read the corpus import pocketgpt

    with gzip.open(BUNDLED, "rb") as f:
        return f.read()


def bundled_text() -> str:
    return bundled_bytes().decode("utf-8")


def nanogpt_char_data(repo: Path) -> None:
    """A karpathy/nanoGPT checkout's data/shakespeare_char prepared from the bundled Tiny Shakespeare
    (its prepare.py would download it; these machines have no network)."""
    import subprocess

    data = repo / "data" / "shakespeare_char"
    if (data / "train.bin").exists():
        return
    if not (data / "input.txt").exists():
        (data / "input.txt").write_text(bundled_text(), encoding="utf-8")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary folder for one benchmark, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="pocketgpt-bench-") as t:
        yield Path(t)


# --------------------------------------------------------------------------- the pocketgpt CLI


def pocketgpt_cmd(*args: str) -> list[str]:
    """The command line of `pocketgpt ARGS` in this interpreter (the venv the script runs in)."""
    return [sys.executable, "-m", "pocketgpt", *args]


def failed(cmd: Sequence[str], code: int, stderr: str) -> SystemExit:
    """The error to raise for a child that failed: its command and the tail of its stderr."""
    return SystemExit(f"command failed (exit {code}): {' '.join(cmd)}\n{stderr[-2000:]}")


def pocketgpt(*args: str) -> str:
    """Run `pocketgpt ARGS` to the end; its stdout. A failure stops the script with the child's stderr."""
    cmd = pocketgpt_cmd(*args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise failed(cmd, res.returncode, res.stderr)
    return res.stdout


def prepare_bundled(out: Path, *options: str) -> Path:
    """`pocketgpt prepare` of the bundled corpus (val = the last 10 %) into `out`; returns `out`."""
    pocketgpt("prepare", "--out", str(out), *options)
    return out


def train(data: Path, run: Path, *options: str) -> str:
    """`pocketgpt train` on a prepared data folder into the run folder `run`; its stdout."""
    return pocketgpt("train", "--data", str(data), "--out", str(run), *options)


def evaluate(run: Path) -> dict[str, Any]:
    """`pocketgpt eval --json` of a run: the full val split (loss, bits_per_byte, tokens, bytes ...)."""
    return json.loads(pocketgpt("eval", "--model", str(run), "--json"))


def info(run: Path) -> dict[str, Any]:
    """`pocketgpt info --json` of a run (parameters, iters ...)."""
    return json.loads(pocketgpt("info", "--model", str(run), "--json"))


# --------------------------------------------------------------------------- run folders


def metrics(run: Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def median_tokens_per_s(run: Path) -> float:
    """Median training tokens/s over a run's log windows, the first (it includes warm-up) left out; 0 if none."""
    tps = [m["tokens_per_s"] for m in metrics(run) if "tokens_per_s" in m][1:]
    return statistics.median(tps) if tps else 0.0


# --------------------------------------------------------------------------- timing and memory


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the body on `n` torch threads (None or 0: leave the count as it is), then restore it."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved(contenders: dict[str, Callable[[int], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds each contender takes in each repeat, run A, B, C, A, B, C ... so that a slow patch of a
    shared machine hits all of them alike. Each is called once with -1 first, as its warm-up (untimed);
    then with the repeat's number."""
    for fn in contenders.values():
        fn(-1)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn(r)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over repeats of a/b (paired by repeat): the figure that survives a noisy, shared machine."""
    return statistics.median(x / y for x, y in zip(a, b))


def medians(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each key's median over rows that share the keys of the first (one row per round)."""
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


# --------------------------------------------------------------------------- tables


def markdown_header(*columns: str) -> None:
    """Print a Markdown table's header and separator rows."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
