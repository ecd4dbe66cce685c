"""examples/kubernetes: every manifest loads, and names, labels, ports, probes, the
reverstd flags (parsed by the real CLI) and the termination grace period agree."""
from __future__ import annotations

import pathlib

import pytest
import yaml

from reverst import cli
from reverst.config import parse_groups

HERE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "kubernetes"


def _documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(HERE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


DOCS = _documents()


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return _one("Deployment", "reverstd")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def flags(container, tmp_path_factory):
    """The container's args as the real reverstd command parses them (files under the
    container's volume mounts stand in a temporary directory)."""
    args = list(container["args"])
    for mount in container["volumeMounts"]:
        here = tmp_path_factory.mktemp(mount["name"])
        for i, arg in enumerate(args):
            name, _, value = arg.partition("=")
            if value.startswith(mount["mountPath"] + "/"):
                stand_in = here / value[len(mount["mountPath"]) + 1:]
                stand_in.write_text("")
                args[i] = f"{name}={stand_in}"
    return cli.reverstd.make_context("reverstd", args).params


def _port(container, name: str) -> dict:
    ports = {p["name"]: p for p in container["ports"]}
    assert name in ports, f"container has no port named {name!r}: {sorted(ports)}"
    return ports[name]


def test_every_manifest_is_listed_in_the_kustomization_and_in_one_namespace():
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    files = {p.name for p in HERE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for filename, doc in DOCS:
        if doc["kind"] not in ("Kustomization", "Namespace"):
            assert doc["metadata"].get("namespace") == "reverst", filename


def test_the_deployment_runs_replicas_that_roll_one_at_a_time(deployment):
    spec = deployment["spec"]
    assert spec["replicas"] >= 3
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_flags_parse_and_the_addresses_match_the_container_ports(flags, container):
    def port(value) -> int:  # ("0.0.0.0", 7171) or "0.0.0.0:9090"
        return int(value[1] if isinstance(value, tuple) else value.rsplit(":", 1)[1])
    assert port(flags["tunnel_address"]) == _port(container, "quic")["containerPort"]
    assert _port(container, "quic")["protocol"] == "UDP"
    assert port(flags["http_address"]) == _port(container, "http")["containerPort"]
    assert port(flags["management_address"]) == _port(container, "management")["containerPort"]
    assert flags["watch_groups"] and flags["tunnel_groups"].startswith("k8s://configmap/reverst/")


def test_probes_use_readyz_and_healthz_on_the_management_port(container):
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "management"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "management"}


def test_the_grace_period_covers_prestop_drain_delay_and_drain_timeout(deployment, container, flags):
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + flags["drain_delay"] + flags["drain_timeout"] + 5, grace
    assert flags["wait_for_tunnels"] > 0  # a new pod is not ready before clients found it


def test_the_tunnel_service_is_headless_udp_and_publishes_pods_before_they_are_ready(deployment, container):
    tunnel = _one("Service", "reverstd-tunnel")["spec"]
    assert tunnel["clusterIP"] == "None"  # one A record per pod: clients register with each
    assert tunnel["publishNotReadyAddresses"] is True
    assert tunnel["selector"] == deployment["spec"]["selector"]["matchLabels"]
    for port in tunnel["ports"]:
        assert port["protocol"] == _port(container, port["targetPort"])["protocol"] == "UDP"


def test_the_public_service_reaches_the_http_port(deployment, container):
    public = _one("Service", "reverstd-http")["spec"]
    assert public["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = public["ports"]
    assert port["protocol"] == _port(container, port["targetPort"])["protocol"] == "TCP"
    assert not public.get("publishNotReadyAddresses")  # visitors only reach ready replicas


def test_rbac_names_the_configmap_and_the_secret_the_groups_read(deployment):
    role, binding, account = _one("Role", "reverstd"), _one("RoleBinding"), _one("ServiceAccount")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert any(s["name"] == account["metadata"]["name"] for s in binding["subjects"])
    allowed = {(r, n) for rule in role["rules"] for r in rule["resources"] for n in rule["resourceNames"]}
    configmap, secret = _one("ConfigMap", "reverst-groups"), _one("Secret", "reverst-tokens")
    assert ("configmaps", "reverst-groups") in allowed

    def read_secret(ref: str) -> bytes:  # the Secret manifest stands in for the API server
        namespace, name, key = ref.removeprefix("k8s://secret/").split("/")
        assert ("secrets", name) in allowed, f"{ref}: the Role does not let reverstd read it"
        assert (namespace, name) == (secret["metadata"]["namespace"], secret["metadata"]["name"]), ref
        return secret["stringData"][key].encode()
    config = parse_groups(configmap["data"]["groups.yml"], "k8s://configmap/reverst/reverst-groups/groups.yml",
                          read_secret=read_secret)
    assert set(config.groups) == {"app.example.com", "ci.example.com"}
