"""Same behaviour: one JSON fingerprint of everything pocketgpt computes deterministically, to compare two trees.

    PYTHONPATH=/path/to/old/src python bench/same_behaviour.py --out old.json     # ~2.2 CPU-minutes
    PYTHONPATH=/path/to/new/src python bench/same_behaviour.py --out new.json
    python bench/same_behaviour.py --compare old.json new.json                  # exit 1 if anything differs

A refactor that must keep behaviour (losses bit for bit, exports byte for byte, the same sampled text)
is checked by running the same fixed-seed scenarios on the tree before and after it. Everything goes
through `python -m pocketgpt ...` child processes, so the tree under test is whichever pocketgpt
PYTHONPATH (or the venv) gives them, and no internal name of pocketgpt is relied on.

Scenarios, all float32 on one CPU thread, without torch.compile, autotuning or a time budget:
- scratch: a char model from scratch (AdamW, cosine, dropout 0.1 also in attention), samples at evals;
- modern: rotary positions, RMSNorm, QK-norm, ReLU^2, untied head, zero-init projections, wsd,
  2 gradient-accumulation steps;
- muon: Muon on the blocks' matrices, biases, dropout outside attention, gradient checkpointing;
- gpt2_ft: `train --init-from` a tiny random Hugging Face GPT-2 folder (GPT-2 tokenizer);
- lora: the same base with rank-4 adapters and adapter dropout;
- bpe: a byte-level BPE tokenizer trained on the text, then a tiny model.
Fingerprinted: the prepared data folders; every metrics.jsonl record without its timing, throughput,
MFU and memory fields (printed per run); every file of each run folder (the weights, last/'s weights,
optimizer and RNG state, config.json, samples.txt ...; state.json and the data folders' meta.json
without their clocks; report.md and plots/ are left out: they hold times); the eval lines and samples
training prints; `export` as hf, gguf and peft, every file; `sample` (temperature 0.8 with top-k,
8 samples with top-p and a repetition penalty, greedy; past the context, so the window slides);
`eval --json` and `eval --memorization`.
The modern and gpt2_ft runs are not evaluated again: their metrics hold their val losses, and each
command costs ~4 s of start-up (28 commands in all: 2.2 CPU-minutes, 5-6 minutes of wall time on a
2-core AMD EPYC shared with other work).

A .safetensors file is hashed as its header with sorted keys plus its data: safetensors writes the
metadata dict in a random order (a Rust HashMap), so the bytes of a file with several metadata keys
(run folders' model.safetensors) differ from one save to the next although nothing in them does.
The temporary folder's path is replaced by <TMP> before hashing (config.json records the data folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

# Everything that could vary from run to run is fixed: one thread, eager, float32, CPU, no time budget.
DETERMINISTIC = common.flags(device="cpu", dtype="float32", compile="false", threads=1, max_time=0,
                             plots=False, log_interval=1)
# The char models' shape: small enough that a run takes a few seconds.
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8, max_iters=60, eval_interval=20,
            eval_iters=5, dropout=0.1, seed=1234, learning_rate=3e-3, min_lr=3e-4, warmup_iters=10,
            weight_decay=0.1, grad_clip=1.0, sample_tokens=60, eval_sample_tokens=30)
SCRATCH = common.flags(**TINY, optimizer="adamw", schedule="cosine")
MODERN = common.flags(**TINY, optimizer="adamw", schedule="wsd", grad_accum_steps=2, pos_emb="rope",
                      norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, zero_init_proj=True)
MUON = common.flags(**TINY, optimizer="muon", muon_lr=0.02, schedule="cosine", bias=True,
                    attention_dropout=False, gradient_checkpointing=True)
# The tiny Hugging Face GPT-2 base (its vocabulary is GPT-2's, so the embedding is most of it).
GPT2_BASE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
FINETUNE = common.flags(batch_size=4, max_iters=12, eval_interval=4, eval_iters=2, seed=99, learning_rate=1e-3,
                        min_lr=1e-4, warmup_iters=3, sample_tokens=20, eval_sample_tokens=10)
BPE = common.flags(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=20, eval_interval=10,
                   eval_iters=3, dropout=0.1, seed=5, optimizer="adamw", learning_rate=3e-3, warmup_iters=5,
                   sample_tokens=20, eval_sample_tokens=0)
# Sampling: one stream, a batch of 8 (the many-rows decoder) and greedy; 100 tokens pass the context of 64.
SAMPLES: dict[str, list[str]] = {
    "t0.8_topk_n1": common.flags(prompt="ROMEO:", temperature=0.8, top_k=20, seed=7, max_new_tokens=100),
    "t0.8_topp_rep_n8": common.flags(prompt="ROMEO:", temperature=0.8, top_k=20, top_p=0.9,
                                     repetition_penalty=1.2, seed=7, max_new_tokens=80, num_samples=8),
    "t0_n1": common.flags(prompt="ROMEO:", temperature=0, max_new_tokens=100),
}
GPT2_SAMPLE = {"t0.8_topk_n1": common.flags(prompt="Hello world", temperature=0.8, top_k=50, seed=7,
                                            max_new_tokens=40)}
# Metric fields that measure the machine, not the model: a key is dropped when it matches.
VOLATILE = re.compile(r"tokens_per_s|ms_per_iter|mfu|elapsed|mem|time|seconds")
# Run-folder files that hold times (report.md) or pictures of them; metrics.jsonl is fingerprinted apart.
SKIPPED_FILES = re.compile(r"^(report\.md|plots/.*|\.lock|metrics\.jsonl)$")
# JSON files with a clock in them (last/state.json's elapsed, a data folder's prepare_seconds): their
# content goes into the fingerprint, without the VOLATILE keys.
TIMED_JSON = ("state.json", "meta.json")
# The child environment: one OpenMP thread for the commands without --threads (sample, eval, export),
# a fixed hash seed (set and dict orders of strings), no GPU, no network.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": "",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------- hashing


def safetensors_digest(data: bytes) -> str:
    """sha256 of a safetensors file with its JSON header re-written with sorted keys (see the module doc)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical + b"\0" + data[8 + n:]).hexdigest()


def file_digest(path: Path, root: Path) -> str:
    """sha256 of a file with the temporary folder's path written as <TMP> (safetensors canonicalised)."""
    data = path.read_bytes().replace(str(root).encode(), b"<TMP>")
    if path.suffix == ".safetensors":
        return "canonical:" + safetensors_digest(data)
    return hashlib.sha256(data).hexdigest()


def without_volatile(value: Any, dropped: set[str]) -> Any:
    """value (a JSON record, or lists and dicts of them) without its VOLATILE keys, which are added to dropped."""
    if isinstance(value, list):
        return [without_volatile(v, dropped) for v in value]
    if not isinstance(value, dict):
        return value
    gone = {k for k in value if VOLATILE.search(k)}
    dropped |= gone
    return {k: without_volatile(v, dropped) for k, v in value.items() if k not in gone}


def folder_fingerprint(folder: Path, root: Path, prefix: str, dropped: set[str]) -> dict[str, Any]:
    """prefix/relative-path -> digest for every file below folder but SKIPPED_FILES; the JSON files that
    hold a clock (TIMED_JSON) as their content without it."""
    out: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if SKIPPED_FILES.match(rel):
            continue
        if path.name in TIMED_JSON:
            text = path.read_text().replace(str(root), "<TMP>")
            out[f"{prefix}/{rel}"] = without_volatile(json.loads(text), dropped)
        else:
            out[f"{prefix}/{rel}"] = file_digest(path, root)
    return out


# --------------------------------------------------------------------------- the scenarios


class Bench:
    """Runs pocketgpt commands in one temporary folder and collects the fingerprint."""

    def __init__(self, root: Path):
        self.root = root
        self.fingerprint: dict[str, Any] = {}
        self.commands: list[str] = []
        self.env = {**os.environ, **CHILD_ENV}

    def cli(self, *args: str) -> str:
        """`python -m pocketgpt ARGS` in the temporary folder (relative paths); its stdout. Prints the command."""
        cmd = common.pocketgpt_cmd(*args)
        shown = "pocketgpt " + " ".join(args)
        print(f"$ {shown}", flush=True)
        self.commands.append(shown)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            raise common.failed(cmd, res.returncode, res.stderr + res.stdout)
        print(f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
        return res.stdout.replace(str(self.root), "<TMP>")

    def put(self, key: str, value: Any) -> None:
        assert key not in self.fingerprint, key  # every key names one thing
        self.fingerprint[key] = value

    def folder(self, name: str, prefix: str) -> None:
        dropped: set[str] = set()
        self.fingerprint.update(folder_fingerprint(self.root / name, self.root, prefix, dropped))
        if dropped:
            print(f"  dropped from {name}'s JSON files: {', '.join(sorted(dropped))}")

    def prepare(self, out: str, *args: str) -> None:
        self.cli("prepare", "--out", out, *args)
        self.folder(out, f"prepare/{out}")

    def train(self, name: str, *args: str) -> None:
        """A training run: its metrics without timings, its printed evals and samples, its files."""
        stdout = self.cli("train", "--out", name, *args, *DETERMINISTIC)
        run = self.root / name
        dropped: set[str] = set()
        self.put(f"{name}/metrics", without_volatile(common.metrics(run), dropped))
        print(f"  dropped from metrics.jsonl: {', '.join(sorted(dropped))}")
        self.put(f"{name}/stdout", printed_results(stdout))
        self.folder(name, name)

    def export(self, name: str, fmt: str, *args: str) -> None:
        out = f"{name}_export_{fmt}" + (".gguf" if fmt == "gguf" else "")
        self.cli("export", "--model", name, "--format", fmt, "--out", out, *args)
        path = self.root / out
        if path.is_dir():
            self.folder(out, f"{name}/export_{fmt}")
        else:
            self.put(f"{name}/export_{fmt}/{path.name}", file_digest(path, self.root))

    def sample(self, model: str, key: str, settings: dict[str, list[str]]) -> None:
        """The printed text of each sampling setting (stderr only holds the speed)."""
        for label, flags in settings.items():
            self.put(f"{key}/sample/{label}", self.cli("sample", "--model", model, *flags))

    def evaluate(self, name: str, *args: str, label: str = "eval") -> None:
        self.put(f"{name}/{label}", json.loads(self.cli("eval", "--model", name, "--json", *args)))


def printed_results(stdout: str) -> list[str]:
    """The lines of a training's output that hold results, not times: the parameter count, the evals, the
    samples at evals, the final sample and the suggested prompt."""
    keep: list[str] = []
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        count = re.match(r"model: ([\d,]+) parameters", line)
        if count:
            keep.append(f"parameters {count.group(1)}")
        elif line.startswith(("eval iter", "sample:", "sample from", "more:")):
            keep.append(line)
    # the final sample: the text between the two dashed lines after "sample from"
    dashes = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    if len(dashes) >= 2:
        keep.append("\n".join(lines[dashes[0] + 1:dashes[1]]))
    return keep


def tiny_gpt2(folder: Path) -> None:
    """A tiny random Hugging Face GPT-2 from a fixed seed; its norms and biases random too, so that
    importing them wrong would show in the losses."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_BASE))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.eval().save_pretrained(str(folder))


def run_scenarios(b: Bench) -> None:
    """Every scenario in order; each later step reads the folders earlier ones wrote."""
    text = common.bundled_text()
    (b.root / "shakespeare_100k.txt").write_text(text[:100_000], encoding="utf-8")
    (b.root / "book_30k.txt").write_text(text[200_000:230_000], encoding="utf-8")
    tiny_gpt2(b.root / "tiny_gpt2")
    b.folder("tiny_gpt2", "input/tiny_gpt2")  # the same base on both sides, or nothing after it compares

    b.prepare("bundled")  # no input: the bundled Tiny Shakespeare, whole
    b.prepare("char", "shakespeare_100k.txt")
    b.prepare("bpe_data", "shakespeare_100k.txt", "--tokenizer", "bpe", "--vocab-size", "512")

    b.train("scratch", "--data", "char", *SCRATCH)
    b.train("modern", "--data", "char", *MODERN)
    b.train("muon", "--data", "char", *MUON)
    b.train("gpt2_ft", "book_30k.txt", "--init-from", "./tiny_gpt2", *FINETUNE)
    b.train("lora", "book_30k.txt", "--init-from", "./tiny_gpt2", "--lora-rank", "4", "--lora-dropout", "0.1",
            *FINETUNE)
    b.train("bpe", "--data", "bpe_data", *BPE)

    b.export("scratch", "hf")  # a char tokenizer as tokenizer.json
    b.export("muon", "hf")  # with biases
    b.export("gpt2_ft", "hf")
    b.export("gpt2_ft", "gguf")
    b.export("lora", "peft")
    b.export("lora", "hf")  # the merged weights
    b.export("bpe", "hf")
    b.export("bpe", "gguf", "--gguf-dtype", "f16")

    b.sample("scratch", "scratch", SAMPLES)
    b.sample("modern", "modern", SAMPLES)
    b.sample("./tiny_gpt2", "tiny_gpt2", GPT2_SAMPLE)  # the Hugging Face folder itself, imported
    b.sample("lora", "lora", GPT2_SAMPLE)  # the adapters merged at load

    b.evaluate("scratch")
    b.evaluate("scratch", "--memorization", "--prompts", "4", "--continuation-tokens", "8", label="memorization")
    b.evaluate("lora")  # the GPT-2 tokenizer's bytes; the merged adapters on the full val split


def describe_tree() -> dict[str, str]:
    """Which pocketgpt the children import (PYTHONPATH decides), its git commit, and the machine."""
    from pocketgpt.probe import cpu_name  # the same tree the children import: sys.path follows PYTHONPATH

    import pocketgpt
    import torch
    import transformers

    src = Path(pocketgpt.__file__).resolve().parent
    git = ["git", "-C", str(src)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout.strip()
    return {"pocketgpt": str(src), "commit": commit + (" (uncommitted changes)" if dirty else ""),
            "cpu": cpu_name(), "cpus": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def record(out: Path, keep: bool) -> None:
    meta = describe_tree()
    for k, v in meta.items():
        print(f"{k}: {v}")
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="same-behaviour-"))  # the same length of path every time (GGUF pads)
    try:
        bench = Bench(root)
        run_scenarios(bench)
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    meta["seconds"] = f"{time.perf_counter() - t0:.0f}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "commands": bench.commands, "fingerprint": bench.fingerprint},
                              indent=1, sort_keys=True) + "\n")
    print(f"{len(bench.fingerprint)} keys in {meta['seconds']}s -> {out}")


# --------------------------------------------------------------------------- comparing


def first_difference(a: Any, b: Any) -> str:
    """Where two values part: for lists (metrics, printed lines) the first differing item, else both, cut short."""
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"item {i}: {json.dumps(x)[:300]}\n      vs {json.dumps(y)[:300]}"
        return f"lengths {len(a)} vs {len(b)}"
    return f"{json.dumps(a)[:300]}\n      vs {json.dumps(b)[:300]}"


def compare(path_a: Path, path_b: Path) -> int:
    """Print every key as same / DIFFERENT / missing; 1 if anything differs."""
    a, b = (json.loads(p.read_text()) for p in (path_a, path_b))
    for k in sorted(set(a["meta"]) | set(b["meta"])):
        va, vb = a["meta"].get(k), b["meta"].get(k)
        print(f"meta {k}: {va}" if va == vb else f"meta {k}: {va} | {vb}")
    fa, fb = a["fingerprint"], b["fingerprint"]
    width = max(map(len, fa | fb))
    bad = 0
    for key in sorted(fa.keys() | fb.keys()):
        if key not in fb or key not in fa:
            verdict = f"only in {path_a.name if key in fa else path_b.name}"
        elif fa[key] == fb[key]:
            verdict = "same"
        else:
            verdict = "DIFFERENT"
        print(f"{key:<{width}}  {verdict}")
        if verdict != "same":
            bad += 1
            if verdict == "DIFFERENT":
                print("      " + first_difference(fa[key], fb[key]))
    print(f"{len(fa.keys() | fb.keys())} keys, {bad} differ" + ("" if bad else ": same behaviour"))
    return 1 if bad else 0


def main() -> int:
    p = common.parser(__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="run the scenarios and write the fingerprint here (JSON)")
    mode.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), help="compare two fingerprints")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    record(args.out, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
