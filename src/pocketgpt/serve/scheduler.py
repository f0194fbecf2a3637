"""The scheduler: one thread owns the model and its batch and steps every request together.

Each request becomes a `Job`: its prompts, one SamplingSettings, a `deliver` callback (the web
side collects the events and hands them to the event loop once per turn, `after_turn`) and a
deadline. The thread admits one waiting job between steps (up to Limits.max_active generating at
once) and adds one generation per prompt to the model's loading.TextBatch (one KV cache, a row
per sample, each at its own position). A turn is one TextBatch.step(): one forward for every
generation, each one's next tokens drawn with its own settings and seed (so its output is what
it would be alone), and each one's chunks of text. Events per job: STARTED once every prompt is
checked and has its rows (so a bad prompt is still a plain 400; the prefill itself rides in the
next step's forward), a Chunk per piece of text, then DONE, or one ApiError instead.

The thread also feeds metrics.Metrics (GET /metrics): tokens generated and inter-token latency
per generation, time to first text per job, the rows of each forward.

A job whose client left (cancel()) or whose deadline passed has its generations closed before
the next step (TextBatch.close() gives their rows back). Any error inside one job ends only that job.

Reload (`watch`): between turns, every `reload_every_s`, the scheduler asks watch() for a stamp
of the weights (their file's mtime and size); when it changes, a side thread loads the model
again and the next turn swaps it in: new requests start on the new weights in a new batch, and
running ones finish on the weights they started with (no request is dropped or mixed).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Callable, Union

from ..errors import PocketError
from ..sampling import Chunk, SamplingSettings
from .api import ApiError, Limits
from .metrics import Metrics

if TYPE_CHECKING:  # the scheduler reaches the model through these alone; torch loads with the model
    from ..loading import Generation, LoadedModel, Progress, TextBatch

STARTED = "started"
DONE = "done"

# what a job's deliver callback gets: STARTED, a Chunk of text, DONE, or the error that ends it
Event = Union[str, Chunk, ApiError]


class Job:
    """One request as the scheduler sees it; `cancelled` is set from the web thread (a plain flag)."""

    def __init__(self, prompts: list[str | list[int]], settings: SamplingSettings, deliver: Callable[[Event], None],
                 timeout_s: float):
        self.prompts, self.settings, self.deliver = prompts, settings, deliver
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self.first_text = False  # its first text has gone out (time to first token is measured once)
        self.cancelled = False
        self.open = 0  # generations still running
        self.ended = False


class _Unit:
    """One prompt of a job: its generation, the batch it runs in and its choice offset."""

    def __init__(self, job: Job, generation: Generation, batch: TextBatch, offset: int):
        self.job, self.generation, self.batch, self.offset = job, generation, batch, offset
        self.counted = 0  # tokens already counted in the metrics
        self.last: float | None = None  # when its previous tokens came


class Scheduler:
    """Owns the model (loaded on its own thread) and its batch; see the module docstring."""

    def __init__(self, load: Callable[[], LoadedModel], limits: Limits,
                 on_load_error: Callable[[str], None] | None = None, metrics: Metrics | None = None,
                 watch: Callable[[], object] | None = None, reload_every_s: float = 2.0,
                 on_reload: Callable[[str], None] | None = None):
        self._load, self.limits, self._on_load_error = load, limits, on_load_error
        self.metrics = metrics if metrics is not None else Metrics()
        self._watch, self.reload_every_s, self._on_reload = watch, reload_every_s, on_reload
        self._cv = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._units: list[_Unit] = []
        self._stopping = False
        self.model: LoadedModel | None = None  # set before `ready`
        self._batch: TextBatch | None = None  # new jobs join this one (older ones finish in theirs)
        self._stamp: object = None
        self._next_check = 0.0
        self._reloading: threading.Thread | None = None
        self._reloaded: LoadedModel | None = None  # loaded by the side thread, swapped in at the next turn
        self.ready = threading.Event()
        self.load_error: str | None = None
        # called after every turn: a web side that collects the turn's events sends them here
        self.after_turn: Callable[[], None] = lambda: None
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
    def reloads(self) -> int:
        """Times new weights were swapped in (the count /metrics shows)."""
        return self.metrics.reloads

    @property
    def active(self) -> int:
        return len(self._units)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def active_samples(self) -> int:
        """Samples generating (n per prompt: one row of the batch each)."""
        return sum(u.job.settings.num_samples for u in list(self._units))

    @property
    def active_requests(self) -> int:
        return len({id(u.job) for u in list(self._units)})

    # ---------------------------------------------------------------- the scheduler thread

    def _run(self) -> None:
        try:
            self._stamp = self._watch() if self._watch is not None else None
            self._use(self._load())
        except Exception as e:  # noqa: BLE001 - any failure to load is reported as one line
            self.load_error = _first_line(e)
            if self._on_load_error is not None:
                self._on_load_error(self.load_error)
            return
        self.ready.set()
        while (admitted := self._wait_for_work()) is not None:
            self._maybe_reload()
            for job in admitted:
                self._start(job)
            self._turn()
            self.after_turn()
        self._end_all()
        self.after_turn()

    def _use(self, model: LoadedModel) -> None:
        self.model, self._batch = model, model.batch()

    def _maybe_reload(self) -> None:
        """Swap in a reloaded model; start a reload when the weights' stamp has changed."""
        if self._reloaded is not None:
            model, self._reloaded = self._reloaded, None
            self._use(model)
            self.metrics.reloaded()
            self._say(f"reloaded {getattr(model, 'source', 'the model')}: new requests use the new weights")
        now = time.monotonic()
        if self._watch is None or now < self._next_check or self._reloading is not None:
            return
        self._next_check = now + self.reload_every_s
        try:
            stamp = self._watch()
        except Exception:  # noqa: BLE001 - the file is being replaced: look again later
            return
        if stamp != self._stamp:
            self._stamp = stamp
            self._reloading = threading.Thread(target=self._reload, name="pocketgpt-reload", daemon=True)
            self._reloading.start()

    def _reload(self) -> None:
        try:
            self._reloaded = self._load()
        except Exception as e:  # noqa: BLE001 - keep serving the weights already loaded
            self._say(f"reload failed, still serving the earlier weights: {_first_line(e)}")
        finally:
            self._reloading = None
            with self._cv:
                self._cv.notify()

    def _say(self, line: str) -> None:
        if self._on_reload is not None:
            self._on_reload(line)

    def _wait_for_work(self) -> list[Job] | None:
        """The jobs to start now (maybe none); None when stopping. With a watch, it wakes up every
        reload_every_s even when idle, to look at the weights."""
        timeout = self.reload_every_s if self._watch is not None else None
        with self._cv:
            while not self._stopping and not self._pending and not self._units and self._reloaded is None:
                if not self._cv.wait(timeout):
                    break
            if self._stopping:
                return None
            running = len({id(u.job) for u in self._units})
            room = max(0, self.limits.max_active - running)
            # One admission (its prefill) per turn: each prefill delays every running stream's next token,
            # and a burst of arrivals then starts streaming one by one instead of all after the last prefill
            # (GPT-2-small, 16 at once: every first token came after all 16 prefills, ~2 s).
            return [self._pending.popleft() for _ in range(min(room, len(self._pending), 1))]

    def _start(self, job: Job) -> None:
        """Start (check, give rows to, and prefill now or in the next step) every prompt of the job;
        a bad prompt ends the job with a 400, others untouched."""
        if job.cancelled or time.monotonic() > job.deadline:
            return self._fail(job, _timeout(self.limits) if not job.cancelled else None)
        batch, units = self._batch, []
        assert batch is not None  # a job starts once the model is loaded
        try:
            for i, prompt in enumerate(job.prompts):
                units.append(_Unit(job, batch.add(prompt, job.settings), batch, i * job.settings.num_samples))
        except PocketError as e:
            for u in units:
                batch.close(u.generation)
            return self._fail(job, ApiError(str(e), "prompt"))
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the scheduler
            for u in units:
                batch.close(u.generation)
            return self._fail(job, _internal(e))
        job.open = len(units)
        self._units.extend(units)
        self._send(job, STARTED)

    def _turn(self) -> None:
        """One batched step: close what has ended or must end, one step of every generation left
        (per batch: generations on reloaded weights step apart), then each one's chunks go out."""
        now = time.monotonic()
        for unit in list(self._units):
            job = unit.job
            if unit not in self._units:  # its job was closed earlier in this loop
                continue
            if job.ended:
                self._drop(unit)
            elif job.cancelled or now > job.deadline:
                self._close_job(job, None if job.cancelled else _timeout(self.limits))
        progress: list[Progress] = []
        try:
            for batch in {id(u.batch): u.batch for u in self._units}.values():
                progress += batch.step()
                self.metrics.batch_step(batch.rows_fed)
        except Exception as e:  # noqa: BLE001 - a failed forward ends the jobs in it, not the server
            for unit in list(self._units):
                if unit in self._units:
                    self._close_job(unit.job, _internal(e))
            return
        units = {u.generation: u for u in self._units}
        for p in progress:
            unit = units[p.generation]
            if unit in self._units:  # its job was not closed by an error earlier in this loop
                self._send_progress(unit, p)

    def _send_progress(self, unit: _Unit, progress: Progress) -> None:
        """Send the step's chunks of one generation; end it (and its job, if last) when it has."""
        if progress.error is not None:
            return self._close_job(unit.job, _internal(progress.error))
        for chunk in progress.chunks:
            self._measure(unit, chunk)
            self._send(unit.job, dataclasses.replace(chunk, index=chunk.index + unit.offset) if unit.offset else chunk)
        if progress.ended:
            self._drop(unit)
            unit.job.open -= 1
            if unit.job.open == 0:
                unit.job.ended = True
                self._send(unit.job, DONE)

    def _measure(self, unit: _Unit, chunk: Chunk) -> None:
        """Tokens generated, inter-token latency (per stream), time to first text (per job)."""
        now, job = time.monotonic(), unit.job
        done = unit.generation.generated
        if done > unit.counted:
            self.metrics.generated(done - unit.counted, None if unit.last is None else now - unit.last)
            unit.counted, unit.last = done, now
        if chunk.text and not job.first_text:
            job.first_text = True
            self.metrics.first_token(now - job.submitted)

    def _drop(self, unit: _Unit) -> None:
        unit.batch.close(unit.generation)
        self._units.remove(unit)

    def _close_job(self, job: Job, error: ApiError | None) -> None:
        for unit in [u for u in self._units if u.job is job]:
            self._drop(unit)
        self._fail(job, error)

    def _fail(self, job: Job, error: ApiError | None) -> None:
        job.ended = True
        if error is not None:
            self._send(job, error)

    def _send(self, job: Job, event: Event) -> None:
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


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _internal(e: Exception) -> ApiError:
    first = str(e).splitlines()[0] if str(e) else ""
    return ApiError(f"internal error: {type(e).__name__}{': ' + first if first else ''}", status=500,
                    kind="server_error")
