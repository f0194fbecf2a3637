"""Logit agreement with Hugging Face transformers, both ways, on randomly initialised GPT-2s.

    python bench/hf_logits.py                 # a tiny GPT-2 and the GPT-2-small shape (124M), ~1 min

No real GPT-2 weights can be downloaded here, so each shape is a random GPT2LMHeadModel (float32,
eager attention) with its LayerNorms and biases randomised too, so a mistake there would show. Rows:
HF folder -> pocketgpt.load (import), and pocketgpt -> export --format hf -> from_pretrained (export),
max |logit difference| over one sequence of random ids.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

SHAPES = {
    "tiny (2x2x32, T=64)": dict(n_layer=2, n_head=2, n_embd=32, n_positions=64),
    "GPT-2 small (12x12x768, T=1024)": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
}


def random_gpt2(transformers: object, shape: dict[str, int], seed: int) -> object:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50257, **shape, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tokens", type=int, default=64, help="length of the random id sequence")
    args = ap.parse_args()
    import transformers

    import pocketgpt

    transformers.utils.logging.disable_progress_bar()  # one table, no shard-writing bars
    from pocketgpt.hf import export_hf

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.tokens} random ids, float32")
    print(f"{'shape':34s} {'import (HF -> pocketgpt)':>25s} {'export (pocketgpt -> HF)':>25s}")
    for i, (label, shape) in enumerate(SHAPES.items()):
        hf = random_gpt2(transformers, shape, seed=i)
        ids = torch.randint(0, 50257, (1, args.tokens), generator=torch.Generator().manual_seed(i))
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            hf.save_pretrained(Path(tmp) / "hf")
            want = hf(ids).logits[0]
            ours = pocketgpt.load(Path(tmp) / "hf")
            imported = max_diff(ours.logits(ids[0]), want)
            export_hf(ours.model, ours.tokenizer, Path(tmp) / "out")
            back = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "out",
                                                                      attn_implementation="eager").eval()
            exported = max_diff(back(ids).logits[0], ours.logits(ids[0]))
        print(f"{label:34s} {imported:25.2e} {exported:25.2e}")


if __name__ == "__main__":
    main()
