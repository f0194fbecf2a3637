"""Shared test helpers: a tiny training config, the CLI run in-process, metrics.jsonl read back, a fake run folder."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from pocketgpt.cli import main
from pocketgpt.config import TrainConfig, build_train_config

TINY = {
    "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0,
    "batch_size": 8, "max_iters": 30, "eval_interval": 10, "eval_iters": 2, "log_interval": 1,
    "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 5, "schedule": "cosine", "max_time": 0,
    "sample_tokens": 0, "seed": 7, "plots": False, "eval_sample_tokens": 0,
    "dtype": "float32",  # the same numbers on every CPU; bf16 autocast has its own tests
}


def tiny_config(**overrides) -> TrainConfig:
    return build_train_config(preset=None, overrides={**TINY, **overrides})


def tiny_flags(**overrides) -> list[str]:
    return [f"--{k}={v}" for k, v in {**TINY, **overrides}.items()]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses_by_iter(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """{iter: value} of every metrics record that has `key` (the train loss by default)."""
    return {m["iter"]: m[key] for m in metrics(run_dir) if key in m}


def assert_resumes_exactly(data_dir: Path, root: Path, stop_at: int, echo=None, **keys) -> dict[int, float]:
    """Train tiny_config(**keys) straight through (its lines to echo), and again stopped after `stop_at` steps then
    resumed: the same train loss at every step (1e-5: float rounding). The straight run's {iter: loss}, in
    root/straight."""
    from pocketgpt.trainer import train

    train(tiny_config(**keys), data_dir, root / "straight", echo=echo or (lambda s: None))
    train(tiny_config(**{**keys, "max_iters": stop_at}), data_dir, root / "resumed", echo=lambda s: None)
    train(tiny_config(**keys), data_dir, root / "resumed", resume=True, echo=lambda s: None)
    a, b = losses_by_iter(root / "straight"), losses_by_iter(root / "resumed")
    assert list(a) == list(b) == list(range(1, keys["max_iters"] + 1))
    for it in a:
        assert abs(a[it] - b[it]) <= 1e-5, it
    return a


# ---------------------------------------------------------------- a CLI whose saves pause half-way

# The real `pocketgpt` command, in its own process, with every last/ save wrapped from outside: after
# optimizer.pt and before rng.safetensors it says so and sleeps, so a test can kill it mid-write or make
# two trainings overlap. The product has no hook for this; the test wraps checkpoint.atomic_write.
_PAUSED_IN_SAVE = """
import sys, time
from pocketgpt import checkpoint
from pocketgpt.cli import main

seconds, write = float(sys.argv.pop(1)), checkpoint.atomic_write

def paused(path, *args, **kwargs):
    if path.name == checkpoint.RNG:
        print("[test] pausing in checkpoint write", flush=True)
        time.sleep(seconds)
    return write(path, *args, **kwargs)

checkpoint.atomic_write = paused
sys.exit(main(sys.argv[1:]))
"""


def paused_cli(seconds: float) -> list[str]:
    """The command line that starts `pocketgpt` with its last/ saves pausing `seconds` half-way."""
    return [sys.executable, "-c", _PAUSED_IN_SAVE, str(seconds)]


# ---------------------------------------------------------------- a fake run folder (plots, report)

PLOT_NAMES = ["loss.png", "lr.png", "grad_norm.png", "step_time.png", "tokens_per_s.png"]
VOCAB, EMBD, BLOCK = 65, 16, 32


def fake_metrics(n_iters: int, log_every: int = 10, eval_every: int = 250, scale: float = 1.0) -> list[dict]:
    """Training lines every log_every iters and eval lines every eval_every, with the oddities a real log has."""
    rng = np.random.default_rng(0)
    lines: list[dict] = []
    for it in range(log_every, n_iters + 1, log_every):
        loss = scale * (1.4 + 2.8 * math.exp(-it / 600)) + float(rng.normal(0, 0.05))
        lr = 3e-3 * min(1.0, it / 100) * (0.5 + 0.5 * math.cos(math.pi * it / n_iters))
        ms = 5000.0 if it == log_every else 70 + float(rng.normal(0, 5))  # the first window compiles
        lines.append({"iter": it, "loss": loss, "lr": lr, "tokens_per_s": 8 * BLOCK * 1000 / ms,
                      "ms_per_iter": ms, "grad_norm": 0.9 * math.exp(-it / 2000) + 0.2,
                      "tokens_seen": it * 8 * BLOCK, "elapsed": it * 0.07})
        if it % eval_every == 0:
            val = scale * (1.6 + 2.6 * math.exp(-it / 700))
            lines.append({"iter": it, "train_loss": loss - 0.02, "val_loss": val, "val_bpb": val / math.log(2),
                          "elapsed": it * 0.07, "tokens_seen": it * 8 * BLOCK})
    lines[3]["grad_norm"] = "nan"  # how MetricsLog writes a non-finite float
    lines[4]["loss"] = "inf"
    del lines[5]["lr"]
    del lines[6]["ms_per_iter"]
    return lines


def make_run(root: Path, name: str = "run", n_iters: int = 3000, scale: float = 1.0) -> Path:
    """A run folder as training leaves it: metrics, config, data meta, last/state.json, weights, samples."""
    from safetensors.numpy import save_file

    run = root / name
    (run / "last").mkdir(parents=True)
    (run / "data").mkdir()
    records = fake_metrics(n_iters, scale=scale)
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"iter": 99999, "loss": 1.2'  # a line cut by a kill
    (run / "metrics.jsonl").write_text(text)
    config = {"format_version": 1, "data_dir": "data",
              "model": {"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 1, "n_head": 2, "n_embd": EMBD,
                        "tie_embeddings": True},
              "optim": {"learning_rate": 3e-3, "grad_clip": 1.0, "schedule": "cosine"},
              "run": {"batch_size": 8, "grad_accum_steps": 1, "max_iters": n_iters}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "data" / "meta.json").write_text(json.dumps({
        "tokenizer": "char", "vocab_size": VOCAB,
        "splits": {"train": {"tokens": 9000, "bytes": 9100}, "val": {"tokens": 1000, "bytes": 1010}},
        "sources": [{"path": "book.txt", "bytes": 10110, "sha256": "0" * 64}]}))
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    (run / "last" / "state.json").write_text(json.dumps({
        "format_version": 1, "iter": n_iters, "tokens_seen": n_iters * 8 * BLOCK, "elapsed": n_iters * 0.07,
        "best_val_loss": best["val_loss"], "best_iter": best["iter"]}))
    save_file(fake_weights(), str(run / "model.safetensors"))  # the tied head stored once, as save_model does
    (run / "samples.txt").write_text("".join(f"=== iter {i} (val loss 1.9) ===\nROMEO:\nsample ``` {i}\n\n"
                                             for i in range(250, n_iters + 1, 250)))
    return run


def fake_weights() -> dict[str, np.ndarray]:
    z = np.zeros
    return {"lm_head.weight": z((VOCAB, EMBD), np.float32), "transformer.wpe.weight": z((BLOCK, EMBD), np.float32),
            "transformer.h.0.attn.c_attn.weight": z((3 * EMBD, EMBD), np.float32),
            "transformer.ln_f.weight": z((EMBD,), np.float32)}


EXPECTED_PARAMS = VOCAB * EMBD + BLOCK * EMBD + 3 * EMBD * EMBD + EMBD


def train_tiny(out: Path, data_dir: Path, **overrides) -> Path:
    """A tiny trained run folder at out (for tests that need a model to load, serve or sample)."""
    from pocketgpt.trainer import train

    train(tiny_config(**overrides), data_dir, out, echo=lambda s: None)
    return out


# ---------------------------------------------------------------- an untrained GPT-2-shaped run (export tests)


def untrained_run(root: Path, tok, **model) -> Path:
    """A GPT-2-shaped run folder as training leaves one (config.json, tokenizer.json, model.safetensors),
    untrained, with random norms (QK-norm's gains too) and biases (so a wrong mapping of them shows)."""
    import torch

    from pocketgpt.checkpoint import save_weights
    from pocketgpt.config import ModelConfig
    from pocketgpt.model import GPT
    from pocketgpt.rundir import write_config
    from pocketgpt.tokenizer import save_tokenizer

    torch.manual_seed(1)
    mc = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, **model)
    gpt = GPT(mc)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "ln_" in name or "_norm." in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    run = root / "run"
    run.mkdir()
    write_config(run, TrainConfig(model=mc), run / "data")
    save_tokenizer(tok, run / "tokenizer.json")
    save_weights(gpt, run / "model.safetensors")
    return run


def hf_logits(folder: Path, ids: list[int]) -> "torch.Tensor":
    """transformers' own float32 logits (eager attention) for ids, from a Hugging Face folder."""
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]


def max_diff(a: "torch.Tensor", b: "torch.Tensor") -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------- a disk that fills up


def fill_disk(folder: Path, leave: int) -> Path:
    """Fill folder's file system but `leave` bytes with one file (delete it to "free space"); returns it."""
    import os
    import shutil

    filler = Path(folder) / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(shutil.disk_usage(folder).free - leave, 1))
    return filler
