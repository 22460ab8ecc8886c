"""One pydantic Settings for the whole service: env vars prefixed `MOEBERT_SERVE_`, and `moebert serve`
flags (which are just another source for the same fields)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from server.operations_settings import OperationsSettings

ENV_PREFIX = "MOEBERT_SERVE_"


def default_models_dir() -> Path:
    """The bundled default models: models/ at the repository root."""
    return Path(__file__).resolve().parent.parent / "models"


def parse_models(value: object) -> dict[str, str]:
    """NAME=PATH pairs: a dict, a list of "NAME=PATH", a JSON object, or "a=/x,b=/y" (env vars)."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return parse_models(json.loads(text))
        value = [item for item in text.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        models: dict[str, str] = {}
        for item in value:
            name, sep, path = str(item).partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ValueError(f"model {item!r}: expected NAME=PATH")
            if name in models:
                raise ValueError(f"model name {name!r} given twice")
            models[name] = path
        return models
    raise ValueError(f"models: expected NAME=PATH pairs, got {type(value).__name__}")


class ServerSettings(OperationsSettings):
    """Everything the service can be told. Limits are per model unless said otherwise (the operations
    fields, access_log and cors_*, are in server/operations_settings.py)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # What to serve and how
    models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="NAME → checkpoint folder (the task comes from the checkpoint)"
    )
    models_dir: str | None = Field(None, description="with no models given: serve every checkpoint in this folder")
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="auto: per model, its ONNX export on CPU when it has one (int8 first: the fastest), else torch",
    )
    onnx_precision: Literal["auto", "fp32", "int8"] = Field(
        "auto", description="onnx backend: which export to run (auto: int8 when exported, else fp32)"
    )
    int8_matmul: Literal["exact", "fast"] = Field(
        "exact",
        description="onnx int8 on x86 CPUs without VNNI (AVX2, plain AVX-512), where ONNX Runtime's fast u8 x s8 "
        "products saturate in int16 pairs: exact (its u8 x u8 kernels; 10-25% slower there) or fast. CPUs with "
        "VNNI or AMX compute either exactly, at full speed",
    )
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="torch backend: weights and compute, converted once at load (auto: bfloat16 on GPUs that "
        "have it, else float16; float32 on CPU)",
    )
    cuda_graphs: bool = Field(
        True,
        description="torch backend on CUDA: capture one CUDA graph per (rows, tokens) bucket at start-up and "
        "replay it for every batch (false: eager)",
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="intra-op threads (default: all cores but one, left to the event loop)"
    )
    inference_nice: int = Field(
        10, ge=0, le=19,
        description="CPU priority of the inference threads below the event loop's (Linux nice, per thread): "
        "a model using every core must not delay 429s, health checks or the next request's tokenization",
    )  # fmt: skip
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="when set, /v1/* needs `Authorization: Bearer KEY`")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Dynamic batching
    max_batch_tokens: int | None = Field(
        None, ge=16,
        description="padded tokens (rows × longest row) per batch; unset: on the CPU, the size each model runs "
        "fastest per token, measured at start-up (256–4096; 1024 without warm-up), on CUDA 8192",
    )  # fmt: skip
    max_batch_requests: int = Field(64, ge=1, description="rows per batch")
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0, description="how long a lone row waits for company")
    max_queue: int = Field(512, ge=1, description="rows waiting per model before 429")
    max_batch_ms: float = Field(
        250.0, ge=1.0, le=60_000.0,
        description="estimated model time per batch: bounds how long one model's batch holds up the others",
    )  # fmt: skip
    request_timeout_s: float = Field(
        10.0, gt=0.0, le=3600.0,
        description="deadline per request: work not computed by then is dropped (504); admission refuses (429) "
        "work whose estimated time to answer (the work ahead plus its own) exceeds half of it",
    )  # fmt: skip

    # Request limits
    max_inputs: int = Field(64, ge=1, description="inputs (texts or question/context pairs) per request")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="request body size (413 above)")
    max_seq_len: int | None = Field(None, ge=8, description="cap on tokens per row (default: the model's)")
    max_qa_windows: int = Field(64, ge=1, description="QA windows per request, all pairs together")
    max_qa_chars: int = Field(
        100_000, ge=1, description="characters per QA request, all contexts together (413 before tokenizing)"
    )

    # Slow clients
    header_timeout_s: float = Field(10.0, gt=0.0, description="time to send a request's headers (else closed)")
    keep_alive_timeout_s: float = Field(
        65.0, gt=0.0,
        description="how long an idle kept-alive connection stays open: longer than clients' and load balancers' "
        "own idle timeouts (httpx 5 s, AWS ALB 60 s), so that they close it first; a server closing it as a "
        "client reuses it makes that client's request fail",
    )  # fmt: skip
    body_timeout_s: float = Field(30.0, gt=0.0, description="time to send a request's body (else 408)")

    # Lifecycle
    warmup: bool = True
    drain_timeout_s: float = Field(30.0, ge=0.0, description="SIGTERM: how long in-flight work may take")

    @field_validator("threads", "max_seq_len", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes `VAR: ${VAR:-}` as an empty string: that means "not set".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_blank_key(cls, value: object) -> object:
        # A blank key must not quietly mean "no auth": whoever set it meant to protect the API.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and (not text.strip() or text != text.strip()):
            raise ValueError(
                "the API key is blank or has leading/trailing whitespace; set a real key or leave it unset"
            )
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> dict[str, str]:
        return parse_models(value)

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        bad = [name for name in self.models if not name.replace("-", "").replace("_", "").replace(".", "").isalnum()]
        if bad:
            raise ValueError(f"model names may use letters, digits, '-', '_' and '.': {bad}")
        if self.dtype not in ("auto", "float32"):
            if self.backend == "onnx":
                raise ValueError(f"dtype {self.dtype} is for the torch backend; onnx runs its export's precision")
            if self.device == "cpu" and self.dtype == "float16":
                raise ValueError("dtype float16 needs device cuda (CPU matmuls have no fast float16 path)")
        return self
