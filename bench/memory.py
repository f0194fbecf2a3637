"""Peak memory (RSS) of training: a GPT-2-small-shaped model (124M) at batch 1 with accumulation.

    python bench/memory.py                  # 12x12x768, vocab 50257, context 1024, 2 steps x 4 micro-batches
    python bench/memory.py --block-size 256 # smaller context

Trains on random tokens written as a pocketgpt data folder, through the real `pocketgpt.train`.
Prints the peak RSS of the process in MB (the target from the performance issue: under 4 GB).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402


def fake_data(folder: Path, vocab: int, n_tokens: int) -> Path:
    from pocketgpt.data import META, SPLITS, TOKENIZER, split_path, write_tokens
    from pocketgpt.files import write_json
    from pocketgpt.tokenizer import CharTokenizer, save_tokenizer

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in SPLITS:
        write_tokens(split_path(folder, split), rng.integers(0, vocab, n_tokens), vocab)
    # a stand-in tokenizer with the right vocabulary size (only its size matters here; plane-1
    # characters, so no surrogate code points whatever the size)
    save_tokenizer(CharTokenizer(chr(0x10000 + i) for i in range(vocab)), folder / TOKENIZER)
    write_json(folder / META, {"vocab_size": vocab, "tokenizer": "char",
                               "splits": {s: {"tokens": n_tokens, "bytes": n_tokens} for s in SPLITS}})
    return folder


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--dtype", default="auto", help="auto (bf16 autocast on AVX512-BF16 CPUs), float32, bfloat16")
    args = ap.parse_args()
    from pocketgpt.config import build_train_config
    from pocketgpt.trainer import train

    with common.scratch() as tmp:
        data = fake_data(tmp / "data", common.GPT2_VOCAB, 20_000)
        cfg = build_train_config(None, None, {
            **common.GPT2_SMALL_SHAPE, "block_size": args.block_size, "batch_size": 1,
            "grad_accum_steps": args.accum, "max_iters": args.steps, "eval_interval": 10**6, "eval_iters": 1,
            "log_interval": 1, "sample_tokens": 0, "eval_sample_tokens": 0, "plots": False, "max_time": 0,
            "dtype": args.dtype})
        t0 = time.perf_counter()
        res = train(cfg, data, tmp / "run", echo=lambda s: None)
        secs = time.perf_counter() - t0
    peak = common.peak_rss_mb()
    print(json.dumps({"params_shape": "12x12x768 vocab 50257", "dtype": args.dtype, "block_size": args.block_size,
                      "batch_size": 1,
                      "grad_accum_steps": args.accum, "steps": res.iters, "seconds": round(secs, 1),
                      "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
