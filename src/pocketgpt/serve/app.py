"""The FastAPI app: routes, auth, errors in OpenAI's shape, server-sent events. The only FastAPI importer."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import chat_prompt
from ..sampling import Chunk
from . import api
from .api import ApiError, GenRequest, Limits
from .metrics import Metrics
from .scheduler import DONE, STARTED, Event, Job, Scheduler

if TYPE_CHECKING:
    from ..loading import LoadedModel

log = logging.getLogger("pocketgpt.serve")


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


OPEN_PATHS = ("/health", "/")  # no API key: the page asks for the key itself
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class _Guard:
    """Pure ASGI middleware: the API key (Bearer; /health and the page stay open), the request
    count of /metrics, and the catch-all that turns any exception into a one-line JSON 500 (pure
    ASGI, not BaseHTTPMiddleware: streams and client disconnects pass through untouched)."""

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0  # the response's status once it has started; 0: not yet
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def tracked(message: dict) -> None:  # one wrapper: it runs for every streamed event
            nonlocal status
            if not status and message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._refused(scope):
                e = ApiError("missing or wrong API key (send Authorization: Bearer KEY)", status=401,
                             kind="authentication_error")
                return await _error_response(e)(scope, receive, tracked)
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the client gets one line
            log.error("internal error on %s: %s: %s", scope["path"], type(e).__name__, str(e).splitlines()[:1])
            if not status:
                await _error_response(ApiError(f"internal error: {type(e).__name__}", status=500,
                                               kind="server_error"))(scope, receive, tracked)
        finally:
            self.metrics.request(endpoint, status or 499)  # 499: the client left before an answer

    def _refused(self, scope: dict) -> bool:
        if not self.api_key or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return False
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        return not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode())


def page_html(api_key_required: bool, max_tokens: int) -> str:
    """The web page (page.html, shipped in the package), told whether to show its API key field
    and how far its max tokens slider goes (its two meta tags)."""
    from importlib.resources import files

    html = files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    key = "required" if api_key_required else "optional"
    return (html.replace('content="api-key-optional"', f'content="api-key-{key}"', 1)
                .replace('name="pocketgpt-max-tokens" content="1024"', f'name="pocketgpt-max-tokens" content="{max_tokens}"', 1))


async def _read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The body as a JSON object, refused beyond limits.max_body_bytes before it is all read."""
    too_big = ApiError(f"the body is larger than this server's {limits.max_body_bytes} bytes", "body", status=413)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_body_bytes:
        raise too_big
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limits.max_body_bytes:
            raise too_big
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"the body is not valid JSON: {str(e).splitlines()[0]}", "body") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object", "body")
    return body


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# Stands for a chunk's text in a template: json.dumps writes it as ASCII escapes that no other
# field of a chunk can hold (and _ChunkEvents checks that it appears once).
_TEXT_MARK = "\u2063pocketgpt-text\u2063"


class _ChunkEvents:
    """The SSE events of one streamed request's chunks. Most chunks differ only in their text (no
    logprobs asked, not a choice's last chunk, not chat's first one, which names the role): those
    are cut from a template made once per choice (the same dict through the same json.dumps, the
    text swapped in), not built and dumped whole for every token; the rest take the general path."""

    def __init__(self, req: GenRequest, model_id: str):
        self.req, self.model_id = req, model_id
        self.plain_ok = req.settings.logprobs is None
        self.templates: dict[int, tuple[str, str] | None] = {}

    def event(self, ev: Chunk, first: bool, offset: int) -> str:
        if self.plain_ok and ev.finish_reason is None and not ev.logprobs and not (first and self.req.chat):
            if ev.index not in self.templates:
                self.templates[ev.index] = self._template(ev.index)
            t = self.templates[ev.index]
            if t is not None:
                return t[0] + json.dumps(ev.text) + t[1]
        return _sse(api.chunk_response(self.req, self.model_id, ev, first, offset))

    def _template(self, index: int) -> tuple[str, str] | None:
        whole = _sse(api.chunk_response(self.req, self.model_id, Chunk(index, _TEXT_MARK), False, 0))
        parts = whole.split(json.dumps(_TEXT_MARK))
        return (parts[0], parts[1]) if len(parts) == 2 else None


class _Outbox:
    """Events from the scheduler thread to the event loop's request queues, handed over once per
    scheduler turn (wake(), called by the scheduler after each step) instead of once per event:
    a batched step makes an event for every active stream at once, and each call_soon_threadsafe
    is a write to the loop's wake-up pipe, a loop iteration, and a fight for the GIL."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.items: list[tuple[asyncio.Queue, Event]] = []
        self.waking = False

    def put(self, queue: asyncio.Queue, event: Event) -> None:
        with self.lock:
            self.items.append((queue, event))

    def wake(self) -> None:
        """Have the loop deliver what is waiting (one wake-up; none if one is on its way)."""
        with self.lock:
            if not self.items or self.waking:
                return
            self.waking = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.waking = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


def _merged(events: list[Any]) -> list[Any]:
    """Chunks that wait together in a queue, with the text-only ones of one choice joined (one SSE
    event instead of several when the client reads slower than tokens come); order is kept."""
    out: list[Any] = []
    for ev in events:
        prev = out[-1] if out else None
        if (isinstance(ev, Chunk) and isinstance(prev, Chunk) and prev.index == ev.index
                and prev.finish_reason is None):
            out[-1] = dataclasses.replace(ev, text=prev.text + ev.text, logprobs=prev.logprobs + ev.logprobs)
        else:
            out.append(ev)
    return out


def model_card(model: LoadedModel, model_id: str) -> dict[str, Any]:
    """GET /v1/models' entry: OpenAI's fields, then what the run folder says about the model."""
    from ..rundir import summary

    run = Path(model.source)
    try:
        stats = summary(run)
    except Exception:  # noqa: BLE001 - the extras are optional: a folder without them still serves
        stats = {}
    return {"id": model_id, "object": "model", "created": int(run.stat().st_mtime) if run.exists() else 0, "owned_by": "pocketgpt",
            "parameters": model.model.num_params(), "context": model.block_size,
            "tokenizer": {"kind": model.tokenizer.kind, "vocab_size": model.tokenizer.vocab_size},
            "chat_template": bool(getattr(model.tokenizer, "chat_template", None)),
            "iterations": stats.get("iters"), "best_val_loss": stats.get("best_val_loss"),
            "best_val_bpb": stats.get("best_val_bpb")}


def weights_stamp(run_dir: str | Path, checkpoint: str) -> Callable[[], tuple[int, int]]:
    """What --reload watches: the mtime and size of the run's weights file. Checkpoints are written
    to a temporary name and renamed, so a changed stamp is always a complete file."""
    from ..loading import weights_path

    def stamp() -> tuple[int, int]:
        st = weights_path(Path(run_dir), checkpoint).stat()
        return st.st_mtime_ns, st.st_size

    return stamp


class _Server:
    """What the routes share: the scheduler, the limits and the model's name."""

    def __init__(self, scheduler: Scheduler, limits: Limits, model_id: str):
        self.scheduler, self.limits, self.model_id = scheduler, limits, model_id
        self._outbox: _Outbox | None = None

    def outbox(self) -> _Outbox:
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = _Outbox(loop)
        return self._outbox

    def wake(self) -> None:
        """The scheduler's end of turn: the events of the step go to the loop together."""
        if self._outbox is not None:
            self._outbox.wake()

    def ready_model(self) -> LoadedModel:
        model = self.scheduler.model
        if not self.scheduler.ready.is_set() or model is None:
            raise ApiError("the model is still loading", status=503, kind="server_error")
        return model

    def check_prompts(self, req: GenRequest) -> GenRequest:
        """The request with a chat's messages made the model's prompt; token counts checked against
        the context, here, so the answer is a 400 naming the field."""
        model = self.ready_model()
        param = "messages" if req.chat else "prompt"
        try:
            if req.chat:
                made = chat_prompt(model.tokenizer, req.messages)
                req = dataclasses.replace(req, prompts=[made.prompt],
                                          settings=req.settings.replace(stop=req.settings.stop + made.stop))
            counts = [len(p) if isinstance(p, list) else len(model.tokenizer.encode(p)) for p in req.prompts]
        except Exception as e:  # noqa: BLE001 - a character the tokenizer lacks, a template that fails
            raise ApiError(str(e).splitlines()[0], param) from None
        for n in counts:
            if n == 0:
                raise ApiError(f"{param} is empty; give at least one character", param)
            if n > model.block_size:
                raise ApiError(f"{param} is {n} tokens but the model's context is {model.block_size}", param)
        return req

    async def generate(self, request: Request, req: GenRequest) -> Any:
        req = self.check_prompts(req)
        queue: asyncio.Queue = asyncio.Queue()
        outbox = self.outbox()
        job = Job(req.prompts, req.settings, lambda ev: outbox.put(queue, ev), self.limits.timeout_s)
        self.scheduler.submit(job)
        try:
            first = await self._next(request, queue, job)
        except BaseException:
            self.scheduler.cancel(job)
            raise
        if isinstance(first, ApiError):
            raise first
        if req.stream:
            return StreamingResponse(self._events(request, req, queue, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await self._collect(request, req, queue, job)
        finally:
            self.scheduler.cancel(job)

    async def _next(self, request: Request, queue: asyncio.Queue, job: Job) -> Any:
        """The next event; every second without one, check whether the client has gone."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    raise ApiError("the client disconnected", status=499) from None

    async def _collect(self, request: Request, req: GenRequest, queue: asyncio.Queue, job: Job) -> dict[str, Any]:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[Any]] = {}
        finals: list[Chunk] = []
        while (ev := await self._next(request, queue, job)) != DONE:
            if isinstance(ev, ApiError):
                raise ev
            if ev is STARTED:
                continue
            texts.setdefault(ev.index, []).append(ev.text)
            logprobs.setdefault(ev.index, []).extend(ev.logprobs)
            if ev.finish_reason is not None:
                finals.append(ev)
        joined = {i: "".join(parts) for i, parts in texts.items()}
        return api.full_response(req, self.model_id, joined, finals, logprobs)

    async def _events(self, request: Request, req: GenRequest, queue: asyncio.Queue, job: Job) -> AsyncIterator[str]:
        """Server-sent events; a client that leaves cancels the generator, and finally frees the job."""
        seen: set[int] = set()
        offsets: dict[int, int] = {}  # per choice: characters sent so far, with its prompt (text_offset)
        finals: list[Chunk] = []
        sse = _ChunkEvents(req, self.model_id)
        try:
            done = False
            while not done:
                events = [await queue.get()]
                while not queue.empty():  # what else is already here goes out in the same write
                    events.append(queue.get_nowait())
                out = []
                for ev in _merged(events):
                    if ev == DONE or isinstance(ev, ApiError):
                        done = True
                        if isinstance(ev, ApiError):  # the headers are out: the error goes as an event
                            out.append(_sse(ev.body()))
                        elif req.include_usage:
                            out.append(_sse(api.usage_response(req, self.model_id, finals)))
                        out.append("data: [DONE]\n\n")
                        break
                    if ev is STARTED:
                        continue
                    offset = offsets.get(ev.index, api.prompt_chars(req, ev.index))
                    out.append(sse.event(ev, ev.index not in seen, offset))
                    offsets[ev.index] = offset + sum(len(t.token) for t in ev.logprobs)
                    seen.add(ev.index)
                    if ev.finish_reason is not None:
                        finals.append(ev)
                if out:
                    yield "".join(out)
        finally:
            self.scheduler.cancel(job)


def create_app(run_dir: str | Path, *, checkpoint: str = "best", device: str = "cpu", vocab: str | Path | None = None,
               limits: Limits = Limits(),
               api_key: str | None = None, cors_origins: Sequence[str] = (),
               on_load_error: Callable[[str], None] | None = None, reload: bool = False,
               reload_every_s: float = 2.0, on_reload: Callable[[str], None] | None = None) -> FastAPI:
    """The app serving one run folder; the model loads on the scheduler thread at startup.
    reload: watch the run's weights file (its mtime and size, every reload_every_s) and serve new
    weights when training writes them; on_reload gets a line each time (the CLI prints it)."""
    from ..loading import load

    metrics = Metrics()
    scheduler = Scheduler(lambda: load(run_dir, checkpoint=checkpoint, device=device, vocab=vocab), limits,
                          on_load_error, metrics, watch=weights_stamp(run_dir, checkpoint) if reload else None,
                          reload_every_s=reload_every_s, on_reload=on_reload)
    metrics.gauges = lambda: (scheduler.waiting, scheduler.active_samples, scheduler.active_requests, limits.max_active)
    server = _Server(scheduler, limits, Path(run_dir).resolve().name)
    scheduler.after_turn = server.wake

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="pocketgpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    _routes(app, server)
    page = page_html(bool(api_key), limits.max_tokens)

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)
    if cors_origins:  # closed unless asked for; added last, so it is outermost and preflights pass
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error_response(e)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """404 / 405 and friends in OpenAI's error shape too."""
    return _error_response(ApiError(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code))


def _routes(app: FastAPI, server: _Server) -> None:
    limits = server.limits

    @app.get("/health")
    async def health() -> JSONResponse:
        sched = server.scheduler
        if sched.load_error:
            return JSONResponse({"status": "error", "message": sched.load_error}, status_code=503)
        if not sched.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = server.ready_model()
        return {"object": "list", "data": [model_card(model, server.model_id)]}

    async def endpoint(request: Request, parse: Callable[[dict, Limits], GenRequest]) -> Any:
        return await server.generate(request, parse(await _read_json(request, limits), limits))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await endpoint(request, api.parse_completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await endpoint(request, api.parse_chat)

