"""SwiGLU against ReLU² at equal wall time, on the recipes of `--preset cpu-15min` and `--preset auto`.

    python bench/mlp_export.py                                    # cpu-15min and auto 5m, 2 runs each (~85 min)
    python bench/mlp_export.py --recipes auto:20s --repeats 1     # a smoke test of the script itself

Why: a ReLU² MLP has no family llama.cpp runs, so a run trained with it cannot be exported; SwiGLU
is Llama's and Qwen3's MLP. The two are compared at equal parameters (SwiGLU's hidden width is 8/3
of the model's, ReLU²'s 4x) and equal wall time, everything else the recipe's own. Runs alternate
A B B A so that a slow patch of a shared machine hits both alike. Each run trains the bundled Tiny
Shakespeare (char-level, val = the last 10 %); `pocketgpt eval` takes the full val loss of its best
checkpoint. Prints a Markdown table per recipe and the median difference (SwiGLU - ReLU², nats).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402


def recipe_flags(recipe: str) -> list[str]:
    """'cpu-15min' -> its preset; 'auto:5m' -> --preset auto for five minutes."""
    name, _, budget = recipe.partition(":")
    return ["--preset", name] + (["--max-time", budget] if budget else [])


def variant_flags(recipe: str, mlp: str) -> list[str]:
    from pocketgpt.config import load_preset  # here: only when run, so --help stays light
    from pocketgpt.sizing import swiglu_width

    if mlp == "relu2":
        return ["--mlp", "relu2", "--mlp-width", "0"]
    name = recipe.partition(":")[0]
    if name == "auto":  # auto sizes the width with its model
        return ["--mlp", "swiglu"]
    return ["--mlp", "swiglu", "--mlp-width", str(swiglu_width(load_preset(name)["model"]["n_embd"]))]


def one_run(tmp: Path, data: Path, recipe: str, mlp: str, i: int) -> dict[str, object]:
    out = tmp / f"{recipe.replace(':', '-')}-{mlp}-{i}"
    common.train(data, out, *recipe_flags(recipe), *variant_flags(recipe, mlp), *common.QUIET, *common.NO_PLOTS)
    m = json.loads((out / "config.json").read_text())["model"]
    full = common.evaluate(out)
    return {"val": full["loss"], "bpb": full["bits_per_byte"], "params": common.info(out)["parameters"],
            "iters": max(r["iter"] for r in common.metrics(out)), "tokens_per_s": common.median_tokens_per_s(out),
            "shape": f"{m['n_layer']}L {m['n_embd']}w T{m['block_size']} {m['mlp']} {m['mlp_width'] or 4 * m['n_embd']}"}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--recipes", default="cpu-15min,auto:5m", help="comma-separated presets (auto:BUDGET)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant per recipe")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    runs: dict[tuple[str, str], list[dict[str, object]]] = {(r, m): [] for r in recipes for m in ("relu2", "swiglu")}
    with common.scratch() as tmp:
        data = common.prepare_bundled(tmp / "data")
        for i in range(args.repeats):
            for recipe in recipes:
                order = ("relu2", "swiglu") if i % 2 == 0 else ("swiglu", "relu2")
                for mlp in order:
                    row = one_run(tmp, data, recipe, mlp, i)
                    runs[(recipe, mlp)].append(row)
                    print(f"# {recipe} {mlp} run {i}: {row}", file=sys.stderr, flush=True)
    print(f"{args.repeats} runs of each, alternating A B B A; full val loss of the best checkpoint\n")
    for recipe in recipes:
        print(f"\n{recipe}\n")
        common.markdown_header("MLP", "shape", "params", "full val (each run)", "median", "iters", "tokens/s")
        for mlp in ("relu2", "swiglu"):
            rows = runs[(recipe, mlp)]
            vals = [float(r["val"]) for r in rows]  # type: ignore[arg-type]
            print(f"| {mlp} | {rows[0]['shape']} | {rows[0]['params']:,} | {', '.join(f'{v:.4f}' for v in vals)} | "
                  f"{statistics.median(vals):.4f} | {statistics.median(r['iters'] for r in rows):,.0f} | "  # type: ignore[misc]
                  f"{statistics.median(r['tokens_per_s'] for r in rows):,.0f} |")  # type: ignore[misc]
        diff = (statistics.median(float(r["val"]) for r in runs[(recipe, "swiglu")])  # type: ignore[arg-type]
                - statistics.median(float(r["val"]) for r in runs[(recipe, "relu2")]))  # type: ignore[arg-type]
        print(f"\nSwiGLU - ReLU² (medians): {diff:+.4f} nats")


if __name__ == "__main__":
    main()
