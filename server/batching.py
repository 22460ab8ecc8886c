"""The dynamic batcher: requests put rows (one tokenized sequence each) on a per-model queue; one task
per model forms batches under a padded-token budget and runs them on the shared inference thread.

Why these choices:
- A lone row waits at most `max_wait_ms` for company: under load the queue fills while the model runs,
  so batches form without waiting; when idle the wait is the only latency added.
- Rows are sorted by length before cutting batches, so rows of similar length share a batch and
  padding (rows × longest) stays small; the budget caps rows × longest, the memory and time driver.
- One inference thread for all models: on a CPU box two models running at once only fight for cores.
- Rows whose request went away (client disconnected, cancelled) are dropped before they run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from server.errors import Overloaded
from server.metrics import Metrics

log = logging.getLogger("moebert.server")


@dataclass(eq=False)
class Row:
    """One sequence to run. future → RowResult."""

    input_ids: list[int]
    token_type_ids: list[int]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


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


def plan_batches(rows: list[Row], max_tokens: int, max_rows: int) -> list[list[Row]]:
    """Cut rows (any order) into batches of similar length, each within rows × longest ≤ max_tokens and
    ≤ max_rows. A row longer than the budget runs alone."""
    ordered = sorted(rows, key=lambda r: len(r.input_ids))
    batches: list[list[Row]] = []
    current: list[Row] = []
    for row in ordered:
        longest = len(row.input_ids)  # ascending order: the newest row is the longest
        if current and (len(current) >= max_rows or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def pad_batch(rows: list[Row], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """→ input_ids, attention_mask, token_type_ids [B, T] int64, T = the longest row."""
    B, T = len(rows), max(len(r.input_ids) for r in rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    token_type_ids = np.zeros((B, T), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = row.input_ids
        attention_mask[i, :n] = 1
        token_type_ids[i, :n] = row.token_type_ids
    return input_ids, attention_mask, token_type_ids


class Batcher:
    def __init__(
        self,
        model_name: str,
        run: Callable[[np.ndarray, np.ndarray, np.ndarray], dict],
        executor: Executor,
        metrics: Metrics,
        *,
        pad_id: int,
        moe_layers: list[int],
        max_batch_tokens: int,
        max_batch_requests: int,
        max_wait_ms: float,
        max_queue: int,
    ):
        self.model_name = model_name
        self._run = run
        self._executor = executor
        self._metrics = metrics
        self._pad_id = pad_id
        self._moe_layers = moe_layers
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self._pending: deque[Row] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._batches = 0
        self._depth = metrics.queue_depth.labels(model_name)
        self._batch_size = metrics.batch_size.labels(model_name)
        self._batch_tokens = metrics.batch_tokens.labels(model_name)
        self._padding = metrics.padding_ratio.labels(model_name)

    # -- requests side ---------------------------------------------------------------------------

    def submit(self, encoded: list[tuple[list[int], list[int]]]) -> list[asyncio.Future]:
        """Queue (input_ids, token_type_ids) rows; all or none (429 when the queue is full)."""
        if self._closing:
            from server.errors import Unavailable

            raise Unavailable("the server is shutting down")
        if len(self._pending) + len(encoded) > self.max_queue:
            self._metrics.failures.labels("queue_full").inc()
            raise Overloaded(f"model {self.model_name!r} has {len(self._pending)} rows queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = []
        now = time.perf_counter()
        for ids, types in encoded:
            future = loop.create_future()
            self._pending.append(Row(ids, types, future, now))
            futures.append(future)
        self._depth.set(len(self._pending))
        self._wakeup.set()
        return futures

    @property
    def depth(self) -> int:
        return len(self._pending)

    # -- batching side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.model_name}")

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather_company()
            rows = [r for r in self._pending if not r.future.done()]  # done = cancelled by a gone client
            self._pending.clear()
            self._depth.set(0)
            for batch in plan_batches(rows, self.max_batch_tokens, self.max_batch_requests):
                batch = [r for r in batch if not r.future.done()]
                if batch:
                    await self._run_batch(batch)

    async def _gather_company(self) -> None:
        """Wait until the oldest row has waited max_wait, unless a full batch is already there."""
        if self.max_wait_s <= 0 or self._closing:
            return
        deadline = self._pending[0].enqueued + self.max_wait_s
        while len(self._pending) < self.max_batch_requests:
            delay = deadline - time.perf_counter()
            if delay <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except TimeoutError:
                return

    async def _run_batch(self, batch: list[Row]) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            outputs, stats = await loop.run_in_executor(self._executor, self._infer, batch)
        except Exception as err:  # the model failed: every row of the batch fails, the server goes on
            log.exception("inference failed for model %s (batch of %d)", self.model_name, len(batch))
            self._metrics.failures.labels("inference_error").inc()
            for row in batch:
                if not row.future.done():
                    row.future.set_exception(RuntimeError(f"inference failed: {type(err).__name__}"))
            return
        inference_s = time.perf_counter() - started
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

    def _infer(self, batch: list[Row]) -> tuple[dict, BatchStats]:
        """In the inference thread: pad, run. → outputs, stats"""
        input_ids, attention_mask, token_type_ids = pad_batch(batch, self._pad_id)
        outputs = self._run(input_ids, attention_mask, token_type_ids)
        stats = BatchStats(len(batch), int(input_ids.size), int(attention_mask.sum()))
        return outputs, stats
