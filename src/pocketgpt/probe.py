"""What this machine measures, cached per machine: matmul FLOP/s at a model's own shapes, per dtype, and
causal attention's forward and backward at a model's shape, per dtype.

CPUs differ too much to assume (a Zen 4 core does bf16 matmuls ~2x its fp32, an AMX Xeon ~6x, a CPU
without bf16 instructions emulates them slower than fp32; PyTorch's bf16 attention kernels are slower
than its fp32 ones on a Zen 4), so the choices that depend on it (bf16 autocast or not, attention's
dtype under it, the MFU denominator) come from short probes. A probe takes a fraction of a second (an
attention probe up to a few seconds);
its result is kept in a JSON file keyed by the CPU, the thread count and the torch version, so a
machine is measured once, or again when it is quieter than it was then (load only slows a probe
down). A missing or unreadable cache is measured again, never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .config import ModelConfig
from .files import WriteFailed, atomic_write_text, read_json_or_empty

PROBE_SECONDS = 0.05  # per shape; the best of three rounds within it
MAX_ROWS = 2048  # a micro-batch's rows beyond this change the rate little and cost probe time
MAX_HEAD = 8192
CACHE_FILE = "probes.json"
LOAD_MARGIN = 0.25  # per core: a cached rate measured this much busier than now is measured again


def cache_dir() -> Path:
    """POCKETGPT_CACHE_DIR, else $XDG_CACHE_HOME/pocketgpt, else ~/.cache/pocketgpt."""
    if os.environ.get("POCKETGPT_CACHE_DIR"):
        return Path(os.environ["POCKETGPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry (some containers): a shared temporary folder
            base = tempfile.gettempdir()
    return Path(base) / "pocketgpt"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def machine_key(device: torch.device) -> str:
    """What a cached number depends on besides the shapes and dtype."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()} x{os.cpu_count()} threads {torch.get_num_threads()}"
    return f"{device.type}: {where} | torch {torch.__version__}"


def model_shapes(cfg: ModelConfig, rows: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of a GPT block's matmuls and the head for `rows` tokens: qkv, proj, MLP up and down, logits
    (the config's own widths).

    The head's N is capped at MAX_HEAD: a 50,257-token head would make one probe call ~160 GFLOP, and its
    rate changes little past a few thousand columns."""
    m = min(rows, MAX_ROWS)
    blocks = [(m, n_in, n_out) for _, n_in, n_out in cfg.matmul_shapes()]
    return blocks + [(m, cfg.n_embd, min(cfg.vocab_size, MAX_HEAD))]


def matmul_rate(device: torch.device, dtype: torch.dtype, shapes: Iterable[tuple[int, int, int]],
                seconds: float = PROBE_SECONDS, remeasure: bool = False) -> float:
    """FLOP/s doing one of each (M, K, N) matmul: their FLOPs over their summed best times (cached).

    Summed times, not the best shape's rate: a model spends its time in all of them, the thin ones too.
    remeasure: measure even when cached (say a run ran faster than its ceiling: the probe met a busy
    machine); the cache keeps the higher rate, since load only ever slows a probe down.
    """
    shapes = [tuple(int(x) for x in s) for s in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    return _cached_rate(_key(device, dtype, shapes), flops,
                        lambda: sum(_best_time(device, dtype, s, seconds) for s in shapes), remeasure)


def attention_rate(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int],
                   seconds: float = 2 * PROBE_SECONDS, remeasure: bool = False) -> float:
    """FLOP/s of causal attention's forward and backward (SDPA) on (batch, heads, T, head_size) (cached).

    FLOPs are counted by attention_flops (the forward's two products and the backward's four, causal
    masking not subtracted): a rate to compare dtypes by, not an MFU."""
    b, h, t, d = (int(x) for x in shape)
    shape = (b, h, t, d)
    return _cached_rate(_attention_key(device, dtype, shape), attention_flops(shape),
                        lambda: _attention_time(device, dtype, shape, seconds), remeasure)


def _cached_rate(key: str, flops: float, measure: Callable[[], float], remeasure: bool) -> float:
    """flops / measure() seconds, kept under key in the cache; a cached rate is used unless remeasure
    or the machine is quieter now than when it was measured (a probe only ever errs low)."""
    cached = _read_cache().get(key)
    load = _load()
    if cached is not None and not remeasure and load >= cached["load"] - LOAD_MARGIN:
        return cached["flops_per_s"]
    rate = flops / measure()
    if cached is not None and cached["flops_per_s"] >= rate:
        entry = {**cached, "load": min(cached["load"], load)}  # measured again no faster: it stands
    else:
        entry = {"flops_per_s": rate, "load": load}
    write_json(CACHE_FILE, {**_read_cache(), key: entry})
    return entry["flops_per_s"]


def load_now() -> float:
    """The machine's load per core now: what a kept measurement's own load is compared with."""
    return _load()


def _load() -> float:
    """The 1-minute load average per core: how busy the machine was when a rate was measured."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):  # not POSIX: every measurement counts as equally busy
        return 0.0


def _key(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, ...]]) -> str:
    return f"{machine_key(device)} | {str(dtype).replace('torch.', '')} | " + " ".join(
        "x".join(map(str, s)) for s in shapes)


def _matmul(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> Callable[[], object]:
    m, k, n = shape
    # constants, not torch.randn: a probe must never draw from the global RNG (resume stays exact)
    a = torch.full((m, k), 0.5, device=device, dtype=dtype)
    b = torch.full((k, n), 0.25, device=device, dtype=dtype)
    return lambda: a @ b


def _attention(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> Callable[[], object]:
    """One causal SDPA forward and its backward, the way a training step runs them."""
    import torch.nn.functional as F

    q, k, v = (torch.full(shape, x, device=device, dtype=dtype, requires_grad=True) for x in (0.5, 0.25, 0.1))
    grad = torch.full(shape, 0.01, device=device, dtype=dtype)

    def once() -> object:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(out, (q, k, v), grad)

    return once


def _attention_key(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> str:
    return f"{machine_key(device)} | {str(dtype).replace('torch.', '')} | attention " + "x".join(map(str, shape))


def _best_time(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], seconds: float) -> float:
    """Seconds per (M, K, N) matmul in dtype."""
    return _best_of_three(device, _matmul(device, dtype, shape), seconds)


def _attention_time(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int], seconds: float) -> float:
    """Seconds per causal attention forward and backward on (batch, heads, T, head_size) in dtype."""
    return _best_of_three(device, _attention(device, dtype, shape), seconds)


def _best_of_three(device: torch.device, fn: Callable[[], object], seconds: float) -> float:
    for _ in range(2):  # warm-up: oneDNN builds a kernel per shape over the first calls
        fn()
    sync(device)
    best = float("inf")
    for _ in range(3):  # the best of three: another program's burst only slows a round down
        count, start = 0, time.perf_counter()
        while count < 1 or time.perf_counter() - start < seconds / 3:  # a slow shape: one call a round
            fn()
            count += 1
        sync(device)
        best = min(best, (time.perf_counter() - start) / count)
    return best


def sync(device: torch.device) -> None:
    """Wait for a GPU's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _read_cache() -> dict[str, dict[str, float]]:
    """key -> {"flops_per_s": rate, "load": load per core when measured}; anything else in the file is dropped."""
    got = read_json(CACHE_FILE)
    return {k: {"flops_per_s": float(v["flops_per_s"]), "load": float(v["load"])} for k, v in got.items()
            if isinstance(v, dict) and isinstance(v.get("flops_per_s"), (int, float)) and v["flops_per_s"] > 0
            and isinstance(v.get("load"), (int, float))}


def read_json(name: str) -> dict[str, object]:
    """The JSON object in the cache folder's file `name`; {} when it is missing, unreadable or not an object."""
    return read_json_or_empty(cache_dir() / name)


def write_json(name: str, obj: dict[str, object]) -> None:
    """Atomically (a reader never sees half a file); a full or read-only cache folder only costs re-measuring."""
    path = cache_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))
    except (OSError, WriteFailed):
        pass


def bf16_speedup(device: torch.device, n_embd: int = 768, rows: int = 1024) -> float:
    """How much faster bf16 matmuls run than float32 here, at a GPT-2-small-like shape, measured once per
    machine and then kept: the dtype a run chooses must not flip between a run and its resume, or between
    the processes of one torchrun (they wait for each other's measurement through a lock file)."""
    gpt2_like = ModelConfig(n_embd=n_embd, n_head=1)
    shapes = [tuple(s) for s in model_shapes(gpt2_like, rows)[:4]]  # the blocks' matmuls
    return _kept_speedup([_key(device, dt, shapes) for dt in (torch.bfloat16, torch.float32)],
                         lambda dt: matmul_rate(device, dt, shapes, remeasure=True))


ATTENTION_MAX_HEADS = 64  # batch x heads of an attention probe: beyond this the rate changes little
ATTENTION_MAX_WORK = 64 * 256 * 256  # batch x heads x T^2: a long context probes fewer rows (GPT-2's 1024: one)


def attention_probe_shape(batch: int, n_head: int, seq: int, head_size: int) -> tuple[int, int, int, int]:
    """The (batch, heads, T, head_size) an attention probe times for a model: its own heads, context and
    head size, its batch capped so that a probe stays near a second even at a long context."""
    b, h, t, d = (int(x) for x in (batch, n_head, seq, head_size))
    return max(1, min(b, ATTENTION_MAX_HEADS // max(1, h), ATTENTION_MAX_WORK // max(1, h * t * t))), h, t, d


def attention_flops(shape: tuple[int, int, int, int]) -> int:
    """FLOPs an attention probe counts for one forward and backward: 12 * batch * heads * T^2 * head_size."""
    b, h, t, d = shape
    return 12 * b * h * t * t * d


def attention_bf16_speedup(device: torch.device, batch: int, n_head: int, seq: int, head_size: int) -> float:
    """How much faster causal attention (SDPA, forward and backward) runs in bf16 than in float32 at a
    model's own shape (attention_probe_shape), measured once per machine and shape and then kept, as
    bf16_speedup is. PyTorch's CPU kernels differ by CPU: on a Zen 4 core the bf16 ones are slower than
    the fp32 ones at every shape measured (bench/RESULTS.md)."""
    shape = attention_probe_shape(batch, n_head, seq, head_size)
    keys = [_attention_key(device, dt, shape) for dt in (torch.bfloat16, torch.float32)]
    return _kept_speedup(keys, lambda dt: attention_rate(device, dt, shape, remeasure=True))


def float16_rows_speedup(device: torch.device, n_embd: int = 768, rows: int = 16) -> float:
    """How much faster float16 matmuls of a few rows (a batch of decode steps) run than float32 here,
    measured once per machine and then kept. CPUs differ: with AVX512-FP16 (an Intel Xeon) they run at
    float32's speed or better, on a Zen 4 (AVX-512 without it) GPT-2-small's 16-row steps took 2.4x
    float32's time; one-row products are fast on both (decoder.low_precision_candidates)."""
    shapes = [tuple(s) for s in model_shapes(ModelConfig(n_embd=n_embd, n_head=1), rows)[:4]]
    return _kept_speedup([_key(device, dt, shapes) for dt in (torch.float16, torch.float32)],
                         lambda dt: matmul_rate(device, dt, shapes, remeasure=True), low=torch.float16)


def _kept_speedup(keys: list[str], rate: Callable[[torch.dtype], float], low: torch.dtype = torch.bfloat16) -> float:
    """cache[keys[0]] / cache[keys[1]]: the `low` (16-bit) and the float32 rate, each measured twice in
    turns (fp32, low, fp32, low: a busy patch of the machine slows both) when either is missing, under
    the lock, and from then on kept as they are."""
    with locked():
        cached = _read_cache()
        if not all(k in cached for k in keys):
            for _ in range(2):
                for dt in (torch.float32, low):
                    rate(dt)
            cached = _read_cache()
    if not all(k in cached for k in keys):  # an unwritable cache: this process's own measurement
        return rate(low) / rate(torch.float32)
    return cached[keys[0]]["flops_per_s"] / cached[keys[1]]["flops_per_s"]


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """An exclusive lock on the cache folder's lock file (POSIX); without one, no lock, never an error."""
    try:
        import fcntl

        cache_dir().mkdir(parents=True, exist_ok=True)
        f = open(cache_dir() / ".lock", "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
