"""Kubernetes sources through the official client against a local API server
(tests/k8s_api.py): a ConfigMap as the groups source (created, updated, key deleted,
deleted, watch cut, watch expired) and Secrets as bearer token sources."""
import hashlib
import sys
import time

import pytest

from reverst import sources
from reverst.config import load_groups
from reverst.errors import ConfigError

from .conftest import Proc, TunnelClient
from .k8s_api import FakeKubeAPI
from .live import NOT_RELOADED, UPDATED, LiveServer, bearer, steady_traffic

NS, NAME, KEY = "tunnels", "reverst", "groups.yml"
SOURCE = f"k8s://configmap/{NS}/{NAME}/{KEY}"
STEADY = """\
groups:
  steady.test:
    hosts: [steady.test]
    authentication:
      basic: {username: user, password: pass}
  secret.test:
    hosts: [secret.test]
    authentication:
      bearer: {tokenPath: "k8s://secret/tunnels/tokens/plain"}
  hashed-secret.test:
    authentication:
      bearer: {hashedTokenPath: "k8s://secret/tunnels/tokens/hashed", scheme: JWT}
"""


def tokens(plain: str, hashed_of: str) -> dict:
    return {"plain": plain.encode() + b"\n", "hashed": hashlib.sha256(hashed_of.encode()).hexdigest().encode()}


@pytest.fixture(scope="module")
def api():
    api = FakeKubeAPI().start()
    yield api
    api.close()


@pytest.fixture(scope="module")
def kubeconfig(api, tmp_path_factory):
    return api.kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="module")
def live(api, kubeconfig, certs):
    api.put_configmap(NS, NAME, {KEY: STEADY, "other": "x"})
    api.put_secret(NS, "tokens", tokens("plain-1", "hashed-1"))
    server = LiveServer(certs, SOURCE, env={"KUBECONFIG": kubeconfig})
    steady = TunnelClient(server, certs, group="steady.test", name="steady")
    yield server
    steady.stop()
    server.stop()


@pytest.fixture
def server(live):
    """The module's reverstd. Every test leaves the ConfigMap valid with the STEADY groups
    (maybe more) and the Secret at tokens("plain-1", "hashed-1"), both applied."""
    return live


def change(server, do, *args, timeout=3.0) -> float:
    mark = server.mark()
    start = time.monotonic()
    do(*args)
    server.wait_after(mark, UPDATED, timeout)
    return time.monotonic() - start


def test_configmap_groups_serve_and_equal_the_same_file(server, api, kubeconfig, tmp_path, monkeypatch):
    assert server.get("steady.test").text == "steady"
    assert server.get("secret.test").status_code == 502 and server.get("secret.test").text == ""
    # The same YAML from a file gives the same groups.
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "groups.yml").write_text(api._list("configmaps", NS, NAME)["items"][0]["data"][KEY])
    from_configmap = sources.load_groups(SOURCE)
    from_file = sources.load_groups(str(tmp_path / "groups.yml"))
    assert from_configmap.source == SOURCE
    assert dict(from_configmap.groups) == dict(from_file.groups)
    assert from_configmap.secret_refs == ("k8s://secret/tunnels/tokens/plain", "k8s://secret/tunnels/tokens/hashed")
    with pytest.raises(ConfigError, match="Kubernetes secrets need"):  # the pure loader reads no Secrets
        load_groups(str(tmp_path / "groups.yml"))


def test_configmap_update_applies(server, api):
    with steady_traffic(server):
        delay = change(server, api.put_configmap, NS, NAME,
                       {KEY: STEADY + "  new.test: {hosts: [new.test]}\n", "other": "x"})
        assert delay < 1.0
        assert server.get("new.test").status_code == 502 and server.get("new.test").text == ""


def test_configmap_other_key_change_is_not_a_reload(server, api):
    current = api._list("configmaps", NS, NAME)["items"][0]["data"][KEY]
    mark = server.mark()
    api.put_configmap(NS, NAME, {KEY: current, "other": "y"})
    time.sleep(1.0)
    assert not server.lines_after(mark, UPDATED)


def test_configmap_key_deleted_keeps_last_good(server, api):
    with steady_traffic(server):
        mark = server.mark()
        api.put_configmap(NS, NAME, {"other": "x"})
        line = server.wait_after(mark, NOT_RELOADED + ".*").group(0)
        assert line.endswith(f"{SOURCE}: key 'groups.yml' not found in ConfigMap {NS}/{NAME}")
        assert server.get("steady.test").text == "steady"
        change(server, api.put_configmap, NS, NAME, {KEY: STEADY + "  back.test: {hosts: [back.test]}\n"})


def test_configmap_deleted_then_created(server, api):
    with steady_traffic(server):
        mark = server.mark()
        api.delete("configmaps", NS, NAME)
        line = server.wait_after(mark, NOT_RELOADED + ".*").group(0)
        assert line.endswith(f"{SOURCE}: ConfigMap {NS}/{NAME} not found")
        change(server, api.put_configmap, NS, NAME, {KEY: STEADY + "  created.test: {hosts: [created.test]}\n"})
        assert server.get("created.test").text == ""


def test_invalid_configmap_is_logged_and_ignored(server, api):
    with steady_traffic(server):
        mark = server.mark()
        api.put_configmap(NS, NAME, {KEY: STEADY.replace("hosts: [steady.test]", "hots: [steady.test]")})
        line = server.wait_after(mark, NOT_RELOADED + ".*").group(0)
        assert line.endswith(f'{SOURCE}: groups."steady.test".hots: unknown key')
        change(server, api.put_configmap, NS, NAME, {KEY: STEADY + "  fixed.test: {hosts: [fixed.test]}\n"})


def test_secret_tokens_plain_and_hashed(server, api, registrar):
    assert registrar.accepted("secret.test", bearer("plain-1"))
    assert not registrar.accepted("secret.test", bearer("plain-1\n"))
    assert registrar.accepted("hashed-secret.test", bearer("hashed-1", "JWT"))
    # A hashedTokenPath secret holds the hash: presenting the hash itself is refused,
    # and a tokenPath secret is the token: its hash is not accepted either.
    assert not registrar.accepted("hashed-secret.test", bearer(hashlib.sha256(b"hashed-1").hexdigest(), "JWT"))
    assert not registrar.accepted("secret.test", bearer(hashlib.sha256(b"plain-1").hexdigest()))


def test_secret_rotation_applies(server, api, registrar):
    with steady_traffic(server):
        change(server, api.put_secret, NS, "tokens", tokens("plain-2", "hashed-2"))
        assert registrar.accepted("secret.test", bearer("plain-2"))
        assert not registrar.accepted("secret.test", bearer("plain-1"))
        assert registrar.accepted("hashed-secret.test", bearer("hashed-2", "JWT"))
        # A Secret losing its key: logged without the token, the last good tokens stay.
        mark = server.mark()
        api.put_secret(NS, "tokens", {"hashed": tokens("x", "hashed-2")["hashed"]})
        line = server.wait_after(mark, NOT_RELOADED + ".*").group(0)
        assert line.endswith(f'{SOURCE}: groups."secret.test".authentication.bearer.tokenPath: '
                             f"key 'plain' not found in Secret {NS}/tokens")
        assert registrar.accepted("secret.test", bearer("plain-2"))
        change(server, api.put_secret, NS, "tokens", tokens("plain-1", "hashed-1"))


def test_watch_cut_by_the_server_reconnects(server, api):
    watches = api.count("watch")
    with steady_traffic(server):
        api.cut_watches()
        deadline = time.monotonic() + 5
        while api.count("watch") < watches + 2 and time.monotonic() < deadline:  # ConfigMap and Secret
            time.sleep(0.05)
        assert api.count("watch") >= watches + 2
        change(server, api.put_configmap, NS, NAME, {KEY: STEADY + "  after-cut.test: {hosts: [after-cut.test]}\n"})
        change(server, api.put_secret, NS, "tokens", tokens("plain-3", "hashed-3"))
        change(server, api.put_secret, NS, "tokens", tokens("plain-1", "hashed-1"))


def test_watch_expired_lists_again(server, api):
    lists = api.count("list")
    with steady_traffic(server):
        mark = server.mark()
        api.expire_watches()  # every open watch gets an ERROR event: 410 Expired
        server.wait_after(mark, r"watch of ConfigMap tunnels/reverst expired \(410 Gone\); listing again")
        server.wait_after(mark, r"watch of Secret tunnels/tokens expired \(410 Gone\); listing again")
        change(server, api.put_configmap, NS, NAME, {KEY: STEADY + "  expired.test: {hosts: [expired.test]}\n"})
    assert api.count("list") >= lists + 2
    assert server.get("expired.test").text == ""


def test_api_server_away_then_back(certs, tmp_path):
    """The watcher backs off while the API server is away, the groups keep serving, and
    a change made meanwhile is picked up when it is back."""
    api = FakeKubeAPI().start()
    api.put_configmap(NS, NAME, {KEY: STEADY.split("  secret.test")[0]})
    server = LiveServer(certs, SOURCE, env={"KUBECONFIG": api.kubeconfig(tmp_path / "config")})
    client = TunnelClient(server, certs, group="steady.test", name="steady")
    try:
        with steady_traffic(server):
            mark = server.mark()
            api.close()
            line = server.wait_after(mark, r"WARNING reverst.sources: watching ConfigMap tunnels/reverst failed: "
                                           r".*; retrying in \d.*", timeout=5).group(0)
            assert "Connection refused" in line
            api.put_configmap(NS, NAME, {KEY: STEADY.split("  secret.test")[0] + "  back.test: {}\n"})
            time.sleep(0.5)
            api.restart()
            server.wait_after(mark, UPDATED, timeout=10)
    finally:
        client.stop()
        server.stop()
        api.close()


def test_missing_configmap_at_start_is_fatal(certs, api, kubeconfig):
    proc = Proc([sys.executable, "-m", "reverst.cli", "reverstd", "-n", "localhost", "-k", certs["key"],
                 "-c", certs["cert"], "-g", f"k8s://configmap/{NS}/nosuch/{KEY}", "-w",
                 "-a", "127.0.0.1:0", "-s", "127.0.0.1:0"], env={"KUBECONFIG": kubeconfig})
    try:
        assert proc.popen.wait(15) == 1
        proc._reader.join(5)
        assert proc.lines[-1] == f"Error: k8s://configmap/{NS}/nosuch/{KEY}: ConfigMap {NS}/nosuch not found"
    finally:
        proc.stop()


@pytest.mark.parametrize("source,error", [
    ("k8s://configmap/tunnels/reverst", "k8s://configmap/tunnels/reverst: must be k8s://configmap/<namespace>/<name>/<key>"),
    ("k8s://secret/a/b/c", "k8s://secret/a/b/c: must be k8s://configmap/<namespace>/<name>/<key>"),
    ("k8s://configmap/Bad_NS/n/k", 'k8s://configmap/Bad_NS/n/k: invalid Kubernetes namespace "Bad_NS"'),
])
def test_bad_configmap_source(source, error):
    with pytest.raises(ConfigError) as info:
        sources.load_groups(source)
    assert str(info.value) == error


def test_no_kubernetes_configuration(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError) as info:
        sources.load_groups(SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: no Kubernetes configuration (in-cluster or KUBECONFIG): ")
    assert len(message.splitlines()) == 1


def test_example_manifests_agree():
    """examples/kubernetes: the groups validate, and the Deployment, RBAC and Secret name the same objects."""
    import pathlib

    import yaml

    from reverst.config import parse_groups, parse_k8s_ref

    here = pathlib.Path(__file__).resolve().parent.parent / "examples" / "kubernetes"
    docs = {}
    for path in sorted(here.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] != "Kustomization":
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    deployment = docs[("Deployment", "reverstd")]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    source = next(a.split("=", 1)[1] for a in args if a.startswith("--tunnel-groups="))
    assert "--watch-groups" in args
    namespace, name, key = parse_k8s_ref(source, "configmap")
    groups = parse_groups(docs[("ConfigMap", name)]["data"][key], source, read_secret=lambda ref: b"token")
    role = docs[("Role", "reverstd")]
    allowed = {(rule["resources"][0], n) for rule in role["rules"] for n in rule["resourceNames"]}
    assert ("configmaps", name) in allowed
    for ref in groups.secret_refs:
        ns, secret, secret_key = parse_k8s_ref(ref, "secret")
        assert ns == namespace and ("secrets", secret) in allowed
        assert secret_key in docs[("Secret", secret)]["stringData"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "reverstd"
    ports = {
        (p["protocol"], p["port"])
        for name in ("reverstd-tunnel", "reverstd-http")
        for p in docs[("Service", name)]["spec"]["ports"]
    }
    assert ports == {("UDP", 7171), ("TCP", 80)}
    kustomization = yaml.safe_load((here / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in here.glob("*.yaml") if p.stem != "kustomization")
