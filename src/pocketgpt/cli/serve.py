"""`pocketgpt serve`: the OpenAI-compatible HTTP server (pocketgpt.serve) on uvicorn."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..errors import PocketError
from .options import AddCommand, add_checkpoint, add_vocab

INSTALL_HINT = 'pip install "pocketgpt[serve]"'


def add_serve(command: AddCommand) -> None:
    """The `serve` subcommand's options, their defaults the server's own Limits."""
    from ..serve.api import Limits

    d = Limits()
    p = command("serve", help="serve a model over HTTP: an OpenAI-compatible API",
                description="An OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) "
                            "and /health, on FastAPI + uvicorn (pip install \"pocketgpt[serve]\").")
    p.add_argument("--model", required=True, help="a run folder (the --out of train), a Hugging Face GPT-2 folder or "
                                                 "hub name, or a nanoGPT checkpoint")
    add_checkpoint(p)
    add_vocab(p)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (not for /health)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable); default: none")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"cap on a request's max_tokens ({d.max_tokens})")
    p.add_argument("--max-n", type=int, default=d.max_n, help=f"cap on a request's n ({d.max_n})")
    p.add_argument("--max-active", type=int, default=d.max_active,
                   help=f"requests generating at once, batched in one decode step ({d.max_active})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting beyond those; more get 429 ({d.max_queue})")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help=f"seconds one request may take ({d.timeout_s:g})")
    p.add_argument("--max-body", type=int, default=d.max_body_bytes, help=f"request body bytes ({d.max_body_bytes})")
    p.add_argument("--reload", action="store_true",
                   help="watch the run folder and serve new weights as training writes them (running "
                        "requests finish on the weights they started with)")


def limits_from(args: argparse.Namespace) -> object:
    from ..serve.api import Limits

    values = {"max_tokens": args.max_tokens, "max_n": args.max_n, "max_queue": args.max_queue,
              "max_active": args.max_active, "timeout_s": args.timeout, "max_body_bytes": args.max_body}
    for name, v in values.items():
        if v <= 0:
            raise PocketError(f"--{name.removesuffix('_s').replace('_', '-')} must be positive, got {v}")
    return Limits(**values)


def _check_source(src: str) -> None:
    """A source that is not a run folder: a path that is no model, or a hub name neither cached nor
    downloadable, is refused now (a hub model is downloaded now; its weights load once the server runs)."""
    from ..hf import resolve_hub, source_kind
    from ..rundir import check_is_run

    kind = source_kind(src)
    if kind is None:
        check_is_run(src)  # "model not found: ...", or what the path is instead
    elif kind == "hub":
        resolve_hub(src)


def _check_address(host: str, port: int) -> None:
    """Refuse a port out of range, or an address this machine cannot listen on (in use, not its own)."""
    import socket

    if not 1 <= port <= 65535:
        raise PocketError(f"--port must be 1-65535, got {port}")
    try:  # "" as uvicorn reads it: every interface
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PocketError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
            probe.bind(address)
    except OSError as e:
        raise PocketError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port "
                          "(or stop what holds it)") from None


def cmd_serve(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise PocketError(f"serve needs {' and '.join(missing)}; install them with: {INSTALL_HINT}")
    from ..loading import weights_path
    from ..rundir import is_run_dir

    # what can fail in one line fails here, before the server prints anything or starts loading
    run = is_run_dir(args.model)
    if run:  # a run without weights
        weights_path(Path(args.model), args.checkpoint)
    elif args.reload:
        raise PocketError(f"--reload watches a run folder's weights as training writes them; {args.model} "
                          "is not a run folder (leave out --reload)")
    limits = limits_from(args)
    _check_address(args.host, args.port)  # before a hub download, which may take a while
    if not run:
        _check_source(args.model)
    import uvicorn

    from ..serve.app import create_app

    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(args.model, checkpoint=args.checkpoint, device=args.device, vocab=args.vocab, limits=limits,
                     api_key=args.api_key, cors_origins=args.cors_origin, on_load_error=on_load_error,
                     reload=args.reload, on_reload=lambda line: print(line, file=sys.stderr, flush=True))
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=True, log_level="info",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    base = f"http://{args.host}:{args.port}"
    watching = "; new weights are picked up as they are written" if args.reload else ""
    print(f"serving {args.model}: the page at {base}/, the API at {base}/v1{watching} (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    server.run()  # uvicorn handles Ctrl-C and SIGTERM: stop accepting, finish, then the scheduler stops
    if failed:
        raise PocketError(f"cannot load {args.model}: {failed[0]}")
    if not server.started:
        raise PocketError(f"could not listen on {args.host}:{args.port} (in use?)")
    return 0
