"""Smoke test of the out-of-the-box service: `moebert serve` with no --model serves the bundled
models/ folder, each on the runtime `auto` picks for it; the SST-2 MoEBERT calls a
clearly positive review positive and the SQuAD MoEBERT answers a SQuAD v1.1 dev question correctly."""

from __future__ import annotations

import httpx
import pytest
from server_process import ServerProcess

from tests.conftest import REPO
from training.metrics import squad_exact

MODELS = REPO / "models"
# The second question of SQuAD v1.1 dev (Rajpurkar et al., 2016; CC BY-SA 4.0) and its gold answer.
CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League "
    "(NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the "
    "National Football Conference (NFC) champion Carolina Panthers 24–10 to earn their third Super Bowl title. "
    "The game was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, "
    "California."
)
QUESTION, GOLD = "Which NFL team represented the NFC at Super Bowl 50?", "Carolina Panthers"

needs_bundle = pytest.mark.skipif(
    not all((MODELS / name / "config.json").is_file() for name in ("sst2", "squad")),
    reason="the bundled models (models/sst2, models/squad) are missing",
)


@pytest.fixture(scope="module")
def default_service():
    server = ServerProcess({}, "--threads", "1").start()
    yield server
    server.stop()


@needs_bundle
def test_default_service_serves_both_bundled_models(default_service):
    models = {m["name"]: m for m in httpx.get(default_service.url + "/v1/models").json()["models"]}
    assert {"sst2", "squad"} <= set(models)
    assert models["sst2"]["task"] == "classification" and models["squad"]["task"] == "qa"
    assert models["sst2"]["experts"] == 4 and models["sst2"]["labels"] == ["negative", "positive"]
    # Each on its fastest CPU runtime (benchmarks/results/backend_speed.md): short texts on int8 ONNX,
    # 256-token QA windows on torch.
    assert models["sst2"]["backend"] == "onnx-int8" and models["squad"]["backend"] == "torch"


@needs_bundle
def test_bundled_sentiment_model(default_service):
    reply = httpx.post(
        default_service.url + "/v1/classify",
        json={"inputs": ["a gorgeous, witty, seductive movie.", "a tedious, joyless mess."], "model": "sst2"},
    )
    assert reply.status_code == 200, reply.text
    assert [r["label"] for r in reply.json()["results"]] == ["positive", "negative"]


@needs_bundle
def test_bundled_qa_model_answers_a_squad_dev_question(default_service):
    reply = httpx.post(
        default_service.url + "/v1/qa", json={"question": QUESTION, "context": CONTEXT, "model": "squad"}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    best = reply.json()["results"][0]["answers"][0]
    # Correct as SQuAD's official script counts it (exact match after its answer normalisation).
    assert squad_exact(best["answer"], GOLD) == 1.0, best
    assert CONTEXT[best["start"] : best["end"]] == best["answer"]
