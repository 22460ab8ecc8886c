"""Ray Serve: the same FastAPI app (`server.app.create_app`) as the ingress of a Ray Serve deployment.

Each replica builds its own app, so it owns its models, batchers and inference thread, exactly as one
`moebert serve` process does; Ray's proxy routes HTTP to the replicas and autoscales them on ongoing
requests. Start it on a local Ray cluster (Ray's HTTP proxy listens on :8000):

    serve run server.ray_serve:build_app models=sst2=models/sst2,squad=models/squad max_replicas=2

Arguments are `key=value`: the Ray options below (RayServeOptions) and any ServerSettings field (the
MOEBERT_SERVE_* environment variables apply too; with no models, the bundled models/ are served).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.settings import ServerSettings


class RayServeOptions(BaseModel):
    """How Ray runs the replicas: autoscaling on ongoing requests per replica, and each replica's CPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: int = Field(4, ge=1, description="replicas under load")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="scale so that each replica has about this many requests in flight"
    )
    max_ongoing_requests: int = Field(
        128, ge=1, description="requests one replica takes at once (its batcher needs company to batch)"
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (with device=cuda)")
    load_timeout_s: float = Field(600.0, gt=0, description="how long a replica may take to load and warm up")

    @model_validator(mode="after")
    def _check(self) -> RayServeOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


def split_args(args: dict[str, str]) -> tuple[RayServeOptions, ServerSettings]:
    """`serve run ... key=value` arguments → the Ray options and the server settings (bundled models by default)."""
    from server.cli import bundled_models

    ray_fields = set(RayServeOptions.model_fields)
    options = RayServeOptions(**{k: v for k, v in args.items() if k in ray_fields})
    settings = ServerSettings(**{k: v for k, v in args.items() if k not in ray_fields})
    if not settings.models:
        settings = settings.model_copy(update={"models": bundled_models(settings.models_dir)})
    return options, settings


def replica_app(settings: ServerSettings, load_timeout_s: float):
    """The service's FastAPI app, whose startup waits until the models are loaded and warmed up: Ray then
    routes to the replica only once it can answer (instead of it answering 503 "loading")."""
    from server.app import create_app

    app = create_app(settings)
    state = app.state.moebert
    state.on_fatal = lambda: None  # a failed load raises below; never SIGTERM the Ray worker process
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as value:
            deadline = asyncio.get_running_loop().time() + load_timeout_s
            while not state.ready:
                if state.failed:
                    raise RuntimeError(f"could not load the models: {state.failed}")
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"models not loaded after {load_timeout_s} s")
                await asyncio.sleep(0.05)
            yield value

    app.router.lifespan_context = lifespan
    return app


def build_app(args: dict[str, str] | None = None):
    """The Ray Serve application (for `serve run server.ray_serve:build_app ...` or `serve.run(build_app({...}))`)."""
    from ray import serve

    from server.cli import check_models

    options, settings = split_args(args or {})
    check_models(settings)  # fail here, with one line, not in every replica

    @serve.deployment(
        name="moebert",
        max_ongoing_requests=options.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "initial_replicas": max(options.min_replicas, 1),
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        },
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        health_check_period_s=10,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
    )
    @serve.ingress()
    class MoEBertReplica:
        def __init__(self, settings: ServerSettings, load_timeout_s: float):
            self.settings = settings
            self.load_timeout_s = load_timeout_s

        def __serve_build_asgi_app__(self):
            # Not `self.app`: serve.ingress gives the class an `app` property (without a setter).
            self.service = replica_app(self.settings, self.load_timeout_s)
            return self.service

        def check_health(self) -> None:
            """Ray restarts a replica whose models failed or that is stuck draining."""
            service = getattr(self, "service", None)
            if service is not None and service.state.moebert.failed:
                raise RuntimeError(service.state.moebert.failed)

    return MoEBertReplica.bind(settings, options.load_timeout_s)
