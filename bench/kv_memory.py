"""Peak memory of a short generation from a model that declares a long context (issue 25).

    python bench/kv_memory.py                                  # this tree: a table of peak RSS
    python bench/kv_memory.py --tree before=/tmp/kv-base/src --tree after=src
                                                               # two trees, run alternately

A random-weight model of SmolLM2-135M's shape (576 wide, 30 layers, 9 query heads, 3 key/value
heads, SwiGLU 1536, vocab 49152, rotary positions, RMSNorm, tied head) declaring 8,192 positions
generates 50 tokens from a 20-token prompt, in a process of its own for each measure: alone
(`Engine.generate`, what `pocketgpt sample` does) and as the one request of a server's shared batch
(`DecodeBatch`, stepped as the scheduler steps it). A KV cache sized to the whole context holds
30 x 3 x 8192 x 64 floats twice: 360 MiB per sample, for 70 tokens.

Each child builds the model, then resets the kernel's peak-RSS mark (/proc/self/clear_refs) so that
the generation's own peak is seen apart from the model's random init; it reports the RSS once the
model is built, the peak during the generation, and the whole process's peak (ru_maxrss). Trees and
modes run alternately (A, B, A, B ...), --repeats rounds; the table shows medians. Each tree is
the pocketgpt its src folder gives the child (PYTHONPATH); the children use only what both sides
of issue 25 have (Engine, DecodeBatch, SamplingSettings).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

# SmolLM2-135M's shape with a long declared context
SHAPE = dict(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, mlp_width=1536,
             pos_emb="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True, rope_theta=100000.0, norm_eps=1e-5)
MODES = ("alone", "shared")


def status_mb(key: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(mode: str, prompt_len: int, new_tokens: int) -> None:
    """Build the model, generate, print one JSON line of memory figures."""
    import torch

    from pocketgpt.config import ModelConfig
    from pocketgpt.engine import DecodeBatch, Engine
    from pocketgpt.model import GPT
    from pocketgpt.sampling import SamplingSettings

    torch.manual_seed(0)
    engine = Engine(GPT(ModelConfig(**SHAPE)).eval())
    built = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark back to the current RSS
    prompt = list(range(100, 100 + prompt_len))
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=0.8, seed=0)
    if mode == "alone":
        ids = engine.generate(prompt, settings)[0]
    else:  # the server's way: one shared batch, stepped and picked
        batch = DecodeBatch(engine)
        stream, ids = batch.start(prompt, settings), []
        while not stream.done:
            batch.advance()
            batch.pick([stream])
            ids += next(stream)
    assert len(ids) == new_tokens
    print(json.dumps({"built_mb": built, "generation_peak_mb": status_mb("VmHWM"),
                      "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "step_dtype": str(engine.step_dtype).removeprefix("torch.")}))


def measure(src: str | None, mode: str, args: argparse.Namespace) -> dict:
    """One child's figures: mode's generation in the pocketgpt of src (None: this Python's)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(Path(src).resolve())
    cmd = [sys.executable, __file__, "--child", mode, "--prompt", str(args.prompt), "--new", str(args.new)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise common.failed(cmd, res.returncode, res.stderr)
    got = json.loads(res.stdout.splitlines()[-1])
    got["own_mb"] = got["generation_peak_mb"] - got["built_mb"]
    return got


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=SRC",
                    help="a pocketgpt src folder to measure (repeatable); default: the one this Python imports")
    ap.add_argument("--mode", choices=(*MODES, "both"), default="both")
    ap.add_argument("--prompt", type=int, default=20, help="prompt tokens")
    ap.add_argument("--new", type=int, default=50, help="new tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.prompt, args.new)
    trees = dict(t.split("=", 1) for t in args.tree) or {"this tree": None}
    modes = MODES if args.mode == "both" else (args.mode,)
    rows: dict[tuple[str, str], list[dict]] = {(t, m): [] for t in trees for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            for name, src in trees.items():
                rows[(name, mode)].append(measure(src, mode, args))
    print(f"SmolLM2-135M shape, block_size {SHAPE['block_size']}, random weights, {args.prompt}-token prompt, "
          f"{args.new} new tokens, medians of {args.repeats} (alternating)")
    common.markdown_header("tree", "generation", "step dtype", "RSS with the model (MB)",
                           "peak during generation (MB)", "generation's own (MB)", "process peak (MB)")
    for (name, mode), runs in rows.items():
        med = common.medians([{k: v for k, v in r.items() if k != "step_dtype"} for r in runs])
        print(f"| {name} | {mode} | {runs[0]['step_dtype']} | {med['built_mb']:.0f} | "
              f"{med['generation_peak_mb']:.0f} | {med['own_mb']:.0f} | "
              f"{med['process_peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
