"""The raw HTTP load clients against a loopback server that answers with each framing the clients must read:
Content-Length, chunked, and a 429 that closes the connection."""

from __future__ import annotations

import asyncio
import json

from load_clients import Tally, closed_loop, encode_requests, open_loop

RESPONSES = {
    "length": b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}',
    "chunked": b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n',
    "busy": b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
}


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
            seen.append(body)
            writer.write(RESPONSES[body["answer"]])
            await writer.drain()
            if body["answer"] == "busy":
                break
    except asyncio.IncompleteReadError:
        pass
    writer.close()


async def _run(loop_fn, x, answers: list[str]) -> tuple[Tally, list]:
    seen: list = []
    server = await asyncio.start_server(lambda r, w: _serve(r, w, seen), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    requests = encode_requests(url, "/v1/classify", [{"answer": a} for a in answers])
    tally = Tally()
    async with server:
        await loop_fn(url, requests, x, 0.3, tally)
    return tally, seen


def test_closed_loop_reads_every_framing_and_counts_statuses():
    tally, seen = asyncio.run(_run(closed_loop, 3, ["length", "chunked", "busy"]))
    answered = {"length": 0, "chunked": 0, "busy": 0}
    for body in seen:
        answered[body["answer"]] += 1
    assert answered["busy"] > 0 and answered["length"] > 0 and answered["chunked"] > 0
    assert len(tally.latencies) == answered["length"] + answered["chunked"]  # every 200 read to its end
    assert tally.errors == {"429": answered["busy"]}  # the closed connection is reopened, not an error
    result = tally.result("x", "closed c=3")
    assert result.ok == len(tally.latencies) and result.throughput > 0 and 0 < result.p50_ms <= result.p99_ms


def test_open_loop_sends_at_its_rate():
    tally, seen = asyncio.run(_run(open_loop, 100.0, ["length", "chunked"]))
    assert len(seen) == 30 and len(tally.latencies) == 30 and not tally.errors
