"""The OpenAPI document says how to authenticate when the server has an API key: an HTTP bearer scheme
on every guarded operation (/v1/* and /predict), so /docs shows an Authorize button and generated
clients send the header."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

SCHEME = "bearerAuth"


def is_guarded(path: str) -> bool:
    """Paths the Guard checks (API key, readiness, body size): the API, not health or metrics."""
    return path.startswith("/v1/") or path == "/predict"


def install_security_scheme(app: FastAPI, settings) -> None:
    if settings.api_key is None:
        return

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                SCHEME: {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"}
            }
            for path, operations in schema.get("paths", {}).items():
                if is_guarded(path):
                    for operation in operations.values():
                        operation["security"] = [{SCHEME: []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
