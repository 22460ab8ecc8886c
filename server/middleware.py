"""Request ids, structured access logs and CORS: ASGI middleware outside the Guard, so rejected requests
(401, 413, 503) get an id and a log line too.

x-request-id: a well-formed id from the client (≤ 128 characters of letters, digits and ._:-) is kept,
anything else is replaced by a fresh one; either way it is echoed on the response and in the access log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

REQUEST_ID_HEADER = b"x-request-id"
_VALID_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
# Headers a browser may read (CORS): the request id and the timings the inference endpoints send.
EXPOSED_HEADERS = ["x-request-id", "x-total-time-ms", "x-tokenization-time-ms", "x-queue-time-ms",
                   "x-inference-time-ms", "retry-after"]  # fmt: skip
_LOGGED_BODY_BYTES = 1 << 16  # responses larger than this are logged without model/rows/tokens

access_log = logging.getLogger("moebert.access")


TOTAL_TIME_HEADER = b"x-total-time-ms"


def request_id_of(scope) -> str:
    """The id RequestContext gave this request."""
    return scope.get("state", {}).get("request_id", "")


class RequestContext:
    """Pure ASGI middleware: assigns the request id, echoes it, and (when enabled) logs one JSON line."""

    def __init__(self, app, log_requests: bool):
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
        request_id = given.decode("ascii") if given and _VALID_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        response: dict = {"status": 500, "headers": {}, "body": bytearray(), "json": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                if not any(k == TOTAL_TIME_HEADER for k, _ in headers):  # errors too (a 429's own time)
                    headers.append((TOTAL_TIME_HEADER, f"{(time.perf_counter() - started) * 1000:.2f}".encode()))
                message = {**message, "headers": headers}
                response["status"] = message["status"]
                if self.log_requests:
                    response["headers"] = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
                    response["json"] = response["headers"].get("content-type", "").startswith("application/json")
            elif (
                message["type"] == "http.response.body"
                and self.log_requests
                and response["json"]
                and len(response["body"]) < _LOGGED_BODY_BYTES
            ):
                response["body"] += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log_requests:
                access_log.info(json.dumps(_access_record(scope, request_id, response, started)))


def _access_record(scope, request_id: str, response: dict, started: float) -> dict:
    headers = response["headers"]
    record = {
        "ts": round(time.time(), 3),
        "request_id": request_id,
        "method": scope["method"],
        "path": scope["path"],
        "status": response["status"],
        "model": None,
        "rows": None,
        "tokens": None,
        "queue_ms": _float(headers.get("x-queue-time-ms")),
        "inference_ms": _float(headers.get("x-inference-time-ms")),
        "total_ms": round((time.perf_counter() - started) * 1000, 2),
        "client": scope["client"][0] if scope.get("client") else None,
    }
    body = bytes(response["body"])
    if body and len(body) < _LOGGED_BODY_BYTES and 200 <= response["status"] < 300:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            record.update(model=data.get("model"), rows=usage.get("inputs"), tokens=usage.get("input_tokens"))
    return record


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def install_middleware(app: FastAPI, settings) -> None:
    """CORS (when origins are set) inside, the request context outermost."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    if settings.access_log and not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))  # the line is the JSON object, nothing else
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
    app.add_middleware(RequestContext, log_requests=settings.access_log)
