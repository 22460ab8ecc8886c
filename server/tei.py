"""POST /predict, compatible with text-embeddings-inference (TEI): an existing TEI client sends the same
request and reads the same response from a moebert classifier.

Request: {"inputs": ..., "truncate": false, "raw_scores": false} where inputs is a string, a pair
["text", "text_pair"], or a batch [["text"], ["text", "text_pair"], ...] (TEI's rules: a list whose first
element is a string is one input of one or two strings). Response: every label with its score, best first,
[{"score": s, "label": l}, ...] for one input, a list of those for a batch. Errors are TEI's shape too:
{"error": message, "error_type": "Validation" | "Overloaded" | "Unhealthy" | "Backend"}.
The model is the only classifier, or ?model=NAME.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from server.errors import ApiError, ClientGone
from server.schemas import ClassifyRequest, TextPair

_ERROR_TYPES = {401: "Validation", 404: "Validation", 413: "Validation", 422: "Validation", 429: "Overloaded",
                503: "Unhealthy"}  # fmt: skip


class TEIPredictRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": "I like you. I love you."}]})

    inputs: StrictStr | list[StrictStr] | list[list[StrictStr]] = Field(
        description="a string, a pair [string, string], or a batch [[string], [string, string], ...]"
    )
    truncate: bool = False
    raw_scores: bool = False


class TEIPrediction(BaseModel):
    score: float
    label: str


def _sequence(value: list[str], where: str) -> str | TextPair:
    if len(value) == 1:
        return value[0]
    if len(value) == 2:
        return TextPair(text=value[0], text_pair=value[1])
    raise ValueError(f"{where}: a sequence is one string or a pair of strings, got {len(value)} strings")


def parse_inputs(inputs) -> tuple[bool, list[str | TextPair]]:
    """TEI's PredictInput → (is_batch, inputs)."""
    if isinstance(inputs, str):
        return False, [inputs]
    if not inputs:
        raise ValueError("inputs: empty list")
    if isinstance(inputs[0], str):
        return False, [_sequence(inputs, "inputs")]
    return True, [_sequence(seq, f"inputs[{i}]") for i, seq in enumerate(inputs)]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message, "error_type": _ERROR_TYPES.get(status, "Backend")}
    return JSONResponse(body, status_code=status, headers=headers)


def tei_router(state) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/predict",
        response_model=list[TEIPrediction] | list[list[TEIPrediction]],
        tags=["text-embeddings-inference"],
        openapi_extra={"requestBody": {"content": {"application/json": {
            "schema": TEIPredictRequest.model_json_schema()}}, "required": True}},
    )  # fmt: skip
    async def tei_predict(request: Request, model: str | None = None) -> Response:
        from server.classify import classify

        try:
            body = TEIPredictRequest.model_validate(json.loads(await request.body()))
            batch, inputs = parse_inputs(body.inputs)
        except (ValueError, ValidationError) as err:  # JSONDecodeError is a ValueError
            if request.scope.get("moebert.too_large"):
                return _error(413, f"body larger than {state.settings.max_request_bytes} bytes")
            message = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            return _error(422, message)
        try:
            served = state.registry.get(model, "classification")
            req = ClassifyRequest(inputs=inputs, truncate=body.truncate, raw_scores=body.raw_scores, all_scores=True)
            response, timings = await classify(req, request, served, state)
        except ClientGone:
            state.metrics.failures.labels("client_gone").inc()
            return Response(status_code=499)
        except ApiError as err:
            state.metrics.failures.labels(err.type).inc()
            return _error(err.status, err.message, err.headers)
        results = []
        for r in response.results:
            if r.labels is not None:
                results.append([{"score": s.score, "label": s.label} for s in r.labels])
            elif r.value is not None:  # regression: one "label" with the value as its score, as TEI does
                results.append([{"score": r.value, "label": served.labels[0]}])
            else:
                results.append([{"score": r.score, "label": r.label}])
        payload = results if batch else results[0]
        return Response(json.dumps(payload), media_type="application/json", headers=timings.headers())

    return router
