"""What every QUIC backend shares (sans-io: no socket, no clock, no gevent).

* :class:`Liveness`: keep-alive PINGs (neither library sends any), a dead-peer probe
  (while requests are in flight and the peer is quiet, PING it; a PING unanswered for
  ``dead_peer_timeout`` closes the connection instead of waiting for the idle timeout),
  and :meth:`Liveness.suspect` (an ICMP unreachable seen by the shell: probe at once,
  with a deadline of a few round trips).  A mixin over each library's QuicConnection.
* Stateless-reset tokens derived from the server key (RFC 9000 §10.3.2), so a restarted
  ``reverstd`` can tell the clients of its previous life that their connection is gone.
* QUIC invariant headers (RFC 8999): enough to route a datagram by connection id and to
  answer an unknown version, without either library.
* Coalesced reads (UDP GRO): the datagrams of one buffer, each ``segment`` bytes.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import NamedTuple

from ..protocol import AppErrorCode

#: While requests are in flight, PING a peer that has been quiet this long (seconds), or
#: three smoothed RTTs if that is longer.
BUSY_PROBE_INTERVAL = 0.5
#: While requests are in flight, a PING unanswered this long, or sixteen smoothed RTTs if
#: that is longer, means the peer is gone (capped at ``dead_peer_timeout``). The library
#: retransmits a lost PING after a PTO (one RTT + 4 RTT variances + the ACK delay), so a live peer
#: has four or five tries to answer: at 100 ms RTT and 2% loss, all lost is ~1e-7.
BUSY_DEAD_PEER_TIMEOUT = 1.0
BUSY_DEAD_PEER_RTTS = 16
#: After a sign that the peer is gone (an ICMP unreachable), close unless something
#: arrives from it within this long, or three smoothed RTTs if that is longer.
SUSPECT_GRACE = 0.25
#: The length of the connection ids we issue (both libraries' default).
CID_LENGTH = 8
#: Request streams a tunnel client lets reverstd have open at once: reverstd's 100 plain
#: requests and its WebSockets (reverst.server). Go's reverst and the libraries allow ~100.
REQUEST_STREAMS = 1024

def coalesced_count(buffer: bytes, segment: int) -> int:
    """How many datagrams a coalesced read holds: each ``segment`` bytes, the last one
    shorter or equal."""
    return -(-len(buffer) // segment)


def split_coalesced(buffer: bytes, segment: int) -> list[bytes]:
    """The datagrams of a coalesced read, each a copy."""
    return [buffer[i:i + segment] for i in range(0, len(buffer), segment)]


QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
_INITIAL_TYPE = {QUIC_V1: 0, QUIC_V2: 1}  # the long-header type bits of an Initial


def stateless_reset_token(key: bytes, cid: bytes) -> bytes:
    """The token a server with ``key`` puts on connection id ``cid``."""
    return hmac.new(key, cid, hashlib.sha256).digest()[:16]


def encode_stateless_reset(token: bytes, trigger_size: int) -> bytes | None:
    """A stateless reset smaller than the packet that triggered it, or None if too small."""
    size = min(trigger_size - 1, 42)
    if size < 21:
        return None
    head = bytearray(os.urandom(size - 16))
    head[0] = 0x40 | (head[0] & 0x3F)  # looks like a short-header packet
    return bytes(head) + token


def is_stateless_reset_candidate(data: bytes) -> bool:
    """A datagram that could be a stateless reset: short header, at least 21 bytes."""
    return len(data) >= 21 and not data[0] & 0x80


class Header(NamedTuple):
    long: bool
    version: int | None  # None for a short header
    initial: bool        # a long-header Initial packet of a version we know
    destination_cid: bytes
    source_cid: bytes


def parse_header_untrusted(data: bytes, cid_length: int = CID_LENGTH) -> Header | None:
    """The invariant fields of the first packet of a datagram, or None if malformed."""
    if not data:
        return None
    first = data[0]
    if not first & 0x80:
        if len(data) < 1 + cid_length:
            return None
        return Header(False, None, False, data[1:1 + cid_length], b"")
    if len(data) < 7:
        return None
    version = int.from_bytes(data[1:5], "big")
    dlen = data[5]
    if dlen > 20 and version in _INITIAL_TYPE or len(data) < 7 + dlen:
        return None
    dcid = data[6:6 + dlen]
    slen = data[6 + dlen]
    if slen > 20 and version in _INITIAL_TYPE or len(data) < 7 + dlen + slen:
        return None
    scid = data[7 + dlen:7 + dlen + slen]
    initial = _INITIAL_TYPE.get(version) == (first & 0x30) >> 4
    return Header(True, version, initial, dcid, scid)


def encode_version_negotiation(header: Header, versions) -> bytes:
    """Answer a long header of a version we do not speak (RFC 8999 §6)."""
    first = 0x80 | (os.urandom(1)[0] & 0x7F)
    return b"".join([
        bytes([first]), b"\0\0\0\0",
        bytes([len(header.source_cid)]), header.source_cid,
        bytes([len(header.destination_cid)]), header.destination_cid,
        *(int(v).to_bytes(4, "big") for v in versions),
    ])


class Liveness:
    """Keep-alive, the dead-peer probe and :meth:`suspect`, over a library's QuicConnection.

    The backend provides ``_handshake_complete``, ``send_ping(uid)`` and these hooks:
    :meth:`_closing`, :meth:`_idle_timeout_in_force` and :meth:`_rtt`; its receive
    methods call :meth:`_heard_from_peer`.
    """

    def _init_liveness(self, keep_alive: float | None, dead_peer_timeout: float) -> None:
        self.keep_alive_period = keep_alive
        self.dead_peer_timeout = dead_peer_timeout
        #: in-flight requests; the owner maintains it (probing only happens while > 0)
        self.busy = 0
        self._last_rx: float | None = None
        #: a PING is out: close at this time unless something arrives first (and why)
        self._probe_deadline: float | None = None
        self._probe_reason = "peer unresponsive"

    # -- hooks --------------------------------------------------------------------------
    def _closing(self) -> bool:
        raise NotImplementedError

    def _idle_timeout_in_force(self) -> float:
        raise NotImplementedError

    def _rtt(self) -> float | None:
        raise NotImplementedError

    # -- liveness ---------------------------------------------------------------------
    def _heard_from_peer(self, now: float) -> None:
        self._last_rx = now
        self._probe_deadline = None

    @property
    def keep_alive(self) -> float:
        """PING a quiet peer this often: the configured period, capped at half the idle
        timeout in force (the smaller of ours and the peer's, RFC 9000 §10.1)."""
        half_idle = self._idle_timeout_in_force() / 2
        return min(self.keep_alive_period, half_idle) if self.keep_alive_period else half_idle

    def suspect(self, now: float, reason: str = "peer unreachable") -> None:
        """Something says the peer may be gone (an ICMP port or host unreachable for its
        address): PING it now and close unless anything arrives from it within a few
        round trips. Not a close on the spot: an ICMP message is easy to forge."""
        if not self._handshake_complete or self._closing():
            return
        deadline = now + max(SUSPECT_GRACE, 3 * (self._rtt() or 0.0))
        if self._probe_deadline is None:
            self.send_ping(0)
        elif self._probe_deadline <= deadline:
            return
        self._probe_deadline = deadline
        self._probe_reason = reason

    def _next_probe_at(self) -> float | None:
        if not self._handshake_complete or self._last_rx is None or self._closing():
            return None
        if self._probe_deadline is not None:
            return self._probe_deadline
        if self.busy:
            return self._last_rx + max(BUSY_PROBE_INTERVAL, 3 * (self._rtt() or 0.0))
        return self._last_rx + self.keep_alive

    def _probe_timeout(self) -> float:
        """How long a PING may go unanswered: ``dead_peer_timeout`` for an idle connection,
        less while requests are in flight (a visitor waits on them)."""
        if not self.busy:
            return self.dead_peer_timeout
        return min(self.dead_peer_timeout, max(BUSY_DEAD_PEER_TIMEOUT, BUSY_DEAD_PEER_RTTS * (self._rtt() or 0.0)))

    def get_timer(self) -> float | None:
        timer_at = super().get_timer()
        probe_at = self._next_probe_at()
        if probe_at is not None and (timer_at is None or probe_at < timer_at):
            return probe_at
        return timer_at

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        probe_at = self._next_probe_at()
        if probe_at is None or now < probe_at:
            return
        if self._probe_deadline is not None:
            self.close(error_code=AppErrorCode.SERVER_ERROR, reason_phrase=self._probe_reason)
        else:
            self._probe_deadline = now + self._probe_timeout()
            self._probe_reason = "peer unresponsive"
            self.send_ping(0)
