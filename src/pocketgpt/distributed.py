"""Several processes training one model (torchrun): who is who, the process group, what the ranks agree on.

torchrun starts one process per GPU (or per share of a CPU's cores) with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE and a rendezvous address in the environment. Without them (or with WORLD_SIZE 1) a run
is one process and everything here is a no-op, so the single-process path stays as it was.

This module owns, for the rest of the package:
  from_env / check_world   the ranks torchrun gave, refused early when the batch does not split over them
  session()                the process group (nccl on CUDA, gloo on CPU) with an explicit timeout, torn
                           down on every exit; CPU threads per rank; a lost rank turned into one line
  Group                    rank, world, the share of a micro-batch; agree() (stop flag and clock),
                           sums() (eval losses), gathered(), any_true(), main_first() (rank 0 writes,
                           others wait)
  check_replicas()         DDP's copies of the weights still equal on every rank (checked at every eval)
The model is wrapped in DistributedDataParallel, or sharded with FSDP2 (fsdp.py) under --parallel fsdp, by
stepmodel.StepModel: gradients are averaged by torch, never here. Faults that tests inject into ranks are
faults.py's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

from .errors import PocketError

ENV_TIMEOUT = "POCKETGPT_DIST_TIMEOUT"  # seconds a collective may wait for a missing rank
ENV_THREADS = "POCKETGPT_THREADS"  # CPU threads per rank (default: this machine's cores // its ranks)
DEFAULT_TIMEOUT_S = 600.0  # long enough for ranks that compile at different speeds, short enough to notice
# Waits where rank 0 works alone (preparing a large corpus, writing checkpoints) go through a second,
# CPU-side group that waits this long: a slow disk is not a dead rank.
PATIENT_TIMEOUT_S = 24 * 3600.0
T = TypeVar("T")


class FollowedError(PocketError):
    """An error every rank meets alike, or one rank 0 met and told the others: rank 0 alone prints it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.quiet = _env_int("RANK", 0) != 0  # read by cli.main: the other ranks exit 2 without a line


class RankLost(PocketError):
    """This rank lost the others (one died, hung or was cut off): the run stops on every rank."""


class _Terminated(Exception):
    """SIGTERM during a session: torchrun ends the survivors as soon as one rank fails, maybe before they
    noticed; raised so the survivor still says which rank is gone instead of vanishing without a word."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated("this rank got SIGTERM: torchrun stops the others when one rank fails")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of one training run; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S
    threads: str = ""  # what was decided about CPU threads, for the log

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def share(self) -> tuple[int, int]:
        """(rank, world size): which slice of every global micro-batch this rank computes (data.BatchSampler)."""
        return self.rank, self.world_size

    def describe(self, batch_size: int, how: str = "DDP") -> str:
        return (f"distributed ({how}): {self.world_size} processes ({self.backend}, {self.local_world_size} on this "
                f"machine, timeout {self.timeout_s:.0f}s) | each rank computes {batch_size // self.world_size} of "
                f"the {batch_size} rows of every micro-batch{' | ' + self.threads if self.threads else ''}")

    # -- what the ranks agree on ------------------------------------------------
    def _reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sums(self, values: list[float]) -> list[float]:
        """values summed over the ranks (each rank's own share of eval batches, say), the same on every rank."""
        return self._reduce(values) if self.enabled else list(values)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor (the loss of this rank's rows) averaged over the ranks: the loss of the global batch."""
        if not self.enabled:
            return value
        t = value.detach().clone()
        torch.distributed.all_reduce(t)
        return t / self.world_size

    def gathered(self, values: list[float]) -> list[list[float]]:
        """Every rank's values (the same count on each), on every rank: row r is rank r's. One all_reduce of
        a world x n table in which each rank fills its own row."""
        if not self.enabled:
            return [list(values)]
        n = len(values)
        table = [0.0] * (n * self.world_size)
        table[self.rank * n:(self.rank + 1) * n] = values
        flat = self._reduce(table)
        return [flat[r * n:(r + 1) * n] for r in range(self.world_size)]

    def any_true(self, flag: bool) -> bool:
        return bool(self._reduce([float(flag)])[0]) if self.enabled else flag

    def agree(self, stop: bool, elapsed: float) -> tuple[bool, float]:
        """One small all_reduce at the end of every step: stop if any rank wants to (Ctrl-C on one machine,
        a signal), and one clock (the mean of the ranks'), so max_time and the schedule that follows it end
        every rank at the same step with the same learning rate."""
        if not self.enabled:
            return stop, elapsed
        n_stop, total = self._reduce([float(stop), elapsed])
        return n_stop > 0, total / self.world_size

    def main_first(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs fn (prepare the data, write files, take the lock); the others wait as long as it takes
        and get its result (picklable), or stop with one line when it failed (rank 0 prints the reason)."""
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:
                box[0] = ("error", f"rank 0 stopped ({type(e).__name__}: {str(e)[:300]})")
                with contextlib.suppress(Exception):  # the others may be gone already: rank 0's error matters
                    _broadcast(box)
                raise
            box[0] = ("ok", result)
            _broadcast(box)
            return result
        _broadcast(box)
        status, value = box[0]
        if status != "ok":
            raise FollowedError(value)
        return value


_SINGLE = Group()
_state: dict[str, Any] = {"group": _SINGLE, "depth": 0, "patient": None}


def current() -> Group:
    """The group of the running session (a single process outside one)."""
    return _state["group"]


def _broadcast(box: list[Any]) -> None:
    """box[0] from rank 0 to every rank, as JSON (broadcast_object_list would unpickle it, and nothing in
    pocketgpt loads pickles): the length, then the UTF-8 bytes, over the patient CPU group."""
    group = _state["patient"]
    data = json.dumps(_to_json(box[0])).encode() if torch.distributed.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    torch.distributed.broadcast(size, src=0, group=group)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
    torch.distributed.broadcast(buf, src=0, group=group)
    box[0] = _from_json(json.loads(bytes(buf.numpy()).decode()))


def _to_json(v: Any) -> Any:
    """What main_first hands over (paths, a TrainConfig, tuples, plain values) in a JSON-able form."""
    from .config import TrainConfig

    if isinstance(v, Path):
        return {"__path__": str(v)}
    if isinstance(v, TrainConfig):
        return {"__train_config__": v.to_dict()}
    if isinstance(v, (tuple, list)):
        return {"__seq__": [_to_json(x) for x in v], "tuple": isinstance(v, tuple)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"main_first cannot hand a {type(v).__name__} to the other ranks")


def _from_json(v: Any) -> Any:
    from .config import TrainConfig

    if isinstance(v, dict):
        if "__path__" in v:
            return Path(v["__path__"])
        if "__train_config__" in v:
            return TrainConfig.from_dict(v["__train_config__"])
        if "__seq__" in v:
            items = [_from_json(x) for x in v["__seq__"]]
            return tuple(items) if v["tuple"] else items
    return v


# ---------------------------------------------------------------- before the process group

def world_from_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) as torchrun sets them; (0, 1, 0, 1) without it."""
    world = _env_int("WORLD_SIZE", 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return _env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), local_world


def local_rank() -> int | None:
    """The GPU index this process should use under torchrun; None for a single process."""
    _, world, local, _ = world_from_env()
    return local if world > 1 else None


def check_world(batch_size: int, parallel: str = "auto", world: int | None = None, small_batch: int = 0) -> None:
    """Refuse, before any process group or prepare, a batch that does not split into equal shares (each
    rank takes batch_size / world rows of every micro-batch, so the global batch, and with it the training,
    is the same whatever the world size). DDP and FSDP split the batch alike; what FSDP cannot train is
    refused by fsdp.check, which needs the whole config. small_batch (small batches first) splits alike:
    its doublings then do too."""
    world = world_from_env()[1] if world is None else world
    if world > 1 and small_batch % world:
        raise FollowedError(f"small_batch {small_batch} does not split over {world} processes (each takes an equal "
                            f"share of every micro-batch); use small_batch {max(world, small_batch // world * world)}")
    if world <= 1 or batch_size % world == 0:
        return
    worlds = [n for n in range(2, batch_size + 1) if batch_size % n == 0]
    lower, upper = batch_size // world * world, (batch_size // world + 1) * world
    sizes = f"batch_size {lower} or {upper}" if lower else f"batch_size {upper}"
    raise FollowedError(
        f"batch_size {batch_size} does not split over {world} processes (each takes an equal share of every "
        f"micro-batch); use {sizes} (raise --grad-accum-steps to keep the tokens per step), or run "
        + (f"{_either(worlds)} processes" if worlds else "a single process"))


def _either(numbers: list[int]) -> str:
    """[2, 4, 8] -> '2, 4 or 8'."""
    words = [str(n) for n in numbers]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise FollowedError(f"{ENV_TIMEOUT}={raw!r}: give the seconds a rank may wait for the others, e.g. 600")
    if value <= 0:
        raise FollowedError(f"{ENV_TIMEOUT} must be positive, got {raw}")
    return value


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(local_world: int) -> str:
    """CPU ranks on one machine share its cores: each gets cores // ranks (at least 1) unless POCKETGPT_THREADS
    says otherwise. torchrun's own OMP_NUM_THREADS=1 would leave most cores idle with few ranks."""
    raw = os.environ.get(ENV_THREADS)
    if raw:
        try:
            n = max(1, int(raw))
        except ValueError:
            raise FollowedError(f"{ENV_THREADS}={raw!r}: give a number of threads per rank, e.g. 4") from None
        why = f"{ENV_THREADS}={raw}"
    else:
        n = max(1, _cores() // local_world)
        why = f"{_cores()} cores // {local_world} ranks on this machine"
    torch.set_num_threads(n)
    return f"{n} CPU thread{'s' if n > 1 else ''} per rank ({why})"


# ---------------------------------------------------------------- the session

@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Group]:
    """The process group for one training under torchrun (a no-op for one process; re-entrant, so launch()
    and train() may both open it): nccl on CUDA, gloo on CPU, an explicit timeout, torn down however the
    block ends. A collective that fails because a rank died or hung becomes one line naming that rank."""
    rank, world, local, local_world = world_from_env()
    if world <= 1:
        yield _SINGLE
        return
    if _state["depth"]:
        _state["depth"] += 1
        try:
            yield _state["group"]
        finally:
            _state["depth"] -= 1
        return
    _check_device(device, local, local_world)
    timeout = _timeout_s()
    backend = "nccl" if device.type == "cuda" else "gloo"
    threads = set_threads(local_world) if device.type == "cpu" else ""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = torch.distributed
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout), rank=rank, world_size=world)
    group = Group(rank, world, local, local_world, backend, device, timeout, threads)
    _state.update(group=group, depth=1)
    previous = _set_sigterm(_on_sigterm)
    try:
        # a CPU-side group for rank 0's long solo work (prepare, saves) and for passing small objects
        _state["patient"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=PATIENT_TIMEOUT_S))
        yield group
    except PocketError:
        raise
    except Exception as e:  # noqa: BLE001 - only lost ranks are rewritten; anything else passes through
        if not _is_comm_error(e):
            raise
        # torchrun ends the survivors (SIGTERM) as soon as one rank dies: finish the message first
        with _sigterm_ignored():
            message = _lost_message(group, e)
        raise RankLost(message) from None
    finally:
        _set_sigterm(previous)
        _state.update(group=_SINGLE, depth=0, patient=None)
        with contextlib.suppress(Exception):  # a broken group may refuse a clean teardown; exiting is what matters
            dist.destroy_process_group()


def _check_device(device: torch.device, local: int, local_world: int) -> None:
    if device.type == "mps":
        raise FollowedError("several processes on an Apple GPU (MPS) are not supported (no collective backend "
                            "runs there); train in one process, or give --device cpu")
    if device.type == "cuda" and local_world > torch.cuda.device_count():
        raise FollowedError(f"torchrun started {local_world} processes on this machine but it has "
                            f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node={torch.cuda.device_count()} "
                            "(one process a GPU)")


def _set_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler; the one it replaces (None off the main thread, where none can be set)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


@contextlib.contextmanager
def _sigterm_ignored() -> Iterator[None]:
    previous = _set_sigterm(signal.SIG_IGN)
    try:
        yield
    finally:
        _set_sigterm(previous)


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, (torch.distributed.DistError, _Terminated)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed", "Connection reset", "Timed out", "timed out", "gloo", "NCCL",
                            "Broken pipe"))


def _lost_message(group: Group, e: BaseException) -> str:
    missing = _missing_ranks(group)
    who = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}" if missing
           else "another rank")
    return (f"rank {group.rank} lost contact with {who} (it died, hung or was cut off; its own output says why) "
            f"and stops here ({_reason(e)}). What was saved (last/) is intact: resume with --resume, on any "
            f"number of processes; a rank waits {group.timeout_s:.0f}s ({ENV_TIMEOUT}) before giving up")


def _reason(e: BaseException) -> str:
    """gloo's or NCCL's first sentence, without the source file it names: 'Read error ...: Connection reset'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
    return (text.split(". ")[0][:160] or type(e).__name__).rstrip(".")


def _missing_ranks(group: Group, wait_s: float = 2.0) -> list[int]:
    """Ranks that do not answer a roll call in the rendezvous store (each survivor checks in, then waits a
    little for the others); [] when the store cannot be reached."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()  # the rendezvous's own key-value store
        store.set(f"pocketgpt/alive/{group.rank}", "1")
        deadline = time.monotonic() + wait_s
        missing = list(range(group.world_size))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"pocketgpt/alive/{r}"])]
            time.sleep(0.1)
        return missing
    except Exception:  # noqa: BLE001 - the store lived with the lost rank: say less, not nothing
        return []


# ---------------------------------------------------------------- replicas that must stay equal

REPLICA_RTOL = 1e-6  # equal replicas agree exactly; a skipped or doubled step moves a checksum by far more


class ReplicasDiffer(FollowedError):
    """DDP's copies of the weights are no longer the same on every rank (every rank sees it alike)."""


def check_replicas(group: Group, named: list[tuple[str, torch.Tensor]], it: int) -> None:
    """Every rank of a DDP run holds the same weights: compare two checksums a tensor (sum, sum of squares,
    in float64) across the ranks and stop every rank with one line naming the first that drifted. DDP
    itself never notices (it only averages gradients), so drifted replicas would train on silently apart."""
    if not group.enabled:
        return
    sums: list[float] = []
    with torch.no_grad():
        for _, t in named:
            d = t.detach().double()
            sums += [float(d.sum()), float(d.square().sum())]
    table = group.gathered(sums)
    # a sum's rounding scales with sum(|x|) <= sqrt(n * sum(x^2)), not with the sum itself (which may be ~0)
    scales = [math.sqrt(t.numel() * max(table[0][2 * i + 1], 0.0)) for i, (_, t) in enumerate(named)]
    for r, row in enumerate(table[1:], start=1):
        for i, (a, b) in enumerate(zip(table[0], row)):
            scale = scales[i // 2] if i % 2 == 0 else max(abs(a), abs(b))
            if not abs(a - b) <= REPLICA_RTOL * max(scale, 1e-12):  # written so that a NaN on either side fails
                raise ReplicasDiffer(
                    f"the weights differ across ranks at iter {it}: {named[i // 2][0]} on rank {r} is not rank 0's "
                    f"(checksum {b:.9g} vs {a:.9g}); the copies drifted apart (faulty hardware, or a rank that "
                    "computed something else), so this run stops before saving them. Resume from the last good "
                    "checkpoint with --resume (rank 0's weights; any number of processes), and check that rank's "
                    "machine if it happens again")

