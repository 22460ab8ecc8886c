"""Operations over real HTTP (a real `moebert serve`): x-request-id, JSON access logs, CORS, the OpenAPI
security scheme, POST /v1/tokenize, and the text-embeddings-inference-compatible POST /predict."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import numpy as np
import pytest
from server_process import ServerProcess
from transformers import AutoTokenizer

from server.app import create_app
from server.settings import ServerSettings
from tests.server.checks import reference_scores

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example.com"
TEXTS = ["a gorgeous, witty, seductive movie.", "unflinchingly bleak and desperate", "fine."]
HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server(moe_cls_dir, tiny_qa_dir):
    flags = ("--api-key", KEY, "--access-log", "--cors-origins", f"{ORIGIN},http://localhost:3000", "--max-inputs", "8")
    proc = ServerProcess({"cls": moe_cls_dir, "qa": tiny_qa_dir}, *flags).start(timeout_s=300)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as c:
        yield c


def access_records(server) -> list[dict]:
    records = []
    for line in server.output().splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


# --------------------------------------------------------------------------------------------------
# Request ids and access logs


def test_request_id_is_kept_generated_or_replaced(client):
    r = client.post("/v1/classify", json={"inputs": "fine.", "model": "cls"}, headers={"x-request-id": "abc-123.4:5"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123.4:5"
    generated = {client.get("/health/live").headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3 and all(HEX_ID.fullmatch(g) for g in generated)
    for bad in ("has space", "x" * 129, "semi;colon", ""):
        got = client.get("/health/ready", headers={"x-request-id": bad}).headers["x-request-id"]
        assert got != bad and HEX_ID.fullmatch(got)
    # Rejected requests carry one too (the Guard answers before the app).
    r = httpx.post(client.base_url.join("/v1/classify"), json={"inputs": "x"}, headers={"x-request-id": "no-auth"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "no-auth"


def test_concurrent_requests_keep_their_own_ids(client, server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as c:
            return await asyncio.gather(
                *(c.post("/v1/classify", json={"inputs": TEXTS[i % 3], "model": "cls"},
                         headers={"x-request-id": f"c-{i}"})
                  for i in range(12))
            )  # fmt: skip

    responses = asyncio.run(go())
    assert [r.headers["x-request-id"] for r in responses] == [f"c-{i}" for i in range(12)]
    assert all(r.status_code == 200 for r in responses)


def test_access_log_lines_are_json_with_the_request_facts(client, server):
    r = client.post("/v1/classify", json={"inputs": TEXTS[:2], "model": "cls"}, headers={"x-request-id": "log-me"})
    body = r.json()
    client.post("/v1/classify", json={"inputs": 5}, headers={"x-request-id": "bad-body"})
    for _ in range(50):  # the line is written as the response finishes
        records = {rec.get("request_id"): rec for rec in access_records(server)}
        if "log-me" in records and "bad-body" in records:
            break
        asyncio.run(asyncio.sleep(0.1))
    rec = records["log-me"]
    assert rec["method"] == "POST" and rec["path"] == "/v1/classify" and rec["status"] == 200
    assert rec["model"] == "cls" and rec["rows"] == 2 and rec["tokens"] == body["usage"]["input_tokens"]
    assert rec["queue_ms"] == pytest.approx(float(r.headers["x-queue-time-ms"]))
    assert rec["inference_ms"] == pytest.approx(float(r.headers["x-inference-time-ms"]))
    assert rec["total_ms"] > 0 and isinstance(rec["ts"], float)
    bad = records["bad-body"]
    assert bad["status"] == 422 and bad["model"] is None and bad["rows"] is None


# --------------------------------------------------------------------------------------------------
# CORS and OpenAPI


def test_cors_preflight_and_exposed_headers(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    r = httpx.options(f"{server.url}/v1/classify", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(f"{server.url}/v1/classify", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(
        f"{server.url}/v1/classify", json={"inputs": "fine.", "model": "cls"}, headers={**AUTH, "Origin": ORIGIN}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"]


def test_openapi_declares_bearer_auth_only_with_a_key(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"
    }  # fmt: skip
    for path in ("/v1/classify", "/v1/qa", "/v1/tokenize", "/predict"):
        assert schema["paths"][path]["post"]["security"] == [{"bearerAuth": []}], path
    assert "security" not in schema["paths"]["/health/ready"]["get"]
    plain = create_app(ServerSettings(models={})).openapi()
    assert "securitySchemes" not in plain.get("components", {}) and "/predict" in plain["paths"]
    with pytest.raises(ValueError, match="CORS origin"):
        ServerSettings(cors_origins="app.example.com")


# --------------------------------------------------------------------------------------------------
# /v1/tokenize


def test_tokenize_matches_the_model_tokenizer(client, moe_cls_dir):
    tok = AutoTokenizer.from_pretrained(str(moe_cls_dir))
    text, pair = "Unflinchingly bleak, isn't it?", "Déjà vu."
    r = client.post("/v1/tokenize", json={"inputs": [text, [text, pair]], "model": "cls"})
    assert r.status_code == 200
    single, both = r.json()["tokens"]
    assert [t["id"] for t in single] == tok(text)["input_ids"]
    assert [t["id"] for t in both] == tok(text, pair)["input_ids"]
    assert single[0]["special"] and single[0]["start"] is None and single[-1]["text"] == "[SEP]"
    for t in both:
        if not t["special"]:
            source = text if t["sequence"] == 0 else pair
            piece = source[t["start"] : t["stop"]].lower()
            assert t["text"].removeprefix("##") in (piece, tok.backend_tokenizer.normalizer.normalize_str(piece))
    assert {t["sequence"] for t in both if not t["special"]} == {0, 1}
    assert r.json()["usage"] == {"inputs": 2, "input_tokens": len(single) + len(both)}
    bare = client.post("/v1/tokenize", json={"inputs": text, "model": "cls", "add_special_tokens": False}).json()
    assert [t["id"] for t in bare["tokens"][0]] == tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_errors(client, server):
    assert client.post("/v1/tokenize", json={"inputs": "x"}).status_code == 422  # two models: say which
    assert client.post("/v1/tokenize", json={"inputs": "x", "model": "nope"}).status_code == 404
    assert client.post("/v1/tokenize", json={"inputs": ["x"] * 9, "model": "cls"}).status_code == 413
    assert client.post("/v1/tokenize", json={"inputs": " ", "model": "cls"}).status_code == 422
    assert httpx.post(f"{server.url}/v1/tokenize", json={"inputs": "x", "model": "cls"}).status_code == 401


# --------------------------------------------------------------------------------------------------
# TEI-compatible /predict


def test_tei_predict_shapes_and_scores(client, moe_cls_dir):
    ref = reference_scores(moe_cls_dir, [TEXTS[0], [TEXTS[0], TEXTS[1]]])
    labels = [f"LABEL_{i}" for i in range(3)]

    def check(predictions, expected):
        assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
        assert set(predictions[0]) == {"score", "label"} and len(predictions) == 3
        by_label = {p["label"]: p["score"] for p in predictions}
        np.testing.assert_allclose([by_label[x] for x in labels], expected, rtol=1e-4, atol=1e-5)

    single = client.post("/predict", json={"inputs": TEXTS[0]})
    assert single.status_code == 200 and isinstance(single.json()[0], dict)
    check(single.json(), ref[0])
    check(client.post("/predict", json={"inputs": [TEXTS[0]]}).json(), ref[0])
    check(client.post("/predict", json={"inputs": [TEXTS[0], TEXTS[1]]}).json(), ref[1])  # a pair, as in TEI
    batch = client.post("/predict", json={"inputs": [[TEXTS[0]], [TEXTS[0], TEXTS[1]]]}).json()
    assert len(batch) == 2 and all(isinstance(b, list) for b in batch)
    check(batch[0], ref[0])
    check(batch[1], ref[1])
    raw = client.post("/predict", json={"inputs": TEXTS[0], "raw_scores": True}).json()
    assert not np.isclose(sum(p["score"] for p in raw), 1.0)


@pytest.mark.parametrize(
    "body,status",
    [
        ({"inputs": ["a", "b", "c"]}, 422),  # TEI: a sequence is one or two strings
        ({"inputs": [["a", "b", "c"]]}, 422),
        ({"inputs": []}, 422),
        ({"inputs": 3}, 422),
        ({"text": "a"}, 422),
        ({"inputs": "long " * 200}, 413),  # truncate defaults to false, as in TEI
    ],
)
def test_tei_predict_errors_have_tei_shape(body, status, client):
    r = client.post("/predict", json=body)
    assert r.status_code == status
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == "Validation"
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_tei_predict_truncates_when_asked_and_is_guarded(client, server):
    assert client.post("/predict", json={"inputs": "long " * 200, "truncate": True}).status_code == 200
    r = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    assert httpx.post(f"{server.url}/predict", json={"inputs": "x"}).status_code == 401
