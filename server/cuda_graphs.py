"""CUDA graphs for the torch backend: one captured forward per (rows, sequence length) bucket.

On a GPU a BERT forward at serving sizes is bound by the host: hundreds of kernel launches from Python cost
more than the GPU work. A CUDA graph replays them all in one launch, but it is captured for fixed shapes and
fixed buffers. So, at start-up, the backend captures one graph per bucket of the bucket grid, and each batch
the batcher forms is padded up to the smallest bucket that holds it (filler rows have no tokens, filler
columns are padding), copied into that graph's input buffers, replayed, and its outputs cut back to the
batch's own rows and columns. The forward must not synchronise with the host (the model's padded token
layout, the Triton MoE backend); a batch no bucket holds runs eagerly.

Shapes: B rows, T tokens per row of a batch; a bucket (rows, seq_len) ≥ (B, T).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("moebert.server")

Bucket = tuple[int, int]  # (rows, seq_len)
MIN_SEQ_BUCKET = 16


def size_steps(limit: int, start: int = 1) -> list[int]:
    """start, 2·start, 3·start (when < limit), then powers of two with their midpoints (…, 32, 48, 64, 96, 128,
    …) up to limit, and limit itself: a batch is padded by less than 1.5× (a plain power-of-two grid: 2×)."""
    steps: list[int] = []
    value = start
    while value < limit:
        steps.append(value)
        half = value // 2
        if half and value + half < limit and value + half not in steps:
            steps.append(value + half)
        value *= 2
    steps.append(limit)
    return sorted(set(steps))


def graph_buckets(max_rows: int, max_tokens: int, max_seq_len: int) -> list[Bucket]:
    """The buckets that batches of the batcher can fall into: rows ≤ max_rows, and rows × longest ≤ max_tokens
    or a single row (plan_batches lets a lone over-budget row run alone). A bucket is kept when the smallest
    batch that maps to it (one more row and one more token than the bucket below) is such a batch.
    Sorted largest first (the capture order: later, smaller graphs reuse the memory pool of the first)."""
    rows = size_steps(max_rows)
    seqs = size_steps(max_seq_len, start=min(MIN_SEQ_BUCKET, max_seq_len))
    buckets = []
    for i, b in enumerate(rows):
        smallest_b = rows[i - 1] + 1 if i else 1
        for j, t in enumerate(seqs):
            smallest_t = seqs[j - 1] + 1 if j else 1
            if smallest_b == 1 or smallest_b * smallest_t <= max_tokens:
                buckets.append((b, t))
    return sorted(buckets, key=lambda bt: (bt[0] * bt[1], bt), reverse=True)


def pick_bucket(buckets: list[Bucket], rows: int, seq_len: int) -> Bucket | None:
    """The bucket of least area (then fewest rows) that holds a [rows, seq_len] batch; None if none does."""
    fits = [bt for bt in buckets if bt[0] >= rows and bt[1] >= seq_len]
    return min(fits, key=lambda bt: (bt[0] * bt[1], bt[0])) if fits else None


def pad_to_bucket(
    input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray, bucket: Bucket, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, T] int64 arrays → [rows, seq_len]: filler rows and columns are pad_id tokens with attention 0."""
    B, T = input_ids.shape
    rows, seq_len = bucket
    if rows < B or seq_len < T:
        raise ValueError(f"a [{B}, {T}] batch does not fit the bucket [{rows}, {seq_len}]")
    out_ids = np.full((rows, seq_len), pad_id, dtype=np.int64)
    out_mask = np.zeros((rows, seq_len), dtype=np.int64)
    out_types = np.zeros((rows, seq_len), dtype=np.int64)
    out_ids[:B, :T], out_mask[:B, :T], out_types[:B, :T] = input_ids, attention_mask, token_type_ids
    return out_ids, out_mask, out_types


def unpad_outputs(outputs: dict, rows: int, seq_len: int) -> dict:
    """Cut a bucket's outputs back to the batch: logits [rows', C] → [rows, C]; start/end logits
    [rows', seq'] → [rows, seq_len]; expert_counts [layers, E] as they are (filler tokens count 0)."""
    cut = {}
    for name, value in outputs.items():
        if name == "expert_counts":
            cut[name] = value
        elif name == "logits":
            cut[name] = value[:rows]
        else:
            cut[name] = value[:rows, :seq_len]
    return cut


# forward(input_ids, attention_mask, token_type_ids), device tensors [rows, seq_len] → {name: device tensor}
Forward = Callable[..., dict]


@dataclass
class _Captured:
    inputs: tuple  # static input buffers on the device, [rows, seq_len] int64 each
    outputs: dict  # the graph's output tensors, rewritten by every replay
    replay: Callable[[], None]


class BucketedRunner:
    """Runs a batch through the bucket that holds it: as a CUDA-graph replay (`graphs=True`, CUDA), or
    eagerly on the padded batch (`graphs=False`: the same padding and cutting, on any device; CPU tests)."""

    def __init__(self, forward: Forward, buckets: list[Bucket], pad_id: int, device, graphs: bool = True):
        import torch

        self._torch = torch
        self.forward = forward
        self.buckets = sorted(buckets, key=lambda bt: (bt[0] * bt[1], bt), reverse=True)
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.graphs = graphs
        if graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._captured: dict[Bucket, _Captured] = {}
        self.replays = 0  # batches served by a bucket (tests, logs)

    def capture(self) -> None:
        """Capture every bucket's graph, largest first, into one shared memory pool (graphs replay one at a
        time on the inference thread, so their intermediates may share memory). The first eager runs of each
        shape also tune the Triton kernels for it, outside any capture."""
        torch = self._torch
        if not self.graphs:
            return
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        generator = torch.Generator().manual_seed(0)
        for bucket in self.buckets:
            rows, seq_len = bucket
            inputs = (
                torch.randint(1000, 2000, (rows, seq_len), generator=generator).to(self.device),
                torch.ones(rows, seq_len, dtype=torch.long, device=self.device),
                torch.zeros(rows, seq_len, dtype=torch.long, device=self.device),
            )
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # compile, tune, and settle the allocator before the capture
                    self.forward(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                outputs = self.forward(*inputs)
            self._captured[bucket] = _Captured(inputs, outputs, graph.replay)
        torch.cuda.synchronize(self.device)
        log.info(
            "captured %d CUDA graphs (rows × tokens from %s to %s) in %.1f s", len(self._captured),
            "×".join(map(str, self.buckets[-1])), "×".join(map(str, self.buckets[0])), time.perf_counter() - started,
        )  # fmt: skip

    def replay_of(self, bucket: Bucket) -> tuple[tuple, Callable[[], None], dict]:
        """(input buffers, replay, output tensors) of a captured bucket: for benchmarks that time the replay alone."""
        captured = self._captured[bucket]
        return captured.inputs, captured.replay, captured.outputs

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> dict | None:
        """→ {name: numpy array} for the batch's own rows and columns, or None when no bucket holds it."""
        torch = self._torch
        B, T = input_ids.shape
        bucket = pick_bucket(self.buckets, B, T)
        if bucket is None:
            return None
        padded = pad_to_bucket(input_ids, attention_mask, token_type_ids, bucket, self.pad_id)
        with torch.inference_mode():
            if self.graphs:
                captured = self._captured[bucket]
                for buffer, array in zip(captured.inputs, padded, strict=True):
                    buffer.copy_(torch.from_numpy(array))
                captured.replay()
                outputs = captured.outputs
            else:
                outputs = self.forward(*(torch.from_numpy(a).to(self.device) for a in padded))
            host = {name: value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                    for name, value in outputs.items()}  # fmt: skip
        self.replays += 1
        return unpad_outputs(host, B, T)
