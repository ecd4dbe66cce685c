"""The UDP endpoint's Linux offloads (GSO on send, GRO on receive), over real sockets."""
import socket
import sys
import time

import gevent
import pytest

from reverst._transport import RECV_BATCH_DATAGRAMS, Endpoint
from reverst.quic._common import split_coalesced

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux UDP offloads")


def receiver():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    return sock


def datagrams(count, size, last=None):
    out = [bytes([i % 256]) * size for i in range(count)]
    if last:
        out.append(b"z" * last)
    return out


def test_a_run_of_equal_datagrams_leaves_in_one_segmented_send_and_arrives_intact(monkeypatch):
    endpoint = Endpoint.bind("127.0.0.1", 0)
    assert endpoint._gso
    calls = []
    real = endpoint._send_segmented
    monkeypatch.setattr(endpoint, "_send_segmented", lambda segs, size, addr: (calls.append(len(segs)),
                                                                                real(segs, size, addr)))
    with receiver() as sock:
        sent = datagrams(40, 1200, last=500) + datagrams(3, 900)  # two runs: 41 and 3
        endpoint.send_datagrams([(d, sock.getsockname()) for d in sent])
        got = [sock.recvfrom(65536)[0] for _ in sent]
    endpoint.close()
    assert got == sent
    assert calls == [41, 3]


def test_coalesced_receives_hold_the_datagrams_sent_at_their_segment_size():
    sender = Endpoint.bind("127.0.0.1", 0)
    target = Endpoint.bind("127.0.0.1", 0)  # not started: read by hand below
    assert target._gro
    sent = datagrams(30, 1200, last=300)
    sender.send_datagrams([(d, target.address) for d in sent])
    got, reads = [], 0
    target._raw.settimeout(5)
    while len(got) < len(sent):
        data, _ = target._recv_coalesced(65536)
        reads += 1
        if isinstance(data, tuple):  # (buffer, segment size): split as the QUIC backends do
            got.extend(split_coalesced(*data))
        else:
            got.append(data)
    sender.close()
    target.close()
    assert got == sent
    assert reads < len(sent)  # loopback GRO coalesced some of them


def test_a_segmented_send_the_kernel_refuses_goes_out_one_by_one():
    endpoint = Endpoint.bind("127.0.0.1", 0)
    with receiver() as sock:
        sent = datagrams(200, 10)  # more segments than the kernel takes in one send
        endpoint._send_segmented(sent, 10, sock.getsockname())
        got = [sock.recvfrom(65536)[0] for _ in sent]
    assert got == sent
    assert not endpoint._gso  # and later sends go one by one
    endpoint.close()


def test_offloads_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("REVERST_UDP_OFFLOAD", "off")
    endpoint = Endpoint.bind("127.0.0.1", 0)
    assert not endpoint._gso and not endpoint._gro
    with receiver() as sock:
        sent = datagrams(5, 1000)
        endpoint.send_datagrams([(d, sock.getsockname()) for d in sent])
        assert [sock.recvfrom(65536)[0] for _ in sent] == sent
    endpoint.close()
    gevent.sleep(0)


def udp_queued(port: int) -> int:
    """Bytes (kernel accounting) waiting in the receive queue of our UDP socket on ``port``."""
    with open("/proc/net/udp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no UDP socket on port {port}")


def test_a_long_run_of_arriving_datagrams_is_read_in_batches_and_the_loop_runs_between_them():
    """RECV_BATCH_DATAGRAMS: the read loop goes back to the gevent loop after about that
    many datagrams (coalesced reads count each one), so the loop serves its other sockets
    and greenlets before the endpoint's queue is drained. (The datagrams are junk to the
    endpoint, which drops them: only the reading is under test.)"""
    sender = Endpoint.bind("127.0.0.1", 0)
    target = Endpoint.bind("127.0.0.1", 0)
    try:
        port = target.address[1]
        sender.send_datagrams([(d, target.address) for d in datagrams(4 * RECV_BATCH_DATAGRAMS, 1000)])
        full = udp_queued(port)  # (the kernel holds them all: 4 MB of receive buffer)
        assert full > 0
        seen = []
        target.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen.append(udp_queued(port))
            if seen[-1] == 0:
                break
            gevent.sleep(0)  # (runs between two of the loop's polls: between two batches, if any)
        assert seen[-1] == 0, "the endpoint never read them all"
        assert any(0 < q < full for q in seen), f"read all at once, nothing ran in between: {seen}"
    finally:
        sender.close()
        target.close()
