"""A stream writer's back-pressure over real QUIC on loopback, on each backend: once the
peer stops granting credit, the writer blocks with between half and just over the
backend's high water mark buffered (``SEND_HIGH_WATER``, as its ``send_buffered``
counts), and it goes on once the peer reads. And a bulk sender's transmits leave the
loop's other sockets their turn (LOOP_TURN_LIMIT). And an aborted stream's reset follows
what was queued before it (RESET_AFTER_SEND_LIMIT)."""
import contextlib
import time

import gevent
import gevent.queue
import gevent.socket
import pytest

from reverst._transport import LOOP_TURN_LIMIT, RESET_AFTER_SEND_LIMIT, Endpoint
from reverst.errors import StreamReset
from reverst.quic import available_backends, load_backend

WINDOW = 1024 * 1024  # the receiver's stream window (small: a quick test)
PIECE = 64 * 1024


def wait_still(value, settle: float = 0.3, timeout: float = 10.0) -> int:
    """value() once it stopped changing for ``settle`` seconds (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        gevent.sleep(0.05)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise AssertionError(f"still changing after {timeout} s: {last}")


@contextlib.contextmanager
def connected(certs, backend, on_connection=None, **server_options):
    """A QUIC connection on loopback from a client endpoint to a server endpoint (each
    started, closed after the block); ``on_connection`` gets the server's side of it."""
    server_cfg = backend.server_configuration(certificate_path=str(certs["cert"]), private_key_path=str(certs["key"]),
                                              idle_timeout=30.0, **server_options)
    server = Endpoint.bind("127.0.0.1", 0, backend=backend, server_config=server_cfg, on_connection=on_connection)
    server.start()
    client = Endpoint.bind("127.0.0.1", 0, backend=backend)
    client.start()
    try:
        cfg = backend.client_configuration(server_name="localhost", idle_timeout=30.0, max_datagram_size=1452,
                                           insecure=True)
        conn = client.connect(server.address, cfg)
        assert conn.handshake_done.wait(5), "no handshake"
        yield conn
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("backend_name", available_backends())
def test_a_blocked_writer_holds_about_the_high_water_mark_and_goes_on_when_the_peer_reads(certs, backend_name):
    backend = load_backend(backend_name)
    accepted: gevent.queue.Queue = gevent.queue.Queue()
    writer = None
    with connected(certs, backend, on_connection=accepted.put, window=WINDOW) as conn:
        try:
            high = conn.send_high_water
            assert high == backend.SEND_HIGH_WATER
            stream = conn.open_stream()
            written = [0]

            def write_forever():
                while True:
                    stream.write(b"x" * PIECE)
                    written[0] += PIECE

            writer = gevent.spawn(write_forever)
            stalled = wait_still(lambda: written[0])
            assert not writer.dead, writer.exception
            assert stalled >= WINDOW  # the peer took its window's worth at least
            # blocked by the high water mark: the last write returned at or under it with one
            # more piece queued, and the writer is woken only at half of it
            assert high // 2 < conn.quic.send_buffered(stream.stream_id) <= high + PIECE

            peer = accepted.get(timeout=5).accept_stream(timeout=5)
            got = 0
            while got < stalled:
                got += len(peer.read(1 << 20, timeout=5))
            assert wait_still(lambda: written[0]) >= stalled + WINDOW // 2, "the writer did not go on"
            assert not writer.dead, writer.exception
        finally:
            if writer is not None:
                writer.kill(block=True, timeout=5)


@pytest.mark.parametrize("backend_name", available_backends())
def test_a_transmit_scheduled_late_in_a_long_loop_turn_lets_waiting_sockets_go_first(certs, backend_name):
    """A bulk sender's transmits wake its writers, whose writes schedule the next transmit:
    callbacks gevent would run one after another without polling. Past LOOP_TURN_LIMIT into
    a loop turn, a transmit waits for the next poll, so a socket that became readable is
    served before it; early in a turn it still runs at once, before the poll."""
    backend = load_backend(backend_name)
    mine, theirs = gevent.socket.socketpair()
    with mine, theirs, connected(certs, backend) as conn:
        order = []
        transmit = conn.transmit
        conn.transmit = lambda **kw: (order.append("transmit"), transmit(**kw))

        def read_one():
            theirs.recv(1)
            order.append("socket")

        for busy_for, expected in ((0.0, ["transmit", "socket"]),
                                   (3 * LOOP_TURN_LIMIT, ["socket", "transmit"])):
            for _ in range(50):  # quiet first: the handshake's last packets (late on a busy machine)
                order.clear()
                gevent.sleep(0.1)
                if not order:
                    break
            assert not order, f"the connection never went quiet: {order}"
            reader = gevent.spawn(read_one)
            gevent.sleep(0.01)  # the reader waits for its socket

            def busy_turn():
                conn.endpoint.loop_turn_age()  # (the turn is counted from here)
                mine.send(b"x")  # readable from now on: served at the loop's next poll
                until = time.perf_counter() + busy_for
                while time.perf_counter() < until:  # (work that does not yield)
                    pass
                conn.schedule_transmit()

            gevent.spawn(busy_turn).join(timeout=5)
            reader.join(timeout=5)
            gevent.sleep(0.01)
            assert order == expected, f"busy for {busy_for * 1e3:.1f} ms: {order}"


@pytest.mark.parametrize("backend_name", available_backends())
def test_an_aborted_stream_is_reset_after_what_was_queued_before_it(certs, backend_name):
    """RESET_STREAM discards what was not sent yet: abort() holds the reset back until the
    queued bytes have left (a response head the pacer delays), and no longer than
    RESET_AFTER_SEND_LIMIT when they cannot (here: beyond what the peer's flow control lets
    through while it does not read)."""
    backend = load_backend(backend_name)
    accepted: gevent.queue.Queue = gevent.queue.Queue()
    with connected(certs, backend, on_connection=accepted.put, window=WINDOW) as conn:
        server_side = None
        for size in (100, 8 * WINDOW):  # all can leave; then only what flow control allows
            stream = conn.open_stream()
            body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            stream.queue(body)
            stream.abort(0x102)
            if server_side is None:
                server_side = accepted.get(timeout=5)
            peer = server_side.accept_stream(timeout=5)
            if size > 100:
                gevent.sleep(RESET_AFTER_SEND_LIMIT + 0.5)  # nothing read meanwhile
            got = bytearray()
            with pytest.raises(StreamReset) as reset:
                while True:
                    got += peer.read(1 << 20, timeout=5)
            assert reset.value.error_code == 0x102
            if size == 100:
                assert bytes(got) == body  # all of it, before the reset
            else:
                assert 0 < len(got) < size and bytes(got) == body[:len(got)]  # the reset did not wait for all
