"""Device and dtype, decided once with the reason; nothing else parses device strings."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PocketError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    reason: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        return f"device {self.device}, {str(self.dtype).replace('torch.', '')} ({self.reason})"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(name: str) -> tuple[torch.device, str]:
    from .distributed import local_rank

    gpu = local_rank()  # under torchrun each process drives the GPU of its local rank
    if gpu is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", gpu), f"{name}: CUDA GPU {gpu} of this machine (local rank {gpu})"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"auto: CUDA GPU {torch.cuda.get_device_name(0)}"
        if _mps_available():
            return torch.device("mps"), "auto: Apple GPU (MPS)"
        return torch.device("cpu"), "auto: no CUDA or MPS GPU found, using the CPU"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PocketError(f"device '{name}' asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
        return torch.device(name), "asked for"
    if name == "mps" and not _mps_available():
        raise PocketError("device 'mps' asked for, but MPS is not available; use --device cpu or auto")
    return torch.device(name), "asked for"


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    if name == "float32":
        return torch.float32, "asked for"
    if name == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise PocketError("this GPU has no bfloat16 support; use --dtype float16 or float32")
        return torch.bfloat16, "asked for"
    if name == "float16":
        if device.type == "cpu":
            raise PocketError("float16 has no fast CPU kernels (it runs ~400x slower); use --dtype bfloat16 or float32")
        return torch.float16, "asked for (with a gradient scaler)"
    # auto: mixed precision where it is fast and safe
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: GPU supports bfloat16"
        return torch.float16, "auto: GPU lacks bfloat16, float16 with a gradient scaler"
    if device.type != "cpu":
        return torch.float32, "auto: float32 on " + device.type
    fast, why = cpu_bf16_choice()
    return (torch.bfloat16 if fast else torch.float32), f"auto: {why}"


# bf16 autocast adds casts and keeps norms, softmax and the optimizer in fp32: below this matmul gain it
# does not pay for them
MIN_BF16_SPEEDUP = 1.3


def cpu_bf16_choice() -> tuple[bool, str]:
    """(bf16 is clearly faster than float32 on this CPU, why): measured by probe.py (cached per machine).

    Only CPUs with AVX512-BF16 or AMX-BF16 (Linux) are measured: elsewhere bf16 is emulated and slower
    than float32. POCKETGPT_CPU_BF16=0/1 overrides both the detection and the measurement.
    """
    forced = os.environ.get("POCKETGPT_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1", f"POCKETGPT_CPU_BF16={forced}"
    if not _cpuinfo_has_bf16():
        return False, "this CPU has no bfloat16 matmul instructions"
    speedup = _measured_bf16_speedup()
    if speedup < MIN_BF16_SPEEDUP:
        return False, f"bfloat16 matmuls measured only {speedup:.1f}x float32 on this CPU"
    return True, f"bfloat16 matmuls measured {speedup:.1f}x float32 on this CPU"


# below this the fp32 path stays: its casts are cheap, and a changed numeric path should buy something
MIN_BF16_ATTENTION_SPEEDUP = 1.1


def cpu_attention_choice(batch: int, n_head: int, seq: int, head_size: int) -> tuple[bool, str]:
    """(attention runs in bf16 too under CPU bf16 autocast, why): PyTorch's CPU attention kernels are
    several times slower in bf16 than in fp32 on some CPUs (Zen 4) and not on others, so probe.py
    measures both at the model's shape (once per machine and shape, kept).
    POCKETGPT_CPU_ATTENTION=bf16/fp32 overrides the measurement."""
    forced = os.environ.get("POCKETGPT_CPU_ATTENTION")
    if forced in ("bf16", "fp32"):
        return forced == "bf16", f"attention in {forced} (POCKETGPT_CPU_ATTENTION)"
    if forced:
        raise PocketError(f"POCKETGPT_CPU_ATTENTION must be bf16 or fp32, got '{forced}'; unset it to measure")
    from .probe import attention_bf16_speedup

    speedup = attention_bf16_speedup(torch.device("cpu"), batch, n_head, seq, head_size)
    if speedup >= MIN_BF16_ATTENTION_SPEEDUP:
        return True, f"attention in bf16 (measured {speedup:.1f}x fp32 at this shape)"
    return False, f"attention in fp32 (bf16 measured {speedup:.2f}x fp32 at this shape)"


def cpu_has_fast_bf16() -> bool:
    """cpu_bf16_choice() without its reason."""
    return cpu_bf16_choice()[0]


@functools.lru_cache(maxsize=1)
def _measured_bf16_speedup() -> float:
    from .probe import bf16_speedup

    return bf16_speedup(torch.device("cpu"))


@functools.lru_cache(maxsize=1)
def _cpuinfo_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve(device: str = "auto", dtype: str = "auto") -> Runtime:
    dev, dev_reason = resolve_device(device)
    dt, dt_reason = resolve_dtype(dtype, dev)
    return Runtime(dev, dt, f"{dev_reason}; {dt_reason}")


def matmul_flops(runtime: Runtime, seconds: float = 0.1) -> float:
    """FLOP/s of square matmuls on this device and dtype, measured for ~`seconds` (probe.py: cached per machine).

    A quick probe rather than a table, because CPUs differ by 10x; sizing.EFFICIENCY turns it into
    the throughput a small GPT's training step reaches.
    """
    from .probe import matmul_rate

    n = 2048 if runtime.is_cuda else 512  # big enough to be compute-bound, small enough to be quick
    # float32 on CPUs: sizing.EFFICIENCY was measured against it (bf16 gets its own factor there)
    dtype = torch.float32 if runtime.device.type == "cpu" else runtime.dtype
    return matmul_rate(runtime.device, dtype, [(n, n, n)], seconds)


def device_memory_mb(runtime: Runtime) -> float:
    """Total memory of the device in MB: the GPU's own on CUDA, the machine's RAM otherwise (0 if unknown)."""
    if runtime.is_cuda:
        return torch.cuda.get_device_properties(runtime.device).total_memory / 2**20
    return machine_memory_mb()


def machine_memory_mb() -> float:
    """The machine's RAM in MB (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):  # not POSIX: no figure, so no refusal
        return 0.0


def process_memory_mb() -> tuple[float, float] | None:
    """(resident now, the peak so far) of this process in MB, from /proc/self/status; None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("VmRSS", "VmHWM")}
    return (kb["VmRSS"] / 1024, kb["VmHWM"] / 1024) if len(kb) == 2 else None
