"""The Kubernetes manifests under deploy/k8s validate against Kubernetes' published schemas (kubernetes-validate,
strict: unknown fields fail) and the RayService against KubeRay's CRD schema (vendored, see deploy/k8s/README.md);
their probes, drain and volumes say what the server does. No cluster needed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[1] / "deploy/k8s"
VERSION = kubernetes_validate.latest_version()
CRD_SCHEMA = K8S / "schemas/rayservice-v1.schema.json.gz"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def kind(name: str, k: str) -> dict[str, Any]:
    return next(d for d in documents(name) if d["kind"] == k)


@pytest.mark.parametrize("name", ["deployment.yaml", "prometheus-adapter.yaml"])
def test_plain_manifests_match_kubernetes_schemas(name: str) -> None:
    for doc in documents(name):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def _pod_templates(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def test_rayservice_matches_the_crd_and_kubernetes_schemas() -> None:
    docs = documents("rayservice.yaml")
    service = kind("rayservice.yaml", "RayService")
    jsonschema.validate(service, json.loads(gzip.decompress(CRD_SCHEMA.read_bytes())))
    # The CRD embeds pod templates loosely; Kubernetes' own PodTemplate schema checks them strictly.
    for template in _pod_templates(service):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, VERSION, strict=True)
    for doc in docs:
        if doc["kind"] != "RayService":
            kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_broken_rayservice_fails_the_crd_schema() -> None:
    service = kind("rayservice.yaml", "RayService")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, json.loads(gzip.decompress(CRD_SCHEMA.read_bytes())))


def test_rayservice_serves_painters_with_probes_drain_gpus_and_cache() -> None:
    service = kind("rayservice.yaml", "RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert app["import_path"] == "server.ray_serve:build"
    drain = app["deployments"][0]["graceful_shutdown_timeout_s"]
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    container = worker["containers"][0]
    # port 8000 on a worker is Ray's proxy: Painters' probes there would ask any replica, on any pod (KubeRay's
    # default probes apply, and Serve's check_health covers the engine)
    assert "livenessProbe" not in container and "readinessProbe" not in container
    from server import ray_serve
    assert "check_health" in (Path(ray_serve.__file__).read_text())
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["terminationGracePeriodSeconds"] > drain
    assert {m["name"] for m in container["volumeMounts"]} == {v["name"] for v in worker["volumes"]} == {"model-cache"}


def test_deployment_scales_on_waiting_requests_and_drains_within_grace() -> None:
    hpa = kind("deployment.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "painters:num_requests_waiting"
    pod = kind("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert pod["terminationGracePeriodSeconds"] > float(env["PAINTERS_DRAIN_TIMEOUT_S"])
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/ready"
    # the image has no ENTRYPOINT (Dockerfile), so the command must name the program; and a numeric user, which
    # runAsNonRoot can check; no volume the manifest does not define
    assert pod["containers"][0]["command"] == ["painters"] and pod["containers"][0]["args"][0] == "serve"
    dockerfile = (K8S.parents[1] / "Dockerfile").read_text()
    assert "ENTRYPOINT" not in dockerfile and "USER 10001:10001" in dockerfile
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert "volumes" not in pod
    adapter = yaml.safe_load(kind("prometheus-adapter.yaml", "ConfigMap")["data"]["config.yaml"])
    assert adapter["rules"][0]["name"]["as"] == "painters:num_requests_waiting"
