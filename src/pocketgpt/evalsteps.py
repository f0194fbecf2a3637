"""What happens at each eval, as a short list of small steps the training loop calls in order.

record() turns the measured losses into an EvalResult and updates the run state; then every step
in EVAL_STEPS runs with the same EvalContext: save the best weights, log the line, note
overfitting, stop early, write a sample, save last/, redraw the plots. Each step is a plain
function of (context, result), so each can be tested alone with a hand-made context.

In a distributed run every rank measures its share of the eval batches and calls record() with the
same sums (the run state stays equal everywhere); the steps, which write files, run on rank 0 alone
(Trainer.evaluate), and its early-stop decision goes to the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import checkpoint as ckpt
from .config import TrainConfig
from .errors import PocketError
from .metrics import MetricsLog
from .rundir import BEST_WEIGHTS, SAMPLES
from .tokenizer import Tokenizer
from .trainstate import RunState


@dataclass
class EvalResult:
    iter: int
    train_loss: float
    val_loss: float
    val_bpb: float
    improved: bool


@dataclass
class EvalContext:
    """What the eval steps may touch; stop_requested is how a step ends the run."""

    out: Path
    cfg: TrainConfig
    state: RunState
    log: MetricsLog
    model: Any  # the raw GPT (never a compiled or distributed wrapper): what is sampled, and saved unless write_best
    tokenizer: Tokenizer
    save_last: Callable[[], None]
    stop_requested: bool = False
    # writes the best weights (path, metadata) where model's own would not do: a LoRA run's, merged (lora.save_merged)
    write_best: Callable[[Path, dict[str, str]], None] | None = None
    # chat data: held-out questions ({"messages", "reference"}) the sample step answers instead
    examples: list[dict[str, Any]] = field(default_factory=list)


def record(state: RunState, losses: dict[str, float], val_bytes_per_token: float) -> EvalResult:
    """Update best loss, history and the evals-since-best count from this eval's losses."""
    bpb = losses["val"] / math.log(2) / val_bytes_per_token
    improved = losses["val"] < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_iter = losses["val"], state.iter
    state.evals_since_best = 0 if improved else state.evals_since_best + 1
    state.history.append({"iter": state.iter, "train_loss": losses["train"], "val_loss": losses["val"]})
    return EvalResult(state.iter, losses["train"], losses["val"], bpb, improved)


def save_best(ctx: EvalContext, ev: EvalResult) -> None:
    if not ev.improved:
        return
    metadata = {"iter": str(ev.iter), "val_loss": f"{ev.val_loss:.6f}", "format_version": "1"}
    with ckpt.disk_errors(ctx.out, f"best weights ({BEST_WEIGHTS})"):
        if ctx.write_best is not None:
            ctx.write_best(ctx.out / BEST_WEIGHTS, metadata)
        else:
            ckpt.save_weights(ctx.model, ctx.out / BEST_WEIGHTS, metadata=metadata)


def log_eval(ctx: EvalContext, ev: EvalResult) -> None:
    s = ctx.state
    ctx.log.write({"iter": ev.iter, "train_loss": ev.train_loss, "val_loss": ev.val_loss, "val_bpb": ev.val_bpb,
                   "elapsed": round(s.elapsed, 3), "tokens_seen": s.tokens_seen})
    ctx.log.say(f"eval iter {ev.iter}: train loss {ev.train_loss:.4f}, val loss {ev.val_loss:.4f} "
                f"({ev.val_bpb:.3f} bits/byte){' -> saved best' if ev.improved else ''}")


def note_overfitting(ctx: EvalContext, ev: EvalResult) -> None:
    """Say when val loss stalls while train loss keeps falling."""
    s = ctx.state
    if s.evals_since_best == 0:
        return
    train_losses = [h["train_loss"] for h in s.history[-(s.evals_since_best + 1):]]
    if train_losses[-1] < train_losses[0]:
        ctx.log.say(
            f"note: val loss has not improved for {s.evals_since_best} eval(s) (best {s.best_val_loss:.4f} at "
            f"iter {s.best_iter}) while train loss keeps falling: the model is starting to overfit"
        )


def stop_early(ctx: EvalContext, ev: EvalResult) -> None:
    patience, s = ctx.cfg.run.early_stop_patience, ctx.state
    if patience and s.evals_since_best >= patience:
        ctx.stop_requested = True
        ctx.log.say(f"early stop: {patience} evals without improvement; the best checkpoint "
                    f"(iter {s.best_iter}) is in {ctx.out / BEST_WEIGHTS}")


def write_sample(ctx: EvalContext, ev: EvalResult) -> None:
    """A short sample from a fixed prompt, so people watch the model learn (own RNG: resume stays exact)."""
    n = ctx.cfg.run.eval_sample_tokens
    if not n:
        return
    if ctx.examples:
        return write_answers(ctx, ev, n)
    from .engine import Engine
    from .sampling import SamplingSettings

    try:
        ids = ctx.tokenizer.encode("\n")
    except PocketError:  # a corpus without newlines: start from its first token instead
        ids = [0]
    # the engine sets eval mode; a moving average stays in it (ema.py); a LoRA sampling view has no mode of its own
    was_training = getattr(ctx.model, "training", True)
    try:
        # float32 steps: a short sample is not worth 16-bit copies of the matrices (memory) or the probe
        engine = Engine(ctx.model, decode_dtype="float32")
        new = engine.generate(ids, SamplingSettings(max_new_tokens=n, seed=ctx.cfg.run.seed))[0]
    finally:
        ctx.model.train(was_training)
    text = ctx.tokenizer.decode(new)
    with ckpt.disk_errors(ctx.out, f"samples ({SAMPLES})"), open(ctx.out / SAMPLES, "a", encoding="utf-8") as f:
        f.write(f"=== iter {ev.iter} (val loss {ev.val_loss:.4f}) ===\n{text}\n\n")
    shown = text.strip().splitlines()[:4]
    ctx.log.say("sample: " + " / ".join(line.strip() for line in shown if line.strip())[:160])


def write_answers(ctx: EvalContext, ev: EvalResult, n: int) -> None:
    """A chat run's sample: its greedy answers to a few held-out questions, beside the reference answers
    (samples.txt keeps every eval's; the report shows the last)."""
    from .chat import chat_prompt
    from .engine import Engine
    from .sampling import SamplingSettings

    stop = getattr(ctx.tokenizer, "stop_ids", None) or []
    blocks, was_training = [], getattr(ctx.model, "training", True)
    try:
        engine = Engine(ctx.model, decode_dtype="float32")
        for example in ctx.examples:
            prompt = chat_prompt(ctx.tokenizer, example["messages"]).prompt
            ids = prompt if isinstance(prompt, list) else ctx.tokenizer.encode(prompt)
            settings = SamplingSettings(max_new_tokens=n, temperature=0.0, seed=ctx.cfg.run.seed)
            answer = ctx.tokenizer.decode(engine.generate(ids, settings, stop_token_ids=stop)[0]).strip()
            blocks.append((example["messages"][-1]["content"], answer, example["reference"]))
    finally:
        ctx.model.train(was_training)
    with ckpt.disk_errors(ctx.out, f"samples ({SAMPLES})"), open(ctx.out / SAMPLES, "a", encoding="utf-8") as f:
        f.write(f"=== iter {ev.iter} (val loss {ev.val_loss:.4f}) ===\n")
        f.writelines(f"question: {q}\nanswer: {a}\nreference: {r}\n\n" for q, a, r in blocks)
    question, answer, reference = blocks[0]
    ctx.log.say(f"answer: {' '.join(answer.split())[:100]!r} (reference: {' '.join(reference.split())[:60]!r})")


def save_last(ctx: EvalContext, ev: EvalResult) -> None:
    ctx.save_last()


def refresh_plots(ctx: EvalContext, ev: EvalResult) -> None:
    if not ctx.cfg.run.plots:
        return
    from .plots import write_plots

    never_fatal(ctx.log, "draw plots", lambda: write_plots(ctx.out))


EVAL_STEPS: tuple[Callable[[EvalContext, EvalResult], None], ...] = (
    save_best, log_eval, note_overfitting, stop_early, write_sample, save_last, refresh_plots,
)


def never_fatal(log: MetricsLog, what: str, fn: Callable[[], Any]) -> None:
    """Plots and reports are for people watching; failing to make one must not stop a run."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        log.say(f"warning: could not {what} ({type(e).__name__}: {e})")
