"""Prometheus metrics (names prefixed `moebert_`, times in seconds), on a registry of the app's own so
that several apps in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

# Request-level latencies span ~1 ms (a short sentence in an idle server) to seconds (overload).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 384, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, me = self.registry, ("model", "endpoint")
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds, …
        PlatformCollector(registry=r)  # python_info
        self.request_seconds = Histogram(
            "moebert_request_seconds", "Request time, received to answered", me, buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokenization_seconds = Histogram(
            "moebert_tokenization_seconds", "Tokenization (and QA windowing) time per request", me,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "moebert_queue_seconds", "Time a request's rows waited for a batch", me, buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "moebert_inference_seconds", "Model time of the batches a request ran in", me, buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.input_tokens = Histogram(
            "moebert_input_tokens", "Tokens per request (after truncation)", me, buckets=TOKEN_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "moebert_batch_size", "Rows per batch", ("model",), buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "moebert_batch_tokens", "Padded tokens per batch (rows × longest)", ("model",), buckets=TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.padding_ratio = Histogram(
            "moebert_batch_padding_ratio", "Share of a batch's tokens that are padding", ("model",),
            buckets=RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "moebert_queue_depth", "Rows not computed yet (queued, or in the running batch)", ("model",), registry=r
        )
        self.in_flight = Gauge("moebert_requests_in_flight", "Requests being handled", registry=r)
        self.requests = Counter(
            "moebert_requests", "Requests by endpoint and HTTP status", ("endpoint", "status"), registry=r
        )
        self.failures = Counter("moebert_failures", "Failed requests by reason", ("reason",), registry=r)
        self.expert_tokens = Counter(
            "moebert_expert_tokens",
            "Tokens routed to each expert of each MoE layer (the MoE load balance)",
            ("model", "layer", "expert"),
            registry=r,
        )

    def count_experts(self, model: str, layers: list[int], counts) -> None:
        """counts [num MoE layers, E] (numpy or nested lists) → per-(layer, expert) counters."""
        for layer, row in zip(layers, counts, strict=True):
            for expert, n in enumerate(row):
                if n:
                    self.expert_tokens.labels(model, str(layer), str(expert)).inc(int(n))
