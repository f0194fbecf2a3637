"""llama.cpp's logits against pocketgpt's, on the same ids, after `pocketgpt export --format gguf`.

    pip install llama-cpp-python              # compiles llama.cpp (10+ minutes on 2 cores); not a pocketgpt dependency
    python bench/gguf_llamacpp.py             # two tiny trained models and a random GPT-2 small, ~2 min

Rows: tiny models trained here on the bundled corpus with a byte-level BPE of their own (the char
tokenizer cannot go to GGUF), once with pocketgpt's default exact GELU and once with GPT-2's tanh GELU
("gelu_new", what llama.cpp's gpt2 computes); and a randomly initialised model of GPT-2 small's shape
with GPT-2's tokenizer (LayerNorms and biases randomised too, so a mapping mistake there would show),
written as f32 and as f16. llama.cpp runs with its defaults (an f16 KV cache) except in the row that
says "KV cache f32". Columns: max |logit difference| over the sequence (and the largest |logit|, for
scale), the share of positions whose most likely next token is the same, and whether llama.cpp's
tokenizer gives pocketgpt's ids for a stretch of the corpus.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=128, max_iters=300, eval_interval=300, batch_size=16,
            max_time=0)
TOKENIZER_TEXT = "  odd   spacing\n\n\tand Ünïcode 数字 123,456 <|endoftext|> don't"


def random_gpt2_small(block_size: int, seed: int = 0) -> Any:
    from pocketgpt.config import ModelConfig
    from pocketgpt.model import GPT

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=common.GPT2_VOCAB, block_size=block_size, bias=True, mlp="gelu_new",
                      **common.GPT2_SMALL_SHAPE)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return model


def train_tiny(root: Path, data: Path, mlp: str) -> Path:
    run = root / f"tiny-{mlp}"
    common.train(data, run, *common.flags(mlp=mlp, **TINY), *common.QUIET, *common.NO_PLOTS)
    return run


def compare(model: Any, tok: Any, ids: list[int], path: Path, dtype: str, text: str,
            kv_f32: bool = False) -> dict[str, Any]:
    """Export, run llama.cpp over ids, and line its logits up with pocketgpt's."""
    import llama_cpp

    from pocketgpt.gguf_export import export_gguf

    export_gguf(model, tok, path, dtype=dtype, overwrite=True)
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False,
                          n_threads=os.cpu_count() or 1, **kv)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0][0].float().numpy()
    same_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text)
    size = path.stat().st_size
    path.unlink()
    return {"diff": float(np.abs(theirs - ours).max()), "scale": float(np.abs(ours).max()),
            "top1": float((theirs.argmax(-1) == ours.argmax(-1)).mean()), "tokens_agree": same_ids, "bytes": size}


def rows(root: Path, tokens: int) -> list[tuple[str, str, dict[str, Any]]]:
    import pocketgpt
    from pocketgpt.tokenizer import GPT2Tokenizer

    corpus = common.bundled_text()
    text = corpus[-4000:] + TOKENIZER_TEXT
    data = common.prepare_bundled(root / "data", "--tokenizer", "bpe", "--vocab-size", "512")
    out = []
    for mlp in ("gelu", "gelu_new"):
        lm = pocketgpt.load(train_tiny(root, data, mlp))
        ids = lm.tokenizer.encode(corpus[-20_000:])[: min(tokens, lm.block_size)]
        label = f"tiny trained, bpe 512, {mlp}"
        out.append((label, "f32", compare(lm.model, lm.tokenizer, ids, root / "m.gguf", "f32", text)))
        if mlp == "gelu_new":  # how much of the difference is llama.cpp's f16 KV cache
            out.append((label + ", KV cache f32", "f32",
                        compare(lm.model, lm.tokenizer, ids, root / "m.gguf", "f32", text, kv_f32=True)))
    model, tok = random_gpt2_small(tokens), GPT2Tokenizer()
    ids = torch.randint(0, common.GPT2_VOCAB, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    for dtype in ("f32", "f16"):
        out.append(("random GPT-2 small, gpt2", dtype, compare(model, tok, ids, root / "m.gguf", dtype, text)))
    return out


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tokens", type=int, default=128, help="length of each id sequence (at most a model's context)")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("this benchmark needs llama-cpp-python: pip install llama-cpp-python") from None
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {args.tokens} ids per sequence")
    with common.scratch() as root:
        table = rows(root, args.tokens)
    common.markdown_header("model", "GGUF", "file", "max abs logit diff", "max abs logit", "top-1 agreement",
                           "tokenizer ids agree")
    for label, dtype, r in table:
        print(f"| {label} | {dtype} | {r['bytes'] / 1e6:.1f} MB | {r['diff']:.2e} | {r['scale']:.1f} | "
              f"{r['top1']:.1%} | {'yes' if r['tokens_agree'] else 'no'} |")


if __name__ == "__main__":
    main()
