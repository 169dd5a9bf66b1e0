"""Offline checks of the deployment files: Dockerfile, docker-compose.yml, nginx, Kubernetes.

No Docker engine or cluster is needed. Every kustomization (base and both overlays) is
rendered by the real kustomize, ``kubectl kustomize DIR`` (offline: what ``kubectl apply
-k DIR`` would send), and the output validated with ``kubernetes-validate --strict``; the
compose file with ``check-jsonschema --builtin-schema vendor.compose-spec``; the nginx
config with the real ``nginx`` binary (``nginx -t`` and a proxied websocket). Every tool
must be installed: a missing one fails the test, it is never skipped.

Python tools come from the running interpreter's environment (the directory of
``sys.executable``): ``pip install kubernetes-validate check-jsonschema pyyaml dockerfile``
(``dockerfile`` wraps BuildKit's Dockerfile parser). From the system: ``kubectl`` (with
its built-in kustomize v5; on PATH or /usr/bin/kubectl) and nginx (``apt-get install -y
nginx``).
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

from devtools.cluster import render_nginx_prefix
from devtools.procs import Supervised, free_port
from gateway.settings import Settings, option_names

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
MANAGED_REDIS = K8S / "overlays" / "managed-redis"
SENTINEL = K8S / "overlays" / "sentinel"
KUSTOMIZATIONS = {"base": BASE, "production": PRODUCTION, "managed-redis": MANAGED_REDIS, "sentinel": SENTINEL}
NGINX_DIR = DEPLOY / "nginx"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
VENV_BIN = Path(sys.executable).parent

# A version bundled by kubernetes-validate (1.25 ... 1.37 in kubernetes-validate 1.37.0).
KUBERNETES_VERSION = "1.33.0"

# The gateway's options as environment variables (CONTRACT §1), from the CLI's own table.
GATEWAY_ENV_VARS = frozenset(Settings.env_name(name) for name in option_names())
GATEWAY_PORT = Settings().port
READINESS_PATH = "/readyz"
LIVENESS_PATH = "/healthz"
DEFAULT_DRAIN_SECONDS = Settings().drain_seconds
UPSTREAM_NAME = "broadcaster_gateways"
GATEWAY_SELECTOR = {
    "app.kubernetes.io/name": "broadcaster-gateway",
    "app.kubernetes.io/component": "gateway",
}

# kubectl's built-in kustomize: the version `kubectl apply -k` uses (v5 reads these files).
KUSTOMIZE_MAJOR = 5

# Files whose BROADCASTER_* names must all be gateway options.
ENV_SCANNED_FILES = [
    DOCKERFILE,
    COMPOSE_FILE,
    *sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".conf", ".toml"}),
    REPO / "docs" / "operations.md",
]


# ---------------------------------------------------------------------------- helpers


def venv_tool(name: str) -> str:
    """A console script installed next to the running interpreter; fails (never skips) if absent."""
    path = VENV_BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}; pip install the [test] extra")
    return str(path)


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail("nginx is not installed (apt-get install -y nginx)")
    return found


def kubectl_binary() -> str:
    """kubectl (installed on every machine of this kind as /usr/bin/kubectl); fails, never skips, if absent."""
    found = shutil.which("kubectl") or ("/usr/bin/kubectl" if os.access("/usr/bin/kubectl", os.X_OK) else None)
    if found is None:
        pytest.fail("kubectl is not installed (looked on PATH and at /usr/bin/kubectl): the Kubernetes "
                    "manifests are rendered by its built-in kustomize, `kubectl kustomize DIR`. Install "
                    "kubectl 1.27+ (https://kubernetes.io/docs/tasks/tools/) and run again.")
    return found


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


def kubectl_kustomize(directory: Path) -> str:
    """``kubectl kustomize DIR``: the YAML ``kubectl apply -k DIR`` would apply; fails with kustomize's error."""
    result = run([kubectl_binary(), "kustomize", str(directory)])
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return result.stdout


@functools.cache
def render_text(name: str) -> str:
    return kubectl_kustomize(KUSTOMIZATIONS[name])


def kubernetes_validate(files: list[Path]) -> subprocess.CompletedProcess[str]:
    return run([venv_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "--quiet", *map(str, files)])


def assert_validated(result: subprocess.CompletedProcess[str]) -> None:
    # Exit code 0 is not enough: a kind without a bundled schema is only a WARN.
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in output and "ERROR" not in output, output


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def kustomization(directory: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return document


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every kustomization as kubectl renders it, parsed: {name: [resource, ...]}."""
    return {name: [d for d in yaml.safe_load_all(render_text(name)) if d] for name in KUSTOMIZATIONS}


def gateway_container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(resources, "Deployment", "broadcaster-gateway")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "gateway"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def dockerfile_instructions() -> list[Any]:
    """The Dockerfile parsed by BuildKit's own parser (the `dockerfile` package); a syntax error raises."""
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def dockerfile_stages() -> list[list[Any]]:
    stages: list[list[Any]] = []
    for command in dockerfile_instructions():
        if command.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def nginx_conf_for_loopback(prefix: Path, listen_port: int, upstream_ports: list[int]) -> Path:
    """PREFIX with compose's nginx.conf listening on 127.0.0.1:listen_port and a loopback upstream.conf.

    The loopback cluster's own renderer (devtools.cluster), so the test runs what it runs.
    """
    return render_nginx_prefix(prefix, NGINX_DIR / "nginx.conf", "127.0.0.1", listen_port, upstream_ports)


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.server.status if self.path in ("/healthz", "/readyz") else 404)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthHandler)
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------- kustomize (kubectl)


def test_kubectl_has_kustomize_v5() -> None:
    result = run([kubectl_binary(), "version", "--client"])
    assert result.returncode == 0, result.stderr
    match = re.search(r"Kustomize Version: v(\d+)\.", result.stdout)
    assert match and int(match.group(1)) == KUSTOMIZE_MAJOR, result.stdout


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_kustomizations_render(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered[name]
    idents = [f"{r['kind']}/{r['metadata']['name']}" for r in resources]
    assert len(idents) == len(set(idents))
    kinds = {r["kind"] for r in resources}
    assert {
        "ConfigMap",
        "ServiceAccount",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    for resource in resources:
        assert resource["metadata"]["namespace"] == "broadcaster"
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "broadcaster"
    # No secret is ever shipped in a rendered kustomization.
    assert "Secret" not in kinds


def test_kubectl_kustomize_rejects_a_broken_kustomization(tmp_path: Path) -> None:
    """Guards the check itself: a patch of a resource the overlay does not have fails the render."""
    (tmp_path / "patch.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nope\n"
                                         "spec:\n  replicas: 2\n")
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {os.path.relpath(BASE, tmp_path)}\npatches:\n  - path: patch.yaml\n")
    result = run([kubectl_binary(), "kustomize", str(tmp_path)])
    assert result.returncode != 0 and "nope" in result.stderr, result.stdout + result.stderr


def test_managed_redis_overlay_is_production_without_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    production = {(r["kind"], r["metadata"]["name"]) for r in rendered["production"]}
    managed = {(r["kind"], r["metadata"]["name"]) for r in rendered["managed-redis"]}
    assert production - managed == {("StatefulSet", "redis"), ("Service", "redis"), ("NetworkPolicy", "redis")}
    assert managed <= production


def test_generated_configmap_is_hashed_and_referenced(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for resources in rendered.values():
        (cm,) = [r for r in resources if r["kind"] == "ConfigMap"]
        assert re.fullmatch(r"broadcaster-profiles-[0-9a-z]{10}", cm["metadata"]["name"])  # kustomize's hash
        assert cm["data"]["profiles.toml"] == (BASE / "profiles.toml").read_text()
        deployment = find(resources, "Deployment", "broadcaster-gateway")
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["profiles"]["configMap"]["name"] == cm["metadata"]["name"]


def test_every_file_under_k8s_is_used_or_an_example() -> None:
    """No YAML file escapes the checks: each is a kustomization, a resource, a patch or an example."""
    used: set[Path] = set()

    def walk(directory: Path) -> None:
        document = kustomization(directory)
        used.add(directory / "kustomization.yaml")
        for entry in document.get("resources", []):
            target = (directory / entry).resolve()
            if target.is_dir():
                walk(target)
            else:
                used.add(target)
        for entry in document.get("patches", []):
            if "path" in entry:
                used.add((directory / entry["path"]).resolve())
        for entry in document.get("configMapGenerator", []):
            for item in entry.get("files", []):
                used.add((directory / item.partition("=")[2 if "=" in item else 0]).resolve())

    for directory in KUSTOMIZATIONS.values():
        walk(directory)
    on_disk = {p.resolve() for p in K8S.rglob("*") if p.is_file()}
    examples = {p for p in on_disk if p.name.endswith(".example.yaml")}
    assert on_disk - used - examples == set()
    assert examples == {(PRODUCTION / "secret.example.yaml").resolve()}


# ---------------------------------------------------------------------------- kubernetes-validate


def test_kubernetes_version_is_bundled() -> None:
    result = run([venv_tool("kubernetes-validate"), "--version"])
    assert result.returncode == 0, result.stderr
    schemas = Path(
        run(
            [
                sys.executable,
                "-c",
                "import kubernetes_validate, os; print(os.path.dirname(kubernetes_validate.__file__))",
            ]
        ).stdout.strip()
    )
    assert (schemas / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict").is_dir(), (
        f"kubernetes-validate {result.stdout.strip()} does not bundle {KUBERNETES_VERSION}"
    )


def test_manifest_files_validate_strict() -> None:
    """Every resource file listed in a kustomization, and the example Secret, on its own."""
    files: list[Path] = []

    def walk(directory: Path) -> None:
        for entry in kustomization(directory).get("resources", []):
            target = (directory / entry).resolve()
            if target.is_dir():
                walk(target)
            else:
                files.append(target)

    walk(BASE)
    files.append(PRODUCTION / "secret.example.yaml")
    assert len(files) >= 10
    assert_validated(kubernetes_validate(files))


def test_rendered_output_validates_strict(tmp_path: Path) -> None:
    """kubectl kustomize's output of every kustomization, as is."""
    files = []
    for name in KUSTOMIZATIONS:
        path = tmp_path / f"{name}.yaml"
        path.write_text(render_text(name))
        files.append(path)
    assert_validated(kubernetes_validate(files))


def test_kubernetes_validate_rejects_unknown_fields(rendered: dict[str, list[dict[str, Any]]],
                                                    tmp_path: Path) -> None:
    """Guards the check itself: with --strict a misspelt field must fail."""
    deployment = copy.deepcopy(find(rendered["base"], "Deployment", "broadcaster-gateway"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = kubernetes_validate([path])
    assert result.returncode != 0, result.stdout


# ---------------------------------------------------------------------------- Kubernetes semantics


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_gateway_deployment(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered[name]
    deployment = find(resources, "Deployment", "broadcaster-gateway")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = gateway_container(resources)

    assert spec["replicas"] == (3 if name == "base" else 6)
    assert spec["selector"]["matchLabels"] == GATEWAY_SELECTOR
    assert GATEWAY_SELECTOR.items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # Port and probes.
    assert container["ports"] == [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": READINESS_PATH, "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": LIVENESS_PATH, "port": "http"}
    assert "args" not in container and "command" not in container  # the image's CMD runs

    # Shutdown budget: preStop sleep + drain must fit in the grace period.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    env = env_of(container)
    drain = int(env["BROADCASTER_DRAIN_SECONDS"]["value"]) if "BROADCASTER_DRAIN_SECONDS" in env else 10
    assert 2 <= pre_stop <= 15
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain

    # Resources and hardening.
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][section].keys()
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # else the kubelet adds BROADCASTER_GATEWAY_* variables
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == GATEWAY_SELECTOR

    # Profiles: BROADCASTER_PROFILES names a file of the mounted ConfigMap.
    profiles_path = Path(env["BROADCASTER_PROFILES"]["value"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["profiles"]["mountPath"] == str(profiles_path.parent)
    assert mounts["profiles"]["readOnly"] is True
    (cm,) = [r for r in resources if r["kind"] == "ConfigMap"]
    assert profiles_path.name in cm["data"]

    # Secrets: referenced, optional, never inline.
    for var, key in (("BROADCASTER_AUTH_SECRET", "auth-secret"), ("BROADCASTER_PUBLISH_KEY", "publish-key")):
        assert "value" not in env[var]
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "broadcaster-secrets", "key": key, "optional": True}

    # Redis URL: the in-cluster headless Service, or the managed one from a Secret.
    redis_url = env["BROADCASTER_REDIS_URL"]
    if name in ("managed-redis", "sentinel"):
        secret = "broadcaster-redis" if name == "managed-redis" else "broadcaster-redis-sentinel"
        assert "value" not in redis_url
        assert redis_url["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "url"}
    else:
        assert redis_url == {"name": "BROADCASTER_REDIS_URL", "value": "redis://redis:6379/0"}


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_service_ingress_hpa_pdb_networkpolicy(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered[name]
    deployment = find(resources, "Deployment", "broadcaster-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    service = find(resources, "Service", "broadcaster-gateway")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == GATEWAY_PORT
    assert "sessionAffinity" not in service["spec"]  # stateless: clients resume anywhere

    ingress = find(resources, "Ingress", "broadcaster-gateway")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    paths = {p["path"]: p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert "/ws" in paths and "/v1" in paths
    assert not {"/metrics", "/healthz", "/readyz"} & paths.keys()
    for path in paths.values():
        assert path["backend"]["service"] == {"name": "broadcaster-gateway", "port": {"name": "http"}}
    if name != "base":
        assert ingress["spec"]["tls"][0]["hosts"] == [ingress["spec"]["rules"][0]["host"]]

    hpa = find(resources, "HorizontalPodAutoscaler", "broadcaster-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "broadcaster-gateway",
    }
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]

    pdb = find(resources, "PodDisruptionBudget", "broadcaster-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    gateway_policy = find(resources, "NetworkPolicy", "broadcaster-gateway")
    assert gateway_policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = gateway_policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": GATEWAY_PORT, "protocol": "TCP"}]


@pytest.mark.parametrize("name", ["base", "production"])
def test_in_cluster_redis(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered[name]
    statefulset = find(resources, "StatefulSet", "redis")
    service = find(resources, "Service", "redis")
    policy = find(resources, "NetworkPolicy", "redis")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]

    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == 6379

    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert container["volumeMounts"] == [{"name": claim["metadata"]["name"], "mountPath": "/data"}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # Redis takes connections from gateway pods only.
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"] == GATEWAY_SELECTOR
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_production_overlay_pins_images_and_sizes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base, production = rendered["base"], rendered["production"]
    assert gateway_container(base)["image"] == "broadcaster-gateway"
    image = gateway_container(production)["image"]
    assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", image), image
    redis = find(production, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["image"] == "redis:7.4"
    assert env_of(gateway_container(production))["BROADCASTER_LOG_LEVEL"]["value"] == "warning"
    assert gateway_container(production)["resources"] != gateway_container(base)["resources"]


def test_managed_redis_switch_drops_in_cluster_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered["managed-redis"]
    assert not [r for r in resources if r["metadata"]["name"] == "redis"]
    assert not [r for r in resources if r["kind"] == "StatefulSet"]


def test_profiles_toml_is_valid() -> None:
    path = BASE / "profiles.toml"
    document = tomllib.loads(path.read_text())
    chat = document["profiles"]["chat"]
    assert set(chat) <= {"include", "exclude", "drop_fields", "enrich"}
    assert chat["include"] and chat["exclude"] and chat["drop_fields"]
    # The gateway's own loader accepts it (enrich hooks would have to import).
    from broadcaster.profiles import ProfileRegistry

    registry = ProfileRegistry.from_file(path)
    assert {"chat", "timeline", "default", "debug"} <= set(registry.names())


# ---------------------------------------------------------------------------- docker-compose


def test_compose_validates_against_compose_spec() -> None:
    result = run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)], cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_rejects_unknown_keys(tmp_path: Path) -> None:
    """Guards the check itself: a misspelt service key must fail."""
    document = compose()
    document["services"]["redis"]["enviroment"] = {"A": "1"}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(document))
    result = run([venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    assert result.returncode != 0, result.stdout


def test_compose_topology() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "gateway1", "gateway2", "gateway3", "nginx", "producer"}

    redis = services["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "ports" not in redis  # not published to the host

    gateways = [services[f"gateway{i}"] for i in (1, 2, 3)]
    for gateway in gateways:
        env = gateway["environment"]
        assert env["BROADCASTER_REDIS_URL"] == "redis://redis:6379/0"
        assert "ports" not in gateway  # reached through nginx only
        test = gateway["healthcheck"]["test"]
        assert test[0] == "CMD" and f"127.0.0.1:{GATEWAY_PORT}{READINESS_PATH}" in test[-1]
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
        grace = int(gateway["stop_grace_period"].rstrip("s"))
        assert grace > int(env.get("BROADCASTER_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS))
        profiles_mount = [v for v in gateway["volumes"] if v.endswith(f":{env['BROADCASTER_PROFILES']}:ro")]
        assert len(profiles_mount) == 1
        assert (REPO / profiles_mount[0].split(":")[0]).is_file()
    assert gateways[0] == gateways[1] == gateways[2]

    nginx = services["nginx"]
    assert nginx["ports"] == ["8080:8080"]
    assert set(nginx["volumes"]) == {
        "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro",
        "./deploy/nginx/upstream-compose.conf:/etc/nginx/upstream.conf:ro",
    }
    for i in (1, 2, 3):
        assert nginx["depends_on"][f"gateway{i}"]["condition"] == "service_healthy"

    producer = services["producer"]
    assert producer["environment"]["BROADCASTER_REDIS_URL"] == "redis://redis:6379/0"
    assert "broadcaster-publish demo chat.message" in producer["command"][0]


def test_compose_upstream_matches_gateway_services() -> None:
    text = (NGINX_DIR / "upstream-compose.conf").read_text()
    assert re.search(rf"^upstream {UPSTREAM_NAME} \{{", text, re.M)
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", text, re.M)
    gateways = {name for name in compose()["services"] if name.startswith("gateway")}
    assert {host for host, _ in servers} == gateways
    assert {int(port) for _, port in servers} == {GATEWAY_PORT}


def test_compose_producer_loop_publishes_valid_json(tmp_path: Path) -> None:
    """Run the producer's shell loop with stand-ins for broadcaster-publish and sleep."""
    script = compose()["services"]["producer"]["command"][0].replace("$$", "$")  # compose's escape
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "broadcaster-publish"
    stub.write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (tmp_path / "sleep").write_text("#!/bin/sh\nexec /bin/sleep 0.01\n")
    for path in (stub, tmp_path / "sleep"):
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    loop = Supervised("producer loop", ["/bin/sh", "-c", script], tmp_path / "loop.out", env=env).start()
    try:
        loop.wait_until(lambda: calls.exists() and len(calls.read_text().splitlines()) >= 3, 10,
                        what="publishing three times", interval=0.02)
    finally:
        loop.kill()
    lines = [json.loads(line) for line in calls.read_text().splitlines()[:3]]
    for n, args in enumerate(lines, start=1):
        assert args[:2] == ["demo", "chat.message"]
        assert json.loads(args[2]) == {"text": f"hello {n}"}


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_structure() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build"
    args = dict(c.value[0].split("=", 1) for c in dockerfile_instructions() if c.cmd == "ARG" and "=" in c.value[0])

    def image_of(stage: list[Any]) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage[0].value[0])

    builder, final = stages[0], stages[-1]
    assert [v.lower() for v in builder[0].value[1:]] == ["as", "builder"]
    assert image_of(final) == "python:3.11-slim"
    assert image_of(builder) == image_of(final)  # the venv's interpreter path stays valid

    final_text = "\n".join(c.original for c in final)
    for forbidden in ("apt-get", "build-essential", "gcc", "pip install", "COPY . "):
        assert forbidden not in final_text, forbidden
    copies = [(c.flags, c.value) for c in final if c.cmd == "COPY"]
    assert copies == [(("--from=builder",), ("/opt/venv", "/opt/venv"))]

    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    assert [c.value for c in final if c.cmd == "EXPOSE"] == [(str(GATEWAY_PORT),)]
    (cmd,) = [c for c in final if c.cmd == "CMD"]
    assert cmd.json and list(cmd.value) == ["broadcaster-gateway", "--host", "0.0.0.0"]
    (healthcheck,) = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert healthcheck.value[0] == "CMD" and healthcheck.json
    assert LIVENESS_PATH in healthcheck.value[-1] and "urllib" in healthcheck.value[-1]


def _healthcheck_command() -> list[str]:
    (healthcheck,) = [c for c in dockerfile_stages()[-1] if c.cmd == "HEALTHCHECK"]
    command = list(healthcheck.value[1:])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_dockerfile_healthcheck_command_works(health_server: http.server.HTTPServer) -> None:
    env = {**os.environ, "BROADCASTER_PORT": str(health_server.server_address[1])}
    assert run(_healthcheck_command(), env=env).returncode == 0
    health_server.status = 503  # type: ignore[attr-defined]
    assert run(_healthcheck_command(), env=env).returncode != 0


def test_compose_healthcheck_command_works(health_server: http.server.HTTPServer) -> None:
    test = compose()["services"]["gateway1"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    port = health_server.server_address[1]
    command = [sys.executable, *(arg.replace(f":{GATEWAY_PORT}/", f":{port}/") for arg in test[2:])]
    assert run(command).returncode == 0
    health_server.status = 503  # type: ignore[attr-defined]
    assert run(command).returncode != 0


def test_dockerignore_allows_only_the_build_inputs() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/").removeprefix("./")
        for command in dockerfile_stages()[0]
        if command.cmd == "COPY" and not command.flags
        for source in command.value[:-1]
    }
    assert copied <= allowed
    assert {"pyproject.toml", "README.md", "broadcaster", "gateway", "producers"} <= copied


# ---------------------------------------------------------------------------- consistency


def test_env_var_names_are_gateway_options() -> None:
    seen: dict[str, set[str]] = {}
    for path in ENV_SCANNED_FILES:
        assert path.is_file(), path
        for name in re.findall(r"BROADCASTER_[A-Z0-9_]+", path.read_text()):
            seen.setdefault(name, set()).add(str(path.relative_to(REPO)))
    unknown = {name: files for name, files in seen.items() if name not in GATEWAY_ENV_VARS}
    assert not unknown, f"not gateway options: {unknown}"
    assert {"BROADCASTER_REDIS_URL", "BROADCASTER_PROFILES", "BROADCASTER_DRAIN_SECONDS"} <= seen.keys()


def test_env_var_names_structurally(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names = set()
    for resources in rendered.values():
        names |= set(env_of(gateway_container(resources)))
    for service in compose()["services"].values():
        names |= set(service.get("environment", {}))
    for command in dockerfile_instructions():
        if command.cmd == "ENV":
            names |= {name for name in command.value[::2] if name.startswith("BROADCASTER_")}
    assert names <= GATEWAY_ENV_VARS, names - GATEWAY_ENV_VARS


def test_ports_and_probe_paths_agree(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for resources in rendered.values():
        container = gateway_container(resources)
        assert env_of(container)["BROADCASTER_PORT"]["value"] == str(GATEWAY_PORT)
        annotations = find(resources, "Deployment", "broadcaster-gateway")["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations["prometheus.io/port"] == str(GATEWAY_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"
    # nginx.conf names no gateway port: the upstream files do (checked above for compose).
    nginx_code = "\n".join(line.split("#", 1)[0] for line in (NGINX_DIR / "nginx.conf").read_text().splitlines())
    assert f":{GATEWAY_PORT}" not in nginx_code
    assert f"EXPOSE {GATEWAY_PORT}" in DOCKERFILE.read_text()


# ---------------------------------------------------------------------------- nginx


def test_nginx_config_static() -> None:
    text = (NGINX_DIR / "nginx.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert re.search(r"^\s*include upstream\.conf;", code, re.M)
    assert re.search(rf"proxy_pass http://{UPSTREAM_NAME};", code)
    assert "proxy_set_header Upgrade $http_upgrade;" in code
    assert "proxy_set_header Connection $connection_upgrade;" in code
    assert "proxy_http_version 1.1;" in code
    assert "proxy_read_timeout 3600s;" in code
    assert "proxy_send_timeout 3600s;" in code
    assert "proxy_buffering off;" in code
    # Runnable unprivileged under any prefix: nothing written to an absolute path.
    assert not re.search(r"^\s*(user|daemon)\b", code, re.M)
    for directive in (
        "pid",
        "client_body_temp_path",
        "proxy_temp_path",
        "fastcgi_temp_path",
        "uwsgi_temp_path",
        "scgi_temp_path",
    ):
        match = re.search(rf"^\s*{directive}\s+(\S+);", code, re.M)
        assert match and not match.group(1).startswith("/"), directive
    assert not re.search(r"^\s*upstream\s", code, re.M)  # upstreams come from upstream.conf only


def test_nginx_t_with_loopback_upstream(tmp_path: Path) -> None:
    conf = nginx_conf_for_loopback(tmp_path, free_port(), [free_port(), free_port()])
    result = run([nginx_binary(), "-t", "-p", f"{tmp_path}/", "-c", str(conf), "-e", "stderr"])
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_proxies_websockets_and_http(tmp_path: Path) -> None:
    """A real nginx with this config in front of a websocket echo server on loopback."""
    from websockets.sync.client import connect
    from websockets.sync.server import serve

    handshakes: list[dict[str, str]] = []

    def echo(ws: Any) -> None:
        handshakes.append(dict(ws.request.headers.raw_items()))
        for message in ws:
            ws.send(f"echo:{message}")

    upstream = serve(echo, "127.0.0.1", 0)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    upstream_port = upstream.socket.getsockname()[1]
    lb_port = free_port()
    conf = nginx_conf_for_loopback(tmp_path, lb_port, [upstream_port])
    nginx = Supervised(
        "nginx", [nginx_binary(), "-p", f"{tmp_path}/", "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
        tmp_path / "nginx.out").start()
    try:
        nginx.wait_until(lambda: listening(lb_port), 5, what=f"listening on 127.0.0.1:{lb_port}")
        with connect(f"ws://127.0.0.1:{lb_port}/ws?conv_id=demo", open_timeout=5) as client:
            client.send("hello")
            assert client.recv(timeout=5) == "echo:hello"
            client.send("again")  # the same upgraded connection carries on
            assert client.recv(timeout=5) == "echo:again"
        (headers,) = handshakes
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["upgrade"].lower() == "websocket"
        assert lowered["x-forwarded-for"] == "127.0.0.1"
        assert lowered["host"] == f"127.0.0.1:{lb_port}"

        with socket.create_connection(("127.0.0.1", lb_port), timeout=5) as sock:
            sock.sendall(b"GET /nginx-healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", lb_port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 404")
    finally:
        nginx.stop(signal.SIGTERM, timeout=10)
        upstream.shutdown()
    assert "[emerg]" not in nginx.output(), nginx.output()


# ---------------------------------------------------------------------------- docs


def test_operations_doc_covers_the_essentials() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    for heading in ("## Deploying", "## Scaling", "## Redis memory", "## Rolling upgrades", "## Metrics", "## Sizing"):
        assert heading in text, heading
    sizing = text.split("## Sizing", 1)[1]
    assert "BENCHMARKS.md" in sizing
    # every metric the doc names is one a gateway really exports, and the core ones are named
    from prometheus_client import generate_latest

    from gateway.state import Gateway

    exported = generate_latest(Gateway(Settings()).metrics.registry).decode()
    named = set(re.findall(r"broadcaster_[a-z_]+", text)) - {"broadcaster_gateways"}  # nginx upstream name
    named -= {"broadcaster_worker_up", "broadcaster_worker_restarts_total"}  # --workers only: tests/test_workers.py
    named -= {"broadcaster_compat_fallback"}  # registered by gateway.server's start-up check: tests/test_compat.py
    assert named, "the doc names no metric"
    for metric in sorted(named):
        assert metric in exported, f"docs/operations.md names {metric}, which the gateway does not export"
    for metric in ("broadcaster_connections", "broadcaster_events_out_total", "broadcaster_drops_total",
                   "broadcaster_slow_consumer_closes_total", "broadcaster_queued_bytes",
                   "broadcaster_publish_to_dispatch_seconds", "broadcaster_backend_reconnects_total",
                   "broadcaster_decode_errors_total"):
        assert metric in named, metric
    assert "rediss://" in text
