"""`--preset auto` against the hand-tuned `--preset demo` at the same wall-clock budget.

    python bench/auto_vs_hand.py --budget 10m        # ~2 x 10 minutes on the bundled corpus
    python bench/auto_vs_hand.py --budget 20s        # a smoke test of the script itself

Both train the bundled Tiny Shakespeare (char-level, val = last 10 %) for --budget; then
`pocketgpt eval --json` takes the full val loss of each best checkpoint. Prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402


def run(tmp: Path, data: Path, preset: str, budget: str) -> dict[str, object]:
    out = tmp / preset
    log = common.train(data, out, "--preset", preset, "--max-time", budget, *common.QUIET, *common.NO_PLOTS)
    cfg = json.loads((out / "config.json").read_text())
    m = cfg["model"]
    full = common.evaluate(out)
    info = common.info(out)
    why = " ".join(line for line in log.splitlines() if line.startswith("auto:"))
    return {"preset": preset, "val": full["loss"], "bpb": full["bits_per_byte"], "params": info["parameters"],
            "shape": f"{m['n_layer']}L {m['n_embd']}w T{m['block_size']} B{cfg['run']['batch_size']}",
            "iters": info["iters"], "why": why}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--budget", default="10m", help="training time per preset (seconds or 90s / 10m)")
    args = ap.parse_args()
    with common.scratch() as tmp:
        data = common.prepare_bundled(tmp / "data")
        rows = [run(tmp, data, preset, args.budget) for preset in ("demo", "auto")]
    print(f"budget {args.budget}, bundled Tiny Shakespeare, full val loss of the best checkpoint\n")
    common.markdown_header("preset", "full val loss", "bits/byte", "parameters", "shape", "iters")
    for r in rows:
        print(f"| {r['preset']} | {r['val']:.4f} | {r['bpb']:.4f} | {r['params']:,} | {r['shape']} | {r['iters']} |")
    for r in rows:
        if r["why"]:
            print(f"\n{r['why']}")


if __name__ == "__main__":
    main()
