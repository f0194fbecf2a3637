"""What a `train` command means, as one plain function: resume or start, prepare first, auto-size, train.

`pocketgpt train ...` parses its flags into a TrainRequest and calls launch(); a notebook can do the
same. Torch loads only when training starts, so a bad request fails fast and cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import rundir
from .config import PrepareConfig, TrainConfig, apply_overrides, build_train_config, parse_duration
from .errors import PocketError

if TYPE_CHECKING:
    from .runtime import Runtime
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
    from .metrics import check_loggers
    from .runtime import resolve

    overrides = dict(req.overrides)
    if req.max_time is not None:
        overrides["max_time"] = req.max_time
    if req.max_memory is not None and req.preset != "auto":
        raise PocketError("--max-memory sizes the model of --preset auto; add --preset auto or drop it")
    out = Path(req.out) if req.out else default_out(req)
    if req.resume:
        if req.inputs or req.preset:
            raise PocketError("--resume continues a run as it was set up; drop INPUT and --preset")
        rundir.check_for_training(out, resume=True, overwrite=False)
        saved, raw = rundir.read_config(out)
        cfg = build_train_config(None, req.config_file, overrides, base=saved)
        data_dir = Path(req.data) if req.data else rundir.data_dir_of(out, raw)
        return _launched(_train(cfg, data_dir, out, req, echo), out, data_dir)
    auto = req.preset == "auto"
    # auto sizes the model from the data, so it is built after preparing; this checks keys first
    cfg = build_train_config(None if auto else req.preset or "demo", req.config_file, overrides)
    check_loggers(cfg.run.loggers)
    runtime = resolve(cfg.run.device, cfg.run.dtype)  # a device or dtype this machine lacks fails before a prepare
    rundir.check_for_training(out, resume=False, overwrite=req.overwrite)
    if req.data and req.inputs:
        raise PocketError("give either INPUT files or --data, not both")
    with rundir.locked(out):  # held from the prepare on, so a second command cannot prepare over this one
        if req.data:
            data_dir = Path(req.data)
        else:  # INPUT files, or the bundled corpus: prepared into the run folder
            from .data import prepare

            prep = PrepareConfig(**{**req.prepare.__dict__, "inputs": list(req.inputs), "out": str(out / rundir.DATA)})
            data_dir = prepare(prep)
        if auto:
            cfg = auto_config(req, data_dir, overrides, runtime, echo or print)
        return _launched(_train(cfg, data_dir, out, req, echo), out, data_dir)


def _train(cfg: TrainConfig, data_dir: Path, out: Path, req: TrainRequest,
           echo: Callable[[str], None] | None) -> "TrainResult":
    from .trainer import train

    return train(cfg, data_dir, out, resume=req.resume, overwrite=req.overwrite, echo=echo,
                 memory_check=req.memory_check)


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
    from .data import open_tokens
    from .tokenizer import load_tokenizer

    try:
        tokens, _ = open_tokens(Path(data_dir) / "val.bin")
        text = load_tokenizer(Path(data_dir) / "tokenizer.json").decode([int(t) for t in tokens[:2000]])
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
