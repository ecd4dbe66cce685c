"""aioquic's QuicConnection with what a long-lived tunnel needs (sans-io).

* Receive windows follow what the application consumed, not what arrived: aioquic
  doubles a window whenever half of it has been *received*, so a fast sender could fill
  unbounded memory behind a slow reader.  Here the owner reports bytes it holds
  (:meth:`hold`) and releases them as they are read (:meth:`release`); windows only
  grow past bytes released.
* Keep-alive PINGs (aioquic sends none) and a dead-peer probe: while requests are in
  flight and the peer is quiet, PING it; a PING unanswered for ``dead_peer_timeout``
  closes the connection instead of waiting for the idle timeout.  :meth:`suspect`
  (an ICMP unreachable seen by the shell) probes at once with a deadline of a few RTTs.
* :attr:`closed_event` exposes a peer's or our own close as soon as the connection
  enters closing/draining; aioquic only emits ConnectionTerminated ~3 PTO later.

Touches private aioquic names: keep the pin in setup.cfg and the loopback tests.
"""
from __future__ import annotations

import hashlib
import hmac

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.connection import END_STATES, QuicConnection

from .protocol import AppErrorCode

#: While requests are in flight, PING a peer that has been quiet this long (seconds).
BUSY_PROBE_INTERVAL = 1.0
#: After a sign that the peer is gone (an ICMP unreachable), close unless something
#: arrives from it within this long, or three smoothed RTTs if that is longer.
SUSPECT_GRACE = 0.25
#: Delay an ACK up to this long (aioquic: 1 ms) unless a second datagram needs one: a
#: request/response exchange then carries its ACKs instead of paying for ACK-only packets.
ACK_DELAY = 0.005


def stateless_reset_token(key: bytes, cid: bytes) -> bytes:
    """The token a server with ``key`` puts on connection id ``cid`` (RFC 9000 §10.3.2).

    Derived rather than random, so a restarted server (same key) can still tell the
    clients of its previous life that their connection is gone.
    """
    return hmac.new(key, cid, hashlib.sha256).digest()[:16]


def encode_stateless_reset(token: bytes, trigger_size: int) -> bytes | None:
    """A stateless reset smaller than the packet that triggered it, or None if too small."""
    size = min(trigger_size - 1, 42)
    if size < 21:
        return None
    import os
    head = bytearray(os.urandom(size - 16))
    head[0] = 0x40 | (head[0] & 0x3F)  # looks like a short-header packet
    return bytes(head) + token


_EPOCH_SETS: dict[frozenset, frozenset] = {}


class TunnelQuicConnection(QuicConnection):
    def __init__(self, *, keep_alive: float | None = None, dead_peer_timeout: float = 5.0,
                 reset_key: bytes | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._reset_key = reset_key
        if reset_key is not None and not self._is_client:
            for cid in self._host_cids:
                cid.stateless_reset_token = stateless_reset_token(reset_key, cid.cid)
        self._share_frame_epochs()
        cfg = self._configuration
        self.keep_alive_period = keep_alive
        self.dead_peer_timeout = dead_peer_timeout
        #: in-flight requests; the owner maintains it (probing only happens while > 0)
        self.busy = 0
        self._stream_window = cfg.max_stream_data
        self._conn_window = cfg.max_data
        self._held: dict[int, int] = {}
        self._held_total = 0
        self._last_rx: float | None = None
        #: a PING is out: close at this time unless something arrives first (and why)
        self._probe_deadline: float | None = None
        self._probe_reason = "peer unresponsive"
        self._unacked = 0
        self._eliciting = 0  # ack-eliciting packets received
        self._data_queued = False

    def _share_frame_epochs(self) -> None:
        # aioquic builds ~30 frozensets per connection for its frame-handler table
        # (~7 KiB); with 1,000 idle tunnels that is 7 MB of identical sets.
        handlers = self._QuicConnection__frame_handlers
        for frame_type, (handler, epochs) in handlers.items():
            handlers[frame_type] = (handler, _EPOCH_SETS.setdefault(epochs, epochs))

    # -- flow control -------------------------------------------------------------
    def hold(self, stream_id: int, nbytes: int) -> None:
        """``nbytes`` of received stream data are buffered, unread, by the owner."""
        if nbytes:
            self._held[stream_id] = self._held.get(stream_id, 0) + nbytes
            self._held_total += nbytes

    def release(self, stream_id: int, nbytes: int | None = None) -> bool:
        """Held bytes were consumed (all of them if ``nbytes`` is None).

        Returns True when a window update became due (the owner should transmit).
        """
        held = self._held.get(stream_id, 0)
        nbytes = held if nbytes is None else min(nbytes, held)
        if not nbytes:
            return False
        if held == nbytes:
            del self._held[stream_id]
        else:
            self._held[stream_id] = held - nbytes
        self._held_total -= nbytes
        stream = self._streams.get(stream_id)
        if stream is not None and stream.max_stream_data_local:
            allowed = stream.receiver.highest_offset - self._held.get(stream_id, 0)
            if allowed + self._stream_window - stream.max_stream_data_local >= self._stream_window // 2:
                return True
        limit = self._local_max_data
        return limit.used - self._held_total + self._conn_window - limit.value >= self._conn_window // 2

    def send_buffered(self, stream_id: int) -> int:
        """Bytes queued on a stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def _write_stream_limits(self, builder, space, stream) -> None:
        # Called for every stream in every packet built: return early when there is
        # nothing to announce (most calls).
        local = stream.max_stream_data_local
        if not local:  # a locally opened unidirectional stream: nothing to receive
            return
        receiver = stream.receiver
        window = self._stream_window
        target = receiver.highest_offset - self._held.get(stream.stream_id, 0) + window
        if target - local >= window // 2:
            stream.max_stream_data_local = local = target
        if stream.max_stream_data_local_sent == local:
            return
        # Hide the received offset from aioquic's "double the window" rule.
        saved, receiver.highest_offset = receiver.highest_offset, 0
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = saved

    def _write_connection_limits(self, builder, space) -> None:
        limit = self._local_max_data
        target = limit.used - self._held_total + self._conn_window
        if target - limit.value >= self._conn_window // 2:
            limit.value = target
        saved, limit.used = limit.used, 0  # likewise for the connection window
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = saved

    # -- liveness -----------------------------------------------------------------
    @property
    def closed_event(self) -> events.ConnectionTerminated | None:
        """Why the connection is closing, as soon as it is (None while it is open)."""
        if self._state in END_STATES:
            return self._close_event or events.ConnectionTerminated(
                error_code=AppErrorCode.OK, frame_type=None, reason_phrase="closed")
        return None

    def _discard_epoch(self, epoch: tls.Epoch) -> None:
        super()._discard_epoch(epoch)
        if epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
            # aioquic keeps an 8 KiB handshake buffer per epoch for the connection's life:
            # 16 KiB per idle tunnel, for nothing once the epoch is gone.
            self._crypto_buffers[epoch] = Buffer(capacity=16)

    def _replenish_connection_ids(self) -> None:
        before = len(self._host_cids)
        super()._replenish_connection_ids()
        if self._reset_key is not None:
            for cid in self._host_cids[before:]:
                cid.stateless_reset_token = stateless_reset_token(self._reset_key, cid.cid)

    def _is_stateless_reset(self, data: bytes) -> bool:
        # aioquic does not detect stateless resets (RFC 9000 §10.3.1): a short-header
        # datagram ending with a token the peer gave us means the peer lost our state.
        if len(data) < 21 or data[0] & 0x80 or not self._handshake_complete:
            return False
        tail = data[-16:]
        token = self._peer_cid.stateless_reset_token
        if token and hmac.compare_digest(token, tail):
            return True
        return any(c.stateless_reset_token and hmac.compare_digest(c.stateless_reset_token, tail)
                   for c in self._peer_cid_available)

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        if self._state not in END_STATES and self._is_stateless_reset(data):
            self._close_event = events.ConnectionTerminated(
                error_code=AppErrorCode.SERVER_ERROR, frame_type=None,
                reason_phrase="stateless reset: the peer lost the connection")
            self._close_begin(is_initiator=False, now=now)
            return
        self._last_rx = now
        self._probe_deadline = None
        eliciting = self._eliciting
        super().receive_datagram(data, addr, now)
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and self._eliciting != eliciting:
            self._unacked += 1
            # aioquic treats an ACK as urgent (exempt from pacing) only once ack_at < now.
            space.ack_at = now - 1e-6 if self._unacked >= 2 else max(space.ack_at, now + ACK_DELAY)

    def _payload_received(self, context, plain, crypto_frame_required=False):
        result = super()._payload_received(context, plain, crypto_frame_required=crypto_frame_required)
        if result[0]:  # only ack-eliciting packets count towards "acknowledge every second"
            self._eliciting += 1
        return result

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        if data or end_stream:  # (H3 queues b"" on the QPACK decoder stream per request)
            self._data_queued = True

    def datagrams_to_send(self, now: float):
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if self._data_queued:
            # A delayed ACK rides along with data that leaves now (aioquic would hold it
            # back until its deadline and then send it alone, and the peer, having
            # received two datagrams, acknowledges at once: 4 datagrams per request
            # instead of 2 at one request in flight).
            self._data_queued = False
            if space is not None and space.ack_at is not None and space.ack_at > now:
                space.ack_at = now
        datagrams = super().datagrams_to_send(now)
        if space is not None and space.ack_at is None:
            self._unacked = 0
        return datagrams

    @property
    def keep_alive(self) -> float:
        """PING a quiet peer this often: the configured period, capped at half the idle
        timeout in force (the smaller of ours and the peer's, RFC 9000 §10.1)."""
        half_idle = self._idle_timeout() / 2
        return min(self.keep_alive_period, half_idle) if self.keep_alive_period else half_idle

    def suspect(self, now: float, reason: str = "peer unreachable") -> None:
        """Something says the peer may be gone (an ICMP port or host unreachable for its
        address): PING it now and close unless anything arrives from it within a few
        round trips. Not a close on the spot: an ICMP message is easy to forge."""
        if not self._handshake_complete or self._state in END_STATES:
            return
        rtt = self._loss._rtt_smoothed if self._loss._rtt_initialized else 0.0
        deadline = now + max(SUSPECT_GRACE, 3 * rtt)
        if self._probe_deadline is None:
            self.send_ping(0)
        elif self._probe_deadline <= deadline:
            return
        self._probe_deadline = deadline
        self._probe_reason = reason

    def _next_probe_at(self) -> float | None:
        if not self._handshake_complete or self._state in END_STATES or self._last_rx is None:
            return None
        if self._probe_deadline is not None:
            return self._probe_deadline
        quiet = BUSY_PROBE_INTERVAL if self.busy else self.keep_alive
        return self._last_rx + quiet

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
            self._probe_deadline = now + self.dead_peer_timeout
            self._probe_reason = "peer unresponsive"
            self.send_ping(0)
