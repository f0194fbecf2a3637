"""train(cfg) -> run dir: the loop, evals, schedule, clipping, accumulation, AMP, compile, resume."""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import CONFIG_FORMAT_VERSION, TrainConfig, validate
from .data import BatchSampler, open_tokens, read_meta
from .errors import PocketError, TrainingDiverged
from .metrics import MetricsLog, check_loggers
from .model import GPT
from .optim import lr_at, make_optimizers, progress, set_lr
from .runtime import Runtime, matmul_flops, resolve
from .sizing import estimate_memory_mb, flops_per_token, gpu_peak_flops, seconds_per_iter, training_flops
from .tokenizer import load_tokenizer

SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "pos_emb", "norm", "qk_norm", "mlp",
              "tie_embeddings")
RUN_FILES = ("config.json", "tokenizer.json", "model.safetensors", "metrics.jsonl", "samples.txt", "last", "last.old",
             "plots", "report.md", "tensorboard", "wandb")
EVAL_SEED_OFFSET = 1_000_003  # eval batches come from their own stream, never the training one


@dataclass
class RunState:
    """What the loop needs besides weights and optimizer to carry on exactly."""

    iter: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # training wall time, carried across resumes for --max-time
    best_val_loss: float = math.inf
    best_iter: int = -1
    evals_since_best: int = 0
    last_train_loss: float = math.nan
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        d["last_train_loss"] = None if math.isnan(self.last_train_loss) else self.last_train_loss
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        s = cls()
        for key in ("iter", "tokens_seen", "elapsed", "best_iter", "evals_since_best", "history"):
            if key in d:
                setattr(s, key, d[key])
        s.best_val_loss = math.inf if d.get("best_val_loss") is None else float(d["best_val_loss"])
        s.last_train_loss = math.nan if d.get("last_train_loss") is None else float(d["last_train_loss"])
        return s


# ---------------------------------------------------------------- run folder

def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber anything that is not ours; with overwrite, clear a previous run (not data/)."""
    out = Path(out)
    if resume:
        if not is_run_dir(out):
            raise PocketError(f"cannot resume: {out} is not a pocketgpt run folder (no config.json)")
        return
    if is_run_dir(out):
        if not overwrite:
            raise PocketError(
                f"{out} already holds a training run; add --resume to continue it, "
                "--overwrite to start again, or choose another --out"
            )
        for name in RUN_FILES:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        ckpt.remove_stale_temps(out)
        return
    if out.exists():
        if not out.is_dir():
            raise PocketError(f"{out} is a file, not a folder; choose another --out")
        if any(p.name != "data" and not ckpt.is_temp(p) for p in out.iterdir()):
            raise PocketError(f"{out} exists and is not a pocketgpt run folder; choose another --out")


def save_config(out: Path, cfg: TrainConfig, data_dir: Path) -> None:
    from . import __version__

    try:
        data_ref = str(data_dir.resolve().relative_to(out.resolve()))
    except ValueError:
        data_ref = str(data_dir.resolve())
    ckpt.write_json(
        out / "config.json",
        {"format_version": CONFIG_FORMAT_VERSION, "pocketgpt_version": __version__, "data_dir": data_ref,
         **cfg.to_dict()},
    )


def read_run_config(run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, raw dict) from RUN_DIR/config.json, with version and key checks."""
    raw = ckpt.read_json(Path(run_dir) / "config.json", "run config")
    ckpt.check_format_version(raw, Path(run_dir) / "config.json")
    cfg = TrainConfig.from_dict(raw)
    return cfg, raw


def data_dir_of(run_dir: Path, raw: dict[str, Any]) -> Path:
    ref = Path(raw.get("data_dir", "data"))
    return ref if ref.is_absolute() else Path(run_dir) / ref


# ---------------------------------------------------------------- pieces of the loop

def _load_split(data_dir: Path, split: str, vocab_size: int, block_size: int) -> np.ndarray:
    tokens, vs = open_tokens(data_dir / f"{split}.bin")
    if vs != vocab_size:
        raise PocketError(f"{data_dir / (split + '.bin')} has vocab {vs} but meta.json says {vocab_size}; prepare again")
    if len(tokens) < block_size + 1:
        raise PocketError(
            f"the {split} split has {len(tokens)} tokens but block_size {block_size} needs at least "
            f"{block_size + 1}; give more text, lower --block-size"
            + (", or raise --val-fraction when preparing" if split == "val" else "")
        )
    return tokens


def _rng_state(runtime: Runtime) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if runtime.is_cuda:
        state["torch_cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _set_rng_state(runtime: Runtime, state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if runtime.is_cuda and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], runtime.device)


class Trainer:
    """Holds the model, optimizer and data of one run; `run()` trains to the end."""

    def __init__(self, cfg: TrainConfig, data_dir: Path, out: Path, runtime: Runtime, log: MetricsLog):
        self.cfg, self.data_dir, self.out, self.runtime, self.log = cfg, data_dir, out, runtime, log
        meta = read_meta(data_dir)
        cfg.model.vocab_size = int(meta["vocab_size"])
        m, r = cfg.model, cfg.run
        self.train_tokens = _load_split(data_dir, "train", m.vocab_size, m.block_size)
        self.val_tokens = _load_split(data_dir, "val", m.vocab_size, m.block_size)
        self.val_bytes_per_token = meta["splits"]["val"]["bytes"] / max(meta["splits"]["val"]["tokens"], 1)
        self.sampler = BatchSampler(self.train_tokens, m.block_size, r.batch_size, r.seed)
        self.eval_samplers = {
            split: BatchSampler(toks, m.block_size, r.batch_size, r.seed + EVAL_SEED_OFFSET)
            for split, toks in (("train", self.train_tokens), ("val", self.val_tokens))
        }
        torch.manual_seed(r.seed)
        self.model = GPT(m).to(runtime.device)
        self.optimizers = make_optimizers(self.model, cfg.optim, runtime.device)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
        self.forward = self.model  # replaced by the compiled module when compile works
        # Reading a loss on a GPU waits for all queued work; read at log and eval steps only, and keep a
        # device-side flag of non-finite values for the steps in between (checked before every save).
        self.read_every_step = not runtime.is_cuda
        self.unread_bad = torch.zeros((), dtype=torch.bool, device=runtime.device)
        self.last_read_iter = 0
        self.compile_pending = bool(r.compile)
        self.state = RunState()
        self.stop_requested = False
        self.early_stopped = False
        self.tokenizer = load_tokenizer(data_dir / "tokenizer.json")
        self.flops_per_token = flops_per_token(_matmul_params(self.model), m.n_layer, m.n_embd, m.block_size)
        self.peak_flops = (gpu_peak_flops(torch.cuda.get_device_name(runtime.device), runtime.dtype != torch.float32)
                           if runtime.is_cuda else None)

    # -- resume -------------------------------------------------------------
    def restore(self) -> None:
        folder, state, optimizer_state, rng = ckpt.load_resume_state(self.out)
        ckpt.load_weights(self.model, folder / "model.safetensors")
        try:
            saved = optimizer_state["optimizers"]
            if len(saved) != len(self.optimizers):
                raise ValueError(f"{len(saved)} optimizers saved, {len(self.optimizers)} now (was optimizer changed?)")
            for opt, sd in zip(self.optimizers, saved):
                opt.load_state_dict(sd)
        except (ValueError, KeyError, TypeError) as e:
            raise PocketError(f"optimizer state in {folder} does not fit this model ({e})") from None
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(self.runtime, rng)
        self.state = RunState.from_dict(state)

    def save_last(self) -> None:
        self._check_unread(self.state.iter)
        extra = {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}
        with ckpt.disk_errors(self.out, "resume checkpoint (last/)"):
            ckpt.save_resume_state(
                self.out, self.model, {"optimizers": [o.state_dict() for o in self.optimizers]},
                _rng_state(self.runtime),
                {**self.state.to_dict(), **extra},
            )

    # -- one optimizer step -------------------------------------------------
    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.runtime.is_cuda:
            return t.pin_memory().to(self.runtime.device, non_blocking=True)
        return t.to(self.runtime.device)

    def _maybe_compile(self) -> None:
        if not self.compile_pending:
            return
        self.compile_pending = False
        try:
            self.forward = torch.compile(self.model)
            self.log.say("compiling the model (the first steps are slow) ...")
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
            self.log.say(f"warning: torch.compile unavailable ({type(e).__name__}); training without it")

    def step(self, it: int, lr: float) -> tuple[float, float]:
        """Forward/backward over grad_accum_steps micro-batches and one update; (loss, grad norm).

        On steps that do not read them (see read_every_step) both come back as NaN.
        """
        r, o = self.cfg.run, self.cfg.optim
        set_lr(self.optimizers, lr / o.learning_rate)
        total = torch.zeros((), device=self.runtime.device)
        for micro in range(r.grad_accum_steps):
            x, y = (self._to_device(a) for a in self.sampler.batch(it, micro))
            with self.runtime.autocast():
                _, loss = self._forward_safely(x, y)
            self.scaler.scale(loss / r.grad_accum_steps).backward()
            total += loss.detach()
        read = self.read_every_step or self._is_read_step(it + 1)
        loss_value = grad_norm = math.nan
        if read:
            self._check_unread(it)
            self.last_read_iter = it + 1
            loss_value = float(total) / r.grad_accum_steps
            if not math.isfinite(loss_value):
                self._zero_grad()
                raise TrainingDiverged(self._diverged_message(it, "loss", loss_value))
        else:
            self.unread_bad |= ~torch.isfinite(total)
        if o.grad_clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
            if read:
                grad_norm = float(norm)
                if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                    self._zero_grad()
                    raise TrainingDiverged(self._diverged_message(it, "gradient norm", grad_norm))
            elif not self.scaler.is_enabled():  # with fp16, overflowing steps are skipped, not fatal
                self.unread_bad |= ~torch.isfinite(norm)
        for opt in self.optimizers:
            self.scaler.step(opt)  # with fp16, skips steps whose gradients overflowed
        self.scaler.update()
        self._zero_grad()
        return loss_value, grad_norm

    def _is_read_step(self, n: int) -> bool:
        r = self.cfg.run
        return n % r.log_interval == 0 or n % r.eval_interval == 0 or n >= r.max_iters

    def _check_unread(self, it: int) -> None:
        """Raise if a step that was not read went non-finite (its update was applied: nothing is saved)."""
        if self.read_every_step or not bool(self.unread_bad):
            return
        raise TrainingDiverged(
            f"training stopped: the loss or gradient norm became non-finite between iter {self.last_read_iter} "
            f"and iter {it}; nothing since the last save was kept, so the last good checkpoint in {self.out} is "
            f"intact. Likely cause: {self._likely_causes()}")

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _forward_safely(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.forward(x, y)
        except Exception as e:  # noqa: BLE001 - a compiler failure shows up at the first call
            if self.forward is self.model:
                raise
            self.log.say(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training without it")
            self.forward = self.model
            return self.model(x, y)

    def _diverged_message(self, it: int, what: str, value: float) -> str:
        return (
            f"training stopped at iter {it}: the {what} became {value}; the step was not applied and "
            f"the last good checkpoint in {self.out} is intact. Likely cause: {self._likely_causes()}"
        )

    def _likely_causes(self) -> str:
        causes = "the learning rate may be too high (try a lower --learning-rate or a longer --warmup-iters)"
        if self.runtime.dtype == torch.float16:
            causes += ", or float16 overflowed (try --dtype bfloat16 or float32)"
        return causes

    # -- evaluation ---------------------------------------------------------
    @torch.no_grad()
    def estimate_losses(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches per split (the same batches at every eval)."""
        self.model.eval()
        out = {}
        for split, sampler in self.eval_samplers.items():
            losses = []
            for k in range(self.cfg.run.eval_iters):
                x, y = (self._to_device(a) for a in sampler.batch(k))
                with self.runtime.autocast():
                    _, loss = self.model(x, y)
                losses.append(float(loss))
            out[split] = float(np.mean(losses))
        self.model.train()
        return out

    def evaluate_and_save(self) -> None:
        s = self.state
        self._check_unread(s.iter)
        losses = self.estimate_losses()
        bpb = losses["val"] / math.log(2) / self.val_bytes_per_token
        improved = losses["val"] < s.best_val_loss
        if improved:
            s.best_val_loss, s.best_iter = losses["val"], s.iter
            with ckpt.disk_errors(self.out, "best weights (model.safetensors)"):
                ckpt.save_weights(
                    self.model, self.out / "model.safetensors",
                    metadata={"iter": str(s.iter), "val_loss": f"{losses['val']:.6f}", "format_version": "1"},
                )
        record = {"iter": s.iter, "train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": bpb,
                  "elapsed": round(s.elapsed, 3), "tokens_seen": s.tokens_seen}
        s.history.append({k: record[k] for k in ("iter", "train_loss", "val_loss")})
        self.log.write(record)
        self.log.say(
            f"eval iter {s.iter}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
            f"({bpb:.3f} bits/byte){' -> saved best' if improved else ''}"
        )
        self._watch_overfitting(improved)
        self._write_sample(losses["val"])
        self.save_last()
        self._refresh_plots()

    def _watch_overfitting(self, improved: bool) -> None:
        """Say when val loss stalls while train loss keeps falling; stop if early stopping is on."""
        s, patience = self.state, self.cfg.run.early_stop_patience
        s.evals_since_best = 0 if improved else s.evals_since_best + 1
        if s.evals_since_best == 0:
            return
        train_losses = [h["train_loss"] for h in s.history[-(s.evals_since_best + 1):]]
        if train_losses[-1] < train_losses[0]:
            self.log.say(
                f"note: val loss has not improved for {s.evals_since_best} eval(s) (best {s.best_val_loss:.4f} at "
                f"iter {s.best_iter}) while train loss keeps falling: the model is starting to overfit"
            )
        if patience and s.evals_since_best >= patience:
            self.early_stopped = True
            self.log.say(f"early stop: {patience} evals without improvement; the best checkpoint "
                         f"(iter {s.best_iter}) is in {self.out / 'model.safetensors'}")

    def _write_sample(self, val_loss: float) -> None:
        """A short sample from a fixed prompt, so people watch the model learn (own RNG: resume stays exact)."""
        n = self.cfg.run.eval_sample_tokens
        if not n:
            return
        from .engine import Engine

        try:
            ids = self.tokenizer.encode("\n")
        except PocketError:  # a corpus without newlines: start from its first token instead
            ids = [0]
        try:
            new = Engine(self.model).generate(ids, n, temperature=0.8, seed=self.cfg.run.seed)[0]
        finally:
            self.model.train()
        text = self.tokenizer.decode(new)
        with open(self.out / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== iter {self.state.iter} (val loss {val_loss:.4f}) ===\n{text}\n\n")
        shown = text.strip().splitlines()[:4]
        self.log.say("sample: " + " / ".join(line.strip() for line in shown if line.strip())[:160])

    def _refresh_plots(self) -> None:
        if not self.cfg.run.plots:
            return
        from .plots import write_plots

        _never_fatal(self.log, "draw plots", lambda: write_plots(self.out))

    # -- the loop -------------------------------------------------------------
    def run(self) -> RunState:
        r, s = self.cfg.run, self.state
        tokens_per_iter = r.batch_size * r.grad_accum_steps * self.cfg.model.block_size
        self.last_read_iter = s.iter
        self._maybe_compile()
        self.model.train()
        if self.runtime.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.runtime.device)
        budget = (r.max_time, s.elapsed, "s") if r.max_time else (r.max_iters, s.iter, "it")
        self.log.start_progress(*budget)
        try:
            return self._loop(tokens_per_iter)
        finally:
            self.log.close_progress()

    def _loop(self, tokens_per_iter: int) -> RunState:
        r, s = self.cfg.run, self.state
        window_start, window_iters, evaluated_at = time.perf_counter(), 0, -1
        while (s.iter < r.max_iters and not (r.max_time and s.elapsed >= r.max_time) and not self.stop_requested
               and not self.early_stopped):
            t0 = time.perf_counter()
            lr = lr_at(self.cfg.optim, s.iter,
                       progress(self.cfg.optim, s.iter, r.max_iters, s.elapsed, r.max_time))
            loss, grad_norm = self.step(s.iter, lr)
            s.iter += 1
            s.tokens_seen += tokens_per_iter
            if not math.isnan(loss):
                s.last_train_loss = loss
            window_iters += 1
            if s.iter % r.log_interval == 0:
                seconds = time.perf_counter() - window_start
                self._log_train(loss, lr, grad_norm, seconds, window_iters, tokens_per_iter)
                window_start, window_iters = time.perf_counter(), 0
            s.elapsed += time.perf_counter() - t0
            self.log.progress(s.elapsed if r.max_time else s.iter, loss=_shown(s.last_train_loss),
                              val=_shown(s.best_val_loss))
            if s.iter % r.eval_interval == 0:
                t1 = time.perf_counter()
                self.evaluate_and_save()
                evaluated_at = s.iter
                s.elapsed += time.perf_counter() - t1
                window_start = time.perf_counter()
        if self.stop_requested:
            self.save_last()
            return s
        if evaluated_at != s.iter and s.iter > 0:
            self.evaluate_and_save()
        elif s.iter == 0:
            raise PocketError("nothing to train: max_iters is already reached")
        return s

    def _log_train(self, loss: float, lr: float, grad_norm: float, seconds: float, iters: int, tpi: int) -> None:
        ms = 1000 * seconds / max(iters, 1)
        tps = tpi * iters / max(seconds, 1e-9)
        s = self.state
        gpu = self._gpu_metrics(tps)
        self.log.write({"iter": s.iter, "loss": loss, "lr": lr, "tokens_per_s": round(tps, 1),
                        "ms_per_iter": round(ms, 2), "grad_norm": grad_norm, "tokens_seen": s.tokens_seen,
                        "elapsed": round(s.elapsed, 3), **gpu})
        budget = self.cfg.run.max_time
        if budget:
            where, eta = f"{s.elapsed:5.0f}s/{budget:.0f}s", budget - s.elapsed
        else:
            where, eta = f"{s.iter}/{self.cfg.run.max_iters}", (self.cfg.run.max_iters - s.iter) * ms / 1000
        extra = f" | MFU {100 * gpu['mfu']:.1f}%" if "mfu" in gpu else ""
        extra += f" | {gpu['peak_mem_mb']:,.0f} MB peak" if "peak_mem_mb" in gpu else ""
        self.log.say(f"iter {s.iter:6d} ({where}) | loss {loss:.4f} | lr {lr:.2e} | "
                     f"{ms:6.1f} ms/iter | {tps:,.0f} tok/s{extra} | ETA {_duration(eta)}")

    def _gpu_metrics(self, tokens_per_s: float) -> dict[str, float]:
        """On CUDA: peak memory (MB) and model FLOPs utilisation; nothing elsewhere."""
        if not self.runtime.is_cuda:
            return {}
        out = {"peak_mem_mb": round(torch.cuda.max_memory_allocated(self.runtime.device) / 2**20, 1)}
        if self.peak_flops:  # unknown GPUs get no MFU rather than a guess
            out["mfu"] = round(self.flops_per_token * tokens_per_s / self.peak_flops, 4)
        return out


def _shown(loss: float) -> str:
    """A loss for the progress bar; '-' before there is one (unread, or no eval yet)."""
    return f"{loss:.3f}" if math.isfinite(loss) else "-"


def _matmul_params(model: GPT) -> int:
    """Parameters that take part in a matmul: not the position table, nor an untied input embedding."""
    n = model.num_params(non_embedding=True)
    if not model.config.tie_embeddings:
        n -= model.transformer.wte.weight.numel()
    return n


def _never_fatal(log: MetricsLog, what: str, fn: Callable[[], Any]) -> None:
    """Plots and reports are for people watching; failing to make one must not stop a run."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        log.say(f"warning: could not {what} ({type(e).__name__}: {e})")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ---------------------------------------------------------------- entry point

@dataclass
class TrainResult:
    out: Path
    iters: int
    best_val_loss: float
    interrupted: bool
    seconds: float


def _check_resume_shape(saved: TrainConfig, cfg: TrainConfig) -> None:
    for key in SHAPE_KEYS:
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if key != "vocab_size" and a != b:
            raise PocketError(
                f"--resume cannot change the model's shape: {key} was {a}, now {b}; "
                "drop that option or start a new run with --out"
            )


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train cfg on the prepared data in data_dir, writing the run folder `out`."""
    out, data_dir = Path(out), Path(data_dir)
    validate(cfg)
    check_loggers(cfg.run.loggers)
    check_run_dir(out, resume, overwrite)
    if resume:
        saved, _ = read_run_config(out)
        _check_resume_shape(saved, cfg)
    runtime = resolve(cfg.run.device, cfg.run.dtype)
    log = MetricsLog(out / "metrics.jsonl", echo)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, data_dir, out, runtime, log)
    if resume:
        trainer.restore()
        if trainer.state.iter >= cfg.run.max_iters or (cfg.run.max_time and trainer.state.elapsed >= cfg.run.max_time):
            # A kill after the final save (while the report was written, say) leaves a finished run:
            # resuming it is not an error, there is just nothing left to train.
            log.say(f"{out} already finished (iter {trainer.state.iter}); nothing to train. To train longer, "
                    "resume with a larger --max-iters (or --max-time)")
            _finish(out, log)
            return TrainResult(out, trainer.state.iter, trainer.state.best_val_loss, False, 0.0)
        log.truncate_after(trainer.state.iter)
        log.say(f"resuming {out} at iter {trainer.state.iter}")
    else:
        log.reset()
        shutil.copyfile(data_dir / "tokenizer.json", out / ".tokenizer.json.tmp")
        os.replace(out / ".tokenizer.json.tmp", out / "tokenizer.json")
    save_config(out, cfg, data_dir)
    n_params = trainer.model.num_params()
    state_mb, act_mb = estimate_memory_mb(cfg, n_params, 2 if runtime.dtype != torch.float32 else 4)
    log.say(f"model: {n_params:,} parameters | {runtime.describe()} | "
            f"data: {len(trainer.train_tokens):,} train / {len(trainer.val_tokens):,} val tokens")
    log.say(f"memory estimate: ~{state_mb + act_mb:,.0f} MB ({state_mb:,.0f} MB weights, gradients and "
            f"optimizer state + {act_mb:,.0f} MB activations per micro-batch) | "
            f"~{1000 * _iter_seconds(trainer):,.0f} ms/iter estimated")
    started = time.perf_counter()
    log.open_mirrors(cfg.run.loggers, out, cfg.to_dict(), trainer.state.iter)
    try:
        with _graceful_interrupt(trainer):
            state = trainer.run()
    finally:
        log.close_mirrors()
    if trainer.stop_requested:
        log.say(f"interrupted at iter {state.iter}; saved. Resume with: pocketgpt train --out {out} --resume")
    else:
        _finish(out, log)
    return TrainResult(out, state.iter, state.best_val_loss, trainer.stop_requested, time.perf_counter() - started)


def _iter_seconds(trainer: Trainer) -> float:
    """Seconds per iteration from the matmul probe and sizing's efficiency (what --preset auto assumes)."""
    r, rt = trainer.cfg.run, trainer.runtime
    flops = training_flops(matmul_flops(rt), rt.device.type, rt.dtype == torch.bfloat16)
    return seconds_per_iter(r.batch_size * r.grad_accum_steps * trainer.cfg.model.block_size,
                            trainer.flops_per_token, flops)


def _finish(out: Path, log: MetricsLog) -> None:
    from .report import write_report

    _never_fatal(log, "write report.md", lambda: write_report(out))


class _graceful_interrupt:
    """First Ctrl-C: finish the current step, save last/, stop. Second: stop at once."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous = trainer, None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.stop_requested = True
        self.trainer.log.say("\ninterrupt: finishing this step and saving (Ctrl-C again to quit at once)")

    def __enter__(self) -> "_graceful_interrupt":
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
