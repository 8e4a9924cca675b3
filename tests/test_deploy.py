"""The deployment files say what the code does: every Kubernetes manifest (base and each
overlay, rendered as Kustomize would) validates against the Kubernetes schemas, and agrees with
the worker: its settings, probes, port, consumer group and topic, and the Prometheus config."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from classify_app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
VERSION = "1.31"
# Custom resources the Kubernetes schemas do not hold (KEDA's): checked by consistency only.
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication"}
SETTINGS = {f"CLASSIFY_{field.name.upper()}" for field in dataclasses.fields(Settings)}


def load(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch, as far as these overlays use it: maps merge, lists of named
    items merge by name, other lists and values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in base + patch)
    ):
        by_name = {item["name"]: item for item in base}
        for item in patch:
            by_name[item["name"]] = (
                merge(by_name[item["name"]], item) if item["name"] in by_name else item
            )
        return list(by_name.values())
    return copy.deepcopy(patch)


def render(folder: Path) -> list[dict[str, Any]]:
    """The resources of a kustomization, with its patches applied and its labels added."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = folder / entry
        resources += render(target) if target.is_dir() else load(target)
    for patch in kustomization.get("patches", []):
        for document in load(folder / patch["path"]):
            for position, resource in enumerate(resources):
                if (resource["kind"], resource["metadata"]["name"]) == (
                    document["kind"],
                    document["metadata"]["name"],
                ):
                    resources[position] = merge(resource, document)
    for label in kustomization.get("labels", []):
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for resource in resources:
            pod = resource.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return resources


OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    for resource in render(KUBERNETES / "overlays" / overlay):
        if resource["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(resource, VERSION, strict=True)


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [resource for resource in resources if resource["kind"] == kind]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_agree_with_the_worker(overlay: str) -> None:
    resources = render(KUBERNETES / "overlays" / overlay)
    config = by_kind(resources, "ConfigMap")["data"]
    statefulset = by_kind(resources, "StatefulSet")
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    env = {variable["name"] for variable in container["env"]}

    # Every setting the manifests give is a real one (or the file it is read from).
    named = {name for name in {*config, *env} if name.startswith("CLASSIFY_")}
    assert {
        n for n in named if n not in SETTINGS and n.removesuffix("_FILE") not in SETTINGS
    } == set()
    # And the ConfigMap's values are valid (the files it names exist only in the pod).
    Settings.from_env({**config, "CLASSIFY_KAFKA_CA_FILE": "", "CLASSIFY_KAFKA_PASSWORD": "x"})

    # The port the command serves is the port probed, exposed, scraped and routed to.
    command = container["command"]
    port = int(command[command.index("--web-port") + 1])
    assert container["ports"] == [{"name": "web", "containerPort": port}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "web"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "web"}
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    from classify_app.web.access import OPEN_PATHS

    assert {"/readyz", "/healthz"} <= OPEN_PATHS  # probes need no token

    # Table routing reaches each pod by its name in the headless Service.
    workers = next(
        r for r in resources if r["kind"] == "Service" and r["spec"].get("clusterIP") == "None"
    )
    assert statefulset["spec"]["serviceName"] == workers["metadata"]["name"]
    web_host = next(v["value"] for v in container["env"] if v["name"] == "CLASSIFY_WEB_HOST")
    assert f".{workers['metadata']['name']}." in web_host
    assert any(v["name"] == "CLASSIFY_GROUP_INSTANCE_ID" for v in container["env"])

    # KEDA scales on the lag of the input topic of this deployment's group, up to a worker
    # per partition.
    scaled = by_kind(resources, "ScaledObject")
    [trigger] = scaled["spec"]["triggers"]
    defaults = Settings()
    assert trigger["metadata"]["consumerGroup"] == config.get("CLASSIFY_APP_ID", defaults.app_id)
    assert trigger["metadata"]["topic"] == config.get("CLASSIFY_ADS_TOPIC", defaults.ads_topic)
    assert scaled["spec"]["maxReplicaCount"] == int(
        config.get("CLASSIFY_PARTITIONS", defaults.partitions)
    )
    assert scaled["spec"]["scaleTargetRef"]["name"] == statefulset["metadata"]["name"]
    brokers = ",".join(url.removeprefix("kafka://") for url in config["CLASSIFY_BROKER"].split(","))
    assert trigger["metadata"]["bootstrapServers"] == brokers
    secret = by_kind(resources, "Secret")["stringData"]
    for reference in by_kind(resources, "TriggerAuthentication")["spec"]["secretTargetRef"]:
        assert reference["key"] in secret, reference
    mounted = {
        v["value"].rsplit("/", 1)[1] for v in container["env"] if v["name"].endswith("_FILE")
    }
    assert mounted <= set(secret)

    # Prometheus keeps exactly these pods, on the port named web.
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if "kubernetes_sd_configs" in j)
    keep = {
        tuple(rule["source_labels"]): rule["regex"]
        for rule in job["relabel_configs"]
        if rule.get("action") == "keep"
    }
    assert (
        keep[("__meta_kubernetes_pod_label_app",)]
        == statefulset["spec"]["template"]["metadata"]["labels"]["app"]
    )
    assert keep[("__meta_kubernetes_pod_container_port_name",)] == "web"


def worker_container(overlay: str) -> dict[str, Any]:
    statefulset = by_kind(render(KUBERNETES / "overlays" / overlay), "StatefulSet")
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def test_the_gpu_overlay_asks_for_a_gpu() -> None:
    container = worker_container("gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["CLASSIFY_DEVICE"] == "cuda:0" and "CLASSIFY_WEB_HOST" in env  # base env kept


def test_the_cpu_overlay_runs_the_image_built_without_cuda() -> None:
    cpu, gpu = worker_container("cpu")["image"], worker_container("gpu")["image"]
    assert cpu == f"{gpu}-cpu"  # docs/operations.md builds both tags
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH=cuda" in dockerfile and '[ "$TORCH" = cpu ]' in dockerfile
    assert f"--build-arg TORCH=cpu -t {cpu}" in (ROOT / "docs" / "operations.md").read_text()


def test_the_compose_file_names_real_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        names = {name for name in service.get("environment", {}) if name.startswith("CLASSIFY_")}
        assert names - SETTINGS == set()


def test_the_license_is_the_one_the_package_declares() -> None:
    declared = next(
        line.split("=", 1)[1].strip()
        for line in (ROOT / "setup.cfg").read_text().splitlines()
        if line.startswith("license =")
    )
    text = (ROOT / "LICENSE").read_text()
    assert declared == "Apache-2.0" and "Apache License" in text and "Version 2.0" in text
