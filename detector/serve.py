"""``detector serve``: the detector as an HTTP service for moderation and newsroom pipelines.

FastAPI on uvicorn (``pip install 'detector[serve]'``), over one loaded detector
(:func:`detector.load`). The path of a request:

1. **Admission**: a bearer token when one is configured (compared in constant time), a body limit
   checked against ``Content-Length`` before anything is read and again while reading, a bounded
   queue (full: ``503`` with ``Retry-After``), and ``503`` once shutdown has begun.
2. **Decoding** in worker processes (:func:`detector.images.decode_bytes`, with the pixel bound
   that refuses decompression bombs), never in the event loop; the model set's own preprocessing
   (``transforms()``) runs there too.
3. **Scoring** in batches: requests that arrive within ``batch_wait_ms`` of each other share one
   pass of :func:`detector.scoring.score_stream`, the path every command scores through, on one
   scoring thread.

Answers are JSON: the scan row's fields and the detector's sha256. Errors are JSON with a message,
never a traceback: ``401`` bad or missing token, ``413`` body too large, ``415`` not an image type,
``422`` not decodable, truncated or too many pixels, ``503`` busy or shutting down.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time.

import asyncio
import hmac
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from .ensemble import Ensemble
from .images import DEFAULT_MAX_PIXELS, ImageError, decode_bytes
from .resources import require
from .scoring import Preparation, score_stream

__all__ = ["ServeOptions", "create_app", "read_token", "serve"]

TOKEN_ENV = "DETECTOR_TOKEN"


@dataclass(frozen=True)
class ServeOptions:
    """How the service admits, decodes and batches requests."""

    max_body_mb: float = 50.0
    batch_wait_ms: float = 5.0
    max_batch: int = 16
    queue_size: int = 64
    decode_workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 64  # per batch request
    token: str | None = None

    def __post_init__(self) -> None:
        if self.max_body_mb <= 0 or self.batch_wait_ms < 0 or self.max_batch < 1 or self.queue_size < 1:
            raise ValueError("max_body_mb > 0, batch_wait_ms >= 0, max_batch >= 1 and queue_size >= 1, please")
        if self.decode_workers < 0 or self.max_files < 1:
            raise ValueError("decode_workers >= 0 and max_files >= 1, please")

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class Refused(Exception):
    """A request the service answers with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _decode(data: bytes, name: str, max_pixels: int, prepare: Preparation) -> dict:
    """In a decode worker: the upload's pixels, prepared for the model set, or its error."""
    try:
        image = decode_bytes(data, name, max_pixels)
        return {"format": image.format, **prepare(image.pixels), "error": ""}
    except ImageError as err:
        return {"error": str(err), "width": None, "height": None, "format": ""}


class _Batcher:
    """Prepared images in, verdicts out: a bounded queue drained in batches by one scoring thread."""

    def __init__(self, model: Ensemble, options: ServeOptions, metrics) -> None:
        self.model, self.options, self.metrics = model, options, metrics
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=options.queue_size)
        self.task: asyncio.Task | None = None

    def submit(self, item: dict) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise Refused(503, "busy: the queue is full, try again shortly", {"Retry-After": "1"}) from None
        self.metrics["queue"].set(self.queue.qsize())
        return future

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.options.batch_wait_ms / 1000
            while len(batch) < self.options.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            self.metrics["queue"].set(self.queue.qsize())
            self.metrics["batch"].observe(len(batch))
            try:
                results = await asyncio.to_thread(self._score, [item for item, _ in batch])
            except Exception as err:  # noqa: BLE001 - a failed batch fails its requests, not the service
                results = [(None, f"unexpected {type(err).__name__}: {err}")] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def _score(self, items: list[dict]) -> list[tuple[Any, str]]:
        stream = score_stream(self.model, items, batch_size=self.options.max_batch)
        return [(scored.verdict, scored.error) for scored in stream]


def _answer(name: str, item: dict, verdict, error: str, seconds: float, sha256: str) -> dict:
    """A scan row's fields as JSON (see README, Scanning images)."""
    out = {"path": name, "logit": None, "probability": None, "label": "", "width": item.get("width"),
           "height": item.get("height"), "format": item.get("format", ""), "n_patches": 0, "seconds": round(seconds, 4),
           "error": error, "members": {}, "detector_sha256": sha256}
    if verdict is not None:
        # no probability for an image too small to judge: JSON has no NaN
        out.update(logit=verdict.logit, probability=verdict.probability if verdict.judged else None, label=verdict.label,
                   n_patches=verdict.n_patches,
                   members={n: {"logit": v.logit, "probability": v.probability if v.judged else None}
                            for n, v in verdict.members.items()})
    return out


def create_app(model: Ensemble, options: ServeOptions = ServeOptions()):
    """The FastAPI application serving ``model`` (see the module docstring)."""
    fastapi = require("fastapi", "serve", "detector serve")
    prometheus = require("prometheus_client", "serve", "detector serve")
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    registry = prometheus.CollectorRegistry()
    metrics = {
        "requests": prometheus.Counter("detector_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                       registry=registry),
        "latency": prometheus.Histogram("detector_request_seconds", "Request latency", ["endpoint"], registry=registry,
                                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
        "queue": prometheus.Gauge("detector_queue_depth", "Images waiting to be scored", registry=registry),
        "batch": prometheus.Histogram("detector_batch_size", "Images per scoring batch", registry=registry,
                                      buckets=(1, 2, 4, 8, 16, 32, 64)),
        "images": prometheus.Counter("detector_images", "Images answered by label", ["label"], registry=registry),
    }
    described = model.describe()
    sha256 = str(described.get("weights_sha256", ""))
    prepare = model.transforms()
    state: dict[str, Any] = {"ready": False, "draining": False, "pool": None, "batcher": None}

    async def lifespan(app):
        # spawned, not forked: a fork of a process running torch and ONNX Runtime threads can deadlock
        state["pool"] = (ProcessPoolExecutor(options.decode_workers, mp_context=multiprocessing.get_context("spawn"))
                         if options.decode_workers else None)
        batcher = _Batcher(model, options, metrics)
        batcher.task = asyncio.create_task(batcher.run())
        state["batcher"], state["ready"] = batcher, True
        yield
        state["ready"] = False
        batcher.task.cancel()
        if state["pool"] is not None:  # the decode workers go with the server, none is left behind
            await asyncio.to_thread(state["pool"].shutdown, wait=True, cancel_futures=True)

    app = fastapi.FastAPI(title="detector", version=str(described.get("architecture", "")), lifespan=lifespan,
                          docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    def refuse(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers or {})

    @app.middleware("http")
    async def admit(request: Request, call_next):
        endpoint = request.url.path
        t0 = time.perf_counter()
        if endpoint.startswith("/v1/"):
            if state["draining"]:
                response = refuse(503, "shutting down: send it elsewhere or later", {"Retry-After": "5"})
            elif options.token and not _authorised(request.headers.get("authorization", ""), options.token):
                response = refuse(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            elif _declared_length(request) > options.max_body:
                response = refuse(413, f"body larger than {options.max_body_mb:g} MB")
            else:
                try:
                    response = await call_next(request)
                except Refused as err:
                    response = refuse(err.status, err.message, err.headers)
        else:
            response = await call_next(request)
        metrics["requests"].labels(endpoint, str(response.status_code)).inc()
        metrics["latency"].labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused):
        return refuse(err.status, err.message, err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # never a traceback on the wire
        return refuse(500, f"internal error ({type(err).__name__})")

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > options.max_body:
                raise Refused(413, f"body larger than {options.max_body_mb:g} MB")
            chunks.append(chunk)
        return b"".join(chunks)

    async def uploads(request: Request, many: bool) -> list[tuple[str, bytes]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind.startswith("multipart/form-data"):
            form = await request.form(max_files=options.max_files, max_part_size=options.max_body)
            files = [(str(getattr(v, "filename", "") or ""), await v.read())
                     for k, v in form.multi_items() if k in ("file", "files") and hasattr(v, "read")]
            if not files:
                raise Refused(422, "no image in the form: send it as the field 'file'")
            if not many and len(files) > 1:
                raise Refused(422, "one image per /v1/scan request; /v1/scan/batch takes several")
            return files
        if many:
            raise Refused(415, "a batch is a multipart/form-data request with one 'files' field per image")
        if not kind.startswith("image/") and kind != "application/octet-stream":
            raise Refused(415, f"send the image as the body with Content-Type image/*, or as the multipart field "
                               f"'file' (got {kind or 'no Content-Type'})")
        return [("", await read_body(request))]

    async def score(name: str, data: bytes) -> dict:
        t0 = time.perf_counter()
        if not data:
            raise Refused(422, "empty body: no image")
        loop = asyncio.get_running_loop()
        item = await loop.run_in_executor(state["pool"], _decode, data, name, options.max_pixels, prepare)
        if item["error"]:
            return _answer(name, item, None, item["error"], time.perf_counter() - t0, sha256)
        verdict, error = await state["batcher"].submit(item)
        metrics["images"].labels(verdict.label if verdict is not None else "error").inc()
        return _answer(name, item, verdict, error, time.perf_counter() - t0, sha256)

    @app.post("/v1/scan")
    async def scan_one(request: Request):
        (name, data), = await uploads(request, many=False)
        answer = await score(name, data)
        # not decodable, truncated, too many pixels, too small: the row's error, as a 422
        return JSONResponse(answer, status_code=422 if answer["error"] else 200)

    @app.post("/v1/scan/batch")
    async def scan_many(request: Request):
        files = await uploads(request, many=True)
        answers = await asyncio.gather(*(score(name, data) for name, data in files))
        return {"results": list(answers), "detector_sha256": sha256}

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"] or state["draining"]:
            return refuse(503, "not ready")
        return {"status": "ready", "detector_sha256": sha256}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(prometheus.generate_latest(registry).decode(), media_type=prometheus.CONTENT_TYPE_LATEST)

    @app.get("/v1/detector")
    async def detector_record():
        return described

    return app


def _authorised(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _declared_length(request) -> int:
    try:
        return int(request.headers.get("content-length", "0"))
    except ValueError:
        return 0


def read_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$DETECTOR_TOKEN``, else None (no auth)."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    with open(token_file, encoding="utf-8") as fh:
        token = fh.readline().strip()
    if not token:
        raise ValueError(f"{token_file}: its first line holds no token")
    return token


def serve(model: Ensemble, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions = ServeOptions(),
          log=print) -> None:
    """Run the service until SIGTERM or SIGINT: requests in flight finish, new ones get ``503``."""
    uvicorn = require("uvicorn", "serve", "detector serve")
    app = create_app(model, options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30))
    original = server.handle_exit

    def drain(sig: int, frame) -> None:
        app.state.serve["draining"] = True  # new requests: 503; uvicorn lets the ones in flight finish
        original(sig, frame)

    server.handle_exit = drain  # uvicorn re-raises the signal once drained: the exit status says SIGTERM
    log(f"detector serve: http://{host}:{port} (POST /v1/scan, /v1/scan/batch; GET /healthz, /readyz, /metrics, "
        f"/v1/detector){' with bearer-token auth' if options.token else ''}; Ctrl-C or SIGTERM stops it")
    server.run()  # returns after a graceful stop by Ctrl-C (SIGTERM ends the process once drained)
