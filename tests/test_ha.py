"""High availability: a client registered with every replica of a name, replicas that die,
drain and are rolled, with real processes on loopback (127.0.0.0/8 gives many addresses).

The name ``replicas.test`` resolves through the system resolver: the client runs in a
private mount namespace (``unshare -m``) whose /etc/hosts is a file of the test. Nothing
of our code is patched; without ``unshare`` (no CAP_SYS_ADMIN) those tests are skipped.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from .conftest import READY_SERVER, Proc
from .gopeer import GoClient, go_missing_reason, local_service
from .observe import eventually

NAME = "replicas.test"
ADDRESSES = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def _namespaces_work() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare command"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10)
    return None if probe.returncode == 0 else f"unshare -m refused: {probe.stderr.decode().strip()}"


NAMESPACE_PROBLEM = _namespaces_work()
needs_namespaces = pytest.mark.skipif(NAMESPACE_PROBLEM is not None, reason=f"{NAMESPACE_PROBLEM}")


def free_ports(kinds) -> list[int]:
    """Port numbers free on every replica address, one per kind (SOCK_DGRAM/SOCK_STREAM)."""
    for _ in range(50):
        ports, ok = [], True
        for kind in kinds:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            for address in ADDRESSES:
                try:
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind((address, port))
                except OSError:
                    ok = False
            ports.append(port)
        if ok and len(set(ports)) == len(ports):
            return ports
    raise AssertionError("no ports free on every replica address")


class Hosts:
    """The /etc/hosts of the client's namespace: ``replicas.test`` -> the given addresses.
    Rewritten in place (the bind mount follows the file, not its name)."""

    def __init__(self, path, addresses) -> None:
        self.path = path
        self.set(addresses)

    def set(self, addresses) -> None:
        with open(self.path, "w") as fh:
            fh.write("127.0.0.1 localhost\n" + "".join(f"{a} {NAME}\n" for a in addresses))


#: A drained replica keeps serving for a second after /readyz turns 503 (the default 5 s is
#: for load balancers that look less often): five looks of ReadinessBalancer (every 0.2 s).
DRAIN = ["--drain-delay", "1s"]


class Replica(Proc):
    """Our reverstd on one loopback address: tunnel UDP, public TCP and management TCP on
    the shared port numbers."""

    def __init__(self, certs, groups_path, address: str, ports, extra=()):
        self.address = address
        self.tunnel_port, self.http_port, self.mgmt_port = ports
        super().__init__([sys.executable, "-m", "reverst.cli", "reverstd", "-l", "debug",
                          "-n", "localhost", "-k", certs["key"], "-c", certs["cert"], "-g", str(groups_path),
                          "-a", f"{address}:{self.tunnel_port}", "-s", f"{address}:{self.http_port}",
                          "--management-address", f"{address}:{self.mgmt_port}", *extra])
        self._wait_or_kill(READY_SERVER.pattern)

    @property
    def tunnel_address(self) -> str:
        return f"{self.address}:{self.tunnel_port}"

    def url(self, path="/name") -> str:
        return f"http://{self.address}:{self.http_port}{path}"

    def get(self, path="/name", **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 5)
        return requests.get(self.url(path), headers={"Host": "app.test"}, **kwargs)

    def ready(self) -> bool:
        try:
            return requests.get(f"http://{self.address}:{self.mgmt_port}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False


class NamespacedClient(Proc):
    """``reverst client wsgi`` with ``-a replicas.test:PORT``, its /etc/hosts being ours."""

    def __init__(self, certs, hosts: Hosts, tunnel_port: int, extra=(), name="app"):
        command = [sys.executable, "-m", "reverst.cli", "client", "wsgi", "-l", "debug",
                   "-a", f"{NAME}:{tunnel_port}", "-n", "localhost", "-g", "app.test", "-c", certs["ca"],
                   "--username", "user", "--password", "pass", "--resolve-interval", "1s",
                   "--keep-alive-period", "1s", *extra, "tests.apps:app"]
        super().__init__(["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                          str(hosts.path), *command], env={"APP_NAME": name})

    def registered(self, address: str, port: int) -> int:
        return sum(1 for line in list(self.lines)
                   if f"registered with {address}:{port} ({NAME}) in group" in line)


@pytest.fixture
def ha(tmp_path, certs, groups_file, procs):
    """Three replicas and a namespaced client registered with all three."""
    ports = free_ports([socket.SOCK_DGRAM, socket.SOCK_STREAM, socket.SOCK_STREAM])
    replicas = {}
    for address in ADDRESSES:
        replicas[address] = Replica(certs, groups_file, address, ports, extra=DRAIN)
        procs.append(replicas[address])
    hosts = Hosts(tmp_path / "hosts", ADDRESSES)
    client = NamespacedClient(certs, hosts, ports[0])
    procs.append(client)
    for address in ADDRESSES:
        replicas[address].wait_for(r"registered in group 'app.test'", timeout=15)
    return replicas, client, hosts, ports


class Load:
    """Requests from native threads all along a ``with`` block: GETs, and uploads whose
    SHA-256 the app echoes; every answer is checked."""

    def __init__(self, urls, uploads: bool = False) -> None:
        self.urls, self.uploads = urls, uploads
        self.ok, self.failures = 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(3)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        eventually(lambda: self.ok >= 10 or self.failures, timeout=10)
        assert not self.failures, self.failures[:3]
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _run(self, index: int) -> None:
        n = 0
        with requests.Session() as session:
            while not self._stop.is_set():
                url = self.urls[(index + n) % len(self.urls)]
                n += 1
                try:
                    if self.uploads and n % 3 == 0:
                        body = os.urandom(256 * 1024)
                        r = session.post(url.replace("/name", "/upload"), data=body, headers={"Host": "app.test"},
                                         timeout=10)
                        good = r.status_code == 200 and r.json() == {"size": len(body),
                                                                      "sha256": hashlib.sha256(body).hexdigest()}
                    else:
                        r = session.get(url, headers={"Host": "app.test"}, timeout=10)
                        good = r.status_code == 200 and r.text == "app"
                    if good:
                        self.ok += 1
                    else:
                        self.failures.append(f"{url}: {r.status_code} {r.text[:80]!r}")
                except requests.RequestException as exc:
                    self.failures.append(f"{time.monotonic():.2f} {url}: {exc!r}")
                time.sleep(0.005)


# -- the client and the replicas -------------------------------------------------------------------
@needs_namespaces
def test_a_client_registers_with_every_replica_of_a_name(ha):
    replicas, client, _, ports = ha
    for address, replica in replicas.items():
        assert replica.get().text == "app", address
        assert client.registered(address, ports[0]) == 1


@needs_namespaces
def test_a_killed_replica_costs_nothing_through_the_others_and_is_served_again_when_back(
        ha, certs, groups_file, procs):
    replicas, client, _, ports = ha
    others = [replicas["127.0.0.2"].url(), replicas["127.0.0.3"].url()]
    with Load(others) as load:
        replicas["127.0.0.1"].stop(signal.SIGKILL)
        time.sleep(1.0)
        back = Replica(certs, groups_file, "127.0.0.1", ports)
        procs.append(back)
        started = time.monotonic()
        eventually(lambda: back.get().status_code == 200, timeout=5)
        back_in = time.monotonic() - started
        time.sleep(0.5)
    print(f"failover: {load.ok} requests, 0 failed; the restarted replica served again in {back_in:.2f} s")
    assert not load.failures, load.failures[:5]
    assert load.ok > 20
    assert back_in < 5, back_in


@needs_namespaces
def test_a_replica_added_to_the_name_gets_registered_without_a_restart(tmp_path, certs, groups_file, procs):
    ports = free_ports([socket.SOCK_DGRAM, socket.SOCK_STREAM, socket.SOCK_STREAM])
    first = Replica(certs, groups_file, "127.0.0.1", ports)
    procs.append(first)
    hosts = Hosts(tmp_path / "hosts", ["127.0.0.1"])
    client = NamespacedClient(certs, hosts, ports[0])
    procs.append(client)
    first.wait_for(r"registered in group 'app.test'", timeout=15)
    second = Replica(certs, groups_file, "127.0.0.2", ports)
    procs.append(second)
    hosts.set(["127.0.0.1", "127.0.0.2"])
    second.wait_for(r"registered in group 'app.test'", timeout=5)  # (resolved again every second)
    client.wait_for(r"replica 127\.0\.0\.2:\d+ \(replicas\.test\) appeared")
    assert second.get().text == "app" and first.get().text == "app"
    hosts.set(["127.0.0.2"])  # and removed again: the client lets go of it
    client.wait_for(r"replica 127\.0\.0\.1:\d+ \(replicas\.test\) is no longer listed", timeout=5)
    first.wait_for(r"left group 'app.test': replica no longer listed", timeout=5)


# -- draining ----------------------------------------------------------------------------------------
@needs_namespaces
def test_a_rolling_restart_behind_a_load_balancer_fails_no_request(ha, certs, groups_file, procs):
    """A small TCP load balancer sends public connections only to ready replicas (/readyz);
    each replica in turn is drained (SIGTERM), restarted and waits for its tunnels before it
    is ready again. GETs and checksummed uploads run all along."""
    replicas, client, _, ports = ha
    lb = ReadinessBalancer(list(replicas.values()))
    started = time.monotonic()
    with lb, Load([f"http://127.0.0.1:{lb.port}/name"], uploads=True) as load:
        for address in ADDRESSES:
            old = replicas[address]
            old.popen.send_signal(signal.SIGTERM)
            assert old.popen.wait(15) == 0, old.output()[-2000:]
            new = Replica(certs, groups_file, address, ports, extra=[*DRAIN, "--wait-for-tunnels", "10s"])
            procs.append(new)
            replicas[address] = new
            lb.replace(old, new)
            eventually(new.ready, timeout=10)
            assert new.get().text == "app"
        time.sleep(0.5)
    print(f"rolling restart of 3 replicas in {time.monotonic() - started:.1f} s: {load.ok} requests "
          f"(a third of them 256 KiB uploads), {len(load.failures)} failed")
    assert not load.failures, load.failures[:5]
    assert load.ok > 50


class ReadinessBalancer:
    """TCP load balancer on 127.0.0.1: each new connection goes round-robin to a replica
    whose /readyz answered 200 at the last check (every 0.2 s), as a cloud LB or
    kube-proxy with readiness does; bytes are then copied both ways."""

    def __init__(self, replicas) -> None:
        self.replicas = list(replicas)
        self.ready: set = set(self.replicas)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._next = 0

    def __enter__(self):
        threading.Thread(target=self._check, daemon=True).start()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.sock.close()

    def replace(self, old, new) -> None:
        self.replicas[self.replicas.index(old)] = new
        self.ready.discard(old)

    def _check(self) -> None:
        while not self._stop.is_set():
            self.ready = {r for r in list(self.replicas) if r.ready()}
            self._stop.wait(0.2)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        ready = [r for r in self.replicas if r in self.ready]
        if not ready:
            conn.close()
            return
        self._next += 1
        replica = ready[self._next % len(ready)]
        try:
            upstream = socket.create_connection((replica.address, replica.http_port), timeout=5)
        except OSError:
            conn.close()
            return

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        t = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
        t.start()
        pipe(conn, upstream)
        t.join(30)
        conn.close()
        upstream.close()


def test_drain_finishes_uploads_and_streams_in_flight_then_exits_0(certs, groups_file, procs):
    from .conftest import Server, TunnelClient
    server = Server(certs, groups_file, extra=["--drain-delay", "1s", "--drain-timeout", "20s",
                                               "--management-address", "127.0.0.1:0"])
    procs.append(server)
    management = server.wait_for(r"management on tcp (\S+)").group(1)
    procs.append(TunnelClient(server, certs))
    results = {}

    def slow_upload():
        def body():
            for _ in range(10):
                time.sleep(0.2)
                yield b"x" * 10000
        r = requests.post(server.url("/upload"), data=body(), headers={"Host": "app.test"}, timeout=20)
        results["upload"] = r.status_code, r.json()

    def stream():
        with requests.get(server.url("/sse?delay=1.5"), headers={"Host": "app.test"}, stream=True, timeout=20) as r:
            results["sse"] = r.status_code, b"".join(r.iter_content(None))

    threads = [threading.Thread(target=slow_upload), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # both in flight
    server.popen.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    eventually(lambda: requests.get(f"http://{management}/readyz", timeout=2).status_code == 503,
               timeout=0.5, interval=0.01)  # at once
    assert requests.get(server.url("/name"), headers={"Host": "app.test"}, timeout=5).text == "app"  # in the delay
    eventually(lambda: _refused(server.http_port), timeout=5)  # then no new connections
    assert time.monotonic() - signalled >= 0.9
    for t in threads:
        t.join(20)
    assert results["upload"] == (200, {"size": 100000, "sha256": hashlib.sha256(b"x" * 100000).hexdigest()})
    assert results["sse"] == (200, b"data: first\n\ndata: second\n\n")  # its second event after the delay
    assert server.popen.wait(20) == 0
    server.wait_for(r"drained in [\d.]+s")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


@pytest.mark.skipif(go_missing_reason() is not None, reason=go_missing_reason() or "")
def test_a_go_client_of_a_drained_replica_redials_and_is_served_again(certs, groups_file, procs):
    """What a Go client gets from HA: no replica list (it dials one address), but a drained
    replica's orderly close makes it redial at once (its own backoff gives up after ~5
    failures in its life)."""
    ports = free_ports([socket.SOCK_DGRAM, socket.SOCK_STREAM, socket.SOCK_STREAM])
    replica = Replica(certs, groups_file, "127.0.0.1", ports, extra=["--drain-delay", "0s"])
    procs.append(replica)
    with local_service("go") as go_local:
        go = GoClient(replica, certs, go_local.url)
        procs.append(go)
        assert replica.get().text == "go"
        replica.popen.send_signal(signal.SIGTERM)
        assert replica.popen.wait(10) == 0
        again = Replica(certs, groups_file, "127.0.0.1", ports)
        procs.append(again)
        eventually(lambda: again.get().status_code == 200, timeout=10)
        assert again.get().text == "go"
