"""`--preset auto` against the hand-tuned `--preset demo` at the same wall-clock budget.

    python bench/auto_vs_hand.py --budget 10m        # ~2 x 10 minutes on the bundled corpus
    python bench/auto_vs_hand.py --budget 20s        # a smoke test of the script itself

Both train the bundled Tiny Shakespeare (char-level, val = last 10 %) for --budget; then
`pocketgpt eval --json` takes the full val loss of each best checkpoint. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

QUIET = ["--eval-sample-tokens", "0", "--sample-tokens", "0", "--plots", "false"]


def pocketgpt(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "pocketgpt", *args], check=True, capture_output=True,
                          text=True).stdout


def run(tmp: Path, data: Path, preset: str, budget: str) -> dict[str, object]:
    out = tmp / preset
    log = pocketgpt("train", "--preset", preset, "--max-time", budget, "--data", str(data), "--out", str(out), *QUIET)
    cfg = json.loads((out / "config.json").read_text())
    m = cfg["model"]
    full = json.loads(pocketgpt("eval", "--model", str(out), "--json"))
    info = json.loads(pocketgpt("info", "--model", str(out), "--json"))
    why = " ".join(line for line in log.splitlines() if line.startswith("auto:"))
    return {"preset": preset, "val": full["loss"], "bpb": full["bits_per_byte"], "params": info["parameters"],
            "shape": f"{m['n_layer']}L {m['n_embd']}w T{m['block_size']} B{cfg['run']['batch_size']}",
            "iters": info["iters"], "why": why}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="10m", help="training time per preset (seconds or 90s / 10m)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        pocketgpt("prepare", "--out", str(tmp / "data"))
        rows = [run(tmp, tmp / "data", preset, args.budget) for preset in ("demo", "auto")]
    print(f"budget {args.budget}, bundled Tiny Shakespeare, full val loss of the best checkpoint\n")
    print("| preset | full val loss | bits/byte | parameters | shape | iters |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['val']:.4f} | {r['bpb']:.4f} | {r['params']:,} | {r['shape']} | {r['iters']} |")
    for r in rows:
        if r["why"]:
            print(f"\n{r['why']}")


if __name__ == "__main__":
    main()
