"""Smoke test of the out-of-the-box service: `moebert serve` with no --model serves the bundled
models/ folder; the SST-2 MoEBERT classifies a clearly positive review as positive."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.process import ServerProcess

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.skipif(not (MODELS / "sst2" / "config.json").is_file(), reason="no bundled SST-2 model in models/")
def test_default_service_serves_the_bundled_sentiment_model():
    server = ServerProcess({}, "--threads", "1").start()
    try:
        models = httpx.get(server.url + "/v1/models").json()["models"]
        assert "sst2" in {m["name"] for m in models}
        sst2 = next(m for m in models if m["name"] == "sst2")
        assert sst2["experts"] == 4 and sst2["labels"] == ["negative", "positive"]
        reply = httpx.post(
            server.url + "/v1/classify",
            json={"inputs": ["a gorgeous, witty, seductive movie.", "a tedious, joyless mess."], "model": "sst2"},
        )
        assert reply.status_code == 200, reply.text
        labels = [r["label"] for r in reply.json()["results"]]
        assert labels == ["positive", "negative"]
    finally:
        server.stop()
