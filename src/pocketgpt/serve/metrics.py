"""GET /metrics: counters and histograms in Prometheus' text format (version 0.0.4), by hand, no dependency.

Written from two threads (the web side counts requests, the scheduler thread counts tokens and
latencies) under one lock; the gauges (queue length, active streams) are read from the scheduler
at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable, Sequence

# seconds: a tiny CPU model makes tokens in well under a millisecond, a big one on a busy server in seconds
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # rows (samples) fed through the model by one decode step


class Histogram:
    """A cumulative Prometheus histogram (not locked itself: Metrics holds the lock)."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def lines(self, name: str) -> Iterable[str]:
        total = 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            total += c
            yield f'{name}_bucket{{le="{_num(bound)}"}} {total}'
        yield f"{name}_sum {_num(self.sum)}"
        yield f"{name}_count {self.count}"


def _num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What /metrics shows. `gauges` (set by the app) returns (queue length, active streams,
    active requests, max active) at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.reloads = 0
        self.gauges: Callable[[], tuple[int, int, int, int]] = lambda: (0, 0, 0, 0)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def generated(self, tokens: int, gap_s: float | None) -> None:
        """`tokens` new tokens of one stream; gap_s: the time since that stream's previous ones
        (None for its first), spread evenly over them as inter-token latency."""
        if tokens <= 0:
            return
        with self._lock:
            self.tokens += tokens
            if gap_s is not None:
                self.itl.observe(gap_s / tokens, tokens)

    def batch_step(self, rows: int) -> None:
        """One batched decode step fed `rows` rows (0: nothing was due, not counted)."""
        if rows > 0:
            with self._lock:
                self.batch.observe(rows)

    def reloaded(self) -> None:
        with self._lock:
            self.reloads += 1

    def render(self) -> str:
        waiting, streams, active, max_active = self.gauges()
        with self._lock:
            out = ["# HELP pocketgpt_requests_total HTTP requests answered, by endpoint and status code.",
                   "# TYPE pocketgpt_requests_total counter"]
            out += [f'pocketgpt_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP pocketgpt_generated_tokens_total Tokens generated, over all requests.",
                    "# TYPE pocketgpt_generated_tokens_total counter",
                    f"pocketgpt_generated_tokens_total {self.tokens}",
                    "# HELP pocketgpt_time_to_first_token_seconds From a request's arrival (queueing "
                    "included) to its first text.",
                    "# TYPE pocketgpt_time_to_first_token_seconds histogram",
                    *self.ttft.lines("pocketgpt_time_to_first_token_seconds"),
                    "# HELP pocketgpt_inter_token_latency_seconds Time between a stream's tokens.",
                    "# TYPE pocketgpt_inter_token_latency_seconds histogram",
                    *self.itl.lines("pocketgpt_inter_token_latency_seconds"),
                    "# HELP pocketgpt_batch_rows Rows (samples of all requests) fed through the model by one "
                    "decode step: how full the batch is.",
                    "# TYPE pocketgpt_batch_rows histogram",
                    *self.batch.lines("pocketgpt_batch_rows"),
                    "# HELP pocketgpt_reloads_total Times --reload swapped in new weights.",
                    "# TYPE pocketgpt_reloads_total counter",
                    f"pocketgpt_reloads_total {self.reloads}"]
        out += ["# HELP pocketgpt_queue_length Requests waiting for a place to generate.",
                "# TYPE pocketgpt_queue_length gauge", f"pocketgpt_queue_length {waiting}",
                "# HELP pocketgpt_active_streams Sample streams generating now (one per prompt and sample).",
                "# TYPE pocketgpt_active_streams gauge", f"pocketgpt_active_streams {streams}",
                "# HELP pocketgpt_active_requests Requests generating now (batch occupancy: of max_active).",
                "# TYPE pocketgpt_active_requests gauge", f"pocketgpt_active_requests {active}",
                "# HELP pocketgpt_max_active Requests this server generates at once (--max-active).",
                "# TYPE pocketgpt_max_active gauge", f"pocketgpt_max_active {max_active}"]
        return "\n".join(out) + "\n"


def parse(text: str) -> dict[str, float]:
    """Prometheus text back into {'name{labels}': value} (for tests and serve_bench; no HELP/TYPE lines)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
