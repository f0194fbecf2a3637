"""Peak memory (RSS) of fine-tuning GPT-2, SmolLM2 and Qwen3 shapes, full vs LoRA, through the real
`train --init-from` code.

    python bench/lora_memory.py                                 # gpt2 and gpt2-medium; full, lora, lora+gc; context 256, 1024
    python bench/lora_memory.py --shapes qwen3-0.6b,smollm2-135m --blocks 512 --modes lora,full
    python bench/lora_memory.py --shapes gpt2-medium --blocks 1024 --modes lora
    python bench/lora_memory.py --dtype float32                 # what a CPU without bf16 instructions runs
    python bench/lora_memory.py --dropout 0.1                   # the finetune preset's dropout (attention too)
    python bench/lora_memory.py --eval-sample-tokens 0          # no sample at the eval (its decode copies)

Each case is one child process, one at a time, running what `pocketgpt train BOOK --init-from BASE
[--lora-rank 8] [--gradient-checkpointing]` runs (launch.launch): load the base, prepare the text with its
tokenizer, build, train. Modes: full (the finetune preset), lora (finetune-lora, rank 8 on every block
matrix), lora+gc (and gradient checkpointing). The base is a Hugging Face folder of the shape with
random weights, written beforehand by another child with pocketgpt's own export (no download, no
transformers), in the dtype the real model is published in (GPT-2 float32; SmolLM2 and Qwen3 bfloat16,
which a LoRA fine-tune keeps: lora_base_dtype auto); the text is the first 300 kB of the bundled corpus. Batch 1, dropout 0 in every mode unless
--dropout, 3 optimizer steps, then the final eval (1 batch per split, a 16-token sample unless
--eval-sample-tokens), the best weights (and adapter), the resume checkpoint and the report written.

Reported: the peak RSS (VmHWM) of loading the base (hf.py), then, with the peak reset once the base is
loaded (/proc/self/clear_refs), the peak of the training itself as it stood when the model was built, when
the steps were done, and at the end (eval, saves). The process's own peak is the larger of load and end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

GPT2_SHAPE = dict(vocab_size=common.GPT2_VOCAB, block_size=1024, bias=True, mlp="gelu_new")
FAMILY = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True, bias=False)
# the published shapes (config.json) of the models people fine-tune, with random weights
SHAPES: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, **GPT2_SHAPE),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **GPT2_SHAPE),
    "smollm2-135m": dict(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         mlp_width=1536, rope_theta=100000.0, norm_eps=1e-5, **FAMILY),
    "qwen3-0.6b": dict(vocab_size=151936, block_size=40960, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024,
                       head_size=128, mlp_width=3072, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True,
                       qk_norm_gains=True, **FAMILY),
}
MODES: dict[str, dict[str, Any]] = {"full": {}, "lora": {"lora_rank": 8},
                                    "lora+gc": {"lora_rank": 8, "gradient_checkpointing": True}}
STEPS = 3
PHASES = ("model built", "steps done", "end")


def vm_hwm_mb() -> float:
    """Peak resident set of this process since it started or since reset_peak(), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return common.peak_rss_mb()


def reset_peak() -> None:
    """Start VmHWM again from the present RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def make_base(shape: str, folder: Path) -> None:
    """A random model of the shape as a Hugging Face folder (what `from_pretrained` would find): GPT-2's
    with its tokenizer; a Llama or Qwen with a byte-level tokenizer.json of its own (a small one trained
    on the corpus: the model's vocabulary rows are the real model's, the ids past it never used)."""
    from pocketgpt.config import ModelConfig
    from pocketgpt.hf import export_hf
    from pocketgpt.model import GPT
    from pocketgpt.tokenizer import GPT2Tokenizer

    cfg = ModelConfig(**SHAPES[shape])
    tok = GPT2Tokenizer() if cfg.vocab_size == common.GPT2_VOCAB else own_tokenizer(cfg.vocab_size)
    export_hf(GPT(cfg), tok, folder)
    if shape_dtype(shape) == "bfloat16":
        as_bfloat16(folder)


def shape_dtype(shape: str) -> str:
    """The dtype a shape's checkpoint is published in: GPT-2's float32, SmolLM2's and Qwen3's bfloat16."""
    return "float32" if shape.startswith("gpt2") else "bfloat16"


def as_bfloat16(folder: Path) -> None:
    """A Hugging Face folder's weights rewritten in bfloat16, config.json saying so (as Qwen3 ships)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def own_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE of 2,000 tokens with an end-of-text token, as a pretrained model's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pocketgpt.tokenizer import PretrainedTokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([common.bundled_text()[:300_000]], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    settings = {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False, "eos_ids": [],
                "chat_template": None}
    return PretrainedTokenizer(json.loads(tk.to_str()), settings, vocab_size)


def run_case(base: Path, mode: str, block: int, dtype: str, dropout: float, sample: int, tmp: Path) -> dict[str, Any]:
    """One fine-tune in this process: peaks of the load and of the training's phases, parameter counts, time."""
    from pocketgpt.launch import TrainRequest, launch

    book = tmp / "book.txt"
    book.write_text(common.bundled_text()[:300_000], encoding="utf-8")
    got: dict[str, Any] = {"params": 0, "trainable": 0}

    def echo(line: str) -> None:  # the lines launch says mark the phases and give the parameter counts
        if line.startswith("fine-tuning "):
            got["load"] = vm_hwm_mb()
            reset_peak()
        elif line.startswith("model: "):
            got["model built"] = vm_hwm_mb()
            got["params"] = got["trainable"] = int(line.split()[1].replace(",", ""))
        elif line.startswith("LoRA rank "):
            got["trainable"] = int(line.split(": ")[1].split()[0].replace(",", ""))
        elif line.startswith(f"iter {STEPS:6d}"):
            got["steps done"] = vm_hwm_mb()

    overrides = {"block_size": block, "batch_size": 1, "max_iters": STEPS, "eval_interval": 10**6, "eval_iters": 1,
                 "log_interval": 1, "eval_sample_tokens": sample, "plots": False, "dtype": dtype, "dropout": dropout,
                 **MODES[mode]}
    t0 = time.perf_counter()
    launch(TrainRequest(inputs=[str(book)], out=str(tmp / "run"), init_from=str(base), overrides=overrides), echo)
    return {**got, "end": vm_hwm_mb(), "seconds": time.perf_counter() - t0}


def child(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise common.failed(cmd, res.returncode, res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| shape | mode | context | trainable | load (hf.py) | training peak | model built | steps done | "
             "process peak | wall time |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mb = {k: f"{r.get(k, float('nan')):,.0f} MB" for k in ("load", *PHASES)}
        lines.append(f"| {r['shape']} ({r['params'] / 1e6:.0f}M) | {r['mode']} | {r['block']} | "
                     f"{r['trainable'] / 1e6:.2f}M | {mb['load']} | **{mb['end']}** | {mb['model built']} | "
                     f"{mb['steps done']} | {max(r['load'], r['end']):,.0f} MB | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--make-base", "--case"):  # a child
        if sys.argv[1] == "--make-base":
            make_base(sys.argv[2], Path(sys.argv[3]))
            print(json.dumps({}))
        else:
            base, mode, block, dtype, dropout, sample, tmp = sys.argv[2:9]
            print(json.dumps(run_case(Path(base), mode, int(block), dtype, float(dropout), int(sample), Path(tmp))))
        return
    ap = common.parser(__doc__)
    ap.add_argument("--shapes", default="gpt2,gpt2-medium")
    ap.add_argument("--modes", default="full,lora,lora+gc")
    ap.add_argument("--blocks", default="256,1024")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 autocast on AVX512-BF16 CPUs), float32, bfloat16")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--eval-sample-tokens", type=int, default=16)
    args = ap.parse_args()
    rows = []
    with common.scratch() as tmp:
        for shape in args.shapes.split(","):
            base = tmp / shape
            child("--make-base", shape, str(base))
            for mode in args.modes.split(","):
                for block in args.blocks.split(","):
                    work = tmp / f"{shape}-{mode}-{block}"
                    work.mkdir()
                    got = child("--case", str(base), mode, block, args.dtype, str(args.dropout),
                                str(args.eval_sample_tokens), str(work))
                    rows.append({"shape": shape, "mode": mode, "block": int(block), **got})
                    print(json.dumps(rows[-1]), flush=True)
                    shutil.rmtree(work)
    print(f"\ndtype {args.dtype}, dropout {args.dropout:g}, batch 1, {STEPS} steps + the final eval (a "
          f"{args.eval_sample_tokens}-token sample), best and last/ written\n")
    print(table(rows))


if __name__ == "__main__":
    main()
