"""The impairment relay (bench/relay.py, through tests/relay.py) on real UDP sockets on loopback,
and one tunnel through it: reverstd and a tunnel client with 1% loss and 10 ms each way."""
from __future__ import annotations

import collections
import hashlib
import json
import math
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests

from .apps import pattern
from .conftest import ROOT, Server, TunnelClient
from .relay import (Impairment, PATH, parse_duration, parse_probability, parse_rate, relay_factory,  # noqa: F401
                    relay_module, through)

HEADER = struct.Struct("!Id")  # sequence number, send time (monotonic)
# Timing is checked strictly where a busy machine cannot help (never earlier, never faster than
# configured) and with this much slack where it can (a descheduled relay or receiver is late).
LATE = 0.06


class Peer:
    """A UDP socket on 127.0.0.1 whose datagrams a thread records as (arrival time, payload, source);
    with ``echo`` it sends each one back to its source."""

    def __init__(self, echo=False):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = self.sock.getsockname()
        self.echo = echo
        self.got: list[tuple[float, bytes, tuple]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data, source = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                if self._stop:
                    return
                continue
            now = time.monotonic()
            if self.echo:
                self.sock.sendto(data, source)
            with self._cond:
                self.got.append((now, data, source))
                self._cond.notify_all()

    def send(self, data, to):
        self.sock.sendto(data, tuple(to))

    def wait_count(self, n, timeout=5.0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.got) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return len(self.got)

    def settle(self, quiet=0.15, timeout=5.0) -> int:
        """Until nothing arrived for ``quiet`` seconds (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        count = -1
        while time.monotonic() < deadline:
            with self._cond:
                if len(self.got) == count:
                    return count
                count = len(self.got)
            time.sleep(quiet)
        return len(self.got)

    def seqs(self) -> list[int]:
        return [HEADER.unpack_from(d)[0] for _, d, _ in self.got]

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def peers():
    made = []

    def make(echo=False):
        made.append(Peer(echo))
        return made[-1]
    yield make
    for p in made:
        p.close()


def blast(sender: Peer, to, n, size=64, start=0, batch=100, pause=0.001):
    """``n`` numbered datagrams, in batches (the relay's socket buffer never overflows)."""
    pad = b"." * max(0, size - HEADER.size)
    for i in range(start, start + n):
        sender.send(HEADER.pack(i, time.monotonic()) + pad, to)
        if (i - start) % batch == batch - 1:
            time.sleep(pause)


def latencies(peer: Peer) -> list[float]:
    return [t - HEADER.unpack_from(d)[1] for t, d, _ in peer.got]


def wait_received(relay, n, direction="up", timeout=5.0):
    deadline = time.monotonic() + timeout
    while relay.stats()[direction]["received"] < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert relay.stats()[direction]["received"] >= n


def balanced(s: dict) -> bool:
    """Every datagram (and every duplicate) is either forwarded, dropped or still in flight."""
    return s["received"] + s["duplicated"] == s["forwarded"] + s["dropped_total"] + s["in_flight"]


def binomial_bounds(n, p, sigmas=6):
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


# -- parsing -------------------------------------------------------------------------------------
def test_durations_rates_and_probabilities_parse_like_the_cli_expects():
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("250us") == pytest.approx(0.00025)
    assert parse_duration("0") == 0.0
    assert parse_rate("10mbit") == 1.25e6
    assert parse_rate("500kbit") == 62500
    assert parse_rate("2MB") == 2e6
    assert parse_rate("64KiB") == 65536
    assert parse_rate("none") is None
    assert parse_probability("1%") == pytest.approx(0.01)
    assert parse_probability("0.5") == 0.5
    for bad, parse in (("20 parsecs", parse_duration), ("10 furlongs", parse_rate), ("150%", parse_probability)):
        with pytest.raises(ValueError):
            parse(bad)
    with pytest.raises(ValueError):
        Impairment(loss=1.5)
    args = relay_module.build_parser().parse_args(
        ["--target", "127.0.0.1:1", "--loss", "1%", "--delay", "20ms", "--up-loss", "5%", "--down-rate", "10mbit"])
    imps = relay_module.impairments_from(args)
    assert imps["up"] == Impairment(loss=0.05, delay=0.02)
    assert imps["down"] == Impairment(loss=0.01, delay=0.02, rate=1.25e6)


# -- forwarding ----------------------------------------------------------------------------------
def test_forwards_both_ways_for_several_clients_each_with_its_own_upstream_socket(peers, relay_factory):
    echo = peers(echo=True)
    relay = relay_factory(echo.address)
    clients = [peers() for _ in range(4)]
    for round_ in range(10):
        for i, c in enumerate(clients):
            c.send(b"client %d round %d" % (i, round_), relay.address)
    for i, c in enumerate(clients):
        assert c.wait_count(10) == 10
        assert sorted(d for _, d, _ in c.got) == sorted(b"client %d round %d" % (i, r) for r in range(10))
        assert {src for _, _, src in c.got} == {relay.address}
    sources = {src for _, _, src in echo.got}
    assert len(sources) == 4 and not sources & {c.address for c in clients}
    s = relay.stats()
    assert s["flows"] == 4 and s["flows_opened"] == 4
    assert s["up"]["forwarded"] == s["down"]["forwarded"] == 40


def test_idle_flows_expire_and_a_new_datagram_opens_a_new_one(peers, relay_factory):
    echo = peers(echo=True)
    relay = relay_factory(echo.address, idle_timeout=0.3)
    client = peers()
    client.send(b"one", relay.address)
    assert client.wait_count(1) == 1
    deadline = time.monotonic() + 3
    while relay.stats()["flows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.stats()["flows_expired"] == 1
    client.send(b"two", relay.address)
    assert client.wait_count(2) == 2
    assert relay.stats()["flows_opened"] == 2


# -- impairments ---------------------------------------------------------------------------------
def test_loss_rate_is_close_to_the_configured_one(peers, relay_factory):
    n, p = 4000, 0.1
    sink = peers()
    relay = relay_factory(sink.address, up=Impairment(loss=p), seed=3)
    sender = peers()
    blast(sender, relay.address, n)
    relay.wait_idle()
    got = sink.settle()
    s = relay.stats()["up"]
    assert s["received"] == n  # none lost before the relay: the figure below is the relay's
    low, high = binomial_bounds(n, p)
    assert low <= s["dropped"]["loss"] <= high, s
    assert got == s["forwarded"] == n - s["dropped"]["loss"]
    assert sorted(set(sink.seqs())) == sorted(sink.seqs())  # no duplicates


def test_delay_is_added_one_way_and_only_in_its_direction(peers, relay_factory):
    echo = peers(echo=True)
    relay = relay_factory(echo.address, up=Impairment(delay=0.04))
    client = peers()
    for i in range(20):
        blast(client, relay.address, 1, start=i)
        time.sleep(0.003)
    assert echo.wait_count(20) == 20 and client.wait_count(20) == 20
    one_way = latencies(echo)
    assert min(one_way) >= 0.04
    assert sorted(one_way)[10] < 0.04 + LATE / 2, one_way
    assert max(one_way) < 0.04 + LATE, one_way
    # the echo's own way back is clean: a round trip is the up delay plus a little
    assert max(t - HEADER.unpack_from(d)[1] for t, d, _ in client.got) < 0.04 + LATE


def test_jitter_spreads_the_delay_uniformly_and_reorders(peers, relay_factory):
    sink = peers()
    relay = relay_factory(sink.address, up=Impairment(delay=0.01, jitter=0.04), seed=5)
    sender = peers()
    n = 200
    blast(sender, relay.address, n, batch=10, pause=0.001)
    assert sink.wait_count(n) == n
    lat = latencies(sink)
    assert min(lat) >= 0.01
    assert max(lat) < 0.01 + 0.04 + LATE
    assert max(lat) - min(lat) > 0.025  # spread over most of 0..40 ms
    mean = sum(lat) / n  # uniform: 10 + 20 ms on average
    assert 0.01 + 0.02 - 0.008 < mean < 0.01 + 0.02 + LATE / 2, mean
    seqs = sink.seqs()
    assert sorted(seqs) == list(range(n))
    inversions = sum(1 for a, b in zip(seqs, seqs[1:]) if b < a)
    assert inversions > n // 10, seqs


def test_jitter_without_reordering_keeps_the_order(peers, relay_factory):
    sink = peers()
    relay = relay_factory(sink.address, up=Impairment(delay=0.01, jitter=0.03, reorder=False), seed=5)
    sender = peers()
    blast(sender, relay.address, 100, batch=5, pause=0.002)
    assert sink.wait_count(100) == 100
    assert sink.seqs() == list(range(100))
    lat = latencies(sink)
    assert min(lat) >= 0.01 and max(lat) - min(lat) > 0.01


GEVENT_PATCHED = r"""
from gevent import monkey
monkey.patch_all()
import importlib.util, socket, sys, time
spec = importlib.util.spec_from_file_location("relay", sys.argv[1])
relay_module = importlib.util.module_from_spec(spec)
sys.modules["relay"] = relay_module
spec.loader.exec_module(relay_module)
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.bind(("127.0.0.1", 0))
with relay_module.Relay(sink.getsockname(), seed=1) as relay:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.sendto(b"through", relay.address)
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # never yields to the gevent hub
        pass
    forwarded = relay.stats(timeout=1)["up"]["forwarded"]
    sink.settimeout(2)
    print(forwarded, sink.recv(100).decode())
    client.close()
sink.close()
"""


def test_runs_in_a_native_thread_in_a_gevent_patched_process():
    done = subprocess.run([sys.executable, "-c", GEVENT_PATCHED, str(PATH)], cwd=ROOT, capture_output=True,
                          text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "through"], done.stdout + done.stderr


def test_duplication(peers, relay_factory):
    n, p = 2000, 0.25
    sink = peers()
    relay = relay_factory(sink.address, up=Impairment(dup=p), seed=11)
    sender = peers()
    blast(sender, relay.address, n)
    relay.wait_idle()
    got = sink.settle()
    s = relay.stats()["up"]
    low, high = binomial_bounds(n, p)
    assert low <= s["duplicated"] <= high, s
    assert got == n + s["duplicated"] == s["forwarded"]
    counts = collections.Counter(sink.seqs())
    assert set(counts) == set(range(n)) and set(counts.values()) == {1, 2}
    assert sum(1 for v in counts.values() if v == 2) == s["duplicated"]


def test_bandwidth_cap_paces_a_burst_and_drop_tail_holds_the_rate(peers, relay_factory):
    rate = 250_000  # bytes/s
    sink = peers()
    relay = relay_factory(sink.address, up=Impairment(rate=rate, queue_time=2.0))
    sender = peers()
    # a 125 kB burst into a queue long enough for all of it: paced out at the rate, none dropped
    blast(sender, relay.address, 125, size=1000, batch=125)
    assert sink.wait_count(125, timeout=3) == 125
    times = [t for t, _, _ in sink.got]
    span = times[-1] - times[0]
    assert span >= 0.95 * 124 * 1000 / rate  # never faster than the cap
    assert span < 124 * 1000 / rate + LATE * 2, span
    assert relay.stats()["up"]["dropped"]["queue"] == 0

    # offered at twice the rate for 0.6 s into the default 100 ms queue: the excess is dropped,
    # what gets through arrives at the cap
    sink.got.clear()
    relay.set(up=Impairment(rate=rate))
    end, i = time.monotonic() + 0.6, 0
    while time.monotonic() < end:
        blast(sender, relay.address, 10, size=1000, start=1000 + i, batch=10, pause=0)
        i += 10
        time.sleep(10 * 1000 / (2 * rate))
    relay.wait_idle()
    got = sink.settle()
    s = relay.stats()["up"]
    times = [t for t, _, _ in sink.got]
    span = times[-1] - times[0]
    assert 0.95 * (got - 1) * 1000 / rate <= span < (got - 1) * 1000 / rate + LATE * 2
    assert s["dropped"]["queue"] > 0, s  # about i / 2 (fewer when a busy machine offers less)
    assert got == i - s["dropped"]["queue"]

    # a byte limit on the queue: a burst keeps only what fits
    relay.set(up=Impairment(rate=rate, queue_time=1.0, queue_bytes=5000))
    before = s["forwarded"]
    blast(sender, relay.address, 30, size=1000, start=5000, batch=30)
    relay.wait_idle()
    assert 5 <= relay.stats()["up"]["forwarded"] - before <= 8


def test_blackhole_drops_everything_and_the_path_recovers(peers, relay_factory):
    echo = peers(echo=True)
    relay = relay_factory(echo.address)
    client = peers()
    blast(client, relay.address, 20)
    assert client.wait_count(20) == 20
    relay.blackhole(True)
    blast(client, relay.address, 20, start=20)
    wait_received(relay, 40)
    time.sleep(0.05)
    assert len(echo.got) == 20 and len(client.got) == 20
    assert relay.stats()["up"]["dropped"]["blackhole"] == 20
    relay.blackhole(False)
    blast(client, relay.address, 20, start=40)
    assert client.wait_count(40) == 40
    relay.blackhole(True, "down")  # one-way: requests get there, answers do not
    blast(client, relay.address, 20, start=60)
    assert echo.wait_count(60) == 60
    wait_received(relay, 60, "down")
    time.sleep(0.05)
    assert len(client.got) == 40
    s = relay.stats()
    assert s["down"]["dropped"]["blackhole"] == 20 and s["up"]["dropped"]["blackhole"] == 20
    relay.blackhole(False, "down")
    blast(client, relay.address, 5, start=80)
    assert client.wait_count(45) == 45


def test_blackhole_mid_stream_from_another_thread(peers, relay_factory):
    sink = peers()
    relay = relay_factory(sink.address)
    sender = peers()
    stop = threading.Event()

    def stream():
        i = 0
        while not stop.is_set():
            blast(sender, relay.address, 5, start=i, batch=5, pause=0)
            i += 5
            time.sleep(0.002)
    t = threading.Thread(target=stream)
    t.start()
    try:
        time.sleep(0.15)
        relay.blackhole(True)
        time.sleep(0.05)
        frozen = len(sink.got)
        time.sleep(0.15)
        assert len(sink.got) == frozen
        relay.blackhole(False)
        assert sink.wait_count(frozen + 10, timeout=2) >= frozen + 10
    finally:
        stop.set()
        t.join(2)
    assert relay.stats()["up"]["dropped"]["blackhole"] > 0


def _pattern_of(peers, relay_factory, seed, loss, n=400):
    sink = peers()
    relay = relay_factory(sink.address, up=Impairment(loss=loss, dup=0.1), seed=seed)
    sender = peers()
    blast(sender, relay.address, n)
    relay.wait_idle()
    sink.settle(quiet=0.1)
    assert relay.stats()["up"]["received"] == n
    return collections.Counter(sink.seqs())


def test_the_same_seed_gives_the_same_decisions(peers, relay_factory):
    first = _pattern_of(peers, relay_factory, seed=42, loss=0.3)
    again = _pattern_of(peers, relay_factory, seed=42, loss=0.3)
    other = _pattern_of(peers, relay_factory, seed=43, loss=0.3)
    assert first == again
    assert first != other
    # the draws do not depend on the settings: what 20% loss drops, 30% drops too
    lighter = _pattern_of(peers, relay_factory, seed=42, loss=0.2)
    assert set(first) < set(lighter)


def test_stats_add_up(peers, relay_factory):
    echo = peers(echo=True)
    imp = Impairment(loss=0.1, dup=0.1, delay=0.005, jitter=0.005, rate=400_000, queue_time=0.02)
    relay = relay_factory(echo.address, up=imp, down=imp, seed=9)
    client = peers()
    blast(client, relay.address, 300, size=500, batch=20)
    wait_received(relay, 300)
    mid = relay.stats()
    assert balanced(mid["up"]) and balanced(mid["down"])
    relay.blackhole(True)
    blast(client, relay.address, 50, size=500, start=300)
    wait_received(relay, 350)  # the relay decides when it reads a datagram, not when it was sent
    relay.blackhole(False)
    blast(client, relay.address, 150, size=500, start=350, batch=20)
    relay.wait_idle()
    client.settle()
    relay.wait_idle()
    s = relay.stats()
    up, down = s["up"], s["down"]
    for d in (up, down):
        assert balanced(d) and d["in_flight"] == 0 and d["queue_bytes"] == 0 and d["queue_packets"] == 0
        assert d["dropped_total"] == sum(d["dropped"].values())
        assert d["dropped"]["error"] == 0
    assert up["received"] == 500 and up["dropped"]["blackhole"] == 50
    assert up["dropped"]["loss"] and up["dropped"]["queue"] and up["duplicated"]
    assert up["forwarded"] == len(echo.got) == down["received"]
    assert down["forwarded"] == len(client.got)
    assert up["bytes_forwarded"] == 500 * up["forwarded"]


def test_cli_relays_prints_its_address_and_stats_and_exits_on_sigterm(peers):
    echo = peers(echo=True)
    proc = subprocess.Popen(
        [sys.executable, str(PATH), "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo.address[1]}",
         "--delay", "5ms", "--loss", "0%", "--down-dup", "100%", "--seed", "1", "--stats-interval", "0.1",
         "--final-stats"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        assert m, line
        client = peers()
        blast(client, (m.group(1), int(m.group(2))), 5)
        assert client.wait_count(10) == 10  # every answer twice
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert re.search(r"flows=1 \| up: rx=5 tx=5", err), err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["up"]["forwarded"] == 5 and final["down"]["duplicated"] == 5


def download_checked(server, size: int, *, within: float, timeout) -> None:
    """GET /download/<size> through ``server``: every byte the app's pattern, in ``within`` s."""
    expected = hashlib.sha256(b"".join(pattern(size))).hexdigest()
    digest, got = hashlib.sha256(), 0
    start = time.monotonic()
    with requests.get(server.url(f"/download/{size}"), headers={"Host": "app.test"}, stream=True,
                      timeout=timeout) as r:
        assert r.status_code == 200
        for chunk in r.iter_content(65536):
            digest.update(chunk)
            got += len(chunk)
            assert time.monotonic() - start < within, f"only {got} bytes in {within} s"
    assert got == size and digest.hexdigest() == expected


# -- a tunnel through the relay ------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_2mb_download_through_a_tunnel_with_1pct_loss_and_10ms_each_way(certs, groups_file, procs,
                                                                          relay_factory):
    server = Server(certs, groups_file)
    procs.append(server)
    imp = Impairment(loss=0.01, delay=0.01)
    relay = relay_factory(server, up=imp, down=imp, seed=1)
    procs.append(TunnelClient(through(relay), certs))
    size = 2 * 1024 * 1024
    download_checked(server, size, within=30, timeout=(5, 15))
    s = relay.stats()
    assert s["flows"] == 1
    assert s["up"]["dropped"]["loss"] + s["down"]["dropped"]["loss"] > 0  # it did go through the relay
    assert s["up"]["bytes_forwarded"] > size  # the response flows from the tunnel client to reverstd


@pytest.mark.timeout(60)
def test_bodies_intact_both_ways_at_5pct_loss_with_reordering(certs, groups_file, procs, relay_factory):
    """5% loss and 10 ms each way with 5 ms of jitter that reorders, on both directions: a
    download and an upload (SHA-256 checked by the app) arrive whole, within a bound."""
    server = Server(certs, groups_file)
    procs.append(server)
    imp = Impairment(loss=0.05, delay=0.01, jitter=0.005)
    relay = relay_factory(server, up=imp, down=imp, seed=7)
    procs.append(TunnelClient(through(relay), certs))
    size = 256 * 1024
    download_checked(server, size, within=25, timeout=(10, 15))
    body = hashlib.sha256(b"up").digest() * (size // 32)
    r = requests.post(server.url("/upload"), data=body, headers={"Host": "app.test"}, timeout=(10, 25))
    assert r.status_code == 200
    assert r.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    s = relay.stats()
    assert s["up"]["dropped"]["loss"] and s["down"]["dropped"]["loss"]  # both directions lost some
