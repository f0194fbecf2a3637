"""RUN_DIR/report.md: one page saying what a run was, how it went and what it wrote.

Torch-free: everything comes from the run's JSON files, metrics.jsonl and the tensor shapes in the
safetensors header. A missing or damaged file leaves its section out (or says so); it never stops
the report, because training writes it at the end of a run.
"""

from __future__ import annotations

import json
import math
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from .checkpoint import read_last_state
from .data import META
from .errors import PocketError
from .files import atomic_write_text, read_json_or_empty
from .plots import num, read_run_metrics, series
from .rundir import ADAPTER, BEST_WEIGHTS, PLOTS, REPORT, SAMPLES, data_dir_of, lora_summary, read_raw_config

MAX_EVAL_ROWS = 30
SAMPLE_LINES = 40
PLOT_TITLES = {"loss": "Loss", "lr": "Learning rate", "grad_norm": "Gradient norm", "step_time": "Time per iteration",
               "tokens_per_s": "Throughput"}


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.md (atomically) and return its path; PocketError if RUN_DIR is not a run."""
    run_dir = Path(run_dir)
    records = read_run_metrics(run_dir)
    cfg = read_raw_config(run_dir)
    state = _last_state(run_dir)
    sections = [
        _header(run_dir),
        _summary(run_dir, cfg, state, records),
        _evals_section(records),
        _plots_section(run_dir),
        _config_section(cfg),
        _data_section(run_dir, cfg),
        _samples_section(run_dir),
    ]
    path = run_dir / REPORT
    atomic_write_text(path, "\n\n".join(s for s in sections if s) + "\n")
    return path


# ---------------------------------------------------------------- reading

def _last_state(run_dir: Path) -> dict[str, Any]:
    try:
        return read_last_state(run_dir)
    except PocketError:  # a damaged state.json: the report says less, it does not fail
        return {}


def count_parameters(weights: Path, tied: bool = True) -> int | None:
    """Parameters in a safetensors file, from the header's tensor shapes (no tensor data is read).

    save_model stores a tied output head once (the embedding's name becomes an alias in the
    metadata); a file that holds both names still counts the shared matrix once. None when the
    file is missing or unreadable.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (OSError, SafetensorError):
        return None
    total = sum(math.prod(s) for s in shapes.values())
    if tied and "lm_head.weight" in shapes and "transformer.wte.weight" in shapes:
        total -= math.prod(shapes["lm_head.weight"])
    return total


# ---------------------------------------------------------------- formatting

def _fmt(x: Any, digits: int = 4) -> str:
    v = num(x)
    return f"{v:.{digits}f}" if math.isfinite(v) else "–"


def _int(x: Any) -> str:
    v = num(x)
    return f"{v:,.0f}" if math.isfinite(v) else "–"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _millions(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f} M)" if n >= 100_000 else f"{n:,}"


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in the text, so a sample cannot end it early."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text}\n{ticks}"


# ---------------------------------------------------------------- sections

def _header(run_dir: Path) -> str:
    from .version import __version__

    when = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"# Training report: {run_dir.resolve().name}\n\n"
            f"Run folder `{run_dir}`, report written {when} by pocketgpt {__version__}.")


def _evals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "val_loss" in r or "train_loss" in r]


def _best(evals: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in evals if math.isfinite(num(r.get("val_loss")))]
    return min(scored, key=lambda r: num(r["val_loss"])) if scored else None


def _summary(run_dir: Path, cfg: dict[str, Any], state: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = ["## Summary", ""]
    model = cfg.get("model", {})
    params = count_parameters(run_dir / BEST_WEIGHTS, bool(model.get("tie_embeddings", True)))
    shape = (f"{_count(model.get('n_layer'), 'layer')}, {_count(model.get('n_head'), 'head')}, "
             f"{model.get('n_embd')} wide, context {model.get('block_size')}, "
             f"vocabulary {model.get('vocab_size')}") if model else ""
    if params is not None or shape:
        lines.append(f"- **Model:** {_millions(params) + ' parameters' if params is not None else ''}"
                     f"{'; ' if params is not None and shape else ''}{shape}")
    base = cfg.get("init_from")
    if isinstance(base, dict) and base.get("source"):
        lines.append(f"- **Fine-tuned from:** `{base['source']}` ({base.get('kind', 'unknown kind')})")
    lora = lora_summary(cfg)
    if lora:
        lines.append(_lora_line(run_dir, lora, params))
    lines.append(_training_line(state, records))
    lines += _loss_lines(records, state)
    _, tps = series(records, "iter", "tokens_per_s")
    if tps:
        lines.append(f"- **Throughput:** median {statistics.median(tps):,.0f} tokens/s")
    return "\n".join(lines)


def _lora_line(run_dir: Path, lora: dict[str, Any], params: int | None) -> str:
    n = lora["trainable_parameters"]
    share = f" ({100 * n / params:.2f}% of the base's {params:,}, frozen)" if params else ""
    adapter = run_dir / ADAPTER
    size = f"; the best adapter alone is `{ADAPTER}` ({_size(adapter.stat().st_size)})" if adapter.is_file() else ""
    return (f"- **LoRA:** rank {lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])}: "
            f"{n:,} trainable parameters{share}{size}; `model.safetensors` holds the merged weights")


def _training_line(state: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Iterations, tokens and time from last/state.json; from the log's last line if there is none."""
    src = state or (records[-1] if records else {})
    elapsed = num(src.get("elapsed"))
    time = _duration(elapsed) if math.isfinite(elapsed) else "–"
    return (f"- **Training:** {_int(src.get('iter'))} iterations, {_int(src.get('tokens_seen'))} tokens seen, "
            f"{time} of training time")


def _loss_lines(records: list[dict[str, Any]], state: dict[str, Any]) -> list[str]:
    evals = _evals(records)
    best = _best(evals)
    if best is None:
        if math.isfinite(num(state.get("best_val_loss"))):
            return [f"- **Best val loss:** {_fmt(state['best_val_loss'])} at iter {_int(state.get('best_iter'))}"]
        return ["- **Best val loss:** no evaluation yet"]
    bpb = num(best.get("val_bpb"))
    lines = [f"- **Best val loss:** {_fmt(best['val_loss'])}"
             + (f" = **{bpb:.4f} bits per byte**" if math.isfinite(bpb) else "")
             + f" at iter {_int(best.get('iter'))} (the weights in `model.safetensors`)"]
    final = evals[-1]
    lines.append(f"- **Last eval** (iter {_int(final.get('iter'))}): train loss {_fmt(final.get('train_loss'))}, "
                 f"val loss {_fmt(final.get('val_loss'))}")
    return lines


def _pick(n: int, k: int, keep: int | None) -> list[int]:
    """About k indices spread evenly over range(n), always with the first, the last and `keep`."""
    if n <= k:
        return list(range(n))
    chosen = {round(i * (n - 1) / (k - 1)) for i in range(k)}
    if keep is not None:
        chosen.add(keep)
    return sorted(chosen)


def _evals_section(records: list[dict[str, Any]]) -> str:
    evals = _evals(records)
    if not evals:
        return ""
    best = _best(evals)
    keep = next((i for i, r in enumerate(evals) if r is best), None)
    rows = _pick(len(evals), MAX_EVAL_ROWS, keep)
    shown = "" if len(rows) == len(evals) else f" ({len(rows)} of {len(evals)}, evenly spaced)"
    lines = [f"## Evaluations{shown}", "", "| iter | train loss | val loss | val bits/byte |", "|---:|---:|---:|---:|"]
    for i in rows:
        r = evals[i]
        val = f"**{_fmt(r.get('val_loss'))}** (best)" if r is best else _fmt(r.get("val_loss"))
        lines.append(f"| {_int(r.get('iter'))} | {_fmt(r.get('train_loss'))} | {val} | {_fmt(r.get('val_bpb'))} |")
    return "\n".join(lines)


def _plots_section(run_dir: Path) -> str:
    found = [(stem, title) for stem, title in PLOT_TITLES.items() if (run_dir / PLOTS / f"{stem}.png").is_file()]
    if not found:
        return f"## Plots\n\nNone yet: `pocketgpt plot {run_dir}` draws them."
    # relative links, so the report and its pictures move together
    return "## Plots\n\n" + "\n\n".join(f"![{title}]({PLOTS}/{stem}.png)" for stem, title in found)


def _config_section(cfg: dict[str, Any]) -> str:
    rows = []
    for section in ("model", "optim", "run", *(("lora",) if lora_summary(cfg) else ())):
        for i, (key, value) in enumerate(cfg.get(section, {}).items()):
            shown = value if isinstance(value, str) else json.dumps(value)
            rows.append(f"| {section if i == 0 else ''} | `{key}` | {shown} |")
    if not rows:
        return "## Config\n\nNo readable `config.json` in the run folder."
    return "\n".join(["## Config", "", "| section | key | value |", "|---|---|---|", *rows])


def _data_section(run_dir: Path, cfg: dict[str, Any]) -> str:
    data_dir = data_dir_of(run_dir, cfg)
    meta = read_json_or_empty(data_dir / META)
    if not meta:
        return f"## Data\n\nNo readable `{META}` in the data folder `{data_dir}` (moved or deleted?)."
    lines = ["## Data", "", f"- **Folder:** `{data_dir}`",
             f"- **Tokenizer:** {meta.get('tokenizer', '?')}, vocabulary {_int(meta.get('vocab_size'))}"]
    for split, counts in meta.get("splits", {}).items():
        lines.append(f"- **{split}:** {_int(counts.get('tokens'))} tokens, {_int(counts.get('bytes'))} bytes")
    sources = meta.get("sources", [])
    if sources:
        lines.append(f"- **Sources** ({len(sources)}):")
        lines += [f"  - `{s.get('path', '?')}` ({_int(s.get('bytes'))} bytes)" for s in sources[:10]]
        if len(sources) > 10:
            lines.append(f"  - … and {len(sources) - 10} more")
    return "\n".join(lines)


def _samples_section(run_dir: Path) -> str:
    try:
        text = (run_dir / SAMPLES).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = text.rstrip().splitlines()[-SAMPLE_LINES:]
    heads = [i for i, line in enumerate(lines) if line.startswith("=== iter ")]
    if heads:  # start at a sample's heading rather than mid-sample
        lines = lines[heads[0]:]
    if not lines:
        return ""
    return "## Last samples\n\n" + _fence("\n".join(lines))
