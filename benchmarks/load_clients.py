"""Load generators for benchmarks/load_test.py: closed loop and open loop over raw keep-alive HTTP/1.1.

The load generator shares the server's cores on one machine, so every microsecond it spends per request is
taken from the server (and, for a fast model, is a large part of a request's cost: aiohttp's client costs
about as much CPU per request as the server's own HTTP handling). These clients do the least Python can do:
every request's bytes are encoded once before the run, a response is read by its Content-Length (or its
chunks), and connections are kept alive. Latency is measured from the write to the last byte read.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Result:
    config: str
    mode: str  # "closed c=16" / "open 100/s"
    duration_s: float
    ok: int = 0
    errors: dict = field(default_factory=dict)
    throughput: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass
class Tally:
    """What one measurement saw, over one or more windows (interleaved rounds add up here)."""

    latencies: list[float] = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def result(self, config: str, mode: str) -> Result:
        res = Result(config, mode, round(self.elapsed_s, 2), ok=len(self.latencies), errors=dict(self.errors))
        if self.elapsed_s > 0:
            res.throughput = round(len(self.latencies) / self.elapsed_s, 1)
        if self.latencies:
            lat = np.array(self.latencies) * 1000
            res.p50_ms, res.p95_ms, res.p99_ms = (round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99))
        return res


def encode_requests(url: str, path: str, bodies: list[dict]) -> list[bytes]:
    """Each JSON body → the whole HTTP/1.1 POST request, as bytes."""
    host = urlsplit(url).netloc
    out = []
    for body in bodies:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        out.append(head.encode("latin-1") + payload)
    return out


class Connection:
    """One keep-alive connection; `post` → the response's status code (the body is read and dropped)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1."):
                raise ValueError(f"not an HTTP/1.x response: {head[:40]!r}")
            status = int(head[9:12])
            lower = head.lower()
            if b"transfer-encoding: chunked" in lower:
                await self._read_chunks()
            else:
                at = lower.find(b"content-length:")
                length = int(lower[at + 15 : lower.index(b"\r\n", at)]) if at >= 0 else 0
                await self.reader.readexactly(length)
            if b"connection: close" in lower:
                self.close()
            return status
        except BaseException:
            self.close()  # a half-read response leaves the connection unusable
            raise

    async def _read_chunks(self) -> None:
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await self.reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                return

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


CLIENT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, asyncio.TimeoutError)


async def _one(conn: Connection, request: bytes, since: float, tally: Tally, timeout_s: float) -> None:
    try:
        status = await asyncio.wait_for(conn.post(request), timeout_s)
    except CLIENT_ERRORS as err:
        tally.error(type(err).__name__)
        return
    if status == 200:
        tally.latencies.append(time.perf_counter() - since)
    else:
        tally.error(str(status))


async def closed_loop(url: str, requests: list[bytes], concurrency: int, duration: float, tally: Tally,
                      seed: int = 0, timeout_s: float = 60.0) -> None:  # fmt: skip
    """`concurrency` clients, each sending its next request when the last one is answered, for `duration` s."""
    stop = time.perf_counter() + duration

    async def client(i: int):
        rng, conn = random.Random(seed * 1000 + i), Connection(url)
        while time.perf_counter() < stop:
            await _one(conn, rng.choice(requests), time.perf_counter(), tally, timeout_s)
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    tally.elapsed_s += time.perf_counter() - t0


async def open_loop(url: str, requests: list[bytes], rate: float, duration: float, tally: Tally,
                    seed: int = 0, timeout_s: float = 60.0) -> None:  # fmt: skip
    """Requests sent at a fixed rate; latency counts from the scheduled send time, so a slow server cannot
    hide its queueing. Idle connections are reused; a new one is opened when none is free."""
    rng, idle, tasks = random.Random(seed), [], []

    async def one(scheduled: float, request: bytes):
        conn = idle.pop() if idle else Connection(url)
        await _one(conn, request, scheduled, tally, timeout_s)
        idle.append(conn)

    t0 = time.perf_counter()
    for k in range(int(rate * duration)):
        scheduled = t0 + k / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, rng.choice(requests))))
    await asyncio.gather(*tasks)
    tally.elapsed_s += time.perf_counter() - t0
    for conn in idle:
        conn.close()
