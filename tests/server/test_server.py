"""The inference service over real HTTP: a real uvicorn (`moebert serve`) on a free local port, httpx as
the client. Classification, models, health, errors, metrics, batching, overload, auth, disconnects and
SIGTERM draining. QA lives in test_server_qa.py, ONNX in test_onnx.py."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import numpy as np
import pytest
from server_process import ServerProcess

from tests.server.checks import assert_error, metric_values, reference_scores

TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the plot is paper-thin and the characters never come alive, no matter how hard the actors try",
    "ok",
    "it's a charming and often affecting journey.",
    "unflinchingly bleak and desperate",
    "a long, long sentence " * 5,
    "Who wrote it?",
    "fine.",
]


@pytest.fixture(scope="module")
def server(moe_cls_dir, tiny_cls_dir, tiny_qa_dir):
    with ServerProcess({"cls": moe_cls_dir, "dense": tiny_cls_dir, "qa": tiny_qa_dir}, "--max-inputs", "16") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def scores_of(result: dict, labels: list[str]) -> list[float]:
    by_label = {x["label"]: x["score"] for x in result["labels"]}
    return [by_label[label] for label in labels]


# --------------------------------------------------------------------------------------------------
# Happy paths


def test_health_and_models(client):
    assert client.get("/health/live").json() == {"status": "live"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"cls", "dense", "qa"}
    assert models["cls"]["task"] == "classification" and models["qa"]["task"] == "qa"
    assert models["cls"]["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert models["cls"]["routing"] == "hash-random" and models["cls"]["experts"] == 4
    assert models["cls"]["moe_layers"] == [0, 1, 2] and models["dense"]["moe_layers"] == []
    assert models["dense"]["routing"] is None and models["cls"]["backend"] == "torch"
    for m in models.values():  # no --max-batch-tokens: measured at start-up, one of the sizes tried
        assert 16 <= m["max_batch_tokens"] <= 4096, m
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/classify", "/v1/qa", "/v1/models"}


@pytest.mark.parametrize("name", ["cls", "dense"])
def test_classify_matches_the_model_run_directly(client, name, moe_cls_dir, tiny_cls_dir):
    inputs = TEXTS[:4] + [["Who wrote it?", TEXTS[0]]]
    r = client.post("/v1/classify", json={"inputs": inputs, "model": name, "all_scores": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == name and len(body["results"]) == len(inputs)
    labels = ["LABEL_0", "LABEL_1", "LABEL_2"]
    got = np.array([scores_of(res, labels) for res in body["results"]])
    ref = reference_scores(moe_cls_dir if name == "cls" else tiny_cls_dir, inputs)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for res, row in zip(body["results"], ref, strict=True):
        assert res["label"] == labels[int(row.argmax())] and res["score"] == pytest.approx(row.max(), abs=1e-5)
    assert body["usage"]["inputs"] == 5 and body["usage"]["input_tokens"] > 20
    for header in ("x-queue-time-ms", "x-inference-time-ms", "x-tokenization-time-ms", "x-total-time-ms"):
        assert float(r.headers[header]) >= 0


def test_input_shapes_and_options(client):
    one = client.post("/v1/classify", json={"inputs": "fine.", "model": "cls"}).json()["results"]
    assert len(one) == 1 and set(one[0]) == {"label", "score"}
    pair_list = client.post("/v1/classify", json={"inputs": [["Who wrote it?", "Ada."]], "model": "cls"}).json()
    pair_obj = client.post(
        "/v1/classify", json={"inputs": {"text": "Who wrote it?", "text_pair": "Ada."}, "model": "cls"}
    ).json()
    assert pair_list["results"] == pair_obj["results"]
    top2 = client.post("/v1/classify", json={"inputs": "fine.", "model": "cls", "top_k": 2}).json()["results"][0]
    assert len(top2["labels"]) == 2 and top2["labels"][0]["score"] >= top2["labels"][1]["score"]
    assert top2["labels"][0]["label"] == top2["label"]
    clipped = client.post("/v1/classify", json={"inputs": "fine.", "model": "cls", "top_k": 50}).json()
    assert len(clipped["results"][0]["labels"]) == 3
    raw = client.post("/v1/classify", json={"inputs": "fine.", "model": "cls", "raw_scores": True, "all_scores": True})
    probs = client.post("/v1/classify", json={"inputs": "fine.", "model": "cls", "all_scores": True})
    logits = np.array([x["score"] for x in raw.json()["results"][0]["labels"]])
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(softmax, [x["score"] for x in probs.json()["results"][0]["labels"]], atol=1e-6)


def test_truncation(client):
    long_text = "word " * 300
    cut = client.post("/v1/classify", json={"inputs": long_text, "model": "cls"})
    assert cut.status_code == 200 and cut.json()["usage"]["input_tokens"] == 64  # the tiny model's limit
    refused = client.post("/v1/classify", json={"inputs": ["ok", long_text], "model": "cls", "truncate": False})
    assert refused.status_code == 413
    message = refused.json()["error"]["message"]
    assert "302 tokens" in message and "at most 64" in message and "inputs[1]" in message


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        return await asyncio.gather(*(c.post("/v1/classify", json=b) for b in bodies))


def test_result_is_the_same_alone_or_in_a_batch(client, server):
    opts = {"model": "cls", "raw_scores": True, "all_scores": True}
    alone = [client.post("/v1/classify", json={"inputs": t, **opts}).json()["results"][0] for t in TEXTS]
    together = client.post("/v1/classify", json={"inputs": TEXTS, **opts}).json()["results"]
    concurrent = [
        r.json()["results"][0] for r in asyncio.run(_post_all(server.url, [{"inputs": t, **opts} for t in TEXTS]))
    ]
    labels = ["LABEL_0", "LABEL_1", "LABEL_2"]
    for a, b, c in zip(alone, together, concurrent, strict=True):
        assert a["label"] == b["label"] == c["label"]
        # Padding is masked and the FFNs skip it, so only float summation order can differ (BLAS blocking).
        np.testing.assert_allclose(scores_of(a, labels), scores_of(b, labels), rtol=0, atol=2e-6)
        np.testing.assert_allclose(scores_of(a, labels), scores_of(c, labels), rtol=0, atol=2e-6)
    batches = metric_values(client.get("/metrics").text, "moebert_batch_size_sum")
    assert batches[("cls",)] > batches.get(("dense",), 0)


# --------------------------------------------------------------------------------------------------
# Bad input: always a clear 4xx JSON error, never a 500 or a traceback

BAD_JSON = [
    ("missing inputs", {}, 422),
    ("empty string", {"inputs": ""}, 422),
    ("whitespace", {"inputs": " \n\t "}, 422),
    ("empty list", {"inputs": []}, 422),
    ("empty text in list", {"inputs": ["ok", ""]}, 422),
    ("empty pair half", {"inputs": [["ok", "  "]]}, 422),
    ("number", {"inputs": 123}, 422),
    ("null", {"inputs": None}, 422),
    ("list of numbers", {"inputs": [1, 2]}, 422),
    ("pair of one", {"inputs": [["a"]]}, 422),
    ("pair of three", {"inputs": [["a", "b", "c"]]}, 422),
    ("nested lists", {"inputs": [[["a", "b"]]]}, 422),
    ("object without pair", {"inputs": {"text": "a"}}, 422),
    ("unknown field", {"inputs": "a", "temperature": 1}, 422),
    ("top_k zero", {"inputs": "a", "top_k": 0}, 422),
    ("top_k negative", {"inputs": "a", "top_k": -3}, 422),
    ("top_k absurd", {"inputs": "a", "top_k": 10**12}, 422),
    ("top_k string", {"inputs": "a", "top_k": "many"}, 422),
    ("truncate string", {"inputs": "a", "truncate": "maybe"}, 422),
    ("model number", {"inputs": "a", "model": 5}, 422),
    ("unknown model", {"inputs": "a", "model": "nope"}, 404),
    ("wrong task model", {"inputs": "a", "model": "qa"}, 422),
    ("no model named, two classifiers", {"inputs": "a"}, 422),
    ("too many inputs", {"inputs": ["a"] * 17, "model": "cls"}, 413),
]


@pytest.mark.parametrize(("case", "body", "status"), BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_json_inputs(client, case, body, status):
    r = client.post("/v1/classify", json=body)
    assert_error(r, status)


BAD_RAW = [
    ("non-utf8", b'{"inputs": "\xff\xfe\xfa"}', 422),
    ("invalid json", b'{"inputs": ', 422),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 422),
    ("deeply nested, small", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422),
    ("array body", b'["a"]', 422),
    ("string body", b'"a"', 422),
    ("null body", b"null", 422),
    ("empty body", b"", 422),
    ("huge body", b'{"inputs": "' + b"a" * (2 << 20) + b'"}', 413),
]


@pytest.mark.parametrize(("case", "raw", "status"), BAD_RAW, ids=[c[0] for c in BAD_RAW])
def test_bad_raw_bodies(client, case, raw, status):
    r = client.post("/v1/classify", content=raw, headers={"content-type": "application/json"})
    assert_error(r, status)


def test_huge_chunked_body_is_413(client):
    def chunks():
        for _ in range(40):
            yield b"a" * 65536

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_wrong_method_and_path(client):
    assert_error(client.get("/v1/classify"), 405)
    assert_error(client.post("/v1/nothing", json={}), 404)


# --------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_are_exported_and_move(client):
    before = client.get("/metrics").text
    for name in (
        "moebert_request_seconds", "moebert_tokenization_seconds", "moebert_queue_seconds",
        "moebert_inference_seconds", "moebert_input_tokens", "moebert_batch_size", "moebert_batch_tokens",
        "moebert_batch_padding_ratio", "moebert_queue_depth", "moebert_requests_in_flight",
        "moebert_requests_total", "moebert_failures_total", "moebert_expert_tokens_total",
    ):  # fmt: skip
        assert f"# TYPE {name.removesuffix('_total')}" in before, name
    r = client.post("/v1/classify", json={"inputs": ["fine.", "a gorgeous movie"], "model": "cls"})
    tokens = r.json()["usage"]["input_tokens"]
    client.post("/v1/classify", json={"inputs": ""})
    after = client.get("/metrics").text

    def delta(name, key):
        return metric_values(after, name).get(key, 0) - metric_values(before, name).get(key, 0)

    assert delta("moebert_requests_total", ("classify", "200")) == 1
    assert delta("moebert_requests_total", ("classify", "422")) == 1
    assert delta("moebert_failures_total", ("invalid_input",)) == 1
    assert delta("moebert_request_seconds_count", ("classify", "cls")) == 1
    assert delta("moebert_input_tokens_sum", ("classify", "cls")) == tokens
    # Every non-padding token is routed once per MoE layer: 3 layers here.
    routed = sum(delta("moebert_expert_tokens_total", (e, str(layer), "cls")) for layer in range(3) for e in "0123")
    assert routed == 3 * tokens
    assert not any(k[-1] == "dense" for k in metric_values(after, "moebert_expert_tokens_total"))
    assert metric_values(after, "moebert_requests_in_flight")[()] == 1  # this very /metrics request


# --------------------------------------------------------------------------------------------------
# Overload, auth, disconnects, draining: a server whose rows wait 1 s for company, so that the queue
# state is deterministic.

SLOW = ("--max-wait-ms", "1000", "--max-queue", "4", "--api-key", "s3cret", "--max-batch-tokens", "3000")
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def slow_server(moe_cls_dir):
    with ServerProcess({"cls": moe_cls_dir}, *SLOW) as proc:
        yield proc


def test_api_key(slow_server):
    body = {"inputs": "fine."}
    assert_error(httpx.post(slow_server.url + "/v1/classify", json=body), 401)
    wrong = httpx.post(slow_server.url + "/v1/classify", json=body, headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401)
    assert httpx.post(slow_server.url + "/v1/classify", json=body, headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(slow_server.url + "/health/ready").status_code == 200  # probes need no key
    (model,) = httpx.get(slow_server.url + "/v1/models", headers=AUTH).json()["models"]
    assert model["max_batch_tokens"] == 3000  # as set: no measurement


def test_overload_gives_429_then_recovers(slow_server):
    async def burst():
        async with httpx.AsyncClient(base_url=slow_server.url, headers=AUTH, timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/classify", json={"inputs": ["a", "b"]}) for _ in range(6)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429, 429], codes  # 2 requests × 2 rows fill the queue of 4
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429)
            assert int(r.headers["Retry-After"]) >= 1
    again = httpx.post(slow_server.url + "/v1/classify", json={"inputs": ["a", "b"]}, headers=AUTH, timeout=10)
    assert again.status_code == 200


def test_disconnected_client_has_its_rows_dropped(slow_server):
    url = slow_server.url
    before = httpx.get(url + "/metrics").text
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/classify", json={"inputs": "fine."}, headers=AUTH, timeout=0.3)
    time.sleep(1.5)  # past the batcher's wait: the row would have run by now
    after = httpx.get(url + "/metrics").text
    gone = metric_values(after, "moebert_failures_total").get(("client_gone",), 0)
    assert gone - metric_values(before, "moebert_failures_total").get(("client_gone",), 0) == 1
    ran = metric_values(after, "moebert_batch_size_count")[("cls",)]
    assert ran == metric_values(before, "moebert_batch_size_count")[("cls",)]


def test_sigterm_drains_in_flight_requests(moe_cls_dir):
    proc = ServerProcess({"cls": moe_cls_dir}, *SLOW).start()
    try:

        async def scenario():
            async with httpx.AsyncClient(base_url=proc.url, headers=AUTH, timeout=30) as c:
                in_flight = asyncio.create_task(c.post("/v1/classify", json={"inputs": "fine."}))
                await asyncio.sleep(0.3)  # the row is now waiting in the batcher
                proc.terminate()
                return await in_flight

        answered = asyncio.run(scenario())
        assert answered.status_code == 200 and answered.json()["results"][0]["label"]
        assert proc.proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        with pytest.raises(httpx.ConnectError):
            httpx.get(proc.url + "/health/ready", timeout=2)
    finally:
        proc.stop()


def test_bad_serve_arguments_fail_fast(tmp_path):
    import subprocess
    import sys

    def serve(*args):
        return subprocess.run(
            [sys.executable, "-m", "moebert_cli", "serve", *args], capture_output=True, text=True, timeout=120
        )

    missing = serve("--model", f"x={tmp_path / 'nope'}")
    assert missing.returncode == 2 and "error" in missing.stderr and "Traceback" not in missing.stderr
    no_models = serve("--models-dir", str(tmp_path / "empty"))  # no --model and nothing bundled there
    assert no_models.returncode == 2 and "no models" in no_models.stderr
    bad_pair = serve("--model", "just-a-path")
    assert bad_pair.returncode == 2 and "NAME=PATH" in bad_pair.stderr
    onnx_missing = serve("--model", f"x={tmp_path}", "--backend", "onnx")
    assert onnx_missing.returncode == 2


def test_settings_from_env(monkeypatch):
    from server.settings import ServerSettings

    monkeypatch.setenv("MOEBERT_SERVE_MODELS", "a=/m/a, b=/m/b")
    monkeypatch.setenv("MOEBERT_SERVE_MAX_BATCH_TOKENS", "4096")
    monkeypatch.setenv("MOEBERT_SERVE_API_KEY", "k-e-y")
    s = ServerSettings()
    assert s.models == {"a": "/m/a", "b": "/m/b"} and s.max_batch_tokens == 4096
    assert s.api_key.get_secret_value() == "k-e-y" and "k-e-y" not in repr(s)
    monkeypatch.setenv("MOEBERT_SERVE_MODELS", json.dumps({"c": "/m/c"}))
    assert ServerSettings().models == {"c": "/m/c"}
    assert ServerSettings(models=["d=/m/d"]).models == {"d": "/m/d"}  # flags win over env
