"""Ray Serve: a local Ray instance serves the FastAPI app with the bundled models; classification and
QA over HTTP through Ray's proxy give the same answers as the plain service; everything shuts down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from server.ray_serve import RayServeOptions, replica_app, split_args
from server.settings import ServerSettings
from tests.conftest import REPO

pytest.importorskip("ray.serve")

MODELS = f"sst2={REPO / 'models' / 'sst2'},squad={REPO / 'models' / 'squad'}"
TIMEOUT_S = 480  # a local node, the controller, the proxy and one replica loading two models: ~3 min on 2 busy cores
RAY_DID_NOT_START = 3  # the driver's exit status when Ray itself cannot start a node here


def test_options_and_settings_are_split_and_checked():
    options, settings = split_args({"models": MODELS, "max_replicas": "3", "max_batch_requests": "8"})
    assert options.max_replicas == 3 and settings.max_batch_requests == 8 and set(settings.models) == {"sst2", "squad"}
    with pytest.raises(ValueError, match="min_replicas"):
        RayServeOptions(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        split_args({"max_replicas": "0"})
    with pytest.raises(ValueError):
        split_args({"no_such_setting_or_option": "1", "max_batch_tokens": "1"})


def test_replica_app_starts_only_when_its_models_are_ready(moe_cls_dir):
    """What each Ray replica runs: the service app, whose startup returns once the models are loaded."""
    from fastapi.testclient import TestClient

    _, settings = split_args({"models": f"cls={moe_cls_dir}", "warmup": "false"})
    app = replica_app(settings, load_timeout_s=120)
    with TestClient(app) as client:  # runs the lifespan, as Ray's replica wrapper does
        assert app.state.moebert.ready
        assert client.get("/health/ready").status_code == 200
        r = client.post("/v1/classify", json={"inputs": ["fine.", "a gorgeous movie"]})
        assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_replica_app_fails_its_startup_instead_of_killing_the_worker(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(
        '{"model_type": "bert", "architectures": ["BertForSequenceClassification"]}'
    )
    from fastapi.testclient import TestClient

    app = replica_app(ServerSettings(models={"x": str(tmp_path / "broken")}), load_timeout_s=60)
    with pytest.raises(RuntimeError, match="could not load the models"), TestClient(app):
        pass


@pytest.mark.slow
def test_ray_serve_deploys_answers_and_shuts_down():
    # Ray's session folder holds AF_UNIX sockets (paths ≤ 107 bytes): a short folder, not pytest's tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    pythonpath = os.pathsep.join([str(REPO), str(REPO / "benchmarks")])  # the driver imports server_process
    env = {**os.environ, "PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TMPDIR": ray_tmp}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ray_serve_driver", MODELS], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"Ray Serve test did not finish in {TIMEOUT_S} s:\n{stderr[-3000:]}")
    if proc.returncode == RAY_DID_NOT_START:  # an overloaded machine: Ray's own node start timed out
        pytest.skip(f"Ray could not start a local node: {stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, stderr[-4000:]
    out = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT"))[len("RESULT") :])
    assert out["ready"]["status"] == "ready" and set(out["ready"]["models"]) == {"sst2", "squad"}
    assert out["classify"]["status"] == 200, out["classify"]
    labels = [r["label"] for r in out["classify"]["body"]["results"]]
    assert labels == ["positive", "negative"]
    assert out["qa"]["status"] == 200, out["qa"]
    assert "Lovelace" in out["qa"]["body"]["results"][0]["answers"][0]["answer"]
    assert out["bad"]["status"] == 422 and "error" in out["bad"]["body"]
    assert [r["status"] for r in out["concurrent"]] == [200] * 24
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert [r["label"] for r in out["concurrent"]] == ["positive", "negative"] * 12
    assert out["metrics"]
    assert out["shutdown_s"] < 60
