"""The dynamic batcher: requests put rows (one tokenized sequence each) on their model's queue; one
scheduler serves every model's queue in turn on the shared inference thread, one batch at a time.

Why these choices:
- One inference thread for all models: on a CPU box two models running at once only fight for cores.
  Models take turns (round robin) and a batch's estimated model time is bounded (`max_batch_s`), so a
  short classification waits for at most about one bounded batch of long QA, not for the QA backlog.
- A lone row waits at most `max_wait_s` for company: under load the queue fills while the model runs,
  so batches form without waiting; when idle the wait is the only latency added.
- A batch starts from the oldest row and is filled with the rows closest to it in length, so padding
  (rows × longest) stays small and no row starves; the padded-token budget caps rows × longest.
- Padded lengths are rounded up to a few buckets (`bucket_length`), so the model sees a bounded set of
  shapes: every new shape costs oneDNN a primitive and glibc fresh, differently sized buffers, and an
  unbounded set of shapes grew the resident memory without bound (see server/memory.py).
- Admission is by estimated time to answer: each model learns its seconds per padded token from the
  batches it runs; a request whose own work plus the work ahead of it (queued, running, admitted and
  still tokenizing) would take longer than `max_queue_wait_s` gets a fast 429, unless nothing waits (a
  big request on a quiet server still runs). Work is counted in padded tokens (rows rounded up to their
  length bucket), the unit the cost is learned in. A row still queued past its request's deadline is
  dropped (504) before it is computed.
- Rows whose request went away (client disconnected, cancelled) are dropped before they run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import numpy as np

from server.errors import DeadlineExceeded, Overloaded, PayloadTooLarge, Unavailable
from server.metrics import Metrics

log = logging.getLogger("moebert.server")

# Padded lengths: multiples of 16 up to 128, of 32 up to 512, then of 256 (20 shapes up to 512). A row of
# 9 tokens pays for 16 and one of 300 for 320: ≤ 1.8× on tiny rows (cheap anyway), ≤ 1.25× from 128 on.
LENGTH_BUCKETS = (*range(16, 129, 16), *range(160, 513, 32))


def bucket_length(n: int) -> int:
    for b in LENGTH_BUCKETS:
        if n <= b:
            return b
    return -(-n // 256) * 256


@dataclass(eq=False)
class Row:
    """One sequence to run. future → RowResult; deadline: perf_counter time after which nobody waits."""

    input_ids: list[int]
    token_type_ids: list[int]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")

    @property
    def cost(self) -> int:
        """Padded tokens this row adds to a batch (its length rounded up to its bucket)."""
        return bucket_length(len(self.input_ids))


@dataclass
class RowResult:
    outputs: dict[str, np.ndarray]  # this row's slice: logits [C], or start/end_logits [L] (L = row length)
    queue_s: float
    inference_s: float
    batch: int  # which batch it ran in (a request's rows may span several)


@dataclass
class BatchStats:
    rows: int
    padded_tokens: int
    real_tokens: int


def take_batch(pending: list[Row], max_tokens: int, max_rows: int) -> list[Row]:
    """One batch from `pending` (oldest first): the oldest row plus the rows nearest to it in length,
    within rows × bucketed longest ≤ max_tokens (the oldest row always goes, even alone over budget)."""
    oldest = pending[0]
    n0 = len(oldest.input_ids)
    batch, longest = [oldest], bucket_length(n0)
    for row in sorted(pending[1:], key=lambda r: (abs(len(r.input_ids) - n0), r.enqueued)):
        if len(batch) >= max_rows:
            break
        grown = max(longest, bucket_length(len(row.input_ids)))
        if (len(batch) + 1) * grown > max_tokens:
            continue  # a shorter row further down may still fit
        batch.append(row)
        longest = grown
    return batch


def pad_batch(rows: list[Row], pad_id: int, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """→ input_ids, attention_mask, token_type_ids [B, T] int64, T = the longest row rounded up to its
    length bucket, but not past max_len (the model's positions); None: no rounding. Padding is masked,
    so results do not change."""
    B, T = len(rows), max(len(r.input_ids) for r in rows)
    if max_len is not None:
        T = max(T, min(bucket_length(T), max_len))
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    token_type_ids = np.zeros((B, T), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = row.input_ids
        attention_mask[i, :n] = 1
        token_type_ids[i, :n] = row.token_type_ids
    return input_ids, attention_mask, token_type_ids


# Padded tokens per batch when none is set and none is measured: on CUDA (bigger calls only fill the GPU
# better), and on the CPU when the server starts without warm-up (between the measured best sizes below).
GPU_BATCH_TOKENS = 8192
CPU_BATCH_TOKENS = 1024
# Model-call sizes the start-up measurement tries (padded tokens), and how close to the best time per token
# a bigger size must come to be preferred (the model time is then the same, and fewer calls spread the
# server's per-batch work over more rows).
PROBE_BATCH_TOKENS = (256, 512, 1024, 2048, 4096)
PROBE_TOLERANCE = 1.05
PROBE_ROUNDS = 3  # timed calls per size, in interleaved rounds


def default_batch_tokens(device: str) -> int:
    """Padded tokens per batch when `max_batch_tokens` is not set, before (or without) the measurement."""
    return GPU_BATCH_TOKENS if device == "cuda" else CPU_BATCH_TOKENS


def measure_batch_tokens(
    run: Callable[[np.ndarray, np.ndarray, np.ndarray], dict], pad_id: int, max_row_len: int, max_rows: int,
    max_batch_s: float, sizes: tuple[int, ...] = PROBE_BATCH_TOKENS, rounds: int = PROBE_ROUNDS,
) -> tuple[int, float]:  # fmt: skip
    """The padded tokens per model call at which this model runs fastest per token, measured: → (tokens,
    seconds per token there). Rows of min(128, max_row_len) tokens, sizes from `sizes` (rows capped at
    max_rows). Each size runs once cold and once timed, in turn; larger sizes are not tried once a call takes
    longer than max_batch_s (batches are cut to that time anyway). Then `rounds` − 1 more timed rounds go
    over the sizes in turn, and each size counts its fastest call: sizes timed side by side, so that a
    slow stretch of the machine (another process on the core) lands on all of them rather than deciding
    which wins. The largest size within PROBE_TOLERANCE of the best time per token wins.

    Why measured: the best call size depends on the runtime and the machine. On 2 cores (AMX), MiniLM-L6,
    rows of 128 tokens: ONNX Runtime int8 is fastest per token at 256–512 tokens and 25% slower at 4096
    (served QA at 16 clients: 95 req/s with calls of ≤ 512 tokens, 56 with 8192); ONNX fp32 at 512; torch
    fp32 at 512–4096; torch bf16 at 4096 (benchmarks/results/batch_tokens.md)."""
    length = max(2, min(128, max_row_len))
    row = Row([101] + [1000] * (length - 2) + [102], [0] * length, None)  # type: ignore[arg-type]

    def timed(inputs) -> float:
        started = time.perf_counter()
        run(*inputs)
        return time.perf_counter() - started

    batches, best = [], []  # the sizes tried: padded inputs, fastest call (s)
    for size in sizes:
        rows = max(1, min(max_rows, size // length))
        inputs = pad_batch([row] * rows, pad_id, max_row_len)
        run(*inputs)  # cold: first call of this shape
        batches.append(inputs)
        best.append(timed(inputs))
        if best[-1] > max_batch_s or rows == max_rows:
            break
    for _ in range(rounds - 1):
        for i, inputs in enumerate(batches):
            best[i] = min(best[i], timed(inputs))
    measured = {int(inputs[0].size): s / int(inputs[0].size) for inputs, s in zip(batches, best, strict=True)}
    fastest = min(measured.values())
    tokens = max(t for t, rate in measured.items() if rate <= PROBE_TOLERANCE * fastest)
    return tokens, measured[tokens]


class Scheduler:
    """Runs every model's batches on one inference thread, the models taking turns (round robin)."""

    def __init__(self, executor: Executor):
        self.executor = executor
        self.batchers: list[Batcher] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._turn = 0
        self._closing = False

    def add(self, batcher: Batcher) -> None:
        self.batchers.append(batcher)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="scheduler")

    def wake(self) -> None:
        self._wakeup.set()

    def busy_models(self) -> int:
        return sum(1 for b in self.batchers if b.depth)

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while True:
            for b in self.batchers:
                b.drop_dead()
            now = time.perf_counter()
            waits = [b.ready_in(now) for b in self.batchers]
            ready = [i for i, w in enumerate(waits) if w is not None and w <= 0]
            if not ready:
                if self._closing and not any(b.depth for b in self.batchers):
                    return
                pending = [w for w in waits if w is not None]
                self._wakeup.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), min(pending) if pending else None)
                continue
            n = len(self.batchers)
            pick = min(ready, key=lambda i: (i - self._turn) % n)  # the next ready model from the turn on
            self._turn = (pick + 1) % n
            await self.batchers[pick].run_next_batch()


class Batcher:
    """One model's queue: admission (429/413), batch forming, running on the scheduler's thread."""

    def __init__(
        self,
        model_name: str,
        run: Callable[[np.ndarray, np.ndarray, np.ndarray], dict],
        scheduler: Scheduler,
        metrics: Metrics,
        *,
        pad_id: int,
        moe_layers: list[int],
        max_batch_tokens: int,
        max_batch_requests: int,
        max_wait_ms: float,
        max_queue: int,
        max_row_len: int,
        max_batch_s: float = 0.25,
        max_queue_wait_s: float = 5.0,
    ):
        self.model_name = model_name
        self._run = run
        self._scheduler = scheduler
        self._metrics = metrics
        self._pad_id = pad_id
        self._moe_layers = moe_layers
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_row_len = max_row_len
        self.max_batch_s = max_batch_s
        self.max_queue_wait_s = max_queue_wait_s
        self.s_per_token: float | None = None  # learned from the batches run (an EWMA)
        self._pending: deque[Row] = deque()
        self._queued_tokens = 0
        self._reserved_rows = 0  # admitted requests still tokenizing
        self._reserved_tokens = 0
        self._running_rows = 0
        self._running_tokens = 0
        self._closing = False
        self._batches = 0
        self._depth = metrics.queue_depth.labels(model_name)
        self._batch_size = metrics.batch_size.labels(model_name)
        self._batch_tokens = metrics.batch_tokens.labels(model_name)
        self._padding = metrics.padding_ratio.labels(model_name)

    # -- requests side ---------------------------------------------------------------------------

    def estimated_wait_s(self, extra_tokens: int = 0) -> float:
        """Model time until `extra_tokens` more padded tokens would be done: this model's backlog, times the
        number of models taking turns (each gets one bounded batch per round)."""
        if self.s_per_token is None:
            return 0.0
        backlog = self._queued_tokens + self._running_tokens + self._reserved_tokens + extra_tokens
        return backlog * self.s_per_token * max(1, self._scheduler.busy_models())

    def admit(self, rows: int, tokens: int) -> None:
        """Raise (413/429/503) unless `rows` rows (`tokens` padded tokens) could be queued now: cheap, so
        called before the expensive work (QA windowing) with an estimate (reserve), or by submit.
        429 when the estimated time to answer it, the work ahead (queued, running, reserved) plus its own,
        is over max_queue_wait_s while anything waits: accepted work then finishes well inside its deadline,
        and a big request on a quiet server still runs."""
        waiting = self._check_rows(rows)
        if not waiting:  # nothing ahead of it: even a big request runs
            return
        wait = self.estimated_wait_s(tokens)
        if wait > self.max_queue_wait_s:
            raise Overloaded(
                f"model {self.model_name!r} is busy: about {wait:.1f} s until this request would be answered "
                f"(limit {self.max_queue_wait_s:g} s)"
            )

    def _check_rows(self, rows: int) -> int:
        """The hard limits (shutting down, the row cap): raise 503/413/429; → rows waiting ahead."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        if rows > self.max_queue:
            raise PayloadTooLarge(
                f"the request needs {rows} rows; model {self.model_name!r} queues at most {self.max_queue} "
                "(send fewer or shorter inputs)"
            )
        waiting = self.depth + self._reserved_rows
        if waiting + rows > self.max_queue:
            raise Overloaded(f"model {self.model_name!r} has {waiting} rows waiting (limit {self.max_queue})")
        return waiting

    @contextmanager
    def reserve(self, rows: int, tokens: int) -> Iterator[None]:
        """admit(), and hold that room while the request tokenizes, so that concurrent requests see it;
        the room is given back on exit, just before the request's submit() (no await in between)."""
        self.admit(rows, tokens)
        self._reserved_rows += rows
        self._reserved_tokens += tokens
        try:
            yield
        finally:
            self._reserved_rows -= rows
            self._reserved_tokens -= tokens

    def submit(
        self, encoded: list[tuple[list[int], list[int]]], deadline: float = float("inf"), *, reserved: bool = False
    ) -> list[asyncio.Future]:
        """Queue (input_ids, token_type_ids) rows; all or none. deadline: perf_counter time. reserved: the
        request was admitted by reserve() (its room held while it tokenized), so only the hard limits are
        checked again: a request is not refused for its time estimate after its tokenization was paid for."""
        for ids, _ in encoded:  # the model's position table ends here: a longer row would crash it
            if len(ids) > self.max_row_len:
                raise PayloadTooLarge(
                    f"a row of {len(ids)} tokens is over model {self.model_name!r}'s limit of {self.max_row_len}"
                )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        rows = [Row(ids, types, loop.create_future(), now, deadline) for ids, types in encoded]
        if reserved:
            self._check_rows(len(rows))
        else:
            self.admit(len(rows), sum(row.cost for row in rows))
        self._pending.extend(rows)
        self._queued_tokens += sum(row.cost for row in rows)
        self._depth.set(self.depth)
        self._scheduler.wake()
        return [row.future for row in rows]

    @property
    def depth(self) -> int:
        """Rows not computed yet: queued, or in the batch that is running."""
        return len(self._pending) + self._running_rows

    def fail_all(self, error: Exception) -> int:
        """Answer every queued row with `error` (not computed); → how many."""
        n = 0
        for row in self._pending:
            if not row.future.done():
                row.future.set_exception(error)
                n += 1
        self._pending.clear()
        self._queued_tokens = 0
        self._depth.set(self.depth)
        return n

    def close(self) -> None:
        """No new rows from now on (what is queued still runs, unless failed with fail_all)."""
        self._closing = True

    # -- scheduler side --------------------------------------------------------------------------

    def drop_dead(self) -> None:
        """Forget rows whose request is gone (done futures) and answer expired ones with a 504."""
        if not self._pending:
            return
        now = time.perf_counter()
        alive: deque[Row] = deque()
        expired = 0
        for row in self._pending:
            if row.future.done():
                continue
            if now >= row.deadline:
                row.future.set_exception(
                    DeadlineExceeded("the request waited in the queue past its deadline (overloaded); retry later")
                )
                expired += 1
                continue
            alive.append(row)
        if len(alive) != len(self._pending):
            self._pending = alive
            self._queued_tokens = sum(r.cost for r in alive)
            self._depth.set(self.depth)
        if expired:
            self._metrics.failures.labels("deadline_dropped").inc(expired)

    def ready_in(self, now: float) -> float | None:
        """Seconds until this queue should run a batch (≤ 0: now), None when empty."""
        if not self._pending:
            return None
        if self.max_wait_s <= 0 or self._closing or len(self._pending) >= self.max_batch_requests:
            return 0.0
        if self._queued_tokens >= self.batch_token_budget():
            return 0.0
        return self._pending[0].enqueued + self.max_wait_s - now

    def batch_token_budget(self) -> int:
        if self.s_per_token is None:
            return self.max_batch_tokens
        return max(16, min(self.max_batch_tokens, int(self.max_batch_s / self.s_per_token)))

    async def run_next_batch(self) -> None:
        if not self._pending:
            return
        batch = take_batch(list(self._pending), self.batch_token_budget(), self.max_batch_requests)
        taken = set(map(id, batch))
        self._pending = deque(r for r in self._pending if id(r) not in taken)
        tokens = sum(r.cost for r in batch)
        self._queued_tokens -= tokens
        self._running_rows, self._running_tokens = len(batch), tokens
        try:
            await self._run_batch(batch)
        finally:
            self._running_rows = self._running_tokens = 0
            self._depth.set(self.depth)

    async def _run_batch(self, batch: list[Row]) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            outputs, stats = await loop.run_in_executor(self._scheduler.executor, self._infer, batch)
        except Exception as err:  # the model failed: every row of the batch fails, the server goes on
            log.exception("inference failed for model %s (batch of %d)", self.model_name, len(batch))
            self._metrics.failures.labels("inference_error").inc()
            for row in batch:
                if not row.future.done():
                    row.future.set_exception(RuntimeError(f"inference failed: {type(err).__name__}"))
            return
        inference_s = time.perf_counter() - started
        self.learn(inference_s, stats.padded_tokens)
        self._batches += 1
        self._batch_size.observe(stats.rows)
        self._batch_tokens.observe(stats.padded_tokens)
        self._padding.observe(1 - stats.real_tokens / stats.padded_tokens)
        counts = outputs.pop("expert_counts", None)
        if counts is not None:
            self._metrics.count_experts(self.model_name, self._moe_layers, counts)
        per_token = {k for k, v in outputs.items() if v.ndim == 2 and k != "logits"}  # start/end_logits [B, T]
        for i, row in enumerate(batch):
            if row.future.done():
                continue
            n = len(row.input_ids)
            sliced = {k: (v[i, :n] if k in per_token else v[i]) for k, v in outputs.items()}
            row.future.set_result(RowResult(sliced, started - row.enqueued, inference_s, self._batches))

    def learn(self, seconds: float, padded_tokens: int) -> None:
        """Update the cost model (seconds per padded token) with one batch's time."""
        rate = seconds / max(1, padded_tokens)
        self.s_per_token = rate if self.s_per_token is None else 0.8 * self.s_per_token + 0.2 * rate

    def _infer(self, batch: list[Row]) -> tuple[dict, BatchStats]:
        """In the inference thread: pad, run. → outputs, stats"""
        input_ids, attention_mask, token_type_ids = pad_batch(batch, self._pad_id, self.max_row_len)
        outputs = self._run(input_ids, attention_mask, token_type_ids)
        stats = BatchStats(len(batch), int(input_ids.size), int(attention_mask.sum()))
        return outputs, stats
