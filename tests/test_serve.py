"""pocketgpt serve against a real server on a free loopback port: the OpenAI client, streams, limits, errors."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from helpers import run_cli, train_tiny  # noqa: E402

from pocketgpt.serve.api import Limits  # noqa: E402

PROMPT = "ROMEO:\nWhat "
WAIT_S = 20.0  # every poll loop ends by then


class Served:
    """One uvicorn server in a thread, on a socket bound to 127.0.0.1 port 0 (no race for a port)."""

    def __init__(self, run: Path, **kwargs: Any):
        import uvicorn

        from pocketgpt.serve.app import create_app

        self.app = create_app(run, **kwargs)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: _health(self.url) == 200, "the server to become healthy")

    @property
    def scheduler(self) -> Any:
        return self.app.state.scheduler

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _health(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.TransportError:
        return None


def wait_for(ok: Any, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not ok():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    return train_tiny(tmp_path_factory.mktemp("serve") / "tiny", data_dir, max_iters=30, block_size=64)


@pytest.fixture(scope="module")
def served(run_dir) -> Iterator[Served]:
    s = Served(run_dir, limits=Limits(max_tokens=20_000, max_body_bytes=20_000, max_stop=4, max_n=3))
    yield s
    s.close()


@pytest.fixture(scope="module")
def small(run_dir) -> Iterator[Served]:
    """A server with one generation at a time, one waiting place, and an API key."""
    s = Served(run_dir, limits=Limits(max_tokens=50_000, max_active=1, max_queue=1, timeout_s=30), api_key="sekrit")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json", **kwargs}, timeout=30)


def stream_text(url: str, body: dict[str, Any]) -> tuple[str, list[dict]]:
    """A streamed completion read with httpx: (the joined text of choice 0, every event)."""
    events = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    return "".join(c["text"] for e in parsed for c in e["choices"] if c["index"] == 0), parsed


# ---------------------------------------------------------------- the API, through the openai client


def test_health_and_models(served, client):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    (card,) = client.models.list().data
    extra = card.model_dump()
    assert card.id == "tiny" and extra["context"] == 64 and extra["tokenizer"]["kind"] == "char"
    assert extra["parameters"] > 0 and extra["iterations"] == 30
    assert extra["best_val_loss"] > 0 and extra["best_val_bpb"] > 0


def test_completion_stream_equals_full(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0.9, seed=3)
    full = client.completions.create(**kw)
    (choice,) = full.choices
    parts = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.text for p in parts for c in p.choices) == choice.text
    assert parts[-1].choices == [] and parts[-1].usage == full.usage
    assert choice.finish_reason == "length" and parts[-2].choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(PROMPT) and full.usage.completion_tokens == 40
    assert full.usage.total_tokens == len(PROMPT) + 40


def test_greedy_matches_the_loaded_model(client, run_dir):
    from pocketgpt import load

    want = load(run_dir).complete(PROMPT, max_new_tokens=30, temperature=0)[0].text
    for seed in (1, 2):  # temperature 0 is greedy: the seed changes nothing
        got = client.completions.create(model="x", prompt=PROMPT, max_tokens=30, temperature=0, seed=seed)
        assert got.choices[0].text == want


def test_stop_string_is_never_sent(client, served):
    kw = {"prompt": PROMPT, "max_tokens": 60, "temperature": 1.0, "seed": 4}
    base = client.completions.create(model="x", **kw).choices[0].text
    at = next(i for i in range(10, 57) if base[i:i + 3] not in base[:i + 2])  # a first occurrence, mid-text
    stop = base[at:at + 3]
    full = client.completions.create(model="x", **kw, stop=[stop, "QQQ"])
    assert full.choices[0].text == base[:at] and full.choices[0].finish_reason == "stop"
    text, _ = stream_text(served.url, {**kw, "stop": stop})
    assert text == base[:at]


def test_chat_stream_equals_full(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=30, temperature=0.7, seed=5)
    full = client.chat.completions.create(**kw)
    parts = list(client.chat.completions.create(**kw, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == len("user: Hi\nassistant:")


def test_n_and_a_list_of_prompts(client):
    got = client.completions.create(model="x", prompt=[PROMPT, "JULIET:\n"], n=2, max_tokens=8, seed=1)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.usage.prompt_tokens == len(PROMPT) + len("JULIET:\n") and got.usage.completion_tokens == 32
    assert got.choices[0].text != got.choices[1].text  # two samples, not one twice


def test_max_tokens_zero(client):
    got = client.completions.create(model="x", prompt=PROMPT, max_tokens=0)
    assert got.choices[0].text == "" and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 0


def test_completion_logprobs_are_the_models_own(client, served, run_dir):
    import torch

    from pocketgpt import load

    model = load(run_dir)
    got = client.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0.9, seed=2, logprobs=3)
    (choice,) = got.choices
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 12
    ids = model.tokenizer.encode(PROMPT + choice.text)
    want = torch.log_softmax(model.logits(ids[:-1]), dim=-1)[len(model.tokenizer.encode(PROMPT)) - 1:]
    for i, (tok, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        row = want[i]
        assert value == pytest.approx(float(row[model.tokenizer.encode(tok)[0]]), abs=1e-4)
        best = row.topk(3)
        assert list(top) == [model.tokenizer.decode([j]) for j in best.indices.tolist()]
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert lp.text_offset == [len(PROMPT) + len("".join(lp.tokens[:i])) for i in range(12)]
    _, events = stream_text(served.url, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "seed": 2, "logprobs": 3})
    streamed = [c["logprobs"] for e in events for c in e["choices"]]
    assert sum((x["tokens"] for x in streamed), []) == lp.tokens
    assert sum((x["text_offset"] for x in streamed), []) == lp.text_offset
    assert sum((x["token_logprobs"] for x in streamed), []) == pytest.approx(lp.token_logprobs)


def test_chat_logprobs_in_the_openai_shape(client):
    kw = dict(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0.8, seed=1)
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].logprobs is None
    full = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert "".join(t.token for t in content) == full.choices[0].message.content == plain.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and t.top_logprobs[0].logprob >= t.logprob - 1e-6
    parts = list(client.chat.completions.create(**kw, logprobs=True, stream=True))
    streamed = [t for p in parts for c in p.choices if c.logprobs for t in c.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content] and all(t.top_logprobs == [] for t in streamed)


# ---------------------------------------------------------------- many users at once


def test_concurrent_streams_equal_their_single_output(served):
    bodies = [{"prompt": PROMPT, "max_tokens": 50, "temperature": 1.0, "seed": s} for s in range(4)]
    alone = [stream_text(served.url, b)[0] for b in bodies]

    def shared_steps() -> float:  # decode steps that fed more than one row
        m = scrape(served.url)
        return m["pocketgpt_batch_rows_count"] - m['pocketgpt_batch_rows_bucket{le="1"}']

    before = shared_steps()
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: stream_text(served.url, b)[0], bodies))
    assert together == alone and len(set(alone)) == 4
    assert shared_steps() - before >= 10  # they were stepped together, not in turn


def test_disconnect_frees_the_stream_and_others_go_on(served):
    sched = served.scheduler
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 1.0, "seed": 9}
    want = stream_text(served.url, body)[0]
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", served.url + "/v1/completions", timeout=30,
                          json={"prompt": PROMPT, "max_tokens": 20_000, "stream": True}) as r:  # ~10 s to run out
            lines = r.iter_lines()
            next(lines)  # one event, then hang up
            other = pool.submit(stream_text, served.url, body)
            wait_for(lambda: sched.active == 2 or other.done(), "both streams to run")
        hung_up = time.monotonic()
        assert other.result(timeout=WAIT_S)[0] == want
        wait_for(lambda: sched.active == 0 and sched.waiting == 0, "the scheduler to drop the stream")
    assert time.monotonic() - hung_up < 5  # dropped, not run to its end


def test_queue_full_is_429_and_the_api_key(small):
    sched, auth = small.scheduler, {"Authorization": "Bearer sekrit"}
    assert post(small.url, "/v1/completions", {"prompt": "a"}).status_code == 401
    assert post(small.url, "/v1/completions", {"prompt": "a"}, Authorization="Bearer wrong").json()["error"]["type"] \
        == "authentication_error"
    assert httpx.get(small.url + "/health").status_code == 200  # open without the key
    long = {"prompt": PROMPT, "max_tokens": 50_000, "stream": True}
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", small.url + "/v1/completions", json=long, headers=auth, timeout=30) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the response
            next(lines)
            waiting = pool.submit(post, small.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5}, **auth)
            wait_for(lambda: sched.waiting == 1, "the second request to queue")
            busy = post(small.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5}, **auth)
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
        ok = waiting.result(timeout=WAIT_S)  # the long one hung up: the waiting one gets its turn
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


# ---------------------------------------------------------------- /metrics and the page


def scrape(url: str, **headers: str) -> dict[str, float]:
    from pocketgpt.serve.metrics import parse

    r = httpx.get(url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def test_metrics_after_a_few_requests(served):
    before = scrape(served.url)
    ok = 'pocketgpt_requests_total{endpoint="/v1/completions",status="200"}'
    bad = 'pocketgpt_requests_total{endpoint="/v1/completions",status="400"}'
    assert post(served.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "seed": 1}).status_code == 200
    stream_text(served.url, {"prompt": PROMPT, "max_tokens": 10, "seed": 2})
    assert post(served.url, "/v1/completions", {"prompt": "a", "top_p": 2}).status_code == 400
    httpx.get(served.url + "/v1/nothing")
    after = scrape(served.url)
    assert after[ok] - before.get(ok, 0) == 2 and after[bad] - before.get(bad, 0) == 1
    assert after['pocketgpt_requests_total{endpoint="other",status="404"}'] >= 1
    assert after["pocketgpt_generated_tokens_total"] - before["pocketgpt_generated_tokens_total"] == 22
    ttft, itl = "pocketgpt_time_to_first_token_seconds", "pocketgpt_inter_token_latency_seconds"
    assert after[f"{ttft}_count"] - before[f"{ttft}_count"] == 2  # one per request
    assert after[f"{itl}_count"] - before[f"{itl}_count"] == 20  # every token but each stream's first
    assert after[f'{ttft}_bucket{{le="+Inf"}}'] == after[f"{ttft}_count"] and after[f"{ttft}_sum"] > 0
    buckets = [v for k, v in after.items() if k.startswith(f"{itl}_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert after["pocketgpt_queue_length"] == 0 and after["pocketgpt_active_streams"] == 0
    assert after["pocketgpt_max_active"] == 16


def test_metrics_show_active_streams(served):
    with httpx.stream("POST", served.url + "/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 20_000, "n": 2, "stream": True}) as r:
        lines = r.iter_lines()  # held: a dropped iterator closes the response
        next(lines)
        got = scrape(served.url)
        assert got["pocketgpt_active_streams"] == 2 and got["pocketgpt_active_requests"] == 1
    wait_for(lambda: scrape(served.url)["pocketgpt_active_streams"] == 0, "the stream to be dropped")


def test_metrics_and_page_with_an_api_key(small):
    assert httpx.get(small.url + "/metrics").status_code == 401
    assert "pocketgpt_active_streams" in scrape(small.url, Authorization="Bearer sekrit")
    page = httpx.get(small.url + "/")  # the page is open: it asks for the key itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'content="api-key-required"' in page.text and 'content="50000"' in page.text


def test_page_is_shipped_and_self_contained(served):
    page = httpx.get(served.url + "/").text
    assert 'content="api-key-optional"' in page and 'name="pocketgpt-max-tokens" content="20000"' in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # offline: no CDN
    for element in ('id="prompt"', 'id="generate"', 'id="stop"', 'id="output"', 'id="seed"', 'id="show-tokens"'):
        assert element in page


# ---------------------------------------------------------------- every bad request is a 4xx naming the field

BAD = [
    ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_k": -1}, "top_k"),
    ({"prompt": "a", "max_tokens": 100_000}, "max_tokens"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "stop": 7}, "stop"),
    ({"prompt": "a", "n": 10}, "n"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "logprobs": True}, "logprobs"),
    ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "a", "temprature": 0.5}, "temprature"),
    ({"prompt": "a", "model": 123}, "model"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "e" * 65}, "prompt"),  # the context is 64
    ({"prompt": "\u2603"}, "prompt"),  # not in the character vocabulary
    ({}, "prompt"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_completion_request(served, body, param):
    r = post(served.url, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] is None
    assert "\n" not in err["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "e" * 80}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
])
def test_bad_chat_request(served, body, param):
    r = post(served.url, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("content, status", [(b"{not json", 400), (b"[1, 2]", 400), (b"x" * 30_000, 413)])
def test_bad_body(served, content, status):
    r = post(served.url, "/v1/completions", content)
    assert r.status_code == status and r.json()["error"]["param"] == "body"


def test_unknown_path_is_json(served):
    r = httpx.get(served.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert post(served.url, "/v1/completions", {"prompt": "a", "max_tokens": 3}).status_code == 200  # still serving


def test_serve_without_fastapi_names_the_install(capsys, monkeypatch, run_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    code, _, err = run_cli(capsys, "serve", "--model", run_dir)
    assert code == 2 and 'pip install "pocketgpt[serve]"' in err


@pytest.mark.slow
def test_reload_serves_new_weights_and_running_streams_finish_on_theirs(tmp_path, run_dir):
    import shutil

    import torch

    from pocketgpt import load
    from pocketgpt.checkpoint import save_weights
    from pocketgpt.rundir import BEST_WEIGHTS

    run = tmp_path / "watched"
    shutil.copytree(run_dir, run)
    old = load(run)
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    s = Served(run, reload=True, reload_every_s=0.05, limits=Limits(max_tokens=50_000))
    try:
        assert post(s.url, "/v1/completions", body).json()["choices"][0]["text"] == old.complete(PROMPT, 30, temperature=0)[0].text
        long_body = {"prompt": PROMPT, "max_tokens": 3000, "temperature": 1.0, "seed": 5, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=long_body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # the long stream runs on the old weights
            with torch.no_grad():
                for p in old.model.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
            save_weights(old.model, run / BEST_WEIGHTS)  # written as training writes it (atomic rename)
            wait_for(lambda: s.scheduler.reloads == 1, "the new weights to be loaded")
            new_text = post(s.url, "/v1/completions", body).json()["choices"][0]["text"]
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # not dropped by the reload
        assert new_text == load(run).complete(PROMPT, 30, temperature=0)[0].text != old_text(run_dir)
        assert scrape(s.url)["pocketgpt_reloads_total"] == 1
    finally:
        s.close()


def old_text(run_dir: Path) -> str:
    from pocketgpt import load

    return load(run_dir).complete(PROMPT, 30, temperature=0)[0].text


def test_what_serve_cannot_do_is_said_in_one_line_before_it_starts(capsys, run_dir, tmp_path, monkeypatch):
    import socket

    monkeypatch.chdir(tmp_path)  # "runs/nope" is no folder here, and a name the hub could hold
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        free = str(spare.getsockname()[1])  # closed again below: free for the address check
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        cases = [(["--model", run_dir, "--port", "99999"], "--port must be 1-65535"),
                 (["--model", run_dir, "--port", str(busy)], f"cannot listen on 127.0.0.1:{busy}"),
                 (["--model", run_dir, "--host", "no-such-host.invalid", "--port", free], "--host no-such-host"),
                 (["--model", tmp_path / "nowhere", "--port", free], "model not found"),
                 (["--model", "runs/nope", "--port", free], "model not found: runs/nope")]
        for argv, message in cases:
            code, out, err = run_cli(capsys, "serve", *argv)
            assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
            assert message in err and "serving" not in err and out == "", (argv, err)


def test_reload_needs_a_run_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "serve", "--model", tmp_path, "--reload")
    assert code == 2 and "--reload" in err and "run folder" in err and "Traceback" not in err


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
def test_sse_template_events_equal_the_general_path(chat, include_usage):
    # most streamed events are cut from a per-choice template; each must be byte for byte what
    # building the dict and dumping it gives, whatever the text holds
    from pocketgpt.sampling import Chunk, SamplingSettings
    from pocketgpt.serve import api
    from pocketgpt.serve.api import GenRequest
    from pocketgpt.serve.app import _ChunkEvents, _sse

    req = GenRequest(["a"], SamplingSettings(num_samples=2), stream=True, include_usage=include_usage, chat=chat)
    model_id = 'run "x" \u2063'  # quotes and the template's own marker character
    events = _ChunkEvents(req, model_id)
    texts = ["", "plain", 'quo"te\\', "new\nline\t", "caf\u00e9 \U0001f600", "\u2063", "\x00\x1f"]
    for index in (0, 1):
        for i, text in enumerate(texts):
            for first in (False, True):
                ev = Chunk(index, text, finish_reason="length" if i == 3 else None, completion_tokens=3)
                want = _sse(api.chunk_response(req, model_id, ev, first, 5))
                assert events.event(ev, first, 5) == want, (text, first)
    assert set(events.templates) == {0, 1} and all(events.templates.values())
