"""Handshake floods (reverst.quic._admission): Retry, caps, the handshake timeout and the
anti-amplification limit, over real UDP on 127.0.0.1 against a reverstd process.

Flood packets come from other loopback addresses (Linux accepts all of 127.0.0.0/8): valid
client Initials (bench/flood.py's InitialForge: a real ClientHello under fresh connection
ids) that are never answered.
"""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

import gevent
import gevent.event
import pytest

from reverst.client import BasicAuth, Client
from reverst.quic import available_backends, parse_header_untrusted
from reverst.quic._admission import Admission, InvalidToken, RetryTokens, encode_retry

from .apps import app as flask_app
from .conftest import ROOT
from .gopeer import GoClient, go_missing_reason, local_service
from .observe import ManagedServer, eventually
from .relay import Impairment, load_bench, relay_factory  # noqa: F401 (fixture)

flood = load_bench("flood")

HANDSHAKE_TIMEOUT = 2.0


def tunnel_address(server) -> tuple[str, int]:
    host, port = server.tunnel_address.rsplit(":", 1)
    return host, int(port)


@pytest.fixture
def managed(certs, groups_file, procs):
    """``managed(retry)``: reverstd with ``--quic-retry retry`` and a management listener."""
    def start(retry: str, *extra):
        server = ManagedServer(certs, groups_file, extra=["--quic-retry", retry,
                                                          "--handshake-timeout", f"{HANDSHAKE_TIMEOUT}s", *extra])
        procs.append(server)
        return server
    return start


def register(server, certs, backend: str | None = None, timeout: float = 5.0) -> float:
    """Seconds until our client's registration was accepted (fails after ``timeout``)."""
    ready = gevent.event.Event()
    client = Client(flask_app, server.tunnel_address, tunnel_group="app.test", server_name="localhost",
                    ca_file=certs["ca"], auth=BasicAuth("user", "pass"), quic_backend=backend,
                    on_ready=lambda c: ready.set(), max_retries=5)
    started = time.monotonic()
    runner = gevent.spawn(client.dial_and_serve)
    try:
        assert ready.wait(timeout), f"no registration within {timeout}s"
        return time.monotonic() - started
    finally:
        client.stop(1)
        runner.join(2)
        runner.kill(block=False)


def wait_until(check, timeout: float, interval: float = 0.1) -> bool:
    """Whether ``check()`` came true within ``timeout`` (in greenlets: this process's QUIC
    endpoints keep running meanwhile, as tests.observe.eventually's time.sleep would not let them)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(interval)
    return True


def raw_socket(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(0.5)
    return s


def receive_all(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram that arrives within ``seconds``."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(65536))
        except (socket.timeout, ConnectionRefusedError):
            continue
    return got


def parse_retry(data: bytes) -> tuple[bytes, bytes]:
    """(source connection id, token) of a Retry packet."""
    assert data[0] & 0x80 and (data[0] & 0x30) >> 4 == 0x3, "not a QUIC v1 Retry"
    pos = 5
    pos += 1 + data[pos]  # destination id (the client's source id)
    scid = data[pos + 1:pos + 1 + data[pos]]
    pos += 1 + data[pos]
    return scid, data[pos:-16]


# -- sans-io: tokens and Retry packets ---------------------------------------------------------------
def test_retry_packets_match_aioquics_encoding_for_v1_and_v2():
    from aioquic.quic.packet import encode_quic_retry
    for version in (0x00000001, 0x6B3343CF):
        header = parse_header_untrusted(bytes([0xC0]) + version.to_bytes(4, "big") + b"\x08" + os.urandom(8)
                                        + b"\x08" + os.urandom(8) + b"\x00" * 1200)
        retry_cid, token = os.urandom(8), os.urandom(40)
        ours = encode_retry(header, retry_cid, token)
        assert ours == encode_quic_retry(version=version, source_cid=retry_cid, destination_cid=header.source_cid,
                                         original_destination_cid=header.destination_cid, retry_token=token,
                                         unused=ours[0] & 0x0F)


def test_tokens_are_bound_to_address_retry_id_and_time():
    tokens = RetryTokens()
    addr, odcid, rscid = ("127.0.0.1", 4433), os.urandom(8), os.urandom(8)
    token = tokens.issue(addr, odcid, rscid, now=100.0)
    assert tokens.check_untrusted(token, addr, rscid, now=101.0) == odcid
    for args in [(("127.0.0.1", 4434), rscid, 101.0), (("127.0.0.2", 4433), rscid, 101.0),
                 (addr, os.urandom(8), 101.0), (addr, rscid, 100.0 + tokens.lifetime + 0.1)]:
        with pytest.raises(InvalidToken):
            tokens.check_untrusted(token, *args)
    tampered = bytearray(token)
    tampered[5] ^= 1
    with pytest.raises(InvalidToken):
        tokens.check_untrusted(bytes(tampered), addr, rscid, now=101.0)
    with pytest.raises(InvalidToken):  # another process's key
        RetryTokens().check_untrusted(token, addr, rscid, now=101.0)
    assert "key" not in repr(tokens) and token.hex() not in repr(tokens)


def test_admission_caps_retry_and_handshake_timeout():
    initial = parse_header_untrusted(b"\xc0\x00\x00\x00\x01\x08" + b"d" * 8 + b"\x08" + b"s" * 8 + b"\x00" * 1200)
    a = Admission("auto", retry_threshold=2, max_handshakes=3, max_handshakes_per_address=2,
                  max_unregistered=2, max_unregistered_per_address=1, handshake_timeout=5.0, known_reserve=1)
    verdicts = []
    for i in range(3):
        v = a.admit_untrusted(initial, b"", (f"127.0.0.{i + 1}", 1000), 0.0, b"r" * 8)
        verdicts.append(v.action)
        if v.action == "accept":
            a.started(i, (f"127.0.0.{i + 1}", 1000), 0.0)
    assert verdicts == ["accept", "accept", "retry"] and a.handshaking == 2 and a.retries == 1
    a.handshake_done(0)
    a.registered(0)  # 127.0.0.1 is known now
    assert a.handshaking == 1 and a.unregistered == 0
    never = Admission("never", max_handshakes=1, max_handshakes_per_address=5)
    never.started("x", ("10.0.0.1", 1), 0.0)
    assert never.admit_untrusted(initial, b"", ("10.0.0.2", 1), 0.0, b"r" * 8).reason == "handshakes"
    assert never.expired(4.9) == [] and never.expired(5.0) == ["x"]
    assert never.handshaking == 0 and never.refused["handshake_timeout"] == 1
    never.ended("x")  # (after the drop: no double count)
    assert never.handshaking == 0



def test_expired_tokens_get_a_bounded_number_of_closes_and_forged_ones_none():
    """CLOSE_BURST closes at once (a client's connections whose tokens expired together),
    then MAX_CLOSES_PER_SECOND a second; a token for another address gets none."""
    from reverst.quic._admission import CLOSE_BURST, MAX_CLOSES_PER_SECOND
    addr, odcid, rscid = ("127.0.0.1", 4433), os.urandom(8), os.urandom(8)
    initial = parse_header_untrusted(b"\xc0\x00\x00\x00\x01\x08" + rscid + b"\x08" + b"s" * 8 + b"\x00" * 1200)
    a = Admission("auto", tokens=RetryTokens(lifetime=1.0))
    token = a.tokens.issue(addr, odcid, rscid, now=100.0)

    def actions(n, now):
        return [a.admit_untrusted(initial, token, addr, now, b"r" * 8).action for _ in range(n)]
    assert a.admit_untrusted(initial, token, addr, 102.0, b"r" * 8) == ("close", odcid, rscid, "invalid_token")
    late = actions(CLOSE_BURST + 4, 102.0)
    assert late.count("close") == CLOSE_BURST - 1 and late[-5:] == ["drop"] * 5  # the rest dropped
    assert actions(MAX_CLOSES_PER_SECOND + 3, 103.0).count("close") == MAX_CLOSES_PER_SECOND  # a second on
    assert actions(1, 103.0) == ["drop"]
    assert actions(20, 103.25).count("close") == MAX_CLOSES_PER_SECOND // 4  # a quarter second on
    other = a.admit_untrusted(initial, token, ("127.0.0.2", 4433), 103.25, b"r" * 8)  # not its address
    assert other.action == "drop"
    assert a.refused["invalid_token"] == 1 + CLOSE_BURST + 4 + MAX_CLOSES_PER_SECOND + 3 + 1 + 20 + 1


def test_per_address_caps_hold_from_half_of_the_totals():
    """One address (a NAT, a client with many connections) may use the free room; once a
    stage holds half its total cap, the per-address caps hold again."""
    initial = parse_header_untrusted(b"\xc0\x00\x00\x00\x01\x08" + b"d" * 8 + b"\x08" + b"s" * 8 + b"\x00" * 1200)
    a = Admission("never", max_handshakes=8, max_handshakes_per_address=2, max_unregistered=8,
                  max_unregistered_per_address=2)

    def admit(ip, key):
        v = a.admit_untrusted(initial, b"", (ip, 1000), 0.0, b"r" * 8)
        if v.action == "accept":
            a.started(key, (ip, 1000), 0.0)
        return v.reason or v.action
    assert [admit("10.0.0.1", i) for i in range(6)] == ["accept"] * 4 + ["handshakes_per_address"] * 2
    assert [admit("10.0.0.2", i) for i in range(10, 13)] == ["accept", "accept", "handshakes_per_address"]
    assert [a.handshake_done(i) for i in range(4)] == [True] * 4  # 10.0.0.1: 4 unregistered (half of 8)
    assert [a.handshake_done(i) for i in (10, 11)] == [True, True]  # 10.0.0.2: its own 2
    assert a.unregistered == 6 and a.refused["unregistered_per_address"] == 0
    assert admit("10.0.0.1", 20) == "unregistered_per_address"
    assert admit("10.0.0.3", 21) == "accept"


def test_admission_unregistered_caps_hold_at_handshake_completion():
    """The unregistered caps are checked at the Initial, but handshakes admitted before the
    count filled finish later: those past the caps are refused at completion (the shell closes
    them, 0x1 "server busy"), so ``unregistered`` never exceeds ``max_unregistered``."""
    a = Admission("never", max_handshakes=10, max_handshakes_per_address=10, max_unregistered=2,
                  max_unregistered_per_address=2, known_reserve=1)
    for i in range(4):
        a.started(i, (f"10.0.0.{i % 2}", 1), 0.0)
    assert [a.handshake_done(i) for i in range(4)] == [True, True, False, False]
    assert a.unregistered == 2 and a.handshaking == 0 and a.refused["unregistered"] == 2
    a.ended(2)  # (its close: nothing counted any more)
    assert a.unregistered == 2
    a.ended(0)
    assert a.unregistered == 1
    for i in range(4, 7):
        a.started(i, ("10.0.0.9", 1), 0.0)
    assert [a.handshake_done(i) for i in range(4, 7)] == [True, False, False]
    assert a.unregistered == 2 and a.refused["unregistered"] == 4
    # one handshake_timeout refusal per connection, however often expired() runs
    a.started("slow", ("10.0.0.8", 1), 0.0)
    assert a.expired(10.0) == ["slow"] and a.expired(20.0) == [] and a.refused["handshake_timeout"] == 1

# -- a client registers through a Retry ---------------------------------------------------------------
@pytest.mark.parametrize("retry", ["always", "never"])
@pytest.mark.parametrize("backend", available_backends())
def test_our_client_registers_promptly_with_and_without_a_retry(managed, certs, retry, backend):
    server = managed(retry)
    register(server, certs, backend)  # (the libraries loaded in this process)
    took = register(server, certs, backend)
    # (an aioquic client to a qh3 reverstd once stalled 1.2 s: qh3 lost its first flight)
    assert took < 0.8, f"registration took {took:.2f}s"
    retries = server.metrics()["reverst_quic_retry_packets_total"]
    assert (retries >= 2) if retry == "always" else (retries == 0)


@pytest.mark.skipif(go_missing_reason() is not None, reason=go_missing_reason() or "")
def test_the_go_client_registers_through_a_retry(managed, certs, procs):
    server = managed("always")
    with local_service() as local:
        client = GoClient(server, certs, local.url)
        procs.append(client)
        assert server.metrics()["reverst_quic_retry_packets_total"] >= 1
        server.wait_for(r"tunnel \S+ registered in group 'app.test'")


# -- tokens on the wire --------------------------------------------------------------------------------
def test_a_forged_or_misused_token_gets_no_connection_and_a_good_one_does(managed):
    server = managed("always")
    target = tunnel_address(server)
    forge = flood.InitialForge()
    with raw_socket() as sock, raw_socket() as other:
        initial = forge.make()
        sock.sendto(initial, target)
        retry = sock.recv(65536)
        assert len(retry) < len(initial) / 3
        retry_cid, token = parse_retry(retry)
        # for another address, another destination id, forged: dropped, nothing comes back
        other.sendto(forge.make(token=token, dcid=retry_cid), target)
        sock.sendto(forge.make(token=token), target)
        sock.sendto(forge.make(token=token[:-1] + bytes([token[-1] ^ 1]), dcid=retry_cid), target)
        assert receive_all(other, 0.3) == [] and receive_all(sock, 0.3) == []
        assert server.metrics()["reverst_quic_handshakes_refused_total", {"reason": "invalid_token"}] == 3
        # the token as given, from its address to the Retry's id: a connection (its handshake answer)
        sock.sendto(forge.make(token=token, dcid=retry_cid), target)
        answer = sock.recv(65536)
        assert answer[0] & 0xF0 == 0xC0  # a long-header Initial
        assert server.metrics()["reverst_quic_handshakes_in_progress"] == 1


# -- amplification ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["inside", "after"])
def test_an_unvalidated_address_gets_at_most_three_times_what_it_sent(managed, padding):
    """Without a Retry the server answers an Initial it cannot validate with its handshake
    flight, and retransmits it while the client stays silent: never more than 3x the bytes."""
    server = managed("never")
    target = tunnel_address(server)
    with raw_socket("127.10.0.7") as sock:
        datagram = flood.InitialForge().make() if padding == "inside" else flood.aioquic_initial()
        sock.sendto(datagram, target)
        got = receive_all(sock, HANDSHAKE_TIMEOUT + 1.0)
    received = sum(map(len, got))
    assert got, "the server never answered"
    assert received <= 3 * len(datagram), f"{received} bytes answered {len(datagram)}"


# -- floods ------------------------------------------------------------------------------------------------
def start_flood(server, mode: str, rate: int, duration: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "flood.py"), "--worker", mode,
                             "--target", server.tunnel_address, "--rate", str(rate), "--duration", str(duration),
                             "--addresses", str(int(rate * duration)), "--settle", "0"],
                            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("retry", ["auto", "never"])
def test_a_flood_of_initials_is_capped_freed_and_with_retry_does_not_delay_registrations(managed, certs, retry):
    server = managed(retry)
    register(server, certs)
    flooder = start_flood(server, "initials", rate=1500, duration=3.0)
    try:
        gevent.sleep(0.5)
        peak = 0.0
        times = []
        for _ in range(5):
            peak = max(peak, server.metrics()["reverst_quic_handshakes_in_progress"])
            if retry == "auto":
                times.append(register(server, certs))
            else:
                gevent.sleep(0.4)
        assert flooder.wait(10) == 0
    finally:
        flooder.kill()
    metrics = server.metrics()
    assert 0 < peak <= 256 + 32
    if retry == "auto":
        assert metrics["reverst_quic_retry_packets_total"] > 1000
        assert statistics.median(times) < 0.5 and max(times) < 1.0, times
    else:
        assert metrics["reverst_quic_handshakes_refused_total", {"reason": "handshakes"}] > 1000
    # every connection the flood started is dropped at the handshake timeout
    assert eventually(lambda: server.metrics()["reverst_quic_handshakes_in_progress"] == 0,
                      timeout=HANDSHAKE_TIMEOUT + 3)
    assert server.metrics()["reverst_quic_handshakes_refused_total", {"reason": "handshake_timeout"}] >= 1
    register(server, certs)  # and a client still gets in


@pytest.mark.parametrize("backend_name", available_backends())
def test_a_late_token_gets_an_invalid_token_close_not_silence(certs, relay_factory, backend_name):
    """A client whose token-bearing Initial arrives after the token expired (dropped before
    by a cap, a slow path) is real but will not take a second Retry: it is answered with a
    CONNECTION_CLOSE of INVALID_TOKEN at once (RFC 9000 §8.1.3), not left to its handshake
    timeout. A relay delays each client packet past the token's (shortened) lifetime."""
    from reverst._transport import Endpoint
    from reverst.quic import INVALID_TOKEN, load_backend
    backend = load_backend(backend_name)
    server_cfg = backend.server_configuration(certificate_path=str(certs["cert"]), private_key_path=str(certs["key"]),
                                              idle_timeout=30.0)
    server = Endpoint.bind("127.0.0.1", 0, backend=backend, server_config=server_cfg,
                           admission=Admission("always", tokens=RetryTokens(lifetime=0.3)))
    server.start()
    relay = relay_factory(server.address, up=Impairment(delay=0.45))
    client = Endpoint.bind("127.0.0.1", 0, backend=backend)
    client.start()
    try:
        cfg = backend.client_configuration(server_name="localhost", idle_timeout=30.0, max_datagram_size=1452,
                                           insecure=True)
        conn = client.connect(relay.address, cfg)
        assert conn.closed.wait(3), "no answer to the late token"
        assert conn.close_reason.error_code == INVALID_TOKEN, conn.close_reason
        assert server.admission.refused["invalid_token"] >= 1 and server.admission.handshaking == 0
    finally:
        client.close()
        server.close()


# -- connections that never register ------------------------------------------------------------------
def test_a_connection_that_never_registers_is_gone_soon_after_the_registration_timeout(managed, relay_factory):
    """A connection past the handshake that never registers is closed at the registration
    timeout, and leaves the counts soon after, however long its round trip looked: its closing
    period (RFC 9000 §10.2: 3 PTO) is bounded. (Under a flood the RTT samples, taken while
    reverstd is starved of CPU, made 3 PTO 8-20 s: the unregistered count lagged that long.)
    A round trip of 0.6 s through a relay stands in for the starvation here."""
    from reverst._transport import Endpoint
    from reverst.quic import load_backend
    registration_timeout = 2.0
    server = managed("never", "--registration-timeout", f"{registration_timeout}s")
    relay = relay_factory(server, up=Impairment(delay=0.3), down=Impairment(delay=0.3))
    backend = load_backend()
    cfg = backend.client_configuration(server_name="localhost", idle_timeout=30.0, max_datagram_size=1452,
                                       insecure=True)
    endpoint = Endpoint.bind("127.0.0.1", 0, backend=backend)
    endpoint.start()
    try:
        conn = endpoint.connect(relay.address, cfg)
        assert conn.handshake_done.wait(5), "no handshake"
        assert wait_until(lambda: server.metrics()["reverst_quic_unregistered_connections"] == 1, 2.0)
        # reverstd closes it at the registration timeout (counted from its first packet)...
        assert conn.closed.wait(registration_timeout + 2), "not closed at the registration timeout"
        assert conn.close_reason.error_code == 0x1 and "timed out" in str(conn.close_reason)
        closed = time.monotonic()
        # ... and forgets it one (bounded) closing period later: not 3 PTO (~5 s here)
        assert wait_until(lambda: server.metrics()["reverst_quic_unregistered_connections"] == 0, 30.0)
        took = time.monotonic() - closed
    finally:
        endpoint.close()
    assert took < 1.5, f"still counted {took:.1f}s after its close"
