"""deploy/k8s: every manifest validates offline against the Kubernetes JSON schemas bundled with
kubernetes-validate (strict: unknown fields fail), for the oldest and newest versions we target; and the
pieces agree with each other and with the server (probe paths, ports, drain vs grace period)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from server.settings import ServerSettings
from tests.conftest import REPO

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = REPO / "deploy" / "k8s"
VERSIONS = ("1.28.0", "1.37.0")  # oldest supported cluster, newest bundled schema
CRDS = {"monitoring.coreos.com/v1"}  # ServiceMonitor: a CRD, checked by hand below


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize(folder: Path) -> dict[tuple[str, str], dict]:
    """A small kustomize: resources (files or folders) and strategic-merge patches, by (kind, name)."""
    spec = load(folder / "kustomization.yaml")[0]
    objects: dict[tuple[str, str], dict] = {}
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        docs = kustomize(path).values() if path.is_dir() else load(path)
        objects |= {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for patch in spec.get("patches", []):
        for doc in load(folder / patch["path"]):
            key = (doc["kind"], doc["metadata"]["name"])
            objects[key] = merge(copy.deepcopy(objects[key]), doc)
    return objects


def merge(base, patch):
    """Strategic merge as kubectl does for the fields used here: dicts recursively, lists of named items by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        for k, v in patch.items():
            base[k] = merge(base[k], v) if k in base else v
        return base
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in patch):
        by_name = {x["name"]: i for i, x in enumerate(base)}
        for item in patch:
            if item["name"] in by_name:
                base[by_name[item["name"]]] = merge(base[by_name[item["name"]]], item)
            else:
                base.append(item)
        return base
    return patch


VARIANTS = {"cpu": K8S, "gpu": K8S / "gpu"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_kubernetes_schemas(variant, version):
    objects = kustomize(VARIANTS[variant])
    assert {kind for kind, _ in objects} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim",
    }  # fmt: skip
    for obj in objects.values():
        if obj["apiVersion"] in CRDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError with the path


def test_a_broken_manifest_is_refused():
    deployment = copy.deepcopy(kustomize(K8S)[("Deployment", "moebert")])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(kustomize(K8S)[("Deployment", "moebert")])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45  # a typo: strict refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def _container(objects) -> dict:
    return objects[("Deployment", "moebert")]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_ports_and_graceful_termination_fit_the_server(variant):
    objects = kustomize(VARIANTS[variant])
    deployment = objects[("Deployment", "moebert")]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    port = container["ports"][0]
    assert port["containerPort"] == ServerSettings().port or env.get("MOEBERT_SERVE_PORT") == str(port["containerPort"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": port["name"]}
    drain = float(env.get("MOEBERT_SERVE_DRAIN_TIMEOUT_S") or ServerSettings().drain_timeout_s)
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # Settings from the environment must be ones the server accepts.
    ServerSettings(**{k.removeprefix("MOEBERT_SERVE_").lower(): v for k, v in env.items()
                      if k.startswith("MOEBERT_SERVE_") and v is not None})  # fmt: skip
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == str(
        port["containerPort"]
    )
    if variant == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and env["MOEBERT_SERVE_DEVICE"] == "cuda"
        assert container["image"].endswith(":gpu")


def test_service_hpa_pdb_and_monitor_point_at_the_deployment():
    objects = kustomize(K8S)
    deployment = objects[("Deployment", "moebert")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "moebert")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == _container(objects)["ports"][0]["name"]
    pdb = objects[("PodDisruptionBudget", "moebert")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = objects[("HorizontalPodAutoscaler", "moebert")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "moebert"}
    assert hpa["spec"]["minReplicas"] >= 2  # with maxUnavailable 1, a drain never empties the service
    monitor = objects[("ServiceMonitor", "moebert")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects
