"""Run by tests/server/test_ray_serve.py in its own process: start a local Ray instance, deploy
server.ray_serve.build_app, talk HTTP to Ray's proxy, shut everything down, print the answers as JSON."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import ray
from ray import serve
from server_process import free_port

from server.ray_serve import build_app

TEXTS = ["a gorgeous, witty, seductive movie.", "unflinchingly bleak and desperate"]
QA = {"question": "Who wrote the letter?", "context": "The letter was written by Ada Lovelace in London in 1843."}


async def concurrent(url: str, n: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        rs = await asyncio.gather(
            *(client.post("/v1/classify", json={"inputs": TEXTS[i % 2], "model": "sst2"}) for i in range(n))
        )
    return [{"status": r.status_code, "label": r.json()["results"][0]["label"]} for r in rs]


def main() -> None:
    t0 = time.monotonic()
    port = free_port()
    try:
        ray.init(num_cpus=2, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # Ray's node start (raylet + agents) timed out: not this project's failure
        if "timed out during startup" not in str(err):
            raise
        print(f"ray.init failed: {err}", file=sys.stderr)
        sys.exit(3)
    out: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"models": sys.argv[1], "max_replicas": "2", "num_cpus": "0.5", "threads": "1"})
        serve.run(app, name="moebert", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:  # serve.run returns once the replica is up; the proxy may need a moment more
            try:
                if httpx.get(url + "/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("Ray Serve app not ready")
            time.sleep(0.2)
        out["deployed_s"] = time.monotonic() - t0
        out["ready"] = httpx.get(url + "/health/ready", timeout=30).json()
        out["models"] = httpx.get(url + "/v1/models", timeout=30).json()
        r = httpx.post(url + "/v1/classify", json={"inputs": TEXTS, "model": "sst2", "all_scores": True}, timeout=60)
        out["classify"] = {"status": r.status_code, "body": r.json()}
        r = httpx.post(url + "/v1/qa", json={**QA, "model": "squad"}, timeout=60)
        out["qa"] = {"status": r.status_code, "body": r.json()}
        r = httpx.post(url + "/v1/classify", json={"inputs": 5}, timeout=60)
        out["bad"] = {"status": r.status_code, "body": r.json()}
        out["concurrent"] = asyncio.run(concurrent(url, 24))
        out["metrics"] = "moebert_" in httpx.get(url + "/metrics", timeout=30).text
        status = serve.status().applications["moebert"].deployments["moebert"]
        out["autoscaling"] = status.deployment_status_trigger if hasattr(status, "deployment_status_trigger") else None
    finally:
        t1 = time.monotonic()
        serve.shutdown()
        ray.shutdown()
        out["shutdown_s"] = time.monotonic() - t1
    print("RESULT" + json.dumps(out, default=str))


if __name__ == "__main__":
    main()
