"""nanoGPT checkpoints in: an out_dir or its ckpt.pt (read with torch.load(weights_only=True)), with the
char vocabulary from meta.pkl beside it, read by an unpickler that can build nothing but dicts,
strings and ints (so no code in the file ever runs). nanoGPT's parameter names and layout are
pocketgpt's own (GPT-2's names, nn.Linear matrices), so its state dict loads as it is.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from .arch import gpt2
from .arch.convert import build_model
from .config import ModelConfig
from .errors import PocketError
from .hf import Imported, torch_load
from .tokenizer import GPT2_VOCAB_SIZE, CharTokenizer, GPT2Tokenizer, Tokenizer

NANOGPT_CKPT = "ckpt.pt"
NANOGPT_META = "meta.pkl"
# nanoGPT pads GPT-2's vocabulary to a multiple of 64 for speed; the extra rows are never trained on.
NANOGPT_PADDED_VOCAB = 50304


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle makes without looking up a class: dicts, lists, strings, numbers.

    Every class or function reference (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT; what REDUCE needs)
    goes through find_class, which refuses; so no code in the file ever runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and meta.pkl may hold only plain data")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids, and meta.pkl may hold only plain data")


def _plain(obj: Any) -> bool:
    """Only dicts, strings and ints (what nanoGPT's char meta.pkl holds), all the way down."""
    if isinstance(obj, dict):
        return all(_plain(k) and _plain(v) for k, v in obj.items())
    return type(obj) in (str, int)


def read_meta_pkl(path: Path) -> CharTokenizer:
    """nanoGPT's meta.pkl ({vocab_size, itos, stoi}) as a CharTokenizer with the same ids, running no code."""
    try:
        data = path.read_bytes()
        meta = _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError) as e:
        raise PocketError(f"refusing to read {path}: {e}") from None
    if not (isinstance(meta, dict) and _plain(meta)):
        raise PocketError(f"refusing to read {path}: it must hold only a dict of strings and ints")
    stoi = meta.get("stoi")
    if not isinstance(stoi, dict) or not stoi or not all(isinstance(k, str) and len(k) == 1 for k in stoi):
        raise PocketError(f"{path} has no char vocabulary (stoi); only nanoGPT's char meta.pkl is supported")
    tok = CharTokenizer(stoi)
    # CharTokenizer numbers sorted characters, as nanoGPT's prepare does; a meta.pkl numbered otherwise
    # would give other ids, so it is refused rather than silently remapped.
    if any(tok.encode(c) != [i] for c, i in stoi.items()):
        raise PocketError(f"{path} numbers its characters in an order other than sorted; not supported yet")
    return tok


def vocab_from_text(path: Path) -> CharTokenizer:
    """A char vocabulary rebuilt from the text nanoGPT prepared: its sorted distinct characters, the
    very numbering nanoGPT's char prepare.py writes into meta.pkl."""
    try:
        return CharTokenizer.from_text(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PocketError(f"--vocab: no file at {path}") from None
    except UnicodeDecodeError as e:
        raise PocketError(f"--vocab: {path} is neither a meta.pkl nor UTF-8 text (byte {e.start})") from None


def _nanogpt_tokenizer(ckpt: Path, vocab_size: int, vocab: Path | None = None) -> Tokenizer:
    """The checkpoint's vocabulary: --vocab (a meta.pkl, or the original text to rebuild it from), else
    meta.pkl beside ckpt.pt, else GPT-2's for a GPT-2-sized vocabulary."""
    if vocab is not None:
        vocab = Path(vocab)
        return read_meta_pkl(vocab) if vocab.suffix == ".pkl" else vocab_from_text(vocab)
    meta = ckpt.parent / NANOGPT_META
    if meta.is_file():
        return read_meta_pkl(meta)
    if vocab_size in (GPT2_VOCAB_SIZE, NANOGPT_PADDED_VOCAB):
        return GPT2Tokenizer()  # nanoGPT's own sample.py assumes GPT-2's encoding when meta.pkl is absent
    raise PocketError(f"{ckpt.parent} has no {NANOGPT_META} (the char vocabulary) and its {vocab_size} tokens are not "
                      "GPT-2's; give --vocab PATH: nanoGPT's meta.pkl (in its data folder), or the text it "
                      "was prepared from (input.txt) to rebuild it")


def load_nanogpt(src: str | Path, vocab_file: str | Path | None = None) -> Imported:
    """A nanoGPT out_dir or ckpt.pt; vocab_file: its meta.pkl or original text when not beside it."""
    p = Path(src)
    ckpt = p / NANOGPT_CKPT if p.is_dir() else p
    d = torch_load(ckpt)
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict) or not isinstance(d.get("model_args"), dict):
        raise PocketError(f"{ckpt} is not a nanoGPT checkpoint (no 'model' and 'model_args')")
    args = d["model_args"]
    try:
        vocab = int(args["vocab_size"])
        cfg = ModelConfig(vocab_size=vocab, block_size=int(args["block_size"]), n_layer=int(args["n_layer"]),
                          n_head=int(args["n_head"]), n_embd=int(args["n_embd"]), dropout=0.0,
                          bias=bool(args.get("bias", True)), mlp="gelu", tie_embeddings=True)  # exact nn.GELU()
    except (KeyError, TypeError, ValueError) as e:
        raise PocketError(f"{ckpt}: model_args lacks or garbles {e}") from None
    state = {}
    for k, v in d["model"].items():
        k = k.removeprefix("_orig_mod.")  # torch.compile'd models save under this prefix
        if gpt2.hf_key(k) is not None:  # nanoGPT without flash attention registers its mask as attn.bias
            state[k] = v.float()
    tok = _nanogpt_tokenizer(ckpt, vocab, vocab_file)
    head, wte = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        cfg.tie_embeddings = False
    if vocab == NANOGPT_PADDED_VOCAB and tok.vocab_size == GPT2_VOCAB_SIZE:
        # The padding rows are never targets; dropping them leaves every real token's logit as it was and
        # keeps sampling from producing ids the tokenizer has no text for.
        cfg.vocab_size = GPT2_VOCAB_SIZE
        for k in ("transformer.wte.weight", "lm_head.weight"):
            if k in state:
                state[k] = state[k][:GPT2_VOCAB_SIZE].contiguous()
    elif tok.vocab_size != vocab:
        given = f"the vocabulary from {vocab_file}" if vocab_file is not None else f"its {NANOGPT_META}"
        raise PocketError(f"{ckpt} has {vocab} tokens but {given} has {tok.vocab_size}; give the meta.pkl or the "
                          "exact text nanoGPT prepared for this checkpoint")
    model = build_model(cfg, state, str(ckpt))
    info = {"source_kind": "nanogpt", "source": str(ckpt)}
    if isinstance(d.get("iter_num"), int):
        info["iter"] = str(d["iter_num"])
    if isinstance(d.get("best_val_loss"), (int, float, torch.Tensor)):
        info["best_val_loss"] = f"{float(d['best_val_loss']):.4f}"
    return Imported(model.eval(), tok, ckpt, info)
