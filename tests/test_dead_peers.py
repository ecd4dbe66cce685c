"""Dead peers found fast, live ones never declared dead: real processes, the tunnel through
the impairment relay (tests/relay.py) so a path can die without any ICMP message.

``REVERST_LIVE_PEER_SECONDS`` lengthens the lossy-path run (300 for the 5-minute check)."""
from __future__ import annotations

import os
import re
import socket
import time

import pytest
import requests

from .conftest import Server, TunnelClient
from .relay import Impairment, relay_factory, through  # noqa: F401 (fixture)

LIVE_SECONDS = float(os.environ.get("REVERST_LIVE_PEER_SECONDS", "15"))


def start(certs, groups_file, procs, relay_factory, imp=None, seed=1):
    server = Server(certs, groups_file)
    procs.append(server)
    relay = relay_factory(server, up=imp or Impairment(), down=imp or Impairment(), seed=seed)
    client = TunnelClient(through(relay), certs)
    procs.append(client)
    return server, relay, client


def start_download(server, size=500_000_000, first=1_000_000) -> socket.socket:
    visitor = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    visitor.sendall(f"GET /download/{size} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())
    got = 0
    while got < first:
        got += len(visitor.recv(65536))
    return visitor


def seconds_until_cut(visitor: socket.socket, limit=10.0) -> float:
    start = time.monotonic()
    visitor.settimeout(limit)
    try:
        while visitor.recv(65536):
            assert time.monotonic() - start < limit, "the response never ended"
    except ConnectionResetError:
        pass
    return time.monotonic() - start


@pytest.mark.timeout(60)
def test_a_tunnel_client_gone_silent_mid_download_is_cut_within_2s(certs, groups_file, procs, relay_factory):
    """No CONNECTION_CLOSE and no ICMP (the relay swallows everything): the busy probe."""
    server, relay, client = start(certs, groups_file, procs, relay_factory)
    visitor = start_download(server)
    relay.blackhole(True)
    took = seconds_until_cut(visitor)
    visitor.close()
    assert took < 2.0, f"the visitor's response ran on for {took:.2f}s"
    server.wait_for(r"peer unresponsive", timeout=5)  # (the log line may still be on its way)


@pytest.mark.timeout(60)
def test_a_client_serving_a_download_finds_a_silent_reverstd_within_2s_and_comes_back(certs, groups_file, procs,
                                                                                     relay_factory):
    server, relay, client = start(certs, groups_file, procs, relay_factory)
    visitor = start_download(server)
    mark = len(client.lines)
    relay.blackhole(True)
    start_at = time.monotonic()
    while not any(" lost (" in line for line in client.lines[mark:]):
        assert time.monotonic() - start_at < 2.0, "the client did not notice within 2 s:\n" + client.output()
        time.sleep(0.02)
    visitor.close()
    relay.blackhole(False)
    deadline = time.monotonic() + 15
    while True:
        r = requests.get(server.url("/hello"), headers={"Host": "app.test"}, timeout=5)
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, f"not back: {r.status_code}"
        time.sleep(0.2)


@pytest.mark.timeout(LIVE_SECONDS + 120)
def test_a_live_peer_on_a_lossy_100ms_path_is_never_declared_dead(certs, groups_file, procs, relay_factory):
    """100 ms RTT, 2% loss each way: steady traffic (small requests, downloads, and requests
    that keep the tunnel busy but silent) for LIVE_SECONDS, and no probe ever fires."""
    imp = Impairment(loss=0.02, delay=0.05)
    server, relay, client = start(certs, groups_file, procs, relay_factory, imp=imp, seed=7)
    paths = ["/hello", "/download/262144", "/sleep?ms=2000", "/hello", "/download/65536"]
    done, end = 0, time.monotonic() + LIVE_SECONDS
    with requests.Session() as session:
        while time.monotonic() < end:
            path = paths[done % len(paths)]
            r = session.get(server.url(path), headers={"Host": "app.test"}, timeout=30)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])
            done += 1
    s = relay.stats()
    assert s["up"]["dropped"]["loss"] > 0 and s["down"]["dropped"]["loss"] > 0
    for proc in (server, client):
        assert not re.search(r"peer unresponsive| lost \(", proc.output()), proc.output()[-3000:]
    print(f"{done} requests in {LIVE_SECONDS:.0f}s on a 100 ms RTT / 2% loss path, no false dead peer")
