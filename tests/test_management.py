"""The management listener of a real reverstd: /healthz, /readyz, /status and the page."""
from __future__ import annotations

import base64
import hashlib
import re
import signal
import sys
import threading
import time

import pytest
import requests

from reverst.quic import load_backend

from .conftest import Proc, Server, TunnelClient
from .observe import MANAGEMENT_LINE, ManagedServer, eventually


@pytest.fixture
def mserver(certs, groups_file, procs):
    s = ManagedServer(certs, groups_file)
    procs.append(s)
    return s


def test_management_is_off_by_default(server):
    assert not any("management on" in line for line in server.lines)


def test_healthz_and_readyz(mserver):
    r = mserver.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok\n")
    r = mserver.get("/readyz")
    assert (r.status_code, r.text) == (200, "ready\n")
    assert mserver.get("/readyz", headers={"Accept": "*/*"}).headers["Content-Type"].startswith("text/plain")


def test_readyz_is_503_until_the_groups_are_loaded(certs, groups_file, procs):
    proc = Proc([sys.executable, "-m", "tests.unready_server", certs["cert"], certs["key"], str(groups_file)])
    procs.append(proc)
    mgmt = proc.wait_for(MANAGEMENT_LINE).group(1)
    proc.wait_for("listening for tunnels")
    r = requests.get(f"http://{mgmt}/readyz", timeout=5)
    assert r.status_code == 503
    assert r.text == "not ready: tunnel groups not loaded yet from their source\n"
    assert requests.get(f"http://{mgmt}/healthz", timeout=5).status_code == 200  # alive all the same
    status = requests.get(f"http://{mgmt}/status", timeout=5).json()
    assert status["ready"] is False and status["groups"] == []
    assert "tunnel_groups_loaded 0.0" in requests.get(f"http://{mgmt}/metrics", timeout=5).text

    proc.popen.send_signal(signal.SIGUSR1)  # the source answers: groups loaded
    eventually(lambda: requests.get(f"http://{mgmt}/readyz", timeout=5).status_code == 200)
    status = requests.get(f"http://{mgmt}/status", timeout=5).json()
    assert status["ready"] is True and status["not_ready_reason"] is None
    assert "app.test" in [g["name"] for g in status["groups"]]
    # The first load is not a reload.
    assert 'reverst_tunnel_groups_reloads_total{result="success"} 0.0' in \
        requests.get(f"http://{mgmt}/metrics", timeout=5).text


def test_status_shows_groups_hosts_strategy_names_and_tunnels(mserver, certs, procs):
    procs.extend(TunnelClient(mserver, certs, name=f"c{i}") for i in range(2))
    for _ in range(6):
        assert requests.get(mserver.url("/hello"), headers={"Host": "app.test"}, timeout=5).status_code == 200
    r = mserver.get("/status")
    assert r.headers["Content-Type"] == "application/json"
    status = r.json()
    assert status["ready"] is True
    assert status["listeners"]["public_http"] == f"127.0.0.1:{mserver.http_port}"
    assert status["listeners"]["tunnel_udp"] == mserver.tunnel_address
    assert status["listeners"]["management_http"] == mserver.management
    groups = {g["name"]: g for g in status["groups"]}
    assert set(groups) == {"app.test", "bearer.test", "local.example", "empty.test"}
    app = groups["app.test"]
    assert app["hosts"] == ["app.test", "127.0.0.1"]
    assert app["authentication"] == [{"strategy": "basic", "scheme": "Basic"}]
    assert groups["local.example"]["authentication"] == [{"strategy": "basic", "scheme": "Basic"},
                                                         {"strategy": "bearer", "scheme": "Bearer"}]
    assert app["requests_total"] == 6 and app["request_rate"] > 0
    assert len(app["tunnels"]) == 2
    assert sum(t["requests_served"] for t in app["tunnels"]) == 6
    assert all(t["requests_served"] == 3 for t in app["tunnels"])  # round-robin
    for tunnel in app["tunnels"]:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", tunnel["peer"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", tunnel["connected_since"])
        assert tunnel["in_flight"] == 0 and tunnel["lost_packets"] == 0
        assert 0 < tunnel["rtt_ms"] < 1000
        assert tunnel["quic_backend"] == load_backend().NAME  # (our clients: never the fallback)
    assert groups["empty.test"]["tunnels"] == [] and groups["empty.test"]["requests_total"] == 0
    assert status["requests_total"] == 6


def test_status_counts_requests_in_flight(mserver, certs, procs):
    procs.append(TunnelClient(mserver, certs))
    done = threading.Event()

    def slow():
        requests.get(mserver.url("/sleep?ms=1500"), headers={"Host": "app.test"}, timeout=10)
        done.set()
    threading.Thread(target=slow, daemon=True).start()

    def in_flight():
        return mserver.get("/status").json()["groups"][0]["tunnels"][0]["in_flight"]
    eventually(lambda: in_flight() == 1, timeout=5)
    assert mserver.metrics()["reverst_tunnel_group_requests_in_flight", {"tunnel_group": "app.test"}] == 1
    assert done.wait(10)
    eventually(lambda: in_flight() == 0, timeout=5)


def test_unknown_paths_and_methods(mserver):
    assert mserver.get("/nope").status_code == 404
    r = requests.post(mserver.mgmt("/metrics"), timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    r = requests.head(mserver.mgmt("/status"), timeout=5)
    assert r.status_code == 200 and r.content == b""


def test_metrics_speak_openmetrics_when_asked(mserver):
    r = mserver.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")


def test_page_is_self_contained_and_locked_down(mserver):
    r = mserver.get("/")
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
    html = r.text
    # No external asset: no URL, no src attribute, no link but the empty inline icon; the
    # data comes from "status".
    assert not re.search(r"https?:|//[a-z]|\bsrc=|@import", html, re.I)
    assert re.findall(r"\bhref=\S+", html) == ['href="data:,">']
    assert 'fetch("status"' in html
    # Only the page's own inline script and style may run (CSP hashes), nothing framed.
    csp = r.headers["Content-Security-Policy"]
    script = re.search(r"<script>(.*)</script>", html, re.S).group(1)
    style = re.search(r"<style>(.*)</style>", html, re.S).group(1)
    for text in (script, style):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert r.headers["X-Frame-Options"] == "DENY"


def test_management_address_in_use_is_a_clear_error(certs, groups_file, mserver):
    other = Proc([sys.executable, "-m", "reverst.cli", "reverstd", "-n", "localhost", "-k", certs["key"],
                  "-c", certs["cert"], "-g", str(groups_file), "-a", "127.0.0.1:0", "-s", "127.0.0.1:0",
                  "--management-address", mserver.management])
    assert other.popen.wait(15) == 1
    other.stop()
    assert "cannot listen" in other.output()


def test_server_fixture_still_reports_ready_line(certs, groups_file, procs):
    # The management line comes before the ready line the other tests wait for.
    s = ManagedServer(certs, groups_file)
    procs.append(s)
    lines = s.lines
    management = next(i for i, line in enumerate(lines) if "management on tcp" in line)
    ready = next(i for i, line in enumerate(lines) if "listening for tunnels" in line)
    assert management < ready
    assert isinstance(s, Server)


def test_unreachable_kubernetes_source_is_not_ready_until_it_loads(certs, procs, tmp_path, monkeypatch):
    """`-g k8s://...` while the API server is down: reverstd serves /readyz 503 (instead of
    exiting), keeps trying, and becomes ready and routes once the API answers."""
    from .conftest import GROUPS
    from .k8s_api import FakeKubeAPI

    api = FakeKubeAPI().start()
    api.put_configmap("infra", "reverst", {"groups.yml": GROUPS})
    monkeypatch.setenv("KUBECONFIG", api.kubeconfig(tmp_path / "kubeconfig"))
    api.close()  # connections are refused from now on
    try:
        server = ManagedServer(certs, "k8s://configmap/infra/reverst/groups.yml")
        procs.append(server)
        r = server.get("/readyz")
        assert r.status_code == 503, r.text
        server.wait_for("tunnel groups not loaded yet, retrying")
        api.restart()
        deadline = time.monotonic() + 10
        while server.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.2)
        procs.append(TunnelClient(server, certs))
        r = requests.get(server.url("/hello"), headers={"Host": "app.test"}, timeout=10)
        assert (r.status_code, r.text) == (200, "Hello, World!")
    finally:
        api.close()


def test_no_stream_state_is_left_behind(mserver, certs, procs):
    """After normal, HEAD, upload, failing and abandoned requests, the tunnel connection
    tracks no request stream any more (nothing leaks per request)."""
    procs.append(TunnelClient(mserver, certs))
    h = {"Host": "app.test"}
    for _ in range(30):
        assert requests.get(mserver.url("/hello"), headers=h, timeout=10).status_code == 200
    for _ in range(5):
        assert requests.head(mserver.url("/hello"), headers=h, timeout=10).status_code == 200
        assert requests.post(mserver.url("/upload"), headers=h, data=b"x" * 300_000, timeout=10).ok
        assert requests.get(mserver.url("/boom"), headers=h, timeout=10).status_code == 500
        with requests.get(mserver.url(f"/download/{50 * 1024 * 1024}"), headers=h, stream=True,
                          timeout=10) as r:
            next(r.iter_content(65536))  # then walk away mid-body
    deadline = time.monotonic() + 10
    while True:
        tunnels = [t for g in mserver.get("/status").json()["groups"] for t in g["tunnels"]]
        assert len(tunnels) == 1
        if tunnels[0]["open_streams"] == 0 and tunnels[0]["in_flight"] == 0:
            break
        assert time.monotonic() < deadline, tunnels
        time.sleep(0.2)
