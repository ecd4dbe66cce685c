"""TunnelQuicConnection against a real in-memory peer: flow control, keep-alive, liveness.

Two sans-io connections are wired together by handing ``datagrams_to_send(now)`` of one
to ``receive_datagram(data, addr, now)`` of the other, driven by a fake clock through
``get_timer()``/``handle_timer()`` (aioquic ``tests/test_connection.py`` style): no
sockets, no sleeps.
"""
from __future__ import annotations

import random

import pytest

from reverst.protocol import AppErrorCode
from reverst.quic import BUSY_DEAD_PEER_TIMEOUT, BUSY_PROBE_INTERVAL, SUSPECT_GRACE

from .inmemory import (CLIENT_ADDR, LIBRARY, SERVER_ADDR, Link, QuicConnection, TunnelQuicConnection, events,
                       make_link)

KiB = 1024
MiB = 1024 * KiB
STREAM_WINDOW = 64 * KiB
CONN_WINDOW = 256 * KiB

aioquic_only = pytest.mark.skipif(LIBRARY != "aioquic", reason="per-stream consumption credit (aioquic "
                                  "backend); the qh3 backend's bound is per connection: test_qh3_*")
qh3_only = pytest.mark.skipif(LIBRARY != "qh3", reason="the qh3 backend's connection-wide gate")

@pytest.fixture
def small(tls) -> Link:
    """Handshaken pair with small windows so that flow control is quick to exercise."""
    return make_link(tls, max_stream_data=STREAM_WINDOW, max_data=CONN_WINDOW)


class Holder:
    """A reader that buffers every byte it receives and holds it (never reads it)."""

    def __init__(self, conn: TunnelQuicConnection) -> None:
        self.conn = conn
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.released: dict[int, int] = {}

    def __call__(self, event) -> None:
        if isinstance(event, events.StreamDataReceived):
            self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
            self.conn.hold(event.stream_id, len(event.data))
            if event.end_stream:
                self.ended.add(event.stream_id)
        assert not isinstance(event, events.ConnectionTerminated), event

    def received(self, stream_id: int | None = None) -> int:
        if stream_id is None:
            return sum(len(d) for d in self.data.values())
        return len(self.data.get(stream_id, b""))

    def held(self, stream_id: int) -> int:
        return self.received(stream_id) - self.released.get(stream_id, 0)

    def release(self, stream_id: int, nbytes: int | None = None) -> bool:
        n = self.held(stream_id) if nbytes is None else min(nbytes, self.held(stream_id))
        self.released[stream_id] = self.released.get(stream_id, 0) + n
        return self.conn.release(stream_id, n)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- flow control -----------------------------------------------------------------


@aioquic_only
@pytest.mark.parametrize("direction", ["client-to-server", "server-to-client"])
def test_receive_window_follows_consumption_not_arrival(small, direction):
    sender, receiver = ((small.client, small.server) if direction == "client-to-server"
                        else (small.server, small.client))
    reader = small.on_event[receiver] = Holder(receiver)
    body = payload(2 * MiB, seed=1)
    sid = sender.get_next_available_stream_id()
    sender.send_stream_data(sid, body, end_stream=True)

    # Nothing is ever read: exactly one window arrives, and it is not reopened
    # (plain aioquic doubles the window each time half of it has *arrived*).
    small.advance(2.0)
    assert reader.received(sid) == STREAM_WINDOW
    assert receiver._streams[sid].max_stream_data_local == STREAM_WINDOW
    assert receiver._local_max_data.value == CONN_WINDOW
    small.advance(5.0)
    assert reader.received(sid) == STREAM_WINDOW
    assert receiver._streams[sid].max_stream_data_local == STREAM_WINDOW
    assert sender.send_buffered(sid) == len(body) - STREAM_WINDOW

    # Read it 16 KiB at a time: never more than one window past what was read.
    due = []
    for _ in range(10_000):
        if sid in reader.ended:
            break
        due.append(reader.release(sid, 16 * KiB))
        small.advance(0.05)
        assert reader.received(sid) <= reader.released[sid] + STREAM_WINDOW
        assert receiver._local_max_data.used <= reader.released[sid] + CONN_WINDOW
    assert bytes(reader.data[sid]) == body
    assert True in due and False in due  # an update is due only after half a window
    assert receiver.closed_event is None and sender.closed_event is None


@aioquic_only
def test_connection_window_bounds_all_streams_together(small):
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    bodies = {}
    for i in range(8):  # 8 streams x one stream window = 2 x the connection window
        sid = sender.get_next_available_stream_id()
        bodies[sid] = payload(128 * KiB, seed=i)
        sender.send_stream_data(sid, bodies[sid], end_stream=True)

    small.advance(3.0)
    assert CONN_WINDOW // 2 < reader.received() <= CONN_WINDOW
    assert all(reader.received(sid) <= STREAM_WINDOW for sid in bodies)
    assert receiver._local_max_data.value == CONN_WINDOW

    for _ in range(10_000):
        if reader.ended == set(bodies):
            break
        released = 0
        for sid in bodies:
            reader.release(sid)
            released += reader.released.get(sid, 0)
        small.advance(0.05)
        assert reader.received() <= released + CONN_WINDOW
    assert {sid: bytes(reader.data[sid]) for sid in bodies} == bodies


@aioquic_only
def test_release_reports_when_an_update_is_due(small):
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    sid = sender.get_next_available_stream_id()
    sender.send_stream_data(sid, payload(STREAM_WINDOW, seed=2))
    small.advance(1.0)
    assert reader.received(sid) == STREAM_WINDOW
    assert receiver.release(sid, 0) is False
    assert receiver.release(sid + 400, 10) is False  # nothing held there
    assert reader.release(sid, STREAM_WINDOW // 2 - 1) is False
    assert reader.release(sid, 1) is True
    assert reader.release(sid) is True  # the rest (more than half a window)
    assert receiver.release(sid) is False  # nothing left


@aioquic_only
def test_send_buffered_counts_queued_unacknowledged_bytes(small):
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    sid = sender.get_next_available_stream_id()
    assert sender.send_buffered(sid) == 0  # no such stream yet

    sender.send_stream_data(sid, payload(10 * KiB, seed=3))
    assert sender.send_buffered(sid) == 10 * KiB
    assert sender.datagrams_to_send(now=small.now)  # sent, then lost: still buffered
    assert sender.send_buffered(sid) == 10 * KiB
    small.advance(2.0)  # retransmitted and acknowledged
    assert reader.received(sid) == 10 * KiB
    assert sender.send_buffered(sid) == 0

    # More than the window: what the peer holds unread stays queued here.
    sender.send_stream_data(sid, payload(200 * KiB, seed=4))
    small.advance(2.0)
    assert reader.received(sid) == STREAM_WINDOW
    assert sender.send_buffered(sid) == 10 * KiB + 200 * KiB - STREAM_WINDOW
    for _ in range(1000):
        if reader.received(sid) == 210 * KiB:
            break
        reader.release(sid)
        small.advance(0.05)
    small.advance(0.5)
    assert reader.received(sid) == 210 * KiB
    assert sender.send_buffered(sid) == 0


@qh3_only
def test_qh3_unread_data_is_bounded_by_the_budget_and_flows_again_when_read(small):
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    assert receiver.budget == CONN_WINDOW
    body = payload(4 * MiB, seed=1)
    sid = sender.get_next_available_stream_id()
    sender.send_stream_data(sid, body, end_stream=True)

    # Nothing is read: the gate shuts once the budget is held; credit stops with it.
    small.advance(3.0)
    held = reader.received(sid)
    assert CONN_WINDOW <= held <= 2 * CONN_WINDOW  # (the budget, and what one receive popped)
    left_sender = len(body) - sender.send_buffered(sid)
    small.advance(5.0)
    assert reader.received(sid) == held
    assert len(body) - sender.send_buffered(sid) == left_sender <= held + 2 * CONN_WINDOW

    # Read it 16 KiB at a time: the transfer resumes and completes intact.
    for _ in range(20_000):
        if sid in reader.ended:
            break
        reader.release(sid, 16 * KiB)
        small.advance(0.05)
        assert reader.received(sid) - reader.released[sid] <= 2 * CONN_WINDOW
    assert bytes(reader.data[sid]) == body
    assert receiver.closed_event is None and sender.closed_event is None


@qh3_only
def test_qh3_a_stream_nobody_reads_stalls_its_connection_once_the_budget_is_full(small):
    """The documented cost of the connection-wide gate (README, QUIC backends)."""
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    unread, read = sender.get_next_available_stream_id(), None
    sender.send_stream_data(unread, payload(2 * MiB, seed=2), end_stream=True)
    read = sender.get_next_available_stream_id()
    sender.send_stream_data(read, payload(2 * MiB, seed=3), end_stream=True)
    for _ in range(200):
        reader.release(read)
        small.advance(0.05)
    stalled = reader.received(read)
    assert stalled < 2 * MiB  # stalled behind the unread stream
    for _ in range(20):
        reader.release(read)
        small.advance(0.05)
    assert reader.received(read) == stalled
    for _ in range(20_000):  # the unread stream is read after all: both complete
        if reader.ended == {unread, read}:
            break
        reader.release(read)
        reader.release(unread)
        small.advance(0.05)
    assert reader.ended == {unread, read}


@qh3_only
def test_qh3_release_reports_when_held_back_events_were_let_through(small):
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    sid = sender.get_next_available_stream_id()
    sender.send_stream_data(sid, payload(4 * CONN_WINDOW, seed=4))
    small.advance(2.0)
    assert receiver._gate_shut()
    assert receiver.release(sid + 400, 10) is False  # nothing held there
    assert reader.release(sid, 1) is (not receiver._gate_shut())
    reader.release(sid, CONN_WINDOW)
    assert not receiver._gate_shut()
    assert reader.release(sid) is False  # already open: nothing waited


@qh3_only
def test_qh3_send_buffered_counts_queued_unsent_bytes(small):
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    sid = sender.get_next_available_stream_id()
    assert sender.send_buffered(sid) == 0  # no such stream yet
    sender.send_stream_data(sid, payload(10 * KiB, seed=5))
    assert sender.send_buffered(sid) == 10 * KiB
    assert sender.datagrams_to_send(now=small.now)  # sent (lost, as it happens): no longer queued
    assert sender.send_buffered(sid) == 0
    sender.send_stream_data(sid, payload(8 * CONN_WINDOW, seed=6))  # beyond what the gate lets in
    small.advance(3.0)
    assert sender.send_buffered(sid) > 0  # waits for credit
    for _ in range(20_000):
        if sender.send_buffered(sid) == 0 and reader.received(sid) == 10 * KiB + 8 * CONN_WINDOW:
            break
        reader.release(sid)
        small.advance(0.05)
    assert reader.received(sid) == 10 * KiB + 8 * CONN_WINDOW


@qh3_only
def test_qh3_one_transmit_builds_at_most_the_limit_and_the_next_one_the_rest(small):
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    sid = sender.get_next_available_stream_id()
    body = payload(10 * KiB, seed=7)  # 8 datagrams: within the congestion window
    sender.send_stream_data(sid, body, end_stream=True)
    first = sender.datagrams_to_send(small.now, 3)
    assert len(first) == 3
    assert sender.send_buffered(sid) > 0  # the rest still waits in the stream
    rest = sender.datagrams_to_send(small.now, None)
    assert len(rest) >= 4 and sender.send_buffered(sid) == 0
    for data, _ in first + rest:
        receiver.receive_datagram(data, small.addr[sender], now=small.now)
    small.drain(receiver)
    small.exchange()
    assert bytes(reader.data[sid]) == body and sid in reader.ended


def test_datagrams_received_coalesced_give_what_was_sent(small):
    """UDP GRO hands the endpoint one buffer of equal-size datagrams (the last one shorter or
    equal): ``receive_coalesced`` takes it whole, on both backends."""
    sender, receiver = small.client, small.server
    reader = small.on_event[receiver] = Holder(receiver)
    sid = sender.get_next_available_stream_id()
    body = payload(20 * KiB, seed=8)
    sender.send_stream_data(sid, body, end_stream=True)
    first, *sent = [data for data, _ in sender.datagrams_to_send(now=small.now)]
    receiver.receive_datagram(first, small.addr[sender], now=small.now)  # (it may differ in size)
    segment = len(sent[0])
    run = 1
    while run < len(sent) and len(sent[run]) == segment:
        run += 1
    if run < len(sent) and len(sent[run]) < segment:
        run += 1  # (a shorter one may end a coalesced buffer)
    assert run >= 2, [len(d) for d in sent]  # (aioquic paces its first flight: 3 datagrams)
    receiver.receive_coalesced(b"".join(sent[:run]), segment, small.addr[sender], now=small.now)
    for data in sent[run:]:
        receiver.receive_datagram(data, small.addr[sender], now=small.now)
    small.drain(receiver)
    small.advance(1.0)  # (what did not fit in the first flight, acknowledged as usual)
    assert bytes(reader.data[sid]) == body and sid in reader.ended
    assert receiver._close_event is None


class Path:
    """Datagrams between the two ends of a ``Link`` arrive ``one_way`` seconds after they
    left (``Link`` delivers at once: no RTT to measure); the fake clock moves in steps."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.in_transit: list[tuple[float, QuicConnection, bytes, tuple]] = []

    def run(self, one_way: float, seconds: float, step: float = 0.0005) -> None:
        link = self.link
        until = link.now + seconds
        while link.now < until:
            for conn in (link.client, link.server):
                for data, _ in conn.datagrams_to_send(now=link.now):
                    self.in_transit.append((link.now + one_way, link.peer[conn], data, link.addr[conn]))
            link.now += step
            due = [d for d in self.in_transit if d[0] <= link.now]
            self.in_transit = [d for d in self.in_transit if d[0] > link.now]
            for _, conn, data, addr in due:
                conn.receive_datagram(data, addr, now=link.now)
            for conn in (link.client, link.server):
                at = conn.get_timer()
                if at is not None and at <= link.now:
                    conn.handle_timer(now=link.now)
                link.drain(conn)


@qh3_only
@pytest.mark.parametrize("path", ["long path, no queue", "a queue builds", "the path got longer"])
def test_qh3_writers_wait_for_data_in_flight_only_while_the_path_queues(tls, path):
    """Beyond IN_FLIGHT_FLOOR in flight, send_backlog counts the excess (writers wait) only
    while the smoothed RTT is over twice the least one: on a long path without a queue, the
    pipe must stay full. The least RTT stands MIN_RTT_SPAN: a longer route is learned."""
    from reverst.quic._qh3 import IN_FLIGHT_FLOOR, MIN_RTT_SPAN
    link = make_link(tls, max_stream_data=32 * MiB, max_data=32 * MiB, handshake=False)
    sender, receiver = link.client, link.server
    link.on_event[receiver] = Holder(receiver)
    way = Path(link)
    sender.connect(SERVER_ADDR, now=link.now)
    if path == "long path, no queue":
        way.run(one_way=0.025, seconds=0.2)  # 50 ms RTT, from the handshake on
    else:
        way.run(one_way=0.0005, seconds=0.05)  # 1 ms RTT: the least seen
    if path == "the path got longer":
        way.run(one_way=0.005, seconds=MIN_RTT_SPAN, step=0.01)  # (quiet)
    assert sender.handshake_complete
    sid = sender.get_next_available_stream_id()
    sender.send_stream_data(sid, payload(32 * MiB, seed=8))
    if path == "long path, no queue":
        way.run(one_way=0.025, seconds=0.6)
    else:
        way.run(one_way=0.005, seconds=0.1)  # then 10 ms: a queue on the way
    in_flight = sender._core.bytes_in_flight
    assert in_flight > 2 * IN_FLIGHT_FLOOR  # (slow start got there)
    excess = sender.send_backlog(sid) - sender.send_buffered(sid)
    if path == "a queue builds":
        assert excess == in_flight - IN_FLIGHT_FLOOR
    else:
        assert excess == 0


def test_a_tunnel_client_grants_request_streams_beyond_the_librarys_default(tls):
    """reverstd keeps 100 plain requests and its WebSockets open on one tunnel: our tunnel
    clients grant REQUEST_STREAMS concurrent streams (aioquic allows 128, qh3 100)."""
    from reverst.quic import REQUEST_STREAMS
    link = make_link(tls, client_kwargs={"request_streams": REQUEST_STREAMS})
    server = link.server
    opened = []
    for _ in range(300):  # none of them ends: all open at once
        sid = server.get_next_available_stream_id()
        if LIBRARY == "qh3":
            assert server.can_open_stream()
        server.send_stream_data(sid, b"x")
        opened.append(sid)
    link.advance(1.0)
    received = {e.stream_id for e in link.events[link.client] if isinstance(e, events.StreamDataReceived)}
    assert received >= set(opened)
    assert link.client.closed_event is None and server.closed_event is None


# -- keep-alive and liveness --------------------------------------------------------


def test_keep_alive_is_capped_at_half_the_idle_timeout(tls):
    quiet = make_link(tls, idle_timeout=60.0,
                      client_kwargs={"keep_alive": 100.0}, server_kwargs={"keep_alive": None})
    assert quiet.client.keep_alive == 30.0
    assert quiet.server.keep_alive == 30.0
    assert make_link(tls, idle_timeout=60.0,
                     client_kwargs={"keep_alive": 5.0}).client.keep_alive == 5.0


def test_keep_alive_pings_keep_an_idle_connection_open(tls):
    link = make_link(tls, idle_timeout=60.0,
                     client_kwargs={"keep_alive": 5.0}, server_kwargs={"keep_alive": 5.0})
    client, server = link.client, link.server
    last_rx = link.last_rx[client]
    at = client.get_timer()
    assert link.now < at <= last_rx + 5.0

    link.now = at
    client.handle_timer(now=at)
    ping = client.datagrams_to_send(now=at)
    assert len(ping) == 1  # the PING (aioquic itself sends nothing on an idle link)
    for data, _ in ping:
        server.receive_datagram(data, CLIENT_ADDR, now=at)
    link.last_rx[server] = at
    link.drain(server)

    sent_before = dict(link.sent)
    link.advance(180.0)  # 3 minutes, three times the idle timeout
    assert client.closed_event is None and server.closed_event is None
    assert not any(isinstance(e, events.ConnectionTerminated)
                   for c in (client, server) for e in link.events[c])
    assert link.sent[client] - sent_before[client] >= 180 / 5 / 2  # it kept pinging
    assert link.now - link.last_rx[client] <= 5.0


def test_without_keep_alive_the_same_link_idles_out(tls):
    # Control for the test above: plain aioquic peers close after the idle timeout.
    link = make_link(tls, client_cls=QuicConnection, server_cls=QuicConnection,
                     idle_timeout=60.0)
    link.advance(180.0)
    closed = [e for e in link.events[link.client] if isinstance(e, events.ConnectionTerminated)]
    assert closed and closed[0].reason_phrase == "Idle timeout"


def test_keep_alive_follows_a_shorter_idle_timeout_of_the_peer(tls):
    # A peer that sends no keep-alives itself and advertises a 20 s idle timeout (e.g. a
    # quic-go server with MaxIdleTimeout=20s): the effective idle timeout is 20 s.
    link = make_link(tls, server_cls=QuicConnection, idle_timeout=60.0,
                     server_config={"idle_timeout": 20.0})
    link.advance(120.0)
    assert link.client.closed_event is None
    assert not any(isinstance(e, events.ConnectionTerminated) for e in link.events[link.server])


def test_dead_peer_is_detected_while_busy(tls):
    """In flight: PING after BUSY_PROBE_INTERVAL of quiet, close after BUSY_DEAD_PEER_TIMEOUT
    without an answer (loopback RTT: the floors apply), well under ``dead_peer_timeout``."""
    link = make_link(tls, idle_timeout=60.0, client_kwargs={"dead_peer_timeout": 5.0})
    client = link.client
    link.client.send_ping(1)
    link.advance(0.1)  # heard from the peer just now
    client.busy = 1
    link.gone.add(link.server)  # the peer vanished: nothing reaches it, it sends nothing
    quiet_since = link.last_rx[client]

    assert client.get_timer() <= quiet_since + BUSY_PROBE_INTERVAL
    sent = link.sent[client]
    link.run(until=quiet_since + BUSY_PROBE_INTERVAL - 0.01)
    assert link.sent[client] == sent  # quiet so far
    link.run(until=quiet_since + BUSY_PROBE_INTERVAL)
    assert link.sent[client] == sent + 1  # the probe PING went out
    assert client.closed_event is None

    gone_at = quiet_since + BUSY_PROBE_INTERVAL + BUSY_DEAD_PEER_TIMEOUT
    link.run(until=gone_at - 0.01)
    assert client.closed_event is None  # still waiting for the probe's answer
    link.run(until=gone_at)
    closed = client.closed_event
    assert closed is not None
    assert closed.error_code == AppErrorCode.SERVER_ERROR == 0x1
    assert closed.reason_phrase == "peer unresponsive"
    assert link.now - quiet_since < 2.0  # a visitor's response is cut within 2 s


def test_a_busy_probe_waits_no_longer_than_dead_peer_timeout(tls):
    link = make_link(tls, idle_timeout=60.0, client_kwargs={"dead_peer_timeout": 0.3})
    link.client.send_ping(1)
    link.advance(0.1)  # heard from the peer just now
    link.client.busy = 1
    link.gone.add(link.server)
    quiet_since = link.last_rx[link.client]
    link.run(until=quiet_since + BUSY_PROBE_INTERVAL + 0.3 - 0.01)
    assert link.client.closed_event is None
    link.run(until=quiet_since + BUSY_PROBE_INTERVAL + 0.3)
    assert link.client.closed_event is not None


def test_an_idle_connection_gives_its_keep_alive_dead_peer_timeout(tls):
    """Nothing in flight: the keep-alive PING may go unanswered for ``dead_peer_timeout``."""
    link = make_link(tls, idle_timeout=60.0, client_kwargs={"keep_alive": 10.0, "dead_peer_timeout": 5.0})
    link.client.send_ping(1)
    link.advance(0.1)
    link.gone.add(link.server)
    quiet_since = link.last_rx[link.client]
    link.run(until=quiet_since + 10.0 + 5.0 - 0.01)
    assert link.client.closed_event is None
    link.run(until=quiet_since + 10.0 + 5.0)
    closed = link.client.closed_event
    assert closed is not None and closed.reason_phrase == "peer unresponsive"


def test_answered_probes_keep_a_busy_connection_open(tls):
    link = make_link(tls, idle_timeout=60.0, client_kwargs={"dead_peer_timeout": 5.0})
    link.client.busy = 1
    link.advance(30.0)  # probes every second, all answered
    assert link.client.closed_event is None and link.server.closed_event is None
    assert link.sent[link.client] >= 20


def test_a_suspected_peer_that_answers_stays_open(tls):
    """suspect() (an ICMP unreachable, which anyone on the path can forge) only probes:
    a live peer's answer clears it."""
    link = make_link(tls, idle_timeout=60.0)
    sent = link.sent[link.client]
    link.client.suspect(link.now)
    link.advance(SUSPECT_GRACE * 4)
    assert link.sent[link.client] > sent  # the PING went out and was answered
    assert link.client.closed_event is None


def test_a_suspected_peer_that_stays_silent_is_closed_after_the_grace(tls):
    link = make_link(tls, idle_timeout=60.0, client_kwargs={"dead_peer_timeout": 5.0})
    client = link.client
    link.gone.add(link.server)
    start = link.now
    client.suspect(start)
    link.run(until=start + SUSPECT_GRACE - 0.01)
    assert client.closed_event is None
    link.run(until=start + SUSPECT_GRACE)
    closed = client.closed_event
    assert closed is not None and closed.reason_phrase == "peer unreachable"
    assert closed.error_code == AppErrorCode.SERVER_ERROR


def test_closed_event_is_set_as_soon_as_close_is_received(small):
    client, server = small.client, small.server
    server.close(error_code=AppErrorCode.CLIENT_ERROR, reason_phrase="unauthorized")
    assert client.closed_event is None
    datagrams = server.datagrams_to_send(now=small.now)
    assert server.closed_event is not None  # closing
    for data, _ in datagrams:
        client.receive_datagram(data, SERVER_ADDR, now=small.now)
    small.drain(client)

    closed = client.closed_event  # draining
    assert closed is not None
    assert closed.error_code == 2
    assert closed.reason_phrase == "unauthorized"
    assert closed.frame_type is None
    assert not any(isinstance(e, events.ConnectionTerminated) for e in small.events[client])

    small.advance(5.0)  # ~3 PTO later aioquic reports it too
    terminated = [e for e in small.events[client] if isinstance(e, events.ConnectionTerminated)]
    assert len(terminated) == 1
    assert (terminated[0].error_code, terminated[0].reason_phrase) == (2, "unauthorized")
    assert client.closed_event is not None


# -- aioquic: loss detection that adapts to reordering --------------------------------------------
def _recovery():
    from aioquic.quic.recovery import QuicPacketRecovery, QuicPacketSpace
    from reverst.quic._aioquic import CONGESTION_CONTROL, _ReorderingRecovery
    rec = QuicPacketRecovery(congestion_control_algorithm=CONGESTION_CONTROL, initial_rtt=0.1,
                             max_datagram_size=1200, peer_completed_address_validation=True,
                             send_probe=lambda: None)
    _ReorderingRecovery.install(rec)
    space = QuicPacketSpace(is_application_data=True)
    rec.spaces = [space]
    return rec, space


def _send(rec, space, pns, now):
    from aioquic.quic.packet import QuicPacketType
    from aioquic.quic.packet_builder import QuicSentPacket
    from aioquic.tls import Epoch
    for pn in pns:
        rec.on_packet_sent(packet=QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=True,
                                                 is_crypto_packet=False, packet_number=pn,
                                                 packet_type=QuicPacketType.ONE_RTT, sent_time=now,
                                                 sent_bytes=1200),
                           space=space)


def _ack(rec, space, ranges, now):
    from aioquic.quic.rangeset import RangeSet
    acked = RangeSet()
    for start, stop in ranges:
        acked.add(start, stop)
    rec.on_ack_received(ack_rangeset=acked, ack_delay=0.0, now=now, space=space)


@aioquic_only
def test_aioquic_a_reordered_packet_declared_lost_raises_the_threshold_and_undoes_the_cut():
    rec, space = _recovery()
    _send(rec, space, range(0, 20), now=0.001)
    _ack(rec, space, [(0, 10)], now=0.05)  # an RTT sample; slow start goes on
    assert rec._cc.ssthresh is None  # slow start
    # packet 10 is overtaken by 11-16: 3 packets later it is declared lost, the window cut
    _ack(rec, space, [(0, 10), (11, 17)], now=0.051)
    assert rec.lost_total == 1 and rec._cc.ssthresh is not None
    window = rec._cc.congestion_window
    # ... and it arrives after all: it was reordering, not loss
    _ack(rec, space, [(0, 17)], now=0.053)
    assert rec.spurious_total == 1
    assert rec.packet_threshold == 7  # (16 - 10 + 1): that reordering is now tolerated
    assert rec._cc.ssthresh is None and rec._cc.congestion_window > window  # the cut is undone
    # the same reordering again is no loss
    _send(rec, space, range(20, 40), now=0.06)
    _ack(rec, space, [(0, 20), (21, 27)], now=0.11)
    assert rec.lost_total == 1
    _ack(rec, space, [(0, 27)], now=0.112)
    # a real loss is still detected, by the time threshold at the latest
    _ack(rec, space, [(0, 30), (31, 40)], now=0.115)
    assert rec.lost_total == 2
    assert space.loss_time is None and 30 not in space.sent_packets


@aioquic_only
def test_aioquic_a_real_loss_keeps_the_window_cut():
    rec, space = _recovery()
    _send(rec, space, range(0, 20), now=0.001)
    _ack(rec, space, [(0, 10)], now=0.05)
    _ack(rec, space, [(0, 10), (11, 20)], now=0.051)  # 10 never comes
    assert rec.lost_total == 1 and rec.spurious_total == 0
    window = rec._cc.congestion_window
    _ack(rec, space, [(0, 10), (11, 20)], now=0.06)  # (a duplicate ACK changes nothing)
    assert rec._cc.ssthresh is not None and rec._cc.congestion_window == window and rec.packet_threshold == 3


@qh3_only
@pytest.mark.parametrize("headers, error", [
    ([(b":status", b"200"), (b"content-type", b"text/plain")], None),
    ([(b":status", b"200"), (b"Content-Type", b"text/plain")], "contains uppercase letters"),
    ([(b"content-type", b"text/plain"), (b":status", b"200")], "not allowed after regular headers"),
    ([(b":status", b"200"), (b":status", b"204")], "included twice"),
    ([(b":path", b"/")], "is not valid"),
    ([(b"content-type", b"text/plain")], "are missing"),
])
def test_qh3_header_validation_keeps_its_checks_with_the_faster_upper_case_test(headers, error):
    import qh3.h3.connection as h3
    from reverst.quic import _qh3
    assert h3.validate_headers is _qh3._validate_headers  # installed where qh3's callers look
    if error is None:
        assert h3.validate_response_headers(headers) == 200
    else:
        with pytest.raises(h3.MessageError, match=error):
            h3.validate_response_headers(headers)
