"""Pictures of training runs: RUN_DIR/plots/*.png drawn from metrics.jsonl, and several runs overlaid.

Torch-free. matplotlib is imported only inside the drawing functions, so importing this module and
`pocketgpt --help` stay cheap; without matplotlib, drawing is a PocketError that says how to install
it (training reports that as a warning and goes on). Figures are made
with `matplotlib.figure.Figure` rather than pyplot: that needs no display and no backend choice, and
it leaves the backend of a notebook that calls `train()` untouched.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .errors import PocketError
from .files import atomic_write
from .metrics import read_metrics
from .rundir import METRICS, PLOTS, read_raw_config

DPI = 110
SINGLE_SIZE = (8.0, 4.5)  # inches: 880 x 495 px at DPI
COMPARE_SIZE = (13.0, 5.0)
TRAIN_COLOR, EVAL_TRAIN_COLOR, VAL_COLOR, BEST_COLOR = "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"

# file stem -> (metric key, title, y label, log y axis); each is one series against the iteration
SIMPLE = {
    "lr": ("lr", "Learning rate schedule", "learning rate", False),
    "grad_norm": ("grad_norm", "Gradient norm (before clipping)", "L2 norm of all gradients", True),
    "step_time": ("ms_per_iter", "Time per iteration", "ms / iteration", False),
    "tokens_per_s": ("tokens_per_s", "Training throughput", "tokens / second", False),
}


# ---------------------------------------------------------------- reading

def read_run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of a run folder; PocketError (one line) when the folder is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PocketError(f"{run_dir} is not a folder; give a run folder (the --out of pocketgpt train)")
    if not (run_dir / METRICS).is_file():
        raise PocketError(f"{run_dir} is not a pocketgpt run folder (no {METRICS})")
    return read_metrics(run_dir / METRICS)


def num(value: Any) -> float:
    """A metric as a float; missing, "nan", "inf" or junk become nan (the log writes NaN as a string)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def series(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """The finite (x, y) pairs of the records that carry both keys."""
    xs, ys = [], []
    for r in records:
        x, y = num(r.get(x_key)), num(r.get(y_key))
        if math.isfinite(x) and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _fill_tokens_seen(records: list[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    """Older eval lines lack tokens_seen: derive it from the iteration and the run's batch shape."""
    cfg = read_raw_config(run_dir)
    run, model = cfg.get("run", {}), cfg.get("model", {})
    per_iter = num(run.get("batch_size")) * num(run.get("grad_accum_steps", 1)) * num(model.get("block_size"))
    if not math.isfinite(per_iter):
        return records
    return [r if "tokens_seen" in r or "iter" not in r else {**r, "tokens_seen": num(r["iter"]) * per_iter}
            for r in records]


# ---------------------------------------------------------------- figure helpers

def _require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise PocketError("drawing plots needs matplotlib: pip install 'matplotlib>=3.7'")


def _figure(size: tuple[float, float], right: float = 0.3, top: float = 0.4, wspace: float = 0.2) -> Any:
    """A figure with fixed margins in inches (left and bottom fit tick labels plus an axis label; right
    makes room for a secondary axis). Fixed margins rather than layout="constrained": that layout
    engine tripled the drawing time, and these figures are redrawn at every eval.
    """
    from matplotlib.figure import Figure

    w, h = size
    fig = Figure(figsize=size, dpi=DPI)
    fig.subplots_adjust(left=0.9 / w, right=1 - right / w, bottom=0.6 / h, top=1 - top / h, wspace=wspace)
    return fig


def _save(fig: Any, path: Path) -> Path:
    """Write the PNG under a temporary name, then rename: a reader never sees half a picture.

    No fsync: a plot is redrawn at the next eval, so losing one to a power cut costs nothing.
    """
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=DPI), fsync=False)
    return path


def _style(ax: Any, title: str, ylabel: str, xlabel: str = "iteration") -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    if xlabel == "iteration":
        # whole iterations only: around a lone point the default ticks read "10 10 10 10"
        ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True, min_n_ticks=1))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged yet", ha="center", va="center", transform=ax.transAxes,
            fontsize=11, color="0.45")


def _line(ax: Any, xs: list[float], ys: list[float], **kw: Any) -> None:
    """ax.plot that still shows a lone point (a one-point line is invisible)."""
    if len(xs) == 1:
        kw.update(marker="o", alpha=1.0)
    ax.plot(xs, ys, **kw)


def _smooth(ys: list[float]) -> list[float]:
    """Centred running mean over about 1/25 of the points: shows the trend without lagging behind it."""
    half = max(1, len(ys) // 50)
    sums = [0.0]
    for y in ys:
        sums.append(sums[-1] + y)
    out = []
    for i in range(len(ys)):
        lo, hi = max(0, i - half), min(len(ys), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


# ---------------------------------------------------------------- one run's panels

def _draw_loss(ax: Any, records: list[dict[str, Any]], name: str) -> bool:
    it, loss = series(records, "iter", "loss")
    ei, etrain = series(records, "iter", "train_loss")
    vi, vloss = series(records, "iter", "val_loss")
    _style(ax, _title("Loss", name), "cross-entropy loss (nats / token)")
    if not (it or ei or vi):
        _no_data(ax, "loss")
        return False
    if it:
        _line(ax, it, loss, color=TRAIN_COLOR, lw=0.8, alpha=0.3, label="train loss (one batch)")
    smooth = _smooth(loss) if len(it) >= 50 else []
    if smooth:  # single batches are noisy; a running mean shows the trend
        ax.plot(it, smooth, color=TRAIN_COLOR, lw=1.3, label="train loss (running mean)")
    ms = _marker_size(len(vi))
    if ei:
        ax.plot(ei, etrain, "o-", color=EVAL_TRAIN_COLOR, ms=ms, lw=1.5, label="train loss (eval)")
    if vi:
        ax.plot(vi, vloss, "s-", color=VAL_COLOR, ms=ms, lw=1.8, label="val loss (eval)")
        _mark_best(ax, vi, vloss)
    if smooth:  # the first noisy batches would stretch the axis and flatten everything after them
        _top_at(ax, smooth + etrain + vloss)
    twin = _bits_per_byte_axis(ax, records)
    top = twin or ax  # the legend goes on the axes drawn last, or that axes' line would cross it
    handles = [h for a in (ax, twin) if a is not None for h in a.get_legend_handles_labels()[0]]
    top.legend(handles=handles, fontsize=9, loc="upper right")  # losses fall: the emptiest corner
    return True


def _marker_size(n: int) -> float:
    """Markers show where the evals are; past ~60 they merge into a thick line, so they shrink away."""
    return 4.0 if n <= 30 else 2.5 if n <= 60 else 0.0


def _top_at(ax: Any, values: list[float]) -> None:
    low, high = min(values), max(values)
    ax.set_ylim(top=high + 0.08 * max(high - low, 1e-3))  # called last: set_ylim stops autoscaling


def _mark_best(ax: Any, iters: list[float], losses: list[float]) -> None:
    i = min(range(len(losses)), key=losses.__getitem__)
    ax.plot([iters[i]], [losses[i]], "*", color=BEST_COLOR, ms=13, zorder=5,
            label=f"best val {losses[i]:.4f} @ iter {iters[i]:,.0f}")


def _bits_per_byte_axis(ax: Any, records: list[dict[str, Any]]) -> Any:
    """Right axis: val loss read as bits per byte, the number that compares across tokenizers.

    bpb is val loss times a constant of the data (log2 e / bytes per token), so a derived axis shows
    it without drawing the same curve twice. If the constant changed (data swapped on resume), the
    bpb values are drawn as their own line on a twin axes, which is returned.
    """
    pairs = [(num(r.get("val_loss")), num(r.get("val_bpb"))) for r in records]
    ratios = [b / v for v, b in pairs if math.isfinite(v) and math.isfinite(b) and v > 0]
    if not ratios:
        return None
    k = ratios[-1]
    if all(abs(r - k) <= 1e-6 * k for r in ratios):
        sec = ax.secondary_yaxis("right", functions=(lambda y: y * k, lambda b: b / k))
        sec.set_ylabel("val loss in bits per byte", fontsize=10)
        return None
    twin = ax.twinx()
    bi, bpb = series(records, "iter", "val_bpb")
    twin.plot(bi, bpb, "^--", color="0.35", ms=4, lw=1.0, label="val bits per byte (right axis)")
    twin.set_ylabel("val bits per byte", fontsize=10)
    return twin


def _draw_simple(ax: Any, records: list[dict[str, Any]], stem: str, clip: float, name: str) -> bool:
    key, title, ylabel, log = SIMPLE[stem]
    xs, ys = series(records, "iter", key)
    if log:
        xs, ys = [x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0]
    _style(ax, _title(title, name), ylabel)
    if not xs:
        _no_data(ax, ylabel if stem != "grad_norm" else "gradient norm (clipping off?)")
        return False
    _line(ax, xs, ys, color=TRAIN_COLOR, lw=1.3)
    if log:
        _log_y(ax, min(ys), max(ys + [clip]))
    else:
        ax.set_ylim(bottom=0)  # from zero, so small jitter does not look like a big swing
    _format_y(ax, stem)
    if stem == "grad_norm" and clip > 0:
        ax.axhline(clip, color=VAL_COLOR, ls="--", lw=1.0, label=f"grad_clip = {clip:g} (larger norms are scaled down)")
        ax.legend(fontsize=9, loc="upper right")
    if stem == "step_time":
        _clip_spikes(ax, ys)
    return True


def _log_y(ax: Any, low: float, top: float) -> None:
    """Log axis with plain tick labels (0.4, 0.6, 1 rather than 4x10^-1) and room above for a legend.

    Within one decade the minor ticks are labelled too, or the axis might show a single number.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda y, _: f"{y:g}")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 1.6)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if top * 1.6 / low < 10 else NullFormatter())
    ax.grid(True, which="minor", alpha=0.15, linewidth=0.5)


def _title(what: str, name: str) -> str:
    return f"{what} — {name}" if name else what


def _format_y(ax: Any, stem: str) -> None:
    from matplotlib.ticker import EngFormatter, FuncFormatter

    if stem == "lr":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.1e}" if y else "0"))
    elif stem == "tokens_per_s":
        ax.yaxis.set_major_formatter(EngFormatter(sep=" "))


def _clip_spikes(ax: Any, ys: list[float]) -> None:
    """A compile or warm-up step can take 1000x a normal one; cap the axis so the rest stays readable."""
    typical = statistics.median(ys)
    if max(ys) <= 4 * typical:
        return
    top = 3 * typical
    ax.set_ylim(0, top)
    over = sum(y > top for y in ys)
    ax.text(0.99, 0.97, f"{over} point{'s' if over > 1 else ''} off the top (highest {max(ys):,.0f} ms)",
            transform=ax.transAxes, ha="right", va="top", fontsize=9, color="0.3")


# ---------------------------------------------------------------- public

def write_plots(run_dir: Path) -> list[Path]:
    """Draw RUN_DIR/plots/{loss,lr,grad_norm,step_time,tokens_per_s}.png from metrics.jsonl.

    A picture with nothing to show (an empty log, grad_norm with clipping off) is not written.
    Returns the paths written. Training calls this at every eval and its time counts against
    --max-time, so there is no overview figure repeating the five (report.md shows them together).
    """
    run_dir = Path(run_dir)
    records = read_run_metrics(run_dir)
    if not records:
        return []
    _require_matplotlib()
    out = run_dir / PLOTS
    out.mkdir(exist_ok=True)
    clip = num(read_raw_config(run_dir).get("optim", {}).get("grad_clip"))
    written = []
    name = run_dir.resolve().name
    fig = _figure(SINGLE_SIZE, right=0.85)  # room for the bits-per-byte axis
    if _draw_loss(fig.add_subplot(), records, name):
        written.append(_save(fig, out / "loss.png"))
    for stem in SIMPLE:
        fig = _figure(SINGLE_SIZE)
        if _draw_simple(fig.add_subplot(), records, stem, clip, name):
            written.append(_save(fig, out / f"{stem}.png"))
    return written


def compare_runs(run_dirs: list[Path], out: Path) -> Path:
    """Overlay the eval losses of several runs, against iterations and against tokens seen; one PNG at out."""
    runs = [(label, _fill_tokens_seen(read_run_metrics(d), d)) for label, d in zip(_labels(run_dirs), run_dirs)]
    _require_matplotlib()
    from matplotlib.lines import Line2D

    fig = _figure(COMPARE_SIZE, top=0.75)  # room for the figure title above the panel titles
    by_iter, by_tokens = fig.subplots(1, 2, sharey=True)
    _style(by_iter, "Loss against iterations", "cross-entropy loss (nats / token)")
    _style(by_tokens, "Loss against training tokens", "cross-entropy loss (nats / token)", "tokens seen")
    _format_tokens_axis(by_tokens)
    handles = []
    for i, (label, records) in enumerate(runs):
        color = f"C{i % 10}"
        # `|`, not `or`: both panels must be drawn
        drawn = _draw_run(by_iter, records, "iter", color) | _draw_run(by_tokens, records, "tokens_seen", color)
        handles.append(Line2D([], [], color=color, lw=2, label=label if drawn else f"{label} (no evals yet)"))
    handles += [Line2D([], [], color="0.2", marker="o", ms=3, label="val loss"),
                Line2D([], [], color="0.2", ls="--", alpha=0.6, label="train loss (eval)")]
    by_tokens.legend(handles=handles, fontsize=9, loc="upper right")
    fig.suptitle(f"{len(runs)} runs compared" if len(runs) > 1 else f"Loss — {runs[0][0]}", fontsize=14)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)


def _draw_run(ax: Any, records: list[dict[str, Any]], x_key: str, color: str) -> bool:
    vx, vy = series(records, x_key, "val_loss")
    tx, ty = series(records, x_key, "train_loss")
    if vx:
        ax.plot(vx, vy, "o-", color=color, ms=min(3.0, _marker_size(len(vx))), lw=1.6)
    if tx:
        ax.plot(tx, ty, "--", color=color, lw=1.1, alpha=0.6)
    return bool(vx or tx)


def _format_tokens_axis(ax: Any) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=" "))  # 1.5 M rather than 1500000
    ax.tick_params(axis="y", labelleft=True)  # sharey hides them; each panel should read alone


def _labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, with the parent folder added where two runs share a name."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [n if names.count(n) == 1 else f"{Path(d).resolve().parent.name}/{n}" for n, d in zip(names, run_dirs)]
