"""The deployment files are valid and agree with each other and with the code's settings.

Kubernetes manifests (deploy/kubernetes/) are checked against the Kubernetes OpenAPI schema
(``kubernetes-validate``, strict: unknown fields fail) and for what a hospital's platform team
asks first: probes, resource requests and limits, non-root pods, secrets only by reference, and
a NetworkPolicy that keeps the DICOM node inside the imaging network. The compose file
(deploy/compose.yaml) and its offline override (deploy/compose.offline.yaml) are parsed and
checked for consistency (ports, URLs, AE titles, mounted files); tests/test_compose.py runs
them. ``podman kube play`` runs the service Deployment where podman and the locally built
image are present.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from her2low.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose.yaml"
OFFLINE = ROOT / "deploy" / "compose.offline.yaml"
NGINX = ROOT / "deploy" / "nginx" / "her2low.conf"
KUBE_VERSION = "1.30.0"
SETTINGS_VARS = {f"HER2LOW_{name.upper()}" for name in Settings.model_fields}
SECRET_WORDS = ("DB_URL", "QUEUE_URL", "TOKEN", "SECRET", "PASSWORD")


def kube_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in kube_documents() if doc["kind"] == kind]


def by_component(kind: str, component: str) -> dict[str, Any]:
    (found,) = [
        d
        for d in of_kind(kind)
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return found


def pod_specs() -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in of_kind("Deployment") + of_kind("Job")]


@pytest.mark.parametrize(
    "name,doc", kube_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"]
)
def test_every_manifest_is_valid_against_the_kubernetes_schema(
    name: str, doc: dict[str, Any]
) -> None:
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_manifests_cover_node_workers_service_storage_and_policy() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in kube_documents()}
    for wanted in [
        ("Deployment", "her2low-node"),
        ("Deployment", "her2low-worker"),
        ("Deployment", "her2low-service"),
        ("Service", "her2low-node"),
        ("Service", "her2low-service"),
        ("PersistentVolumeClaim", "her2low-dicom"),
        ("NetworkPolicy", "her2low-node-imaging-only"),
        ("Job", "her2low-migrate"),
    ]:
        assert wanted in kinds, wanted
    assert by_component("Deployment", "worker")["spec"]["replicas"] >= 2
    assert by_component("Deployment", "service")["spec"]["replicas"] >= 2


def test_every_container_has_probes_resources_and_runs_unprivileged() -> None:
    for deployment in of_kind("Deployment"):
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert "livenessProbe" in container, component
            if component != "worker":  # a worker takes no traffic: nothing to be ready for
                assert "readinessProbe" in container, component
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), component
            assert {"cpu", "memory"} <= set(resources["limits"]), component
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
    for spec in pod_specs():
        for container in spec["containers"]:
            assert container["args"][0] in ("node", "worker", "service", "db"), container


def test_secrets_only_by_reference_and_every_reference_resolves() -> None:
    (secret,) = of_kind("Secret")
    (config,) = of_kind("ConfigMap")
    claims = {d["metadata"]["name"] for d in of_kind("PersistentVolumeClaim")}
    for key in config["data"]:
        assert key in SETTINGS_VARS, f"ConfigMap sets {key}, which no setting reads"
        assert not any(word in key for word in SECRET_WORDS), f"{key} belongs in the Secret"
    for spec in pod_specs():
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] == config["metadata"]["name"]
            for var in container.get("env", []):
                assert var["name"] in SETTINGS_VARS, var["name"]
                if any(word in var["name"] for word in SECRET_WORDS):
                    assert "value" not in var, f"{var['name']} given in clear"
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in secret["stringData"], ref
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_metrics_have_their_own_secret_on_every_component_serving_them() -> None:
    """Prometheus holds HER2LOW_METRICS_TOKEN, a key of its own: never the results API token."""
    (secret,) = of_kind("Secret")
    for component in ("node", "worker", "service"):
        (container,) = by_component("Deployment", component)["spec"]["template"]["spec"][
            "containers"
        ]
        refs = {
            v["name"]: v["valueFrom"]["secretKeyRef"]["key"]
            for v in container["env"]
            if "valueFrom" in v
        }
        assert refs["HER2LOW_METRICS_TOKEN"] == "metrics-token", component
        assert refs["HER2LOW_RESULTS_API_TOKEN"] != refs["HER2LOW_METRICS_TOKEN"]
    assert secret["stringData"]["metrics-token"] != secret["stringData"]["results-api-token"]


def test_services_select_their_deployments_on_the_configured_ports() -> None:
    (config,) = of_kind("ConfigMap")
    ports = {"node": int(config["data"]["HER2LOW_NODE_PORT"])}
    ports["service"] = int(config["data"]["HER2LOW_CDS_PORT"])
    for service in of_kind("Service"):
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        deployment = by_component("Deployment", component)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert named[port["targetPort"]] == ports[component]
    results = urlsplit(config["data"]["HER2LOW_NODE_RESULTS_URL"])
    assert results.hostname and results.hostname.split(".")[0] == "her2low-service"
    assert results.port == ports["service"]


def test_network_policy_keeps_the_node_inside_the_imaging_network() -> None:
    policy = next(
        p for p in of_kind("NetworkPolicy") if p["metadata"]["name"] == "her2low-node-imaging-only"
    )
    node = by_component("Deployment", "node")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        node["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    dicom_rules = 0
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            selector = peer.get("namespaceSelector") or peer.get("podSelector")
            assert selector and selector["matchLabels"], peer  # labelled peers only, never {}
        if {"protocol": "TCP", "port": 11112} in rule["ports"]:
            dicom_rules += 1
            assert rule["ports"] == [{"protocol": "TCP", "port": 11112}]
            labels = [
                (peer.get("namespaceSelector") or peer.get("podSelector"))["matchLabels"]
                for peer in rule["from"]
            ]
            assert {"her2low.io/zone": "imaging"} in labels, labels
            assert all(
                label in ({"her2low.io/zone": "imaging"}, {"her2low.io/dicom-client": "true"})
                for label in labels
            ), labels
        else:  # the side port (health, metrics): monitoring only
            assert rule["ports"] == [{"protocol": "TCP", "port": 11180}]
    assert dicom_rules == 1


# --- compose ------------------------------------------------------------------------------------


#: What an operator exports before ``compose up`` (the file requires each with ``:?``).
COMPOSE_VARS = {
    "HER2LOW_DB_PASSWORD": "db-secret",
    "HER2LOW_RESULTS_API_TOKEN": "results-secret",
    "HER2LOW_METRICS_TOKEN": "metrics-secret",
    "HER2LOW_REVIEW_SECRET_KEY": "review-secret",
    "HER2LOW_CDS_TRUSTED_ISSUERS": '{"https://ehr.example.org": "https://ehr.example.org/jwks"}',
}


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` (error when unset)."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in values:
            return values[name]
        assert op != ":?", f"compose requires {name}: {arg}"
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, text)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text(), COMPOSE_VARS))
    return data


def test_compose_requires_its_secrets_rather_than_defaulting_them() -> None:
    for name in COMPOSE_VARS:
        with pytest.raises(AssertionError, match=name):
            interpolate(COMPOSE.read_text(), {k: v for k, v in COMPOSE_VARS.items() if k != name})


def env_of(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def test_compose_brings_up_the_whole_scaled_system() -> None:
    services = compose()["services"]
    for name in ("node", "worker-1", "worker-2", "service", "postgres", "redis", "orthanc"):
        assert name in services, name
    assert "nginx" in services
    assert [services[n]["command"][0] for n in ("node", "worker-1", "worker-2", "service")] == [
        "node",
        "worker",
        "worker",
        "service",
    ]
    for name in ("node", "worker-1", "worker-2", "service"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["migrate"]["command"] == ["db", "upgrade"]


def test_compose_settings_are_real_and_agree_across_services() -> None:
    services = compose()["services"]
    ours = ("migrate", "node", "worker-1", "worker-2", "service")
    for name in ours:
        env = env_of(services[name])
        for key in env:
            assert key in SETTINGS_VARS, f"{name}: {key} is read by no setting"
        assert env["HER2LOW_QUEUE_URL"].startswith("redis://redis:")
        for key in ("HER2LOW_NODE_DB_URL", "HER2LOW_CDS_DB_URL"):
            url = urlsplit(env[key])
            assert url.scheme.startswith("postgresql") and url.hostname == "postgres", key
    node_env, service_env = env_of(services["node"]), env_of(services["service"])
    results = urlsplit(node_env["HER2LOW_NODE_RESULTS_URL"])
    assert results.hostname == "service"
    assert str(results.port) == service_env["HER2LOW_CDS_PORT"]
    assert service_env["HER2LOW_CDS_HOST"] == "0.0.0.0"  # the node reaches it by name
    assert (
        f"{node_env['HER2LOW_NODE_PORT']}:{node_env['HER2LOW_NODE_PORT']}"
        in (services["node"]["ports"])
    )
    # both databases exist: created by the init script PostgreSQL runs on first start
    init = (ROOT / "deploy" / "compose" / "postgres-init.sql").read_text()
    for key in ("HER2LOW_NODE_DB_URL", "HER2LOW_CDS_DB_URL"):
        database = urlsplit(node_env[key]).path.lstrip("/")
        assert f"CREATE DATABASE {database} " in init


def test_compose_orthanc_routes_stable_series_to_the_node() -> None:
    services = compose()["services"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["orthanc"]["volumes"]}
    config = json.loads((COMPOSE.parent / mounts["/etc/orthanc/orthanc.json"]).read_text())
    lua = COMPOSE.parent / mounts["/etc/orthanc/route-to-her2low.lua"]
    assert lua.resolve() == (ROOT / "deploy" / "orthanc" / "route-to-her2low.lua").resolve()
    assert "function OnStableSeries" in lua.read_text()
    assert "/etc/orthanc/route-to-her2low.lua" in config["LuaScripts"]
    node_env = env_of(services["node"])
    target = config["DicomModalities"]["her2low"]
    assert target["Host"] == "node"
    assert str(target["Port"]) == node_env["HER2LOW_NODE_PORT"]
    assert target["AET"] == node_env["HER2LOW_NODE_AE_TITLE"]
    allowed = json.loads(node_env["HER2LOW_NODE_ALLOWED_CALLING_AETS"])
    assert config["DicomAet"] in allowed  # the node accepts Orthanc's associations


def test_compose_nginx_fronts_the_service_with_the_shipped_config() -> None:
    services = compose()["services"]
    nginx = services["nginx"]
    assert "network_mode" not in nginx  # its own container on the compose network
    mounts = {m.split(":")[1]: m.split(":")[0] for m in nginx["volumes"]}
    shipped = "/etc/her2low/nginx/her2low.conf"
    assert (COMPOSE.parent / mounts[shipped]).resolve() == NGINX.resolve()
    text = NGINX.read_text()
    upstream = re.search(r"upstream her2low_cds \{\s*(server 127\.0\.0\.1:(\d+) )", text)
    assert upstream and upstream.group(2) == env_of(services["service"])["HER2LOW_CDS_PORT"]
    # the command points the documented upstream at the service container, then runs nginx
    script = nginx["command"][-1]
    sed = re.search(r"sed 's/([^/]+)/([^/]+)/' (\S+) > (\S+)", script)
    assert sed, script
    assert re.sub(sed.group(1), sed.group(2), upstream.group(1)) == (
        f"server service:{upstream.group(2)} "
    )
    assert sed.group(3) == shipped and sed.group(4) == "/etc/nginx/conf.d/default.conf"
    assert script.endswith("exec nginx -g 'daemon off;'")
    for path in re.findall(r"ssl_certificate(?:_key)?\s+(\S+);", text):
        assert any(path.startswith(inside + "/") for inside in mounts), path
    assert "443:443" in nginx["ports"] and "ports" not in services["service"]
    assert "proxy_request_buffering on;" in text and "client_body_timeout" in text


def test_every_file_compose_mounts_exists() -> None:
    for name, service in compose()["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                if source == "./tls":  # the site's certificate, provided at install
                    continue
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"


def test_compose_host_ports_are_variables_with_the_documented_defaults() -> None:
    """Every published port can move (a second stack, a test on free ports) and defaults to
    the port the header comment names."""
    text = COMPOSE.read_text()
    for name, default in (
        ("HER2LOW_HTTPS_PORT", "443"),
        ("HER2LOW_HTTP_PORT", "80"),
        ("HER2LOW_DICOM_PORT", "11112"),
        ("HER2LOW_ORTHANC_DICOM_PORT", "4242"),
        ("HER2LOW_ORTHANC_HTTP_PORT", "8042"),
    ):
        assert f"${{{name}:-{default}}}:" in text, name
        assert f"{name} [{default}]" in text, f"{name} not documented in the header"
    for service in compose()["services"].values():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 1)[0]
            assert host.split(":")[-1] in ("443", "80", "11112", "4242", "8042"), port


def test_offline_override_swaps_only_the_infrastructure_images() -> None:
    """deploy/compose.offline.yaml names the local Debian-made image and entry points, and
    adds no list (compose implementations merge lists by appending: a command, port or mount
    given twice would break the service)."""
    offline: dict[str, Any] = yaml.safe_load(interpolate(OFFLINE.read_text(), {}))
    base = compose()["services"]
    assert set(offline["services"]) == {"postgres", "redis", "nginx", "orthanc"}
    for name, service in offline["services"].items():
        assert service["image"] == "localhost/her2low-infra:bookworm", name
        assert not base[name]["image"].startswith("localhost/"), name  # upstream in compose.yaml
        for key, value in service.items():
            assert not isinstance(value, list | dict), f"{name}.{key} would be appended"
            if isinstance(base[name].get(key), list):
                assert key not in ("command", "ports", "volumes"), f"{name}.{key}"
    assert "${HER2LOW_INFRA_IMAGE:-localhost/her2low-infra:bookworm}" in OFFLINE.read_text()
    entry = ROOT / "deploy" / "compose" / "offline" / offline["services"]["postgres"]["entrypoint"]
    assert offline["services"]["postgres"]["entrypoint"] == "/usr/local/bin/her2low-postgres"
    shipped = ROOT / "deploy" / "compose" / "offline" / "her2low-postgres"
    assert shipped.exists() and entry.name == shipped.name
    build = (ROOT / "deploy" / "compose" / "offline" / "build-infra.sh").read_text()
    for package in ("postgresql", "redis-server", "orthanc", "nginx-light"):
        assert package in build
    assert "copy-in $here/her2low-postgres /usr/local/bin" in build
    assert "orthanc.json" in offline["services"]["orthanc"]["command"]


@pytest.mark.integration
def test_podman_kube_play_accepts_the_service_deployment(tmp_path: Path) -> None:
    """podman's own reading of the manifests (a pod created, not started)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/system-deps.sh installs it)")
    image = subprocess.run(
        ["podman", "image", "exists", "localhost/her2low-cds:latest"], capture_output=True
    )
    if image.returncode != 0:
        pytest.skip("no local her2low image yet: tests/test_container.py builds it")
    docs = [
        d
        for _, d in kube_documents()
        if d["kind"] in ("ConfigMap", "Secret")
        or (d["kind"] == "Deployment" and d["metadata"]["name"] == "her2low-service")
    ]
    suffix = uuid.uuid4().hex[:8]
    for doc in docs:
        doc["metadata"]["name"] = f"{doc['metadata']['name']}-{suffix}"
        doc["metadata"].pop("namespace", None)
    # podman 4.3 resolves secretKeyRef from a podman secret holding the key -> base64 map as
    # JSON (a Secret document in the played file is stored as YAML and then fails to parse)
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    docs.remove(secret)
    secret["data"] = {
        k: base64.b64encode(v.encode()).decode() for k, v in secret.pop("stringData").items()
    }
    secret_name = secret["metadata"]["name"]
    secret_file = tmp_path / "secret.json"
    secret_file.write_text(json.dumps(secret["data"]))  # podman 4.3: the data map alone
    deployment = docs[-1]
    spec = deployment["spec"]["template"]["spec"]
    for container in spec["containers"]:
        container["image"] = "localhost/her2low-cds:latest"
        for source in container["envFrom"]:
            source["configMapRef"]["name"] += f"-{suffix}"
        for var in container["env"]:
            if "valueFrom" in var:
                var["valueFrom"]["secretKeyRef"]["name"] += f"-{suffix}"
    play = tmp_path / "play.yaml"
    play.write_text(yaml.safe_dump_all(docs))
    pod = f"{deployment['metadata']['name']}-pod-0"  # podman's name for replica 0
    try:
        created = subprocess.run(
            ["podman", "secret", "create", secret_name, str(secret_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        done = subprocess.run(
            ["podman", "--runtime", "runc", "kube", "play", "--start=false", str(play)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0 and "OCI runtime" in done.stderr:
            pytest.skip(f"podman kube play cannot run here: {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr
        inspect = subprocess.run(
            ["podman", "pod", "inspect", pod], capture_output=True, text=True, timeout=60
        )
        assert inspect.returncode == 0, inspect.stderr
    finally:
        subprocess.run(
            ["podman", "kube", "down", str(play)], capture_output=True, text=True, timeout=120
        )
        subprocess.run(["podman", "pod", "rm", "-f", pod], capture_output=True, timeout=60)
        subprocess.run(["podman", "secret", "rm", secret_name], capture_output=True, timeout=60)
