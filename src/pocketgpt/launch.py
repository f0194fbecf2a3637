"""What a `train` command means, as one plain function: resume or start, prepare first, auto-size, train.

`pocketgpt train ...` parses its flags into a TrainRequest and calls launch(); a notebook can do the
same. Torch loads only when training starts, so a bad request fails fast and cheaply.

Under torchrun every rank runs launch() alike: each reads the request and the run folder before the
process group exists (nobody has written yet), then rank 0 alone takes the lock and prepares the data
while the others wait (distributed.Group.main_first), and trainer.train_plan() does the rest. Every check a
run must pass runs once, in plan.check, before anything is prepared.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import rundir
from .config import PrepareConfig, TrainConfig, apply_overrides, build_train_config, check_lora, parse_duration
from .errors import PocketError

if TYPE_CHECKING:
    from .config import ModelConfig
    from .model import GPT
    from .plan import TrainPlan
    from .runtime import Runtime
    from .tokenizer import Tokenizer
    from .trainer import TrainResult


@dataclass
class TrainRequest:
    """Everything `pocketgpt train` was asked, before any of it is acted on."""

    inputs: list[str] = field(default_factory=list)  # text to prepare; none and no data: the bundled corpus
    data: str | None = None  # a prepared data folder instead of inputs
    out: str | None = None  # default runs/<first input's name or preset>
    preset: str | None = None  # a shipped preset (default demo) or "auto"
    config_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # config keys, as from the command line
    resume: bool = False
    overwrite: bool = False
    max_time: str | None = None
    max_memory: str | None = None  # --preset auto only
    prepare: PrepareConfig = field(default_factory=PrepareConfig)  # tokenizer etc.; inputs/out are filled in
    memory_check: bool = True
    # fine-tune: start from this model (anything pocketgpt.load accepts: a run folder, a Hugging Face GPT-2
    # folder or hub name, a nanoGPT checkpoint); its shape and tokenizer are the run's
    init_from: str | None = None
    vocab: str | None = None  # --init-from a nanoGPT char checkpoint: its meta.pkl or original text, if not beside it
    data_format: str = "auto"  # chat: the inputs are conversations (JSONL); text; auto: chat for .jsonl inputs


@dataclass
class Launched:
    result: "TrainResult"
    cfg: TrainConfig
    out: Path
    data_dir: Path


def default_out(req: TrainRequest) -> Path:
    if req.inputs:
        return Path("runs") / (Path(req.inputs[0].rstrip("/")).stem or "run")
    return Path("runs") / (req.preset or "demo")


def launch(req: TrainRequest, echo: Callable[[str], None] | None = None) -> Launched:
    """Decide what the request means, prepare the data if needed, and train; the run folder is locked throughout.

    echo receives every line said (None: printed, with a progress bar on terminals).
    """
    from . import distributed, plan

    overrides = dict(req.overrides)
    if req.max_time is not None:
        overrides["max_time"] = req.max_time
    if req.max_memory is not None and req.preset != "auto":
        raise PocketError("--max-memory sizes the model of --preset auto; add --preset auto or drop it")
    out = Path(req.out) if req.out else default_out(req)
    if req.resume:
        if req.inputs or req.preset:
            raise PocketError("--resume continues a run as it was set up; drop INPUT and --preset")
        if req.init_from is not None or req.vocab is not None:
            raise PocketError("--resume continues from the run's own last/ checkpoint (a fine-tune's base model is "
                              "not reloaded); drop --init-from and --vocab")
        rundir.check_for_training(out, resume=True, overwrite=False)
        saved, raw = rundir.read_config(out)
        cfg = build_train_config(None, req.config_file, overrides, base=saved)
        checked = plan.check_config(cfg, out, resume=True, has_base=True)  # the folder was checked just above
        data_dir = Path(req.data) if req.data else rundir.data_dir_of(out, raw)
        return _launched(_train(checked, data_dir, req, echo), out, data_dir)
    chats = is_chat(req)
    if req.init_from is not None:
        return _launch_finetune(req, overrides, out, echo, chats)
    if chats:
        raise PocketError("conversations fine-tune a model: add --init-from MODEL (a run trained on text, or a "
                          "pretrained model), or --data-format text to train on the file as plain text")
    if req.vocab is not None:
        raise PocketError("--vocab names a nanoGPT char checkpoint's vocabulary; it goes with --init-from CKPT")
    auto = req.preset == "auto"
    # auto sizes the model from the data, so it is built after preparing; this checks keys first
    cfg = build_train_config(None if auto else req.preset or "demo", req.config_file, overrides)
    # every refusal (a device or dtype this machine lacks, a batch that does not split...) before a prepare
    checked = plan.check(cfg, out, overwrite=req.overwrite)
    if req.data and req.inputs:
        raise PocketError("give either INPUT files or --data, not both")
    runtime = checked.runtime

    def prepared() -> tuple[Path, TrainConfig]:
        if req.data:
            data_dir = Path(req.data)
        else:  # INPUT files, or the bundled corpus: prepared into the run folder
            from .corpus import prepare

            data_dir = prepare(replace(req.prepare, inputs=list(req.inputs), out=str(out / rundir.DATA)))
        # auto sizes from a matmul probe: rank 0's choice is every rank's
        return data_dir, auto_config(req, data_dir, overrides, runtime, echo or print) if auto else cfg

    with distributed.session(runtime.device) as group, contextlib.ExitStack() as held:
        data_dir, cfg = group.main_first(lambda: _locked_then(held, out, prepared))
        if auto:  # the sized config is a new one: its keys are checked (the folder was, above)
            checked = plan.check_config(cfg, out, overwrite=req.overwrite)
        return _launched(_train(checked, data_dir, req, echo), out, data_dir)


def _locked_then(held: contextlib.ExitStack, out: Path, fn: Callable[[], Any]) -> Any:
    """Take the run folder's lock into `held` (from the prepare on, so a second command cannot prepare over
    this one; the training re-enters it), then fn(): on rank 0 alone under torchrun."""
    held.enter_context(rundir.locked(out))
    return fn()


def _train(checked: "TrainPlan", data_dir: Path, req: TrainRequest,
           echo: Callable[[str], None] | None, initial_model: "GPT | None" = None,
           record: dict[str, Any] | None = None) -> "TrainResult":
    from .trainer import train_plan

    return train_plan(checked, data_dir, echo=echo, memory_check=req.memory_check, initial_model=initial_model,
                      record=record)


# ---------------------------------------------------------------- fine-tuning (--init-from)

FINETUNE_PRESET = "finetune"
FINETUNE_LORA_PRESET = "finetune-lora"  # the default when --lora-rank (or a config file's lora_rank) turns LoRA on


@dataclass
class Base:
    """The pretrained model a fine-tune starts from, and how config.json's init_from records it."""

    model: "GPT"
    tokenizer: "Tokenizer"
    record: dict[str, str]  # {"source": what --init-from said, "kind": pocketgpt | huggingface | hub | nanogpt}


def base_kind(src: str) -> str:
    """What --init-from names: a pocketgpt run folder, or one of hf.source_kind()'s kinds; else a clear error."""
    if rundir.is_run_dir(src):
        return "pocketgpt"
    from .hf import source_kind

    kind = source_kind(src)
    if kind is None:
        raise PocketError(f"--init-from {src}: not a pocketgpt run folder, a Hugging Face GPT-2 folder or hub name, "
                          "or a nanoGPT checkpoint")
    return kind


def load_base(src: str, vocab: str | None = None, keep_bfloat16: bool = False) -> Base:
    """The model --init-from names (a run folder: its best weights); vocab as for loading.load; keep_bfloat16:
    a Hugging Face model's bfloat16 matrices kept so (for a LoRA base: never held as float32 at all), which
    lora_base_dtype() then settles."""
    from .loading import load, load_foreign

    kind = base_kind(src)
    if keep_bfloat16 and kind in ("huggingface", "hub"):
        got = load_foreign(src, kind, vocab, keep_bfloat16=True)
        return Base(got.model.eval(), got.tokenizer, {"source": str(src), "kind": kind})
    got = load(src, vocab=vocab)
    return Base(got.model, got.tokenizer, {"source": str(src), "kind": kind})


def given_keys(req: TrainRequest, overrides: dict[str, Any]) -> tuple[TrainConfig, set[str]]:
    """The keys --config and the command line set (not a preset's), with their values on a TrainConfig."""
    from .config import normalize_key, read_toml

    given, keys = TrainConfig(), set()
    layers = [read_toml(req.config_file)] if req.config_file else []
    for values in [*layers, overrides]:
        apply_overrides(given, values)  # unknown keys and bad values fail here, before anything loads
        for k, v in values.items():
            keys.update(normalize_key(s) for s in v) if isinstance(v, dict) else keys.add(normalize_key(k))
    return given, keys


# Open models declare contexts of 8k-40k positions; a fine-tune's activations grow with the context, so
# it trains on this many unless --block-size says otherwise (GPT-2's own context, 1,024, is kept as is).
FINETUNE_CONTEXT = 1024


def finetune_config(req: TrainRequest, overrides: dict[str, Any], base: "ModelConfig",
                    say: Callable[[str], None]) -> TrainConfig:
    """The base model's shape (its context cropped by a smaller block_size) under the finetune preset (finetune-lora
    with a lora_rank; or --preset), --config and the command line; a shape key that contradicts the base is
    refused by name (the config's other checks are plan.check_config's)."""
    from .config import MODEL_SHAPE_KEYS

    given, keys = given_keys(req, overrides)
    block = base.block_size
    for key in MODEL_SHAPE_KEYS:
        if key not in keys or key == "vocab_size":
            continue
        want, have = getattr(given.model, key), getattr(base, key)
        flag = "--" + key.replace("_", "-")
        if key == "block_size" and want < have:
            block = want
            say(f"fine-tune: block_size {want} crops the base model's context of {have} (its first {want} "
                "positions are kept)")
        elif key == "block_size" and want > have:
            raise PocketError(f"{flag} {want} is longer than the base model's context ({have}); a fine-tune can keep "
                              "or crop the context, not extend it")
        elif want != have:
            raise PocketError(f"{flag} {want} contradicts the base model, whose {key} is {have}; a fine-tune keeps "
                              f"the base's shape: drop {flag}")
    if "block_size" not in keys and block > FINETUNE_CONTEXT:
        block = FINETUNE_CONTEXT
        say(f"fine-tune: context {block} of the base model's {base.block_size} (what a laptop's memory holds for "
            f"training; --block-size N to choose)")
    start = TrainConfig(model=replace(base, block_size=block))
    preset = req.preset or (FINETUNE_LORA_PRESET if given.lora.enabled else FINETUNE_PRESET)
    # build_train_config fills in the config it is given: a copy, so `start` still holds the base's shape
    cfg = build_train_config(preset, req.config_file, overrides, base=copy.deepcopy(start))
    for key in MODEL_SHAPE_KEYS:  # a preset's shape keys (say --preset demo) give way to the base model's
        setattr(cfg.model, key, getattr(start.model, key))
    return cfg


# A float32 copy of a bfloat16 base (the same numbers, no widening per product) is taken where the run it
# makes is estimated to use at most this share of the machine's memory (the rest is the user's)
FLOAT32_BASE_MEMORY_SHARE = 0.5


def lora_base_dtype(cfg: TrainConfig, model: "GPT", say: Callable[[str], None]) -> None:
    """A LoRA fine-tune's lora_base_dtype auto, resolved into cfg (config.json keeps it: a resume builds the same),
    where the base's frozen matrices are exactly bfloat16 values and one process trains: bfloat16 where bfloat16
    products are fast (a GPU, a CPU measured fast in bf16: autocast uses the matrices as they are) or where a
    float32 base would not fit comfortably (float32_base_fits); float32 otherwise, since widening the matrices
    for every product costs a CPU without fast bf16 about a quarter of a step (bench/RESULTS.md). Then the base
    model itself gets those dtypes here (lora.set_base_dtype), so no tensor is held twice."""
    from . import distributed
    from .lora import exactly_bfloat16, set_base_dtype

    lo = cfg.lora
    exact = lo.enabled and lo.lora_base_dtype != "float32" and exactly_bfloat16(model, lo)
    why = "its weights are bfloat16 values: the same numbers" if exact else "rounded: --lora-base-dtype bfloat16"
    if lo.lora_base_dtype == "auto":
        one_process = distributed.world_from_env()[1] <= 1  # (DDP and FSDP keep every weight one dtype)
        keep = lo.enabled and one_process and exact
        fast, fits = (_fast_bf16_products(cfg), float32_base_fits(cfg, model.num_params())) if keep else (False, True)
        lo.lora_base_dtype = "bfloat16" if keep and (fast or not fits) else "float32"
        if keep and not fast and fits:
            say("fine-tune: the base's bfloat16 matrices widened to float32 once (bf16 products are not fast here and "
                "a float32 base fits this machine's memory; --lora-base-dtype bfloat16 halves it, ~25% slower steps)")
        why = "bf16 products are fast here" if fast else "a float32 base would take too much of this machine's memory"
    set_base_dtype(model, lo)  # also widens what load_base kept bfloat16, where the run does not keep it
    if lo.enabled and lo.lora_base_dtype == "bfloat16":
        say(f"fine-tune: the frozen base's matrices kept in bfloat16 (half their memory; {why}), "
            "the products computed in the run's dtype")


def _fast_bf16_products(cfg: TrainConfig) -> bool:
    """The run computes in bfloat16 where it is fast: a GPU (auto or bfloat16), or a CPU measured fast in bf16."""
    import torch

    from .runtime import resolve

    try:
        runtime = resolve(cfg.run.device, cfg.run.dtype)
    except PocketError:
        return False  # check_config says what is wrong with the device or dtype
    return runtime.dtype == torch.bfloat16


def float32_base_fits(cfg: TrainConfig, n_params: int) -> bool:
    """The run with a float32 base is estimated (plan.memory_estimate_mb) at most FLOAT32_BASE_MEMORY_SHARE of
    this machine's memory (True where the machine's memory is unknown: the default stays the faster one)."""
    from .plan import memory_estimate_mb
    from .runtime import machine_memory_mb

    have = machine_memory_mb()
    wide = replace(cfg, lora=replace(cfg.lora, lora_base_dtype="float32"))
    state_mb, act_mb = memory_estimate_mb(wide, n_params, 4)
    return not have or state_mb + act_mb <= FLOAT32_BASE_MEMORY_SHARE * have


def check_data_tokenizer(data_dir: Path, base: Base) -> None:
    """--data must hold tokens of the base model's own tokenizer (tokenizer.json equal to the base's)."""
    from .data import TOKENIZER
    from .tokenizer import load_tokenizer

    theirs = load_tokenizer(Path(data_dir) / TOKENIZER)
    if theirs.to_dict() != base.tokenizer.to_dict():
        raise PocketError(
            f"--data {data_dir} was prepared with a {theirs.kind} tokenizer of {theirs.vocab_size} tokens, not the base "
            f"model's own ({base.tokenizer.kind}, {base.tokenizer.vocab_size} tokens), so its token ids would mean "
            "other text to the model; drop --data and give the text files: they are prepared with the base's tokenizer")


def prepare_for_base(req: TrainRequest, out: Path, base: Base) -> Path:
    """Prepare the inputs (or the bundled corpus) into RUN/data with the base model's tokenizer."""
    from .corpus import prepare

    kind = base.tokenizer.kind
    if req.prepare.tokenizer not in ("char", kind) or req.prepare.vocab_size:  # char is the option's default
        raise PocketError(f"--tokenizer/--vocab-size: a fine-tune prepares the text with the base model's own "
                          f"tokenizer ({kind}); drop them")
    cfg = replace(req.prepare, inputs=list(req.inputs), out=str(out / rundir.DATA), tokenizer=kind)
    # byte-level kinds encode with the base's own tokenizer (a trained BPE is the base run's, never retrained);
    # char prepares the text's characters, then renumbers them into the base's ids
    data_dir = prepare(cfg, None if kind == "char" else base.tokenizer)
    if kind == "char":
        _renumber_chars(data_dir, base.tokenizer)
    check_data_tokenizer(data_dir, base)
    return data_dir


def _renumber_chars(data_dir: Path, base_tok: "Tokenizer") -> None:
    """A char data folder's ids (the text's own sorted characters) -> the base vocabulary's ids, in place.

    A character the base lacks is refused by name: the model has no embedding for it.
    """
    import numpy as np

    from .data import TOKENIZER, remap_ids
    from .tokenizer import describe_char, load_tokenizer

    own = load_tokenizer(data_dir / TOKENIZER)
    missing = [c for c in own.chars if c not in set(base_tok.chars)]
    if missing:
        raise PocketError(f"the text contains {describe_char(missing[0])}, which the base model's "
                          f"{base_tok.vocab_size}-character vocabulary lacks ({len(missing)} such character"
                          f"{'s' if len(missing) > 1 else ''}); remove them or fine-tune a model that has them")
    remap_ids(data_dir, np.asarray(base_tok.encode("".join(own.chars)), dtype=np.int64), base_tok)


DATA_FORMATS = ("auto", "chat", "text")


def is_chat(req: TrainRequest) -> bool:
    """Whether the inputs are conversations: --data-format, or auto: every input a .jsonl file or a folder of them."""
    from .config import nearest
    from .conversations import is_chat_path

    if req.data_format not in DATA_FORMATS:
        raise PocketError(f"unknown --data-format '{req.data_format}'{nearest(req.data_format, DATA_FORMATS)}; "
                          f"choose from {', '.join(DATA_FORMATS)}")
    if req.data_format == "text" or not req.inputs:
        if req.data_format == "chat":
            raise PocketError("--data-format chat reads conversation files (.jsonl); give them as INPUT")
        return False
    chat = [is_chat_path(Path(item).expanduser()) for item in req.inputs]
    if req.data_format == "chat" and not all(chat):
        bad = req.inputs[chat.index(False)]
        raise PocketError(f"--data-format chat: {bad} is not a .jsonl file of conversations (or a folder of them)")
    if any(chat) and not all(chat):
        raise PocketError(f"{req.inputs[chat.index(True)]} holds conversations and {req.inputs[chat.index(False)]} "
                          "text; train on one kind at a time (or --data-format text for all as text)")
    return all(chat)


def _launch_finetune(req: TrainRequest, overrides: dict[str, Any], out: Path,
                     echo: Callable[[str], None] | None, chats: bool = False) -> Launched:
    """A new run from a pretrained model: its shape and tokenizer, the finetune preset, init_from recorded."""
    from . import distributed, plan

    if req.preset == "auto":
        raise PocketError("--preset auto sizes a new model; a fine-tune keeps the base model's shape: drop --preset auto")
    if req.max_memory is not None:
        raise PocketError("--max-memory sizes the model of --preset auto; a fine-tune keeps the base's: drop it")
    if req.data and req.inputs:
        raise PocketError("give either INPUT files or --data, not both")
    given = given_keys(req, overrides)[0]
    check_lora(given, has_base=True)  # bad keys (and LoRA with Muon) fail before the base loads
    if chats and given.run.short_context:
        from .data import SHORT_CONTEXT_CHATS

        raise PocketError(SHORT_CONTEXT_CHATS)
    rundir.check_for_training(out, resume=False, overwrite=req.overwrite)
    say = echo or print
    conversations = _read_chats(req) if chats else None  # a bad line fails here, before anything loads
    lora_wanted = given.lora.enabled or req.preset == FINETUNE_LORA_PRESET
    keep_bfloat16 = lora_wanted and given.lora.lora_base_dtype != "float32"
    base = load_base(req.init_from or "", req.vocab, keep_bfloat16=keep_bfloat16)
    if conversations is not None and not getattr(base.tokenizer, "chat_template", None):
        base = with_turn_tokens(base, lora_wanted, say)
    cfg = finetune_config(req, overrides, base.model.config, say)
    lora_base_dtype(cfg, base.model, say)
    checked = plan.check_config(cfg, out, overwrite=req.overwrite, has_base=True)  # the folder was checked above
    say(f"fine-tuning {base.record['source']} ({base.record['kind']}, {base.model.num_params():,} parameters)")

    def prepared() -> Path:
        if req.data:
            check_data_tokenizer(Path(req.data), base)
            return Path(req.data)
        if conversations is not None:
            from .conversations import prepare_chat

            return prepare_chat(conversations, out / rundir.DATA, base.tokenizer, cfg.model.block_size, say)
        return prepare_for_base(req, out, base)

    with distributed.session(checked.runtime.device) as group, contextlib.ExitStack() as held:
        data_dir = group.main_first(lambda: _locked_then(held, out, prepared))
        # config.json says what the run was fine-tuned from from its first write on (report, info, resume)
        result = _train(checked, data_dir, req, echo, initial_model=base.model, record={"init_from": base.record})
        return _launched(result, out, data_dir)


def with_turn_tokens(base: Base, lora: bool, say: Callable[[str], None]) -> Base:
    """A base without a chat template, made ready for conversations: pocketgpt's turn tokens after its ids
    (their embedding rows the mean of the others) and pocketgpt's template, saved with the run."""
    from .chat import CHAT_TOKENS, with_chat_tokens

    if lora:
        raise PocketError("this model has no chat template, so pocketgpt adds its own turn tokens, whose embedding "
                          "rows must learn: fine-tune it in full (drop --lora-rank), or start from a model that "
                          "brings a template")
    tokenizer = with_chat_tokens(base.tokenizer)
    say(f"chat: the model has no chat template; pocketgpt's turn tokens {' '.join(CHAT_TOKENS)} are added after its "
        f"{base.tokenizer.vocab_size:,} ids (embedding rows starting as the mean of the others) and its template is "
        "saved with the run")
    return Base(base.model.with_vocab(tokenizer.vocab_size), tokenizer, base.record)


def _read_chats(req: TrainRequest) -> Any:
    from .conversations import read_inputs

    if req.prepare.tokenizer != "char" or req.prepare.vocab_size:
        raise PocketError("--tokenizer/--vocab-size: conversations are encoded with the model's own tokenizer; "
                          "drop them")
    return read_inputs(req.inputs, req.prepare.val_fraction)


def _launched(result: "TrainResult", out: Path, data_dir: Path) -> Launched:
    """The result with the run's config as saved (vocab_size filled in from the data)."""
    return Launched(result, rundir.read_config(out)[0], out, data_dir)


def auto_config(req: TrainRequest, data_dir: Path, overrides: dict[str, Any], runtime: "Runtime",
                echo: Callable[[str], None]) -> TrainConfig:
    """--preset auto: sizing.plan_auto's choice, under --config and command-line keys; says why."""
    import torch

    from .data import read_meta
    from .runtime import device_memory_mb, matmul_flops
    from .sizing import DEFAULT_SECONDS, parse_memory, plan_auto, training_flops

    meta = read_meta(data_dir)
    splits = meta["splits"]
    seconds = parse_duration(req.max_time) if req.max_time is not None else DEFAULT_SECONDS
    # by default half of this machine's RAM, or 80% of a GPU's memory
    share = 0.8 if runtime.is_cuda else 0.5
    memory = parse_memory(req.max_memory) if req.max_memory is not None else share * (
        device_memory_mb(runtime) or 8 * 1024)
    probe_flops = matmul_flops(runtime)
    flops = training_flops(probe_flops, runtime.device.type, runtime.dtype == torch.bfloat16)
    plan = plan_auto(int(splits["train"]["tokens"]), int(splits["val"]["tokens"]), int(meta["vocab_size"]),
                     seconds, memory, flops)
    base = TrainConfig()
    apply_overrides(base, plan.keys)
    for line in plan.reasons:
        echo(line)
    echo(f"auto: assumed {flops / 1e9:,.0f} GFLOP/s of training throughput on {runtime.device} "
         f"(a {probe_flops / 1e9:,.0f} GFLOP/s matmul probe x the share small GPTs reach, sizing.py)")
    return build_train_config(None, req.config_file, overrides, base=base)


def suggest_prompt(data_dir: Path, max_chars: int = 24) -> str:
    """A prompt from the user's own text: the start of the first full line with a letter in it, from val."""
    from .data import TOKENIZER, open_tokens, split_path
    from .tokenizer import load_tokenizer

    try:
        tokens, _ = open_tokens(split_path(data_dir, "val"))
        text = load_tokenizer(Path(data_dir) / TOKENIZER).decode([int(t) for t in tokens[:2000]])
    except (PocketError, OSError, ValueError):
        return ""
    lines = text.splitlines()[1:] or text.splitlines()  # the split may start mid-line
    for line in lines:
        words = line.split()
        if not any(c.isalpha() for c in line):
            continue
        prompt = words[0][:max_chars]
        for w in words[1:]:
            if len(prompt) + 1 + len(w) > max_chars:
                break
            prompt += " " + w
        return prompt
    return ""
