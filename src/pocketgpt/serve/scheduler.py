"""The scheduler: one thread owns the model and the engine and steps every request in turn.

Each request becomes a `Job`: its prompts, one SamplingSettings, a `deliver` callback (the web
side puts events on the request's asyncio queue with loop.call_soon_threadsafe) and a deadline.
The thread admits waiting jobs between turns (up to Limits.max_active generating at once), starts
one engine TokenStream per prompt wrapped in sampling.TextStream (decoding, stop strings, finish
reasons), and then goes round-robin: one turn per stream, a turn being one Chunk of its
TextStream.chunks() (one engine step, or a few when text is held back: a possible stop string
or a character split over tokens). Events per job: STARTED once every prompt is prefilled (so a
bad prompt is still a plain 400), a Chunk per piece of text, then DONE, or one ApiError instead.

The thread also feeds metrics.Metrics (GET /metrics): tokens generated and inter-token latency
per stream (from the engine stream's completion_tokens), time to first text per job.

A job whose client left (cancel()) or whose deadline passed has its streams closed at its next
turn (TokenStream.close() frees the KV cache). Any error inside one job ends only that job.

Swapping in true batching later: `RoundRobinScheduler._turn` is the only place that steps
streams. A batched scheduler keeps submit / cancel / stop and the events, and replaces `_turn`
with one forward over all active requests (one KV row per request at its own position); the web
side does not change.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Iterator

from ..errors import PocketError
from ..sampling import Chunk, SamplingSettings
from .api import ApiError, Limits
from .metrics import Metrics

STARTED = "started"
DONE = "done"


class Job:
    """One request as the scheduler sees it; `cancelled` is set from the web thread (a plain flag)."""

    def __init__(self, prompts: list[str], settings: SamplingSettings, deliver: Callable[[Any], None],
                 timeout_s: float):
        self.prompts, self.settings, self.deliver = prompts, settings, deliver
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self.first_text = False  # its first text has gone out (time to first token is measured once)
        self.cancelled = False
        self.open = 0  # streams still running
        self.ended = False


class _Unit:
    """One prompt of a job: its TextStream's chunks, its engine stream, and its choice offset."""

    def __init__(self, job: Job, text_stream: Any, offset: int):
        self.job, self.tokens, self.offset = job, text_stream.tokens, offset
        self.chunks: Iterator[Chunk] = text_stream.chunks()
        self.counted = 0  # tokens already counted in the metrics
        self.last: float | None = None  # when its previous tokens came


class RoundRobinScheduler:
    """Owns the model (loaded on its own thread) and the engine; see the module docstring."""

    def __init__(self, load: Callable[[], Any], limits: Limits,
                 on_load_error: Callable[[str], None] | None = None, metrics: Metrics | None = None):
        self._load, self.limits, self._on_load_error = load, limits, on_load_error
        self.metrics = metrics if metrics is not None else Metrics()
        self._cv = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._units: list[_Unit] = []
        self._stopping = False
        self.model: Any = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="pocketgpt-scheduler", daemon=True)

    # ---------------------------------------------------------------- the web side

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it: 429 when the waiting queue is full, 503 when stopping."""
        with self._cv:
            if self._stopping:
                raise ApiError("the server is shutting down", status=503, kind="server_error")
            if len(self._pending) >= self.limits.max_queue:
                raise ApiError(f"the server is busy ({self.limits.max_queue} requests waiting); retry shortly",
                               status=429, kind="rate_limit_error",
                               headers={"Retry-After": str(self.limits.retry_after_s)})
            self._pending.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client left: its streams are closed at their next turn (a no-op once it has ended)."""
        job.cancelled = True
        with self._cv:
            self._cv.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End every job (503) and the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def active(self) -> int:
        return len(self._units)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def active_samples(self) -> int:
        """Sample streams generating (n per prompt: one engine row each)."""
        return sum(u.job.settings.num_samples for u in list(self._units))

    @property
    def active_requests(self) -> int:
        return len({id(u.job) for u in list(self._units)})

    # ---------------------------------------------------------------- the scheduler thread

    def _run(self) -> None:
        try:
            self.model = self._load()
        except Exception as e:  # noqa: BLE001 - any failure to load is reported as one line
            self.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            if self._on_load_error is not None:
                self._on_load_error(self.load_error)
            return
        self.ready.set()
        while (admitted := self._wait_for_work()) is not None:
            for job in admitted:
                self._start(job)
            self._turn()
        self._end_all()

    def _wait_for_work(self) -> list[Job] | None:
        """The jobs to start now (maybe none); None when stopping."""
        with self._cv:
            while not self._stopping and not self._pending and not self._units:
                self._cv.wait()
            if self._stopping:
                return None
            running = len({id(u.job) for u in self._units})
            room = max(0, self.limits.max_active - running)
            return [self._pending.popleft() for _ in range(min(room, len(self._pending)))]

    def _start(self, job: Job) -> None:
        """Prefill every prompt of the job; a bad prompt ends the job with a 400, others untouched."""
        if job.cancelled or time.monotonic() > job.deadline:
            return self._fail(job, _timeout(self.limits) if not job.cancelled else None)
        units = []
        try:
            for i, prompt in enumerate(job.prompts):
                units.append(_Unit(job, self.model.text_stream(prompt, job.settings), i * job.settings.num_samples))
        except PocketError as e:
            for u in units:
                u.tokens.close()
            return self._fail(job, ApiError(str(e), "prompt"))
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the scheduler
            for u in units:
                u.tokens.close()
            return self._fail(job, _internal(e))
        job.open = len(units)
        self._units.extend(units)
        self._send(job, STARTED)

    def _turn(self) -> None:
        """One chunk from every active stream, in turn (the place a batched step would go)."""
        now = time.monotonic()
        for unit in list(self._units):
            job = unit.job
            if unit not in self._units:  # its job was closed earlier in this turn
                continue
            if job.ended:
                self._drop(unit)
            elif job.cancelled or now > job.deadline:
                self._close_job(job, None if job.cancelled else _timeout(self.limits))
            else:
                self._step(unit)

    def _step(self, unit: _Unit) -> None:
        try:
            chunk = next(unit.chunks)
        except StopIteration:
            self._drop(unit)
            unit.job.open -= 1
            if unit.job.open == 0:
                unit.job.ended = True
                self._send(unit.job, DONE)
            return
        except Exception as e:  # noqa: BLE001 - ends this job only
            return self._close_job(unit.job, _internal(e))
        self._measure(unit, chunk)
        self._send(unit.job, dataclasses.replace(chunk, index=chunk.index + unit.offset))

    def _measure(self, unit: _Unit, chunk: Chunk) -> None:
        """Tokens generated, inter-token latency (per stream), time to first text (per job)."""
        now, job = time.monotonic(), unit.job
        done = sum(unit.tokens.completion_tokens)
        if done > unit.counted:
            self.metrics.generated(done - unit.counted, None if unit.last is None else now - unit.last)
            unit.counted, unit.last = done, now
        if chunk.text and not job.first_text:
            job.first_text = True
            self.metrics.first_token(now - job.submitted)

    def _drop(self, unit: _Unit) -> None:
        unit.tokens.close()
        self._units.remove(unit)

    def _close_job(self, job: Job, error: ApiError | None) -> None:
        for unit in [u for u in self._units if u.job is job]:
            self._drop(unit)
        self._fail(job, error)

    def _fail(self, job: Job, error: ApiError | None) -> None:
        job.ended = True
        if error is not None:
            self._send(job, error)

    def _send(self, job: Job, event: Any) -> None:
        try:
            job.deliver(event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            job.cancelled = True

    def _end_all(self) -> None:
        stopping = ApiError("the server is shutting down", status=503, kind="server_error")
        for unit in list(self._units):
            self._close_job(unit.job, stopping)
        with self._cv:
            pending, self._pending = list(self._pending), collections.deque()
        for job in pending:
            self._fail(job, stopping)


def _timeout(limits: Limits) -> ApiError:
    return ApiError(f"the request ran past the server's {limits.timeout_s:g} s limit", status=504, kind="timeout")


def _internal(e: Exception) -> ApiError:
    first = str(e).splitlines()[0] if str(e) else ""
    return ApiError(f"internal error: {type(e).__name__}{': ' + first if first else ''}", status=500,
                    kind="server_error")
