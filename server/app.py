"""The FastAPI app: state (models, batchers, metrics), lifecycle, the guard middleware and the routes."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.batching import Batcher, Row, Scheduler, default_batch_tokens, measure_batch_tokens, pad_batch
from server.errors import (
    ApiError,
    BadRequest,
    ClientGone,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    api_error_response,
    install_error_handlers,
)
from server.metrics import Metrics
from server.middleware import install_middleware
from server.openapi import install_security_scheme, is_guarded
from server.registry import Registry, load_served_model
from server.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ModelInfo,
    ModelList,
    QARequest,
    QAResponse,
)
from server.settings import ServerSettings
from server.tei import tei_router
from server.tokenize import tokenize_router

log = logging.getLogger("moebert.server")

GIL_SWITCH_INTERVAL_S = 0.0005

# Endpoints named in metrics; anything else counts as "other" (unknown paths must not add label values).
ENDPOINTS = {
    "/v1/classify": "classify",
    "/v1/qa": "qa",
    "/v1/models": "models",
    "/health/live": "live",
    "/health/ready": "ready",
    "/metrics": "metrics",
    "/v1/tokenize": "tokenize",
    "/predict": "tei_predict",
}


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = Metrics()
        self.registry = Registry()
        # One inference thread for every model: on CPU, two models at once only fight for the cores. It
        # loads the models too, so the thread pools the backends start (OpenMP, ONNX Runtime) are its
        # children and share its lower priority: the event loop keeps answering while they use every core.
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="inference",
            initializer=_lower_priority,
            initargs=(settings.inference_nice,),
        )
        # One tokenizer thread: a transformers tokenizer keeps its truncation settings in its Rust backend,
        # so two threads windowing at once flip each other's settings (and windows come out too long).
        self.tokenizer_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.scheduler: Scheduler | None = None
        self.ready = False
        self.draining = False
        self.failed: str | None = None  # why loading failed (the CLI then exits non-zero)
        self.on_fatal = _terminate_self  # the CLI replaces it with "stop uvicorn"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loading: asyncio.Task | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.scheduler = Scheduler(self.executor)
        self._loading = asyncio.create_task(self._load())

    async def tokenize(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) in the tokenizer thread."""
        return await self.loop.run_in_executor(self.tokenizer_executor, functools.partial(fn, *args, **kwargs))

    async def _load(self) -> None:
        settings = self.settings
        try:
            for name, path in settings.models.items():
                model = await self.loop.run_in_executor(self.executor, load_served_model, name, path, settings)
                model.batcher = Batcher(
                    name, model.backend.run, self.scheduler, self.metrics,
                    pad_id=model.pad_id, moe_layers=list(model.config.moe_layers),
                    max_batch_tokens=settings.max_batch_tokens or default_batch_tokens(settings.device),
                    max_batch_requests=settings.max_batch_requests,
                    max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, max_row_len=model.max_seq_len,
                    max_batch_s=settings.max_batch_ms / 1000, max_queue_wait_s=settings.request_timeout_s / 2,
                )  # fmt: skip
                if settings.warmup:
                    await self.loop.run_in_executor(self.executor, warm_up, model)
                    if settings.max_batch_tokens is None and settings.device == "cpu":
                        await self.loop.run_in_executor(self.executor, fit_batch_tokens, model)
                self.scheduler.add(model.batcher)
                self.registry.models[name] = model
            self.ready = True
            log.info("ready: %s", ", ".join(self.registry.models) or "no models")
        except Exception as err:  # a model that cannot load: say why once, then stop the server
            self.failed = f"{type(err).__name__}: {err}"
            log.error("loading models failed: %s", self.failed)
            self.on_fatal()

    def begin_drain(self) -> None:
        """SIGTERM: refuse new work now; what is queued may still run for drain_timeout_s, then it is
        answered 503 without being computed."""
        if self.draining and self._abort is not None:
            return
        self.draining = True
        self._abort = self.loop.call_later(self.settings.drain_timeout_s, self.abort_queued)

    _abort: asyncio.TimerHandle | None = None

    def abort_queued(self) -> None:
        dropped = 0
        for model in self.registry.models.values():
            if model.batcher is not None:
                model.batcher.close()
                dropped += model.batcher.fail_all(Unavailable("the server shut down before this request was computed"))
        if dropped:
            log.warning("drain: %d queued rows answered 503 without being computed", dropped)

    async def stop(self) -> None:
        self.draining = True
        if self._abort is not None:
            self._abort.cancel()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        self.abort_queued()
        if self.scheduler is not None:
            await self.scheduler.close()  # the batch that is running finishes
        self.executor.shutdown(wait=True)
        # Tokenization not started yet is for requests nobody waits for any more: not run (a backlog of
        # long contexts must not hold up the exit).
        self.tokenizer_executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` (Linux: nice is per thread, and threads it starts
    inherit it); elsewhere, or where not permitted, a no-op."""
    if nice and sys.platform == "linux":
        try:
            os.nice(nice)
        except OSError as err:
            log.warning("could not lower the inference threads' priority: %s", err)


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def warm_up(model) -> None:
    """Run a few batch shapes once so the first requests do not pay for lazy initialization."""
    for rows, length in ((1, 8), (4, 16), (8, 32), (2, 128)):
        length = min(length, model.max_seq_len)
        batch = [Row([101] + [1000] * (length - 2) + [102], [0] * length, None) for _ in range(rows)]
        inputs = pad_batch(batch, model.pad_id, model.max_seq_len)
        started = time.perf_counter()
        model.backend.run(*inputs)
        if model.batcher is not None and length > 8:  # the first call pays for lazy initialization
            model.batcher.learn(time.perf_counter() - started, inputs[0].size)


def fit_batch_tokens(model) -> None:
    """Set the model's padded tokens per batch to the size it runs fastest per token (measured here)."""
    b = model.batcher
    tokens, s_per_token = measure_batch_tokens(
        model.backend.run, model.pad_id, model.max_seq_len, b.max_batch_requests, b.max_batch_s
    )
    b.max_batch_tokens = tokens
    b.learn(s_per_token * tokens, tokens)
    log.info("%s: %d padded tokens per batch (measured fastest per token: %.1f µs)", model.name, tokens,
             s_per_token * 1e6)  # fmt: skip


class Guard:
    """Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware): counts requests and in-flight,
    and for /v1/*: 503 while loading or draining, 401 without the API key, 413 for an oversized body, 408
    for a body that does not arrive in time."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = self.state.metrics
        endpoint = ENDPOINTS.get(scope["path"], "other")
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            guarded = is_guarded(scope["path"])
            rejection = self._reject(scope) if guarded else None
            if rejection is None and guarded:
                rejection, receive = await self._read_body(receive)
            if rejection is not None:
                await rejection(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, str(status[0])).inc()

    def _reject(self, scope) -> Response | None:
        state, settings = self.state, self.state.settings
        if state.draining:
            return self._error(Unavailable("the server is shutting down", close=True))
        if not state.ready:
            return self._error(Unavailable("models are loading"))
        if settings.api_key is not None:
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            expected = settings.api_key.get_secret_value()
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
                return self._error(Unauthorized())
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return self._error(BadRequest("invalid Content-Length", close=True))
                if size > settings.max_request_bytes:  # closed after the answer: its body is not worth reading
                    message = f"body of {size} bytes; the limit is {settings.max_request_bytes}"
                    return self._error(PayloadTooLarge(message, close=True))
        return None

    def _error(self, err: ApiError) -> Response:
        self.state.metrics.failures.labels(err.type).inc()
        return api_error_response(err)

    async def _read_body(self, receive):
        """The whole body, read here within body_timeout_s (a slow client gets a 408) and within
        max_request_bytes (chunked uploads have no Content-Length: 413 once over). → (rejection or None,
        a receive that replays the body and then passes on the client's disconnect)."""
        settings = self.state.settings
        chunks, size = [], 0
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return Response(status_code=499), receive  # nobody reads it
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > settings.max_request_bytes:
                        message = f"the request body is over the size limit of {settings.max_request_bytes} bytes"
                        return self._error(PayloadTooLarge(message, close=True)), receive
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            message = f"the request body did not arrive within {settings.body_timeout_s:g} s"
            return self._error(RequestTimeout(message, close=True)), receive
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


def json_response(body, timings) -> Response:
    return Response(body.model_dump_json(exclude_none=True), media_type="application/json", headers=timings.headers())


ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (401, 404, 408, 413, 422, 429, 503, 504)}


def create_app(settings: ServerSettings) -> FastAPI:
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # The event loop shares the GIL with the tokenizer and inference threads, and waits up to the switch
        # interval each time it wants it back while they run Python: at the default 5 ms, a request that
        # takes the loop a few iterations waited tens of ms behind QA windowing. 0.5 ms bounds that wait.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        await state.start()
        yield
        await state.stop()

    app = FastAPI(
        title="moebert",
        summary="MoEBERT inference: batched classification and extractive QA",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.moebert = state
    install_error_handlers(app, lambda reason: state.metrics.failures.labels(reason).inc())
    app.add_middleware(Guard, state=state)
    install_middleware(app, settings)  # request ids, access log, CORS (server/middleware.py)
    install_security_scheme(app, settings)
    app.include_router(tokenize_router(state))
    app.include_router(tei_router(state))

    async def infer(handle, body, request: Request, task: str) -> Response:
        """Run one inference handler; a client that left gets a 499 (nobody reads it) and a metric."""
        model = state.registry.get(body.model, task)
        try:
            response, timings = await handle(body, request, model, state)
        except ClientGone:
            state.metrics.failures.labels("client_gone").inc()
            return Response(status_code=499)
        return json_response(response, timings)

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES, tags=["inference"])
    async def classify_endpoint(body: ClassifyRequest, request: Request) -> Response:
        from server.classify import classify

        return await infer(classify, body, request, "classification")

    @app.post("/v1/qa", response_model=QAResponse, responses=ERROR_RESPONSES, tags=["inference"])
    async def qa_endpoint(body: QARequest, request: Request) -> Response:
        from server.question_answering import answer

        return await infer(answer, body, request, "qa")

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def models_endpoint() -> ModelList:
        return ModelList(models=[ModelInfo(**m.info()) for m in state.registry.models.values()])

    @app.get("/health/live", tags=["health"])
    async def live() -> dict:
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"])
    async def ready() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "failed" if state.failed else "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "models": list(state.registry.models)})

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        for name, model in state.registry.models.items():  # queued and running rows, not computed yet
            state.metrics.queue_depth.labels(name).set(model.batcher.depth if model.batcher else 0)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
