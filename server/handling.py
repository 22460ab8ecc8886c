"""What both endpoints share: waiting for a request's rows (dropping them when the client goes away),
timings, metrics and response headers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import Request

from server.batching import RowResult
from server.errors import ClientGone, DeadlineExceeded, InvalidInput, PayloadTooLarge
from server.metrics import Metrics


@dataclass
class Timings:
    started: float = field(default_factory=time.perf_counter)
    timeout_s: float = float("inf")  # the request's deadline, from `started`
    tokenization_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0

    def headers(self) -> dict[str, str]:
        total = time.perf_counter() - self.started
        ms = lambda s: f"{s * 1000:.2f}"
        return {
            "x-total-time-ms": ms(total),
            "x-tokenization-time-ms": ms(self.tokenization_s),
            "x-queue-time-ms": ms(self.queue_s),
            "x-inference-time-ms": ms(self.inference_s),
        }

    @property
    def deadline(self) -> float:
        """perf_counter time after which nobody waits for this request's rows."""
        return self.started + self.timeout_s

    def observe(self, metrics: Metrics, model: str, endpoint: str, tokens: int) -> None:
        metrics.request_seconds.labels(model, endpoint).observe(time.perf_counter() - self.started)
        metrics.tokenization_seconds.labels(model, endpoint).observe(self.tokenization_s)
        metrics.queue_seconds.labels(model, endpoint).observe(self.queue_s)
        metrics.inference_seconds.labels(model, endpoint).observe(self.inference_s)
        metrics.input_tokens.labels(model, endpoint).observe(tokens)


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for_rows(request: Request, futures: list[asyncio.Future], timings: Timings) -> list[RowResult]:
    """All rows' results; if the client disconnects first, its queued rows are dropped (ClientGone); past
    the deadline they are dropped too (DeadlineExceeded, a 504)."""
    gathered = asyncio.gather(*futures)
    watcher = asyncio.ensure_future(_disconnected(request))
    timeout = max(0.0, timings.deadline - time.perf_counter()) if timings.timeout_s != float("inf") else None
    try:
        done, _ = await asyncio.wait({gathered, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if gathered not in done:
        gathered.cancel()  # cancels the row futures: the batcher skips them
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log
        if watcher in done:
            raise ClientGone()
        raise DeadlineExceeded(f"the request was not answered within its deadline of {timings.timeout_s:g} s")
    try:
        results = gathered.result()  # a row's error (deadline, shutdown) is raised here
    except BaseException:
        for future in futures:  # the request fails as a whole: its other rows need not run
            future.cancel()
        raise
    # A request's rows may run in several batches: the queue time is the longest wait, the inference
    # time the sum of distinct batches (rows of one batch share its time).
    timings.queue_s = max(r.queue_s for r in results)
    timings.inference_s = sum({r.batch: r.inference_s for r in results}.values())
    return results


def check_text(text: str, where: str) -> None:
    """Any text JSON allows is either tokenizable or a clear 422: blank, or a lone surrogate (JSON's
    "\\ud800" is legal but no Unicode text; the tokenizer cannot take it)."""
    if not text.strip():
        raise InvalidInput(f"{where} is empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidInput(
            f"{where} is not valid Unicode text: a lone surrogate {text[err.start]!r} at character {err.start}"
        ) from None


def check_count(n: int, limit: int, what: str) -> None:
    if n == 0:
        raise InvalidInput(f"no {what} given")
    if n > limit:
        raise PayloadTooLarge(f"{n} {what} in one request; the limit is {limit}")
