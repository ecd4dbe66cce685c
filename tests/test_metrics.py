"""/metrics of a real reverstd (--management-address), parsed with prometheus_client's
parser: the Go server's families with its names and labels, counters that move by exactly
what the test did, gauges that follow the tunnels, and our own families."""
from __future__ import annotations

import signal
import socket
import time

import gevent
import pytest
import requests

from reverst.client import BasicAuth, Client, NotFound

from .apps import app as flask_app
from .conftest import TunnelClient
from .observe import ManagedServer, Metrics, eventually
from .test_registration import RawTunnel

REG = "reverst_tunnel_group_registrations_total"
ACTIVE = "reverst_tunnel_group_active_conn"
REQS = "reverst_tunnel_group_proxy_requests_total"
LATENCY = "reverst_tunnel_group_proxy_requests_latency_milliseconds"
FAILURES = "reverst_registration_failures_total"


@pytest.fixture
def mserver(certs, groups_file, procs):
    s = ManagedServer(certs, groups_file)
    procs.append(s)
    return s


def public(server, path, host, **kwargs):
    method = kwargs.pop("method", "GET")
    return requests.request(method, server.url(path), headers={"Host": host}, timeout=10, **kwargs)


def delta(after: Metrics, before: Metrics, name: str, **labels) -> float:
    return after[name, labels] - before[name, labels]


def test_go_families_have_the_go_names_labels_and_types(mserver, certs, procs):
    procs.append(TunnelClient(mserver, certs))
    public(mserver, "/hello", "app.test")
    m = mserver.metrics()
    assert m.families[REG[:-len("_total")]].type == "counter"
    assert m.label_names(REG[:-len("_total")]) == {"tunnel_group", "error"}
    assert m.families[ACTIVE].type == "gauge"
    assert m.label_names(ACTIVE) == {"tunnel_group"}
    assert m.families[REQS[:-len("_total")]].type == "counter"
    assert m.label_names(REQS[:-len("_total")]) == {"host", "status"}
    assert m.families[LATENCY].type == "histogram"
    assert m.label_names(LATENCY) == {"host", "status", "le"}
    # The OpenTelemetry default bounds the Go server's histogram has, in milliseconds.
    bounds = sorted(float(s.labels["le"]) for s in m.families[LATENCY].samples if s.name.endswith("_bucket"))
    assert bounds == [0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000, float("inf")]
    assert m[REG, {"tunnel_group": "app.test", "error": ""}] == 1
    # The process collector, and no *_created series (the Go server has none).
    assert m["process_resident_memory_bytes"] > 0
    assert m["process_open_fds"] > 0
    assert "_created" not in m.text


def test_counters_move_by_exactly_what_was_done(mserver, certs, procs):
    before = mserver.metrics()
    assert before[ACTIVE, {"tunnel_group": "app.test"}] == 0

    # One registration that succeeds, one rejected (wrong password), one for an unknown
    # group, one that is not even a registration request.
    client = TunnelClient(mserver, certs)
    procs.append(client)
    wrong = TunnelClient(mserver, certs, auth=("user", "wrong"), name="wrong", wait=False)
    procs.append(wrong)
    assert wrong.popen.wait(15) == 2
    with gevent.Timeout(10), pytest.raises(NotFound):
        Client(flask_app, mserver.tunnel_address, tunnel_group="nosuch.test", server_name="localhost",
               ca_file=certs["ca"], auth=BasicAuth("user", "pass"), max_retries=0).dial_and_serve()
    raw = RawTunnel(mserver, certs)
    try:
        raw.register(b"\xc1")
    finally:
        raw.close()

    # Public requests: 3 x 2XX, a 5XX and a 4XX from the app, a 2XX POST with a body, a 5XX
    # for a host nobody serves and one for a group without tunnels.
    sizes = [len(public(mserver, "/hello", "app.test").content) for _ in range(3)]
    assert public(mserver, "/status/500", "app.test").status_code == 500
    assert public(mserver, "/status/404", "app.test:8181").status_code == 404  # port dropped
    post = public(mserver, "/echo", "app.test", method="POST", data=b"x" * 5000)
    assert post.status_code == 200 and post.json()["body_len"] == 5000
    assert public(mserver, "/x", "nobody.test").status_code == 502
    assert public(mserver, "/x", "empty.test").status_code == 502

    after = eventually(lambda: (m := mserver.metrics())[ACTIVE, {"tunnel_group": "app.test"}] == 1 and m)
    # Go's family: decoded registrations only, by group and error.
    assert delta(after, before, REG, tunnel_group="app.test", error="") == 1
    assert delta(after, before, REG, tunnel_group="app.test", error="unauthorized") == 1
    assert delta(after, before, REG, tunnel_group="nosuch.test", error="not found") == 1
    # Ours: every failure by reason, the undecodable one included.
    assert delta(after, before, FAILURES, reason="unauthorized") == 1
    assert delta(after, before, FAILURES, reason="not found") == 1
    assert delta(after, before, FAILURES, reason="bad request") == 1
    assert sum(v for (name, _), v in after.samples.items() if name == FAILURES) == 3

    assert delta(after, before, REQS, host="app.test", status="2XX") == 4
    assert delta(after, before, REQS, host="app.test", status="5XX") == 1
    assert delta(after, before, REQS, host="app.test", status="4XX") == 1
    assert delta(after, before, REQS, host="nobody.test", status="5XX") == 1
    assert delta(after, before, REQS, host="empty.test", status="5XX") == 1
    assert sum(v for (name, _), v in after.samples.items() if name == REQS) == 8
    assert delta(after, before, LATENCY + "_count", host="app.test", status="2XX") == 4
    assert delta(after, before, LATENCY + "_bucket", host="app.test", status="2XX", le="+Inf") == 4
    assert after[LATENCY + "_sum", {"host": "app.test", "status": "2XX"}] > 0

    sent = sum(sizes) + len(b"status 500") + len(b"status 404") + len(post.content)
    assert delta(after, before, "reverst_tunnel_group_sent_bytes_total", tunnel_group="app.test") == sent
    assert delta(after, before, "reverst_tunnel_group_received_bytes_total", tunnel_group="app.test") == 5000

    # RTT of the group's tunnel, from aioquic's recovery state; nothing lost on loopback.
    assert 0 < after["reverst_tunnel_group_rtt_seconds", {"tunnel_group": "app.test"}] < 1
    assert after["reverst_tunnel_group_lost_packets_total", {"tunnel_group": "app.test"}] == 0
    assert after["reverst_tunnel_group_requests_in_flight", {"tunnel_group": "app.test"}] == 0

    # The tunnel leaves: the gauge goes back down.
    assert client.stop(signal.SIGTERM) == 0
    eventually(lambda: mserver.metrics()[ACTIVE, {"tunnel_group": "app.test"}] == 0)


def test_active_connections_count_each_tunnel(mserver, certs, procs):
    clients = [TunnelClient(mserver, certs, name=f"c{i}") for i in range(2)]
    procs.extend(clients)
    assert mserver.metrics()[ACTIVE, {"tunnel_group": "app.test"}] == 2
    for left, client in zip((1, 0), clients):
        client.stop(signal.SIGTERM)  # a clean close (code 0x0): noticed at once
        eventually(lambda: mserver.metrics()[ACTIVE, {"tunnel_group": "app.test"}] == left, timeout=5)


def test_dropped_datagrams_and_open_public_connections(mserver):
    name = "reverst_quic_dropped_datagrams_total"
    before = mserver.metrics()[name]
    host, port = mserver.tunnel_address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"\x00not quic", (host, int(port)))
    eventually(lambda: mserver.metrics()[name] == before + 1)

    assert mserver.metrics()["reverst_public_connections_open"] == 0
    conns = [socket.create_connection(("127.0.0.1", mserver.http_port), timeout=5) for _ in range(3)]
    try:
        eventually(lambda: mserver.metrics()["reverst_public_connections_open"] == 3)
    finally:
        for c in conns:
            c.close()
    eventually(lambda: mserver.metrics()["reverst_public_connections_open"] == 0)


def test_reloads_and_reload_failures_are_counted(certs, groups_file, procs):
    server = ManagedServer(certs, groups_file, extra=["-w"])
    procs.append(server)
    name = "reverst_tunnel_groups_reloads_total"
    m = server.metrics()
    assert (m[name, {"result": "success"}], m[name, {"result": "failure"}]) == (0, 0)
    assert m["reverst_tunnel_groups_loaded"] == 1

    groups_file.write_text(groups_file.read_text() + "  new.test: {hosts: [new.test]}\n")
    eventually(lambda: server.metrics()[name, {"result": "success"}] == 1)
    groups_file.write_text("groups:\n  broken.test: {hostz: []}\n")
    eventually(lambda: server.metrics()[name, {"result": "failure"}] == 1)
    time.sleep(0.7)  # a poll more: nothing else counted
    m = server.metrics()
    assert (m[name, {"result": "success"}], m[name, {"result": "failure"}]) == (1, 1)
    assert public(server, "/", "new.test").status_code == 502  # the last good version serves


def test_unknown_hosts_cannot_grow_the_registry_without_bound(mserver):
    for i in range(110):
        requests.get(mserver.url("/"), headers={"Host": f"scan{i}.test"}, timeout=5)
    m = mserver.metrics()
    hosts = {dict(labels)["host"] for (name, labels) in m.samples if name == REQS}
    assert len(hosts) == 101 and "other" in hosts
    assert m[REQS, {"host": "other", "status": "5XX"}] == 10


# -- the pieces, without a server ----------------------------------------------------------------
def test_lost_packets_are_counted_from_the_backends_loss_detection(tls):
    """Two real connections of the run's QUIC backend wired in memory; the first datagram
    of a burst is dropped on the way and declared lost once the later ones are acknowledged."""
    from .inmemory import CLIENT_ADDR, make_link

    link = make_link(tls)
    client, server = link.client, link.server
    assert client.lost_packets == 0
    client.send_stream_data(client.open_stream(), b"x" * 12000)
    datagrams = client.datagrams_to_send(now=link.now)
    assert len(datagrams) >= 3
    for data, _ in datagrams[1:]:
        server.receive_datagram(data, CLIENT_ADDR, now=link.now)
    link.drain(server)
    link.advance(0.5)  # the ACKs of the later packets: the first is lost (and sent again)
    assert client.lost_packets == 1


def test_rate_window_clock_is_a_parameter():
    from reverst.metrics import RateWindow
    t = [100.0]
    window = RateWindow(span=10, clock=lambda: t[0])
    for _ in range(20):
        window.add()
    assert window.rate() == 2.0
    t[0] += 5
    window.add(10)
    assert window.rate() == 3.0
    t[0] += 6  # the first 20 are more than 10 s old now
    assert window.rate() == 1.0
    t[0] += 60
    assert window.rate() == 0.0


def test_status_classes_and_label_limits():
    from reverst.metrics import LabelLimiter, status_class
    assert [status_class(c) for c in (0, 101, 200, 302, 404, 502)] == ["2XX", "1XX", "2XX", "3XX", "4XX", "5XX"]
    limit = LabelLimiter(limit=2)
    assert [limit(v, False) for v in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
    assert limit("configured", True) == "configured"
    assert limit("x" * 500, True) == "x" * 200


def test_observability_modules_import_without_gevent():
    import subprocess
    import sys
    code = ("import sys, reverst.metrics, reverst.management, reverst.logs; "
            "assert 'gevent' not in sys.modules, 'gevent imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_without_a_scrape_reverstd_does_not_load_prometheus_client(tmp_path):
    """Counting needs no prometheus_client (~2.5 MB): only the registry, which the
    management app reads, loads it."""
    import subprocess
    import sys
    code = ("import sys\n"
            "from reverst import cli, server\n"
            "from reverst.metrics import ServerMetrics\n"
            "m = ServerMetrics(None, process=False)\n"
            "m.registration('g', None, known_group=True)\n"
            "m.registration('g', 'unauthorized', known_group=True)\n"
            "m.visitor_refused('g', 'denied')\n"
            "m.reloaded(False)\n"
            "print('prometheus_client' in sys.modules)\n"
            "m.registry\n"
            "print('prometheus_client' in sys.modules)\n"
            "print(m.registrations.values[('g', 'unauthorized')], m.reloads.values[('failure',)])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "1", "1"]
