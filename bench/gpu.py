"""The GPU numbers in one run (< 8 minutes on a recent NVIDIA GPU), as a Markdown table.

    python bench/gpu.py                          # on a machine with an NVIDIA GPU
    python bench/gpu.py --nanogpt ../nanoGPT     # also the real nanoGPT's recipe, side by side
    python bench/gpu.py --smoke                  # a few steps of everything on the CPU: the script works

1. nanoGPT's Shakespeare-char recipe with pocketgpt (`--preset shakespeare-char`: 6x6x384, context 256,
   batch 64, 5000 iterations; bf16, torch.compile, fused AdamW): seconds until val loss first reaches
   1.4697 (nanoGPT's A100 result), final val loss, median tokens/s, MFU and peak memory. The run is cut
   at --recipe-seconds; the table says if the target was not reached by then.
2. A GPT-2-small training step (12x12x768, vocab 50257, context 1024, bf16, compile, fused AdamW):
   tokens/s and MFU over --steps steps after warm-up.
3. Generation on the GPT-2-small shape (random weights): tokens/s at batch 1 and aggregate at batch 64.
4. With --nanogpt DIR (a checkout of karpathy/nanoGPT; this machine needs no network: its
   data/shakespeare_char/input.txt is written from the bundled corpus if missing), nanoGPT's own
   `train.py config/train_shakespeare_char.py` under the same time cut, its iteration times and MFU
   as it prints them.

MFU everywhere is pocketgpt's: 6N + 12*L*C*T FLOPs per token times tokens/s over the GPU's dense peak
(sizing.GPU_PEAK_FLOPS); a GPU not in that table gets none.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

TARGET = 1.4697  # nanoGPT's Shakespeare-char val loss on an A100 (its README)
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
SMOKE_SHAPE = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)


def recipe(data: Path, root: Path, device: str, seconds: float, smoke: bool) -> dict[str, Any]:
    """The shakespeare-char preset through the CLI, cut at `seconds`; what its metrics.jsonl says."""
    run = root / "recipe"
    extra = ["--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--compile", "false",
             "--batch-size", "8", *common.flags(**SMOKE_SHAPE)] if smoke else []
    cmd = common.pocketgpt_cmd("train", "--data", str(data), "--out", str(run), "--preset", "shakespeare-char",
                               "--device", device, *common.QUIET, *common.NO_PLOTS, *extra)
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds)
        if res.returncode != 0:
            raise common.failed(cmd, res.returncode, res.stderr)
        cut = False
    except subprocess.TimeoutExpired:
        cut = True
    wall = time.perf_counter() - start
    lines = common.metrics(run) if (run / "metrics.jsonl").exists() else []
    evals = [m for m in lines if "val_loss" in m]
    train = [m for m in lines if "tokens_per_s" in m][1:]  # the first window holds compilation
    hit = next((m for m in evals if m["val_loss"] <= TARGET), None)
    return {
        "wall_s": wall, "cut": cut,
        "time_to_target_s": hit["elapsed"] if hit and "elapsed" in hit else None,
        "iter_at_target": hit["iter"] if hit else None,
        "last_val": evals[-1]["val_loss"] if evals else None, "last_iter": evals[-1]["iter"] if evals else None,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in train) if train else None,
        "mfu": statistics.median(m["mfu"] for m in train if "mfu" in m) if any("mfu" in m for m in train) else None,
        "peak_mem_mb": max((m["peak_mem_mb"] for m in train if "peak_mem_mb" in m), default=None),  # CUDA only
    }


def gpt2_step(root: Path, device: str, steps: int, smoke: bool) -> dict[str, Any]:
    """tokens/s and MFU of pocketgpt's training step at the GPT-2-small shape, on Tiny Shakespeare in GPT-2 ids."""
    import torch

    from pocketgpt.config import build_train_config
    from pocketgpt.metrics import MetricsLog
    from pocketgpt.runtime import resolve
    from pocketgpt.trainer import Trainer

    data = common.prepare_bundled(root / "gpt2-data", "--tokenizer", "gpt2")
    shape = SMOKE_SHAPE if smoke else GPT2_SMALL
    cfg = build_train_config(None, None, {**shape, "batch_size": 2 if smoke else 12, "optimizer": "adamw",
                                          "dtype": "auto", "compile": not smoke, "device": device,
                                          "dropout": 0.0, "max_time": 0})
    out = root / "gpt2-run"
    out.mkdir()
    trainer = Trainer.create(cfg, data, out, resolve(device, "auto"), MetricsLog(out / "m.jsonl", echo=lambda s: None))
    if cfg.run.compile == "true":
        trainer.net.use_compiled(True)
    lr = cfg.optim.learning_rate
    for it in range(5):  # warm-up (compilation)
        trainer.step(it, lr)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for it in range(5, 5 + steps):
        trainer.step(it, lr)
    sync()
    tps = steps * cfg.run.batch_size * cfg.model.block_size / (time.perf_counter() - start)
    mfu = trainer.mfu.flops_per_token * tps / trainer.mfu.peak if trainer.mfu.peak else None
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"tokens_per_s": tps, "mfu": mfu, "peak_mem_mb": peak, "compiled": trainer.net.compiled}


def generation(device: str, smoke: bool) -> dict[str, float]:
    """Tokens/s of the engine on the GPT-2-small shape: batch 1, and aggregate at batch 64."""
    import torch

    from pocketgpt.config import ModelConfig, TrainConfig
    from pocketgpt.loading import LoadedModel
    from pocketgpt.model import GPT
    from pocketgpt.sampling import SamplingSettings
    from pocketgpt.tokenizer import GPT2Tokenizer

    shape = SMOKE_SHAPE if smoke else GPT2_SMALL
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, dropout=0.0, **shape)
    model = GPT(cfg).to(device).eval()
    lm = LoadedModel(model, GPT2Tokenizer(), TrainConfig(model=cfg), Path("."), {})
    new = 16 if smoke else 256
    out = {}
    for n in (1, 64):
        lm.complete("Once upon a time", SamplingSettings(max_new_tokens=8, num_samples=n, seed=0))  # warm-up
        start = time.perf_counter()
        done = lm.complete("Once upon a time", SamplingSettings(max_new_tokens=new, num_samples=n, seed=0,
                                                                 temperature=0.8))
        out[f"batch_{n}"] = sum(c.completion_tokens for c in done) / (time.perf_counter() - start)
    return out


def nanogpt(repo: Path, seconds: float) -> dict[str, Any]:
    """nanoGPT's own Shakespeare-char recipe, cut at `seconds`: its printed iteration times, MFU and val losses."""
    common.nanogpt_char_data(repo)
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--always_save_checkpoint=False"]
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=seconds)
        text = res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.perf_counter() - start
    iters = [(float(t), float(m)) for t, m in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms, mfu (-?[\d.]+)%", text)]
    vals = [(int(i), float(v)) for i, v in re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", text)]
    hit = next((i for i, v in vals if v <= TARGET), None)
    return {"wall_s": wall, "ms_per_iter": statistics.median(t for t, _ in iters[10:]) if len(iters) > 10 else None,
            "mfu": statistics.median(m for _, m in iters[10:]) / 100 if len(iters) > 10 else None,
            "last_val": vals[-1][1] if vals else None, "last_iter": vals[-1][0] if vals else None,
            "iter_at_target": hit}


def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout to run side by side")
    p.add_argument("--recipe-seconds", type=float, default=200, help="time cut of each Shakespeare-char run")
    p.add_argument("--steps", type=int, default=20, help="GPT-2-small training steps timed")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the script, not the GPU")
    p.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = p.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run this on a GPU machine, or pass --smoke to check the script on a CPU")
    device = "cpu" if args.smoke else "cuda"
    where = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    rows = [f"# pocketgpt on {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", ""]
    with common.scratch() as root:
        data = common.prepare_bundled(root / "data")
        r = recipe(data, root, device, args.recipe_seconds, args.smoke)
        s = gpt2_step(root, device, 2 if args.smoke else args.steps, args.smoke)
        g = generation(device, args.smoke)
        n = nanogpt(args.nanogpt, args.recipe_seconds) if args.nanogpt else None
    rows += ["| measurement | pocketgpt | nanoGPT |", "|---|---|---|",
             f"| Shakespeare-char: seconds to val {TARGET} | {_fmt(r['time_to_target_s'])} "
             f"(iter {_fmt(r['iter_at_target'], 'd') if r['iter_at_target'] is not None else '-'}) | "
             f"{'iter ' + str(n['iter_at_target']) if n and n['iter_at_target'] else '-'} |",
             f"| Shakespeare-char: last val loss (iter) | {_fmt(r['last_val'], '.4f')} ({_fmt(r['last_iter'], 'd')})"
             f"{', cut' if r['cut'] else ''} | {_fmt(n and n['last_val'], '.4f')} ({_fmt(n and n['last_iter'], 'd')}) |",
             f"| Shakespeare-char: tokens/s | {_fmt(r['tokens_per_s'])} | "
             f"{_fmt(n and n['ms_per_iter'] and 64 * 256 / n['ms_per_iter'] * 1000)} |",
             f"| Shakespeare-char: MFU | {_fmt(r['mfu'], '.1%')} | {_fmt(n and n['mfu'], '.1%')} |",
             f"| Shakespeare-char: peak memory MB | {_fmt(r['peak_mem_mb'])} | - |",
             f"| GPT-2-small step: tokens/s (compiled: {s['compiled']}) | {_fmt(s['tokens_per_s'])} | - |",
             f"| GPT-2-small step: MFU | {_fmt(s['mfu'], '.1%')} | - |",
             f"| GPT-2-small step: peak memory MB | {_fmt(s['peak_mem_mb'])} | - |",
             f"| generation, GPT-2-small, batch 1: tokens/s | {_fmt(g['batch_1'])} | - |",
             f"| generation, GPT-2-small, batch 64: aggregate tokens/s | {_fmt(g['batch_64'])} | - |"]
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
