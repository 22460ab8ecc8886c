"""`moebert serve`: flags (or MOEBERT_SERVE_* variables) → ServerSettings → uvicorn. Light at import time
(`moebert --help` loads this module): fastapi, uvicorn and torch are imported only when it runs."""

from __future__ import annotations

import argparse
import signal

# flag → settings field; a flag left out keeps the env var (MOEBERT_SERVE_*) or the default. Values are
# validated once, by ServerSettings (the same check for a flag and its environment variable).
SERVE_FLAGS: list[tuple[str, dict]] = [
    (
        "--backend",
        {
            "help": "auto (default: a model's ONNX export on CPU when it has one, int8 first; else torch), "
            "torch, or onnx (ONNX Runtime)",
        },
    ),
    (
        "--onnx-precision",
        {"help": "onnx backend: auto (default: int8 when exported), fp32, int8"},
    ),
    (
        "--int8-matmul",
        {
            "help": "onnx int8 on x86 CPUs without VNNI: exact (default; ORT's u8 x u8 kernels, 10-25%% slower "
            "there) or fast (u8 x s8 products that saturate in int16 pairs); no effect with VNNI or AMX",
        },
    ),
    ("--device", {"help": "cpu (default) or cuda"}),
    (
        "--dtype",
        {
            "help": "torch backend weights/compute (default auto: bfloat16 on GPUs that have it, else float16; "
            "float32 on CPU)",
        },
    ),
    (
        "--cuda-graphs",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "torch backend on CUDA: one CUDA graph per (rows, tokens) bucket, captured at start-up "
            "(default on; --no-cuda-graphs: eager)",
        },
    ),
    ("--threads", {"type": int, "help": "intra-op threads (default: all cores but one, left to the event loop)"}),
    (
        "--inference-nice",
        {"type": int, "help": "inference threads' CPU priority below the event loop's, 0-19 (default 10)"},
    ),
    ("--host", {"help": "address to listen on (default 127.0.0.1; 0.0.0.0 in a container)"}),
    ("--port", {"type": int, "help": "port (default 8000)"}),
    ("--api-key", {"help": "require `Authorization: Bearer KEY` on /v1/*"}),
    ("--models-dir", {"help": "with no --model: serve every checkpoint in this folder (default: the bundled models/)"}),
    (
        "--max-batch-tokens",
        {
            "type": int,
            "help": "padded tokens per batch (default: measured per model at start-up on the CPU, 8192 on CUDA)",
        },
    ),
    ("--max-batch-requests", {"type": int, "help": "rows per batch (default 64)"}),
    ("--max-wait-ms", {"type": float, "help": "how long a lone row waits for company (default 2)"}),
    ("--max-queue", {"type": int, "help": "rows queued per model before 429 (default 512; more in one request: 413)"}),
    (
        "--max-batch-ms",
        {
            "type": float,
            "help": "estimated model time per batch (default 250): how long one model's batch may hold up the others",
        },
    ),
    (
        "--request-timeout-s",
        {
            "type": float,
            "help": "deadline per request (default 10): rows not computed by then are dropped (504); "
            "a request whose estimated time to answer is over half of it gets 429",
        },
    ),
    ("--max-inputs", {"type": int, "help": "inputs per request (default 64)"}),
    ("--max-request-bytes", {"type": int, "help": "body size limit (default 1 MiB)"}),
    ("--max-seq-len", {"type": int, "help": "tokens per row (default: the model's limit)"}),
    ("--max-qa-windows", {"type": int, "help": "QA windows per request (default 64)"}),
    ("--max-qa-chars", {"type": int, "help": "characters per QA request, 413 before tokenizing (default 100000)"}),
    ("--header-timeout-s", {"type": float, "help": "time a client has to send a request's headers (default 10)"}),
    ("--keep-alive-timeout-s", {"type": float, "help": "idle kept-alive connections close after this (default 65)"}),
    ("--body-timeout-s", {"type": float, "help": "time a client has to send a request's body, else 408 (default 30)"}),
    (
        "--drain-timeout-s",
        {
            "type": float,
            "help": "SIGTERM: time allowed for queued and in-flight work (default 30); what has not "
            "run by then is answered 503",
        },
    ),
    ("--log-level", {"help": "debug, info (default), warning or error"}),
    ("--access-log", {"action": "store_const", "const": True, "help": "one JSON line per request on stderr"}),
    ("--cors-origins", {"help": "comma-separated origins browsers may call from ('*': any; default none)"}),
]


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve classification and QA models over HTTP (OpenAPI at /docs). Every flag can also be set by an "
        "environment variable: MOEBERT_SERVE_<FLAG> (e.g. MOEBERT_SERVE_MODELS='sst2=/m/sst2,squad=/m/qa', "
        "MOEBERT_SERVE_API_KEY)."
    )
    p.add_argument(
        "--model", action="append", metavar="NAME=PATH", dest="models",
        help="a checkpoint to serve under NAME (repeatable; the task comes from the checkpoint)",
    )  # fmt: skip
    for flag, kw in SERVE_FLAGS:
        p.add_argument(flag, default=None, **kw)
    p.add_argument("--no-warmup", action="store_const", const=False, dest="warmup", help="skip the warm-up batches")
    p.set_defaults(run=run_serve)


def settings_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from server.settings import ServerSettings

    fields = [flag.lstrip("-").replace("-", "_") for flag, _ in SERVE_FLAGS]
    overrides = {field: getattr(args, field) for field in fields}
    overrides["models"] = args.models
    overrides["warmup"] = args.warmup
    try:
        settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:  # one line per setting, not pydantic's multi-line report
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"invalid settings: {problems}") from None
    if not settings.models:  # no --model and no MOEBERT_SERVE_MODELS: the bundled defaults
        settings = settings.model_copy(update={"models": bundled_models(settings.models_dir)})
    return settings


def bundled_models(models_dir: str | None) -> dict[str, str]:
    """NAME → folder for every checkpoint (a folder with config.json) directly inside models_dir."""
    from pathlib import Path

    from server.settings import default_models_dir

    root = Path(models_dir) if models_dir else default_models_dir()
    if not root.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def check_models(settings) -> None:
    """Fail fast, with one clear line, on what would fail after startup: missing folders, wrong heads."""
    from moebert.loading import CheckpointError
    from server.checkpoints import check_checkpoint
    from server.settings import default_models_dir

    if not settings.models:
        raise ValueError(
            "no models to serve: pass --model NAME=PATH (or set MOEBERT_SERVE_MODELS), "
            f"or put checkpoints in {settings.models_dir or default_models_dir()}"
        )
    for name, path in settings.models.items():
        try:
            check_checkpoint(path, settings.backend, settings.onnx_precision, settings.device)
        except (CheckpointError, FileNotFoundError) as e:
            raise type(e)(f"model {name!r}: {e}") from None


def run_serve(args: argparse.Namespace) -> None:
    from server.memory import bound_native_memory

    settings = settings_from_args(args)
    bound_native_memory()  # before torch and ONNX Runtime load
    check_models(settings)

    import uvicorn

    from server.app import create_app
    from server.protocol import protocol_with_header_timeout

    app = create_app(settings)
    state = app.state.moebert

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: readiness turns 503 and new API requests are refused at once, while uvicorn
        stops listening and lets in-flight requests finish; queued work still waiting after drain_timeout_s
        is answered 503. A drained server exits 0 (uvicorn would re-raise the signal: exit 143)."""

        def handle_exit(self, sig, frame) -> None:
            if state.loop is not None:
                state.loop.call_soon_threadsafe(state.begin_drain)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
        # A backstop: the app answers everything by drain_timeout_s, then a running batch finishes.
        timeout_graceful_shutdown=settings.drain_timeout_s + 5, server_header=False,
        http=protocol_with_header_timeout(settings.header_timeout_s), timeout_keep_alive=settings.keep_alive_timeout_s,
    )  # fmt: skip
    server = DrainingServer(config)
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.failed:
        raise ValueError(f"could not load the models: {state.failed}")
