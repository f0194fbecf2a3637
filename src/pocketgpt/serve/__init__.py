"""`pocketgpt serve`: an OpenAI-compatible HTTP API over one run folder (FastAPI + uvicorn, the `serve` extra).

  api.py        request bodies -> GenRequest (one SamplingSettings) or ApiError; response shapes (no FastAPI)
  scheduler.py  the thread that owns the model and steps every request together, one batched
                forward per token (the model's loading.TextBatch), and reloads new weights (no FastAPI)
  metrics.py    GET /metrics: Prometheus text format by hand (requests, tokens, latencies, queue, streams)
  app.py        the FastAPI app: routes, API key, CORS, errors in OpenAI's shape, server-sent events
  page.html     GET /: one self-contained page (no CDN) that streams /v1/completions in a browser

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, GET /.
"""

from .api import ApiError, Limits

__all__ = ["ApiError", "Limits", "create_app"]


def __getattr__(name: str):  # create_app imports FastAPI: only when asked for
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
