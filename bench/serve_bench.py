"""`pocketgpt serve` under load: N concurrent streaming completions against a real server process.

    python bench/serve_bench.py                    # the demo shape (trains a 200-iteration demo run if
                                                   #   no --model), N = 1, 4, 16, 64, 128 tokens each
    python bench/serve_bench.py --model RUN        # an existing run folder instead
    python bench/serve_bench.py --gpt2-small       # also a random GPT-2-small-shaped model (12x12x768,
                                                   #   vocab 50257, context 1024; a 1-iteration train),
                                                   #   32 tokens each; off by default: it is slow on a CPU

The server is a child process (`python -m pocketgpt serve --model RUN --port FREE` on 127.0.0.1, its
--max-active / --max-queue raised so that the largest N fits without 429s), ready once /health
answers 200 and stopped with SIGTERM at the end. Every level N sends N `POST /v1/completions`
at once, each with stream true, the same prompt, temperature 0.8 and its own seed; one untimed
request warms the server up first, and each level runs --repeats times (pooled: all tokens over the
summed wall time; the percentiles over all requests). Per N, measured client-side (one asyncio
connection per request):

    aggregate tok/s   completion tokens received by all requests (the usage of the last event) / wall time
    TTFT p50 / p99    send -> first SSE chunk with text
    ITL p50 / p99     gaps between a request's consecutive text chunks (one chunk is about one token;
                      when the client reads slower than tokens come, the server joins the waiting ones)
    server CPU %      the server process's CPU time over the wall time (100 = one core)
    client CPU %      this process's, the same way
    errors            non-200 answers (e.g. 429), error events, exceptions, requests past --level-timeout

The client shares the machine with the server, so it must cost little: it speaks HTTP/1.1 over raw
asyncio streams (no HTTP library: httpx took about as much CPU per token as the server's engine at
N=16 on a 2-core machine), takes the chunked framing off and json-parses every event. Its own CPU
share is in the table, so a client-bound level shows.
The last lines: the machine (CPU, torch, threads) and aggregate(N=16) / aggregate(N=1).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


# --------------------------------------------------------------------------- models


def demo_run(out: Path) -> Path:
    """A quick demo-shaped run: the demo preset for 200 iterations (the shape matters, not the quality)."""
    common.pocketgpt("train", "--out", str(out), "--max-iters", "200", *common.QUIET, *common.NO_PLOTS)
    return out


def gpt2_small_run(out: Path) -> Path:
    """A random GPT-2-small-shaped run: one training iteration on the bundled corpus, GPT-2's tokenizer."""
    common.pocketgpt("train", "--out", str(out), "--tokenizer", "gpt2",
                     *common.flags(**common.GPT2_SMALL_SHAPE, block_size=1024, bias=True, max_iters=1,
                                   batch_size=1, eval_iters=1, eval_interval=1, warmup_iters=0),
                     *common.QUIET, *common.NO_PLOTS, "--skip-memory-check")
    return out


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pocketgpt serve` as a child process on 127.0.0.1; its log goes to a file (read on failure)."""

    def __init__(self, run: Path, max_n: int, max_tokens: int, log: Path, ready_s: float = 300.0):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = common.pocketgpt_cmd("serve", "--model", str(run), "--host", "127.0.0.1", "--port", str(self.port),
                                   "--max-active", str(max_n), "--max-queue", str(max_n),
                                   "--max-tokens", str(max(max_tokens, 1024)), "--timeout", "600")
        self._logf = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_s
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}):\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server not healthy after {ready_s:.0f}s:\n{log.read_text()[-2000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


# --------------------------------------------------------------------------- the load


@dataclass
class Result:
    tokens: int = 0  # completion tokens (usage), or text chunks when no usage came
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


class _Events:
    """The server-sent events in a chunked HTTP/1.1 body, fed the bytes as they come: the chunk
    framing is taken off, events split at the blank line (an event or a chunk may be cut anywhere)."""

    def __init__(self) -> None:
        self.raw = bytearray()  # framed bytes not parsed yet
        self.body = bytearray()  # unframed bytes not yet a whole event
        self.ended = False  # the last (empty) chunk came

    def feed(self, data: bytes) -> list[bytes]:
        self.raw += data
        while not self.ended:
            eol = self.raw.find(b"\r\n")
            if eol < 0:
                break
            size = int(bytes(self.raw[:eol]).split(b";")[0], 16)
            if len(self.raw) < eol + 2 + size + 2:
                break  # the chunk is not all here yet
            self.body += self.raw[eol + 2 : eol + 2 + size]
            del self.raw[: eol + 2 + size + 2]
            self.ended = size == 0
        *events, rest = bytes(self.body).split(b"\n\n")
        self.body = bytearray(rest)
        return events


async def one_request(host: str, port: int, body: dict[str, Any]) -> Result:
    """One streaming completion over a raw asyncio connection. The client runs on the server's
    machine, so it must cost little: no HTTP library, but every event is read and json-parsed
    (an error event, the text of each chunk, the usage of the last one); TTFT and the gaps are
    taken per event that carries text, when its bytes arrive."""
    r = Result()
    t0 = time.perf_counter()
    last: float | None = None
    chunks = 0
    payload = json.dumps(body).encode()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), port, len(payload)) + payload)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            r.error = f"HTTP {status}"
            return r
        if b"transfer-encoding: chunked" not in head.lower():
            r.error = "not chunked"
            return r
        events = _Events()
        done = False
        while not done and not events.ended:
            data = await reader.read(65536)
            if not data:
                break
            now = time.perf_counter()
            for raw in events.feed(data):
                if not raw.startswith(b"data: "):
                    continue
                if raw[6:] == b"[DONE]":
                    done = True
                    break
                ev = json.loads(raw[6:])
                if "error" in ev:
                    r.error = "error event: " + str(ev["error"].get("message"))[:60]
                    return r
                if ev.get("usage"):
                    r.tokens = ev["usage"]["completion_tokens"]
                if any(c.get("text") for c in ev.get("choices", [])):
                    chunks += 1
                    if last is None:
                        r.ttft = now - t0
                    else:
                        r.gaps.append(now - last)
                    last = now
        if not done:
            r.error = "ended before [DONE]"
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        r.error = type(e).__name__
    finally:
        if writer is not None:
            writer.close()
    if not r.tokens:
        r.tokens = chunks
    return r


def body_for(seed: int, max_tokens: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}


async def level(base: str, n: int, max_tokens: int, timeout_s: float, seed0: int) -> tuple[list[Result], float]:
    """N requests at once; their results and the wall time until the last ended (bounded by timeout_s)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one_request(host, int(port), body_for(seed0 + i, max_tokens))) for i in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    wall = time.perf_counter() - t0
    for t in pending:
        t.cancel()
    results = [t.result() for t in done]
    results += [Result(error="timeout") for _ in pending]
    return results, wall


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) this process (pid None) or another one has used so far."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs, in ms; nan for none."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def run_model(name: str, run: Path, levels: list[int], max_tokens: int, timeout_s: float, repeats: int,
              log: Path) -> dict[int, float]:
    """Every level against one server; prints the table rows; aggregate tok/s per N."""
    t = time.perf_counter()
    server = Server(run, max(levels), max_tokens, log)
    print(f"\n{name}: {run} (server ready in {time.perf_counter() - t:.1f}s), {max_tokens} tokens per request, "
          f"each level run {repeats}x", flush=True)
    aggregate: dict[int, float] = {}
    try:
        asyncio.run(level(server.base, 1, max_tokens, timeout_s, seed0=10_000))  # warm-up, untimed
        common.markdown_header("model", "N", "requests ok", "tokens", "wall s", "aggregate tok/s", "per-stream tok/s",
                               "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "server CPU %", "client CPU %",
                               "errors")
        for i, n in enumerate(levels):
            results, wall = [], 0.0
            server_cpu = client_cpu = 0.0
            for r in range(repeats):  # pooled: all requests' tokens over the summed wall time
                s0, c0 = cpu_s(server.proc.pid), cpu_s()
                res, w = asyncio.run(level(server.base, n, max_tokens, timeout_s, seed0=100_000 * r + 1000 * (i + 1)))
                server_cpu += cpu_s(server.proc.pid) - s0
                client_cpu += cpu_s() - c0
                results += res
                wall += w
            ok = [r for r in results if r.error is None]
            tokens = sum(r.tokens for r in results)
            ttft = [r.ttft for r in ok if r.ttft is not None]
            gaps = [g for r in ok for g in r.gaps]
            errors: dict[str, int] = {}
            for r in results:
                if r.error:
                    errors[r.error] = errors.get(r.error, 0) + 1
            agg = tokens / wall
            aggregate[n] = agg
            err = ", ".join(f"{k} x{v}" for k, v in errors.items()) or "0"
            print(f"| {name} | {n} | {len(ok)}/{len(results)} | {tokens} | {wall:.1f} | {agg:.0f} | {agg / n:.1f} | "
                  f"{pct(ttft, 50):.0f} | {pct(ttft, 99):.0f} | {pct(gaps, 50):.1f} | {pct(gaps, 99):.1f} | "
                  f"{100 * server_cpu / wall:.0f} | {100 * client_cpu / wall:.0f} | {err} |",
                  flush=True)
    finally:
        server.stop()
    return aggregate


def machine() -> str:
    import torch  # here: only for the versions line

    from pocketgpt.probe import cpu_name

    cpu = cpu_name()
    return (f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads "
            f"{torch.get_num_threads()} (the server's engine picks its own), Python {platform.python_version()}")


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--model", type=Path, help="a run folder to serve (default: train a 200-iteration demo run)")
    p.add_argument("--gpt2-small", action="store_true", help="also a random GPT-2-small-shaped model (slow)")
    p.add_argument("--concurrency", default="1,4,16,64", help="the levels N, comma-separated (default 1,4,16,64)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request, demo model (default 128)")
    p.add_argument("--gpt2-max-tokens", type=int, default=32, help="tokens per request, --gpt2-small (default 32)")
    p.add_argument("--level-timeout", type=float, default=90.0,
                   help="seconds one level may take; requests still running then count as errors (default 90)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each level, pooled (demo model; --gpt2-small runs each once) (default 3)")
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency: positive integers, e.g. 1,4,16,64")
    results: dict[str, dict[int, float]] = {}
    with common.scratch() as tmp:
        run = args.model
        if run is None:
            t = time.perf_counter()
            run = demo_run(tmp / "demo")
            print(f"trained a 200-iteration demo run in {time.perf_counter() - t:.0f}s", flush=True)
        results["demo" if args.model is None else run.name] = run_model(
            "demo" if args.model is None else run.name, run, levels, args.max_tokens, args.level_timeout,
            args.repeats, tmp / "server-demo.log")
        if args.gpt2_small:
            t = time.perf_counter()
            g = gpt2_small_run(tmp / "gpt2-small")
            print(f"\nmade a random GPT-2-small run (1 iteration) in {time.perf_counter() - t:.0f}s", flush=True)
            results["gpt2-small"] = run_model("gpt2-small", g, levels, args.gpt2_max_tokens, args.level_timeout,
                                              1, tmp / "server-gpt2.log")
    print()
    print(machine())
    for name, agg in results.items():
        if 1 in agg and 16 in agg and agg[1] > 0:
            r = agg[16] / agg[1]
            print(f"{name}: aggregate(N=16) / aggregate(N=1) = {r:.2f}x (issue 12 target: >= 5x; "
                  f"{'met' if r >= 5 else 'not met'})")


if __name__ == "__main__":
    main()
