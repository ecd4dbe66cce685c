"""The qh3 backend: qh3's QuicConnection (a native Rust QUIC core behind aioquic's API)
and its H3Connection, with what a long-lived tunnel needs (sans-io).

Where qh3 2.1 has no hook, the nearest equivalent (README, "QUIC backends"):

* **Flow control is bounded per connection, not per stream.** The native core grants
  MAX_DATA/MAX_STREAM_DATA credit when the wrapper pops a stream event from its queue,
  which it does at once after each datagram: credit follows arrival, whatever the
  application reads.  Here the native queue is gated: while the owner holds more than
  ``budget`` bytes unread (:meth:`TunnelQuicConnection.hold`), events wait in the native
  queue and no credit is granted; :meth:`~TunnelQuicConnection.release` opens it again.
  Memory stays bounded; the cost is that one stream nobody reads stalls the other streams
  of its connection once the budget is full (aioquic: only that stream).
* **Stateless resets**: the token of the handshake connection id is derived from the
  server key (peers that keep sending to it are reset after a restart, as with aioquic);
  the tokens of further connection ids are chosen by the native core, at random.  The
  core detects incoming resets itself and reports them as a bare close: relabelled here.
* Liveness (keep-alive, dead-peer probe, suspect) from :class:`~reverst.quic._common.Liveness`.
* Its H3 layer checks no Content-Length: :class:`ReversedH3Connection` does, failing
  just that stream, as aioquic does.

Touches private qh3 names (``_core``, ``_drain_core``, ``_call_core``, ``_normalize_address``,
``_create_tls``, ``_close_event``, ``_tls``, ``_events``; in its H3 layer ``_receive_stream_data``,
``_handle_request_or_push_frame``, ``_maybe_cleanup_stream`` and the H3Stream parser
state): keep the pin in setup.cfg and the loopback tests.
"""
from __future__ import annotations

import logging
import ssl
from types import SimpleNamespace

from qh3 import tls as qh3_tls
from qh3._hazmat import QpackDecoder, QpackEncoder, encode_uint_var
from qh3.h3 import events as h3_events
from qh3.h3.connection import (FieldSectionTooLarge, FrameType, H3Connection, H3Stream, HeadersState, MessageError,
                               encode_frame)
from qh3.h3.connection import ProtocolError as H3ProtocolError
import qh3.h3.connection as _qh3_h3
from qh3.h3.exceptions import H3Error
from qh3.quic import events as quic_events
from qh3.quic.configuration import QuicConfiguration
import qh3.quic.connection as _qh3_connection
from qh3._hazmat import Buffer
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import pull_quic_transport_parameters, push_quic_transport_parameters

from ..http3 import MAX_HEADERS_FRAME, ReversedRoles
from ..protocol import ALPN, AppErrorCode
from ._common import Liveness, coalesced_count, split_coalesced, stateless_reset_token

NAME = "qh3"
#: qh3 2.1's server cannot answer a client whose source connection id is empty, as
#: quic-go's dialer makes it (the Go reverst client): the core keeps the client's original
#: destination id as the peer's, addresses its replies to it, and the client drops them.
#: (One id serves both as the peer's id and to recognise and decrypt the client's Initials,
#: so no wrapper can split them.) The shell serves such clients with another backend.
SERVES_EMPTY_CLIENT_CIDS = False
#: A writer blocks while more bytes than this wait in a stream's send queue.  Here
#: (:meth:`TunnelQuicConnection.send_buffered`) that counts bytes not yet sent, not those
#: in flight: the peer's window bounds those.  256 KB keeps the pipe fed (writers are
#: woken at half) and held 10 MB GETs at 4 connections at ~10 MB less memory than 1 MB,
#: at the same or better throughput (docs/performance.md).
SEND_HIGH_WATER = 256 * 1024
#: Most datagrams one scheduled transmit builds (``datagrams_to_send(now, limit)``); the
#: shell sends them and transmits again after the others in the loop had a turn. 64 (~93 KB)
#: take ~0.15 ms; a bulk sender's congestion window on loopback (tens of MB) let one transmit
#: build 400-1,100, 1-3 ms in which no other request was served (_transport.LOOP_TURN_LIMIT).
TRANSMIT_LIMIT = 64
#: Bytes in flight on a connection (sent, not yet acknowledged: kept in the native core's
#: memory) above which writers also wait while the path queues (``send_backlog``): while the
#: smoothed RTT is more than ``QUEUEING_RTT_RATIO`` times the least RTT seen, more data in
#: flight only lengthens the queue (on loopback, the peer's own read loop), and qh3's
#: congestion window, which no loss ever bounds there, let it reach ~7 MB per connection.
#: Where the RTT is the path's own (a long path, no queue) flow control alone bounds it.
IN_FLIGHT_FLOOR = 2 * 1024 * 1024
QUEUEING_RTT_RATIO = 2.0
#: How long the least RTT seen stands before a new sample replaces it (a route may change).
MIN_RTT_SPAN = 10.0
#: Receive windows, which qh3 2.1 takes once, at construction (no auto-tuning). A stream's
#: bounds what one stream has in flight: credit comes back in steps, so about half of it is
#: in flight per round trip. Down a 100 ms path 4 MB gave 19 MB/s (Go: 19) and 8 MB 34 MB/s;
#: on loopback 8 MB changed neither memory nor throughput (docs/performance.md). The
#: connection's, twice a stream's, bounds what a tunnel connection holds unread
#: (``budget``): 16 MB, the same as with 4 MB streams (it was four times a stream's then).
STREAM_WINDOW = 8 * 1024 * 1024

import qh3 as _library  # noqa: E402

#: The versions whose private names this module was tested with (setup.cfg pins them too).
SUPPORTED = ">=2.1,<2.2"
if not (2, 1) <= tuple(int(p) for p in _library.__version__.split(".")[:2]) < (2, 2):
    raise ImportError(f"qh3 {_library.__version__} is not supported by this reverst (needs qh3{SUPPORTED})")
logger = logging.getLogger(__name__)
_quic_logger = logging.getLogger("quic")


def _validate_headers(headers, allowed_pseudo_headers, required_pseudo_headers, extract_header=None):
    """qh3 2.1's ``h3.connection.validate_headers``, the same checks and errors, with the
    upper-case test done by ``bytes.lower()`` instead of a Python loop over every byte of
    every name (that loop was 3% of a busy reverstd's CPU, and as much of a client's).
    Installed in its module below, where its callers (request, response, trailer and
    push-promise validation) look it up."""
    after_pseudo_headers = False
    authority = path = scheme = extracted = None
    seen: set[bytes] = set()
    for key, value in headers:
        if key.lower() != key:
            raise MessageError(f"Header {key!r} contains uppercase letters")
        if extract_header is not None and extracted is None:
            extracted = value
        if key[:1] == b":":
            if after_pseudo_headers:
                raise MessageError(f"Pseudo-header {key!r} is not allowed after regular headers")
            if key not in allowed_pseudo_headers:
                raise MessageError(f"Pseudo-header {key!r} is not valid")
            if key in seen:
                raise MessageError(f"Pseudo-header {key!r} is included twice")
            seen.add(key)
            if key == b":authority":
                authority = value
            elif key == b":path":
                path = value
            elif key == b":scheme":
                scheme = value
        else:
            after_pseudo_headers = True
    if not required_pseudo_headers.issubset(seen):
        raise MessageError(f"Pseudo-headers {sorted(required_pseudo_headers.difference(seen))} are missing")
    if scheme in (b"http", b"https"):
        if not authority:
            raise MessageError("Pseudo-header b':authority' cannot be empty")
        if not path:
            raise MessageError("Pseudo-header b':path' cannot be empty")
    return extracted


_qh3_h3.validate_headers = _validate_headers


class _NativeCloseNoise(logging.Filter):
    """qh3 logs every peer close and local protocol error at WARNING on logger ``quic``;
    reverst reports closes itself. Keep them for ``quic`` at debug only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Native ") or _quic_logger.isEnabledFor(logging.DEBUG)


_quic_logger.addFilter(_NativeCloseNoise())
_DataReceived, _HeadersReceived = h3_events.DataReceived, h3_events.HeadersReceived

_OPEN_STATES = ("first_flight", "connected")
_DATA_FRAME, _HEADERS_FRAME = int(FrameType.DATA), int(FrameType.HEADERS)
_NO_CONTENT = ((b":status", b"204"), (b":status", b"304"))
#: Hold an ACK that would leave alone up to this long, unless two datagrams came in since
#: our last send: a request/response exchange then carries its ACKs. The native core
#: acknowledges a FIN at once (4-5 datagrams per lone request instead of 2).
ACK_HOLD = 0.005


class _GatedCore:
    """The native core as ``_drain_core`` sees it: no event while the gate is shut."""

    __slots__ = ("_core", "_owner")

    def __init__(self, core, owner: "TunnelQuicConnection") -> None:
        self._core, self._owner = core, owner

    def next_event(self):
        if self._owner._gate_shut():
            return None
        return self._core.next_event()

    def __getattr__(self, name):
        return getattr(self._core, name)


#: qh3 2.1 passes its (fixed) limit of peer-opened bidirectional streams to the native core
#: as this positional argument; see request_streams.
_CORE_LOCAL_MAX_STREAMS_BIDI = 21
_QH3_MAX_STREAMS_BIDI = 100


class TunnelQuicConnection(Liveness, QuicConnection):
    def __init__(self, *, keep_alive: float | None = None, dead_peer_timeout: float = 5.0,
                 reset_key: bytes | None = None, request_streams: int | None = None, **kwargs) -> None:
        self._reset_key = reset_key  # (read by _create_tls, during super().__init__ or later)
        #: streams the peer may have open at once (qh3 2.1: a fixed 100), see _create_core
        self._request_streams = request_streams
        super().__init__(**kwargs)
        self._init_liveness(keep_alive, dead_peer_timeout)
        #: unread bytes the owner may hold before no more credit is granted
        self.budget = self._configuration.max_data
        self._held: dict[int, int] = {}
        self._held_total = 0
        self._received_since_sent = 0  # datagrams
        self._ack_hold_until: float | None = None
        self._credit_granted = False  # by release(): MAX_DATA / MAX_STREAM_DATA to send now
        self._min_rtt: float | None = None  # least RTT sample of the last MIN_RTT_SPAN
        self._min_rtt_at = 0.0
        self._rtt_seen: float | None = None  # the core's latest RTT sample when last looked at

    # -- what the shell asks --------------------------------------------------------------
    @property
    def handshake_complete(self) -> bool:
        return self._handshake_complete

    @property
    def smoothed_rtt(self) -> float | None:
        return self._core.smoothed_rtt if self._core is not None else None

    @property
    def lost_packets(self) -> int:
        return self._core.loss_total if self._core is not None else 0

    def open_stream(self) -> int:
        """The id of a new locally initiated bidirectional stream (used by the next send);
        check :meth:`can_open_stream` first (qh3 raises beyond the peer's limit)."""
        return self.get_next_available_stream_id()

    def can_open_stream(self) -> bool:
        if self._core is None or not self._handshake_complete:
            return True
        peer_max, _, opened, _ = self._core.stream_limits
        return opened < peer_max

    def send_stream_data(self, stream_id: int, data, end_stream: bool = False) -> None:
        # The HTTP/3 layer writes the QPACK instructions of each HEADERS frame it encodes
        # or decodes, and with no dynamic table there are none: an empty write to a
        # unidirectional stream (each opened with its type byte) is skipped, a native
        # call less per HEADERS frame.
        if data or end_stream or not stream_id & 2:
            super().send_stream_data(stream_id, data, end_stream)

    def send_buffered(self, stream_id: int) -> int:
        """Bytes queued on a stream and not yet sent (qh3 tells no per-stream unacked
        count; this one grows exactly when flow control, congestion or pacing hold data)."""
        try:
            return self.get_send_buffer_size(stream_id)
        except ValueError:
            return 0

    def send_backlog(self, stream_id: int) -> int:
        """What counts against a writer's high water: the stream's unsent bytes, plus the
        connection's bytes in flight beyond ``IN_FLIGHT_FLOOR`` while the path queues."""
        backlog = self.send_buffered(stream_id)
        core = self._core
        if core is None:
            return backlog
        excess = core.bytes_in_flight - IN_FLIGHT_FLOOR
        if excess > 0 and self._min_rtt is not None:
            srtt = core.smoothed_rtt
            if srtt is not None and srtt > QUEUEING_RTT_RATIO * self._min_rtt:
                backlog += excess
        return backlog

    def _sample_rtt(self, now: float) -> None:
        rtt = self._core.latest_rtt
        if rtt is None or rtt == self._rtt_seen:
            return  # no new sample since the last look (a stale one must not renew the least)
        self._rtt_seen = rtt
        if self._min_rtt is None or rtt <= self._min_rtt or now - self._min_rtt_at > MIN_RTT_SPAN:
            self._min_rtt, self._min_rtt_at = rtt, now

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        try:
            super().reset_stream(stream_id, error_code)
        except (ValueError, QuicConnectionError):
            pass  # finished, unknown or closed: nothing left to reset (aioquic ignores it too)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        try:
            super().stop_stream(stream_id, error_code)
        except (ValueError, QuicConnectionError):
            pass

    def datagrams_to_send(self, now: float, limit: int | None = None):
        hold = self._held_ack_until()
        if hold is not None and now < hold:
            return []  # nothing but an ACK (and control frames) would leave: wait for an answer
        datagrams = self._poll_datagrams(now, limit)
        if datagrams:
            self._sample_rtt(now)
            self._received_since_sent = 0
            self._credit_granted = False
            self._ack_hold_until = None
        return datagrams

    def _poll_datagrams(self, now: float, limit: int | None = None) -> list:
        """qh3's datagrams_to_send, keeping what was built before an error. qh3 2.1 raises
        "packet builder capacity exhausted" when the anti-amplification limit cuts the
        server's first flight short, and its own loop then loses the datagrams polled
        before (already counted in flight): with an aioquic client, whose Initial packet is
        ~530 bytes padded *after* the packet to 1,452 (qh3's budget counts the packet),
        nothing left until the client's retransmission, a stall of ~1.2 s per handshake."""
        core = self._core
        if core is None:
            return []
        datagrams = []
        while True:
            try:
                transmit = core.poll_transmit(now)
            except RuntimeError as exc:  # (later calls work again)
                logger.debug("poll_transmit: %s", exc)
                break
            if transmit is None:
                break
            if self._quic_logger is not None:
                self._log_datagram("datagrams_sent", transmit[0])
                self._log_packets("packet_sent", transmit[0])
            datagrams.append((transmit[0], transmit[1]))
            if len(datagrams) == limit:
                break
        return datagrams

    def _may_hold_ack(self) -> bool:
        """An ACK may wait for the next answer: at most one datagram awaits it, no credit
        was just granted, and no stream data is queued (it would carry the ACK at once)."""
        core = self._core
        return (core is not None and self._handshake_complete and self._close_event is None
                and self._received_since_sent <= 1 and not self._credit_granted
                and core.get_send_buffer_size(None) == 0)

    def _held_ack_until(self) -> float | None:
        """Until when an ACK that would leave alone is held (None: nothing is held). A hold
        starts when the next native deadline is an ACK and :meth:`_may_hold_ack`."""
        if not self._may_hold_ack():
            return None
        if self._ack_hold_until is None:
            native = self._core.get_timer()
            if native is None or native[0] != "ack_application":
                return None
            self._ack_hold_until = native[1] + ACK_HOLD
        return self._ack_hold_until

    def get_timer(self) -> float | None:
        at = super().get_timer()
        hold = self._held_ack_until()
        if hold is None:
            return at
        native = self._core.get_timer()
        if native is not None and native[0] == "ack_application":  # it gives way to the hold
            probe = self._next_probe_at()
            return hold if probe is None else min(hold, probe)
        return hold if at is None or hold < at else at

    def handle_timer(self, now: float) -> None:
        try:
            super().handle_timer(now)
        except QuicConnectionError as exc:
            logger.debug("handle_timer: %s", exc)

    def _log_packets(self, event: str, data: bytes) -> None:
        # qh3 parses every sent packet's header in Python before its logger check (8% of a
        # bulk sender's time): nothing to do without a QUIC logger.
        if self._quic_logger is not None:
            super()._log_packets(event, data)

    # -- receiving ---------------------------------------------------------------------------
    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        self._heard_from_peer(now)
        was_open = self._close_event is None
        if self._handshake_complete:  # one native call (the wrapper splits packets in Python)
            self.receive_many_datagrams([data], addr, now)
        else:
            super().receive_datagram(data, addr, now)
        self._received(1, was_open)

    def receive_datagrams(self, datagrams: list[bytes], addr, now: float) -> None:
        self._heard_from_peer(now)
        was_open = self._close_event is None
        self.receive_many_datagrams(datagrams, addr, now)
        self._received(len(datagrams), was_open)

    def receive_coalesced(self, buffer: bytes, segment_size: int, addr, now: float) -> None:
        """Datagrams the kernel coalesced (UDP GRO), split in the native core: no copy of
        each datagram in Python, one call per buffer."""
        if not self._handshake_complete or self._core is None:  # (qh3 would split it too)
            self.receive_datagrams(split_coalesced(buffer, segment_size), addr, now)
            return
        self._heard_from_peer(now)
        was_open = self._close_event is None
        if self._quic_logger is not None:
            super().receive_gro_buffer(buffer, segment_size, addr, now)
        else:  # (qh3's method slices each datagram out for its logger, wanted or not)
            self._call_core(self._core.receive_gro_buffer, buffer, segment_size, self._normalize_address(addr), now)
            self._drain_core()
        self._received(coalesced_count(buffer, segment_size), was_open)

    def _received(self, count: int, was_open: bool) -> None:
        self._relabel_stateless_reset(was_open)
        # Datagrams that wait for our ACK (see _hold_ack); an ACK-only one leaves nothing to
        # acknowledge, and must not count towards sending the next ACK at once.
        timer = self._core.get_timer() if self._core is not None else None
        if timer is not None and timer[0] == "ack_application":
            self._received_since_sent += count
        else:
            self._received_since_sent = 0

    def _relabel_stateless_reset(self, was_open: bool) -> None:
        # The core ends a connection at once on a stateless reset and reports
        # ConnectionTerminated(0, None, ""), which reads as the peer's clean close;
        # a peer's CONNECTION_CLOSE leaves it draining instead.
        event = self._close_event
        if (was_open and event is not None and self._core is not None and self._core.state == "terminated"
                and event.error_code == 0 and event.frame_type is None and not event.reason_phrase):
            event.error_code = AppErrorCode.SERVER_ERROR
            event.reason_phrase = "stateless reset: the peer lost the connection"

    # -- flow control: gate the native event queue (see the module docstring) ---------------------
    def _gate_shut(self) -> bool:
        # A closing connection drains at once: its close reason must not wait behind data.
        return (self._held_total >= self.budget and self._handshake_complete
                and self._core.state == "connected")

    def _drain_core(self) -> None:
        if self._held_total < self.budget:  # the gate cannot shut during this drain (the owner
            super()._drain_core()          # reports what it holds after it): no proxy needed
            return
        core = self._core
        self._core = _GatedCore(core, self)
        try:
            super()._drain_core()
        finally:
            self._core = core

    def hold(self, stream_id: int, nbytes: int) -> None:
        """``nbytes`` of received stream data are buffered, unread, by the owner."""
        if nbytes:
            self._held[stream_id] = self._held.get(stream_id, 0) + nbytes
            self._held_total += nbytes

    def release(self, stream_id: int, nbytes: int | None = None) -> bool:
        """Held bytes were consumed (all of them if ``nbytes`` is None). True when events
        waited at the gate and were let through now: the owner should process them and
        transmit (their credit goes out with the next packet)."""
        held = self._held.get(stream_id, 0)
        nbytes = held if nbytes is None else min(nbytes, held)
        if not nbytes:
            return False
        shut = self._gate_shut()
        if held == nbytes:
            del self._held[stream_id]
        else:
            self._held[stream_id] = held - nbytes
        self._held_total -= nbytes
        if shut and not self._gate_shut() and self._core is not None and self._core.has_events:
            self._drain_core()
            self._credit_granted = True
            return True
        return False

    # -- closing, liveness and stateless-reset tokens ---------------------------------------------
    @property
    def closed_event(self) -> quic_events.ConnectionTerminated | None:
        """Why the connection is closing, as soon as it is (None while it is open): qh3
        records a close it makes, receives or detects at once, ~3 PTO before it emits
        ConnectionTerminated."""
        event = self._close_event
        if event is None and self._core is not None and self._core.state not in _OPEN_STATES:
            return quic_events.ConnectionTerminated(AppErrorCode.OK, None, "closed")
        return event

    def _closing(self) -> bool:
        return self._close_event is not None

    def _idle_timeout_in_force(self) -> float:
        ours = self._configuration.idle_timeout
        params = self._tls.remote_transport_parameters if self._tls is not None else None
        theirs = params.max_idle_timeout / 1000 if params is not None and params.max_idle_timeout else None
        return min(ours, theirs) if theirs else ours

    def _rtt(self) -> float | None:
        return self.smoothed_rtt

    # -- more concurrent streams than qh3's fixed 100 (a tunnel client: requests and WebSockets) --
    def _create_core(self, remote_addr, initial_dcid: bytes, now: float) -> None:
        if not self._request_streams:
            super()._create_core(remote_addr, initial_dcid, now)
            return
        real, limit = _qh3_connection.QuicConnectionCore, self._request_streams

        def core(*args):
            args = list(args)
            if args[_CORE_LOCAL_MAX_STREAMS_BIDI] == _QH3_MAX_STREAMS_BIDI:  # (as in qh3 2.1)
                args[_CORE_LOCAL_MAX_STREAMS_BIDI] = limit
            return real(*args)
        _qh3_connection.QuicConnectionCore = core  # (sans-io and single-threaded: only for this call)
        try:
            super()._create_core(remote_addr, initial_dcid, now)
        finally:
            _qh3_connection.QuicConnectionCore = real

    def _create_tls(self, remote_source_cid):
        bridge = super()._create_tls(remote_source_cid)
        if self._request_streams:  # what the core now enforces, told to the peer
            serialize, limit = bridge.serialize_transport_parameters, self._request_streams

            def with_request_streams() -> bytes:
                params = pull_quic_transport_parameters(Buffer(data=serialize()))
                params.initial_max_streams_bidi = limit
                buf = Buffer(capacity=4096)
                push_quic_transport_parameters(buf, params)
                return buf.data
            bridge.serialize_transport_parameters = with_request_streams
            bridge.tls.handshake_extensions = [
                (qh3_tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS, with_request_streams())]
        if self._reset_key is not None and not self._is_client:
            bridge.stateless_reset_token = stateless_reset_token(self._reset_key, self.host_cid)
            bridge.tls.handshake_extensions = [
                (qh3_tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS, bridge.serialize_transport_parameters())]
        return bridge


class ReversedH3Connection(ReversedRoles, H3Connection):
    """qh3's H3Connection with the HTTP role given (see reverst.http3.ReversedRoles), and
    the Content-Length checks aioquic makes (qh3 makes none)."""

    _stream_class = H3Stream
    _message_error = MessageError
    #: qh3 raises FieldSectionTooLarge (a connection error) for a HEADERS frame or a
    #: decoded section over its limits: here it fails just that stream
    _stream_errors = (MessageError, FieldSectionTooLarge)

    #: Header sections one QPACK encoder encodes before a new one takes over (see
    #: :meth:`_encode_headers`): its per-stream map stays below ~40 KB.
    ENCODER_SECTIONS = 1024

    def __init__(self, quic, *, http_client: bool) -> None:
        self._expected_length: dict[int, list[int]] = {}  # stream -> [declared, received]
        self._sections_encoded = 0
        super().__init__(quic, http_client=http_client)

    def _init_connection(self) -> None:
        self._max_encoded_field_section_size = MAX_HEADERS_FRAME  # (qh3: 4 MiB)
        super()._init_connection()

    @staticmethod
    def _goaway_frame(stream_id: int) -> bytes:
        return encode_frame(FrameType.GOAWAY, encode_uint_var(stream_id))

    def _no_dynamic_table_decoder(self):
        return QpackDecoder(0, 0, max_field_section_size=self._max_field_section_size)

    def _static_table_encoder(self):
        return QpackEncoder()  # (never configured: no dynamic table)

    def _handle_control_frame(self, frame_type: int, frame_data: bytes):
        events = super()._handle_control_frame(frame_type, frame_data)
        if frame_type == FrameType.GOAWAY:
            self.goaway_received = True
        return events

    def _encode_headers(self, stream_id: int, headers) -> bytes:
        # qh3's encoder (ls-qpack-rs 0.3) keeps a counter for every stream it ever encoded
        # a section for, in a map it never prunes: 16-34 bytes per request for the life of
        # the connection, in each process (9 MB per 250,000 sections; through a tunnel at
        # ~5,000 requests/s, reverstd and expose grew by 13 MB each in a minute). A new
        # encoder every ENCODER_SECTIONS sections bounds it (ours inserts nothing in a
        # dynamic table: see ReversedRoles); creating one costs ~0.14 µs.
        self._sections_encoded += 1
        if self._sections_encoded > self.ENCODER_SECTIONS:
            self._encoder = self._static_table_encoder()
            self._sections_encoded = 1
        return super()._encode_headers(stream_id, headers)

    def _get_or_create_stream(self, stream_id: int) -> H3Stream:
        stream = self._stream.get(stream_id)
        return stream if stream is not None else self._new_stream(stream_id)

    def forget_stream(self, stream_id: int) -> None:
        super().forget_stream(stream_id)
        self._expected_length.pop(stream_id, None)

    def _receive_stream_data(self, event):
        # The usual piece of a request or response stream holds whole frames: a HEADERS
        # frame first, DATA frames after it. Those are split here in one pass; any other
        # piece (a frame cut across packets, trailers, an unknown or unexpected frame
        # type, a lone FIN, a stream with bytes buffered) takes qh3's general parser.
        # A HEADERS frame is still handled by the library (decoding, validation, state);
        # a DATA frame is too where its state makes it an error. The general parser's
        # bookkeeping was ~5 µs of the ~40-60 µs this layer spent on a small request or
        # response, in each process (docs/performance.md).
        sid = event.stream_id
        if sid & 2 or self._quic_logger is not None or sid in self.malformed:
            return super()._receive_stream_data(event)
        stream = self._get_or_create_stream(sid)
        if stream.buffer or stream.blocked or stream.frame_size is not None:
            return super()._receive_stream_data(event)
        data = event.data
        frames = _whole_frames(data, stream.headers_recv_state is HeadersState.INITIAL,
                               self._max_encoded_field_section_size)
        if not frames:
            return super()._receive_stream_data(event)
        ended = event.end_stream
        if ended:
            stream.receiving_ended = True
        emitted = []
        last = frames[-1]
        for frame in frames:
            kind, start, length = frame
            frame_ended = ended and frame is last
            if kind == _DATA_FRAME and stream.headers_recv_state is HeadersState.AFTER_HEADERS:
                if length or frame_ended:
                    emitted.append(_DataReceived(data=data[start:start + length], push_id=None, stream_id=sid,
                                                 stream_ended=frame_ended))
                continue
            if kind == _HEADERS_FRAME:
                emitted += self._handle_request_or_push_frame(kind, data, stream, frame_ended,
                                                              frame_offset=start, frame_length=length)
            else:  # (DATA after an interim head: the library's error)
                emitted += self._handle_request_or_push_frame(kind, data[start:start + length], stream, frame_ended)
            if sid in self.malformed:
                break
        if (ended and stream.headers_recv_state is HeadersState.AFTER_HEADERS
                and not (emitted and getattr(emitted[-1], "stream_ended", False))):
            emitted.append(_DataReceived(data=b"", push_id=None, stream_id=sid, stream_ended=True))
        self._maybe_cleanup_stream(stream)
        return emitted

    def send_head(self, stream_id: int, headers, data: bytes, end_stream: bool) -> None:
        # A final response's head and its first piece of body leave as one write (qh3's
        # send_headers and send_data would make two, each with its own bookkeeping); any
        # other head takes the library's way.
        stream = self._stream.get(stream_id)
        if (self._http_client or stream is None or stream.headers_send_state is not HeadersState.INITIAL
                or self._quic_logger is not None or not headers or headers[0][1][:1] == b"1"):
            return super().send_head(stream_id, headers, data, end_stream)
        frames = encode_frame(FrameType.HEADERS, self._encode_headers(stream_id, headers)) + encode_frame(
            FrameType.DATA, data)
        stream.headers_send_state = HeadersState.AFTER_HEADERS
        if end_stream:
            stream.finish_sending()
        self._quic.send_stream_data(stream_id, frames, end_stream)
        self._maybe_cleanup_stream(stream)

    def handle_event(self, event):
        # Checked on what the layer emits: large DATA frames reach the application in
        # pieces that never pass through _handle_request_or_push_frame.
        emitted = super().handle_event(event)
        if not emitted:
            return emitted
        expected, malformed = self._expected_length, self.malformed
        dropped = None
        for h3_event in emitted:
            cls = h3_event.__class__
            if cls is _DataReceived:
                sid = h3_event.stream_id
                if sid not in expected and sid not in malformed:
                    continue  # the usual piece of a body: no length to follow
            elif cls is not _HeadersReceived:
                continue
            if not self._length_ok(h3_event):
                dropped = (dropped or set()) | {h3_event.stream_id}
        if dropped:
            return [e for e in emitted if getattr(e, "stream_id", None) not in dropped]
        return emitted

    def _length_ok(self, h3_event) -> bool:
        """Follow the stream's Content-Length through this event; False (and the stream
        marked malformed) when it breaks it."""
        sid = h3_event.stream_id
        if sid in self.malformed:
            return False
        try:
            if h3_event.__class__ is _HeadersReceived:
                self._headers_length(sid, h3_event.headers)
            else:
                self._data_length(sid, len(h3_event.data))
            if h3_event.stream_ended:
                self._end_length(sid)
        except MessageError as exc:
            self.malformed[sid] = exc.reason_phrase
            self._expected_length.pop(sid, None)
            return False
        return True

    def _headers_length(self, sid: int, headers) -> None:
        if sid in self._expected_length:
            return  # trailers
        values = [v for k, v in headers if k == b"content-length"]
        if not values:
            return
        if len(set(values)) != 1 or not values[0].isdigit():
            raise MessageError("invalid content-length header")
        declared = int(values[0])
        # (validated: the pseudo-fields come first, and a response's only one is :status)
        no_content = sid in self._head_requests or headers[0] in _NO_CONTENT
        self._expected_length[sid] = [0 if no_content else declared, 0]

    def _data_length(self, sid: int, size: int) -> None:
        counts = self._expected_length.get(sid)
        if counts is not None:
            counts[1] += size
            if counts[1] > counts[0]:
                raise MessageError("content-length exceeded")

    def _end_length(self, sid: int) -> None:
        counts = self._expected_length.pop(sid, None)
        if counts is not None and counts[1] != counts[0]:
            raise MessageError("content-length does not match data length")


def _whole_frames(data: bytes, initial: bool, headers_limit: int) -> list[tuple[int, int, int]] | None:
    """``[(type, offset, length)]`` of the HTTP/3 frames ``data`` holds whole, when they are
    a request or response's usual frames (``initial``: the stream's head is still to
    come): one HEADERS frame first if ``initial``, then DATA frames. None otherwise."""
    frames = []
    pos, end = 0, len(data)
    while pos < end:
        kind = data[pos]  # (DATA 0x0 and HEADERS 0x1 are one-byte varints)
        if kind > _HEADERS_FRAME or (kind == _HEADERS_FRAME) != initial or pos + 1 >= end:
            return None
        first = data[pos + 1]
        size = 1 << (first >> 6)
        if pos + 1 + size > end:
            return None
        length = first & 0x3F if size == 1 else int.from_bytes(data[pos + 1:pos + 1 + size], "big") & (
            (1 << (8 * size - 2)) - 1)
        pos += 1 + size
        if pos + length > end or (kind == _HEADERS_FRAME and length > headers_limit):
            return None
        frames.append((kind, pos, length))
        pos += length
        initial = False
    return frames


# -- the backend as the shell sees it (reverst.quic.Backend) ------------------------------------
events = SimpleNamespace(
    StreamDataReceived=quic_events.StreamDataReceived, StreamReset=quic_events.StreamReset,
    StopSendingReceived=quic_events.StopSendingReceived,
    HandshakeCompleted=quic_events.HandshakeCompleted,
    ConnectionIdIssued=quic_events.ConnectionIdIssued,
    ConnectionIdRetired=quic_events.ConnectionIdRetired,
    ConnectionTerminated=quic_events.ConnectionTerminated,
    HeadersReceived=h3_events.HeadersReceived, DataReceived=h3_events.DataReceived,
)
#: What a send on a stream the peer reset (or asked to stop) may raise.
STREAM_ERRORS = (H3Error, H3ProtocolError, ValueError, QuicConnectionError)


def _configuration(is_client: bool, idle_timeout: float, max_datagram_size: int, window: int,
                   **kwargs) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client, alpn_protocols=[ALPN], idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size, max_stream_data=window, max_data=2 * window,
        # qh3's H3 layer always sends SETTINGS_H3_DATAGRAM, and a qh3 peer then requires
        # this transport parameter (else H3_SETTINGS_ERROR).  No datagram is ever sent.
        max_datagram_frame_size=65536, **kwargs)


def client_configuration(*, server_name: str, idle_timeout: float, max_datagram_size: int,
                         insecure: bool = False, ca_file: str | None = None, ca_data: bytes | None = None,
                         window: int = STREAM_WINDOW) -> QuicConfiguration:
    cfg = _configuration(True, idle_timeout, max_datagram_size, window, server_name=server_name)
    if insecure:
        cfg.verify_mode = ssl.CERT_NONE
    elif ca_file or ca_data:
        cfg.load_verify_locations(cafile=ca_file, cadata=ca_data)
    return cfg


def server_configuration(*, certificate_path: str, private_key_path: str, idle_timeout: float,
                         max_datagram_size: int = 1452, window: int = STREAM_WINDOW) -> QuicConfiguration:
    cfg = _configuration(False, idle_timeout, max_datagram_size, window)
    cfg.load_cert_chain(certificate_path, private_key_path)
    return cfg


def client_connection(configuration: QuicConfiguration, **options) -> TunnelQuicConnection:
    return TunnelQuicConnection(configuration=configuration, **options)


def server_connection(configuration: QuicConfiguration, original_destination_connection_id: bytes,
                      retry_source_connection_id: bytes | None = None, **options) -> TunnelQuicConnection:
    """A server connection; after a Retry, ``retry_source_connection_id`` is its source id
    (both ids go into our transport parameters, which the client checks)."""
    return TunnelQuicConnection(configuration=configuration,
                                original_destination_connection_id=original_destination_connection_id,
                                retry_source_connection_id=retry_source_connection_id, **options)


def h3_connection(quic: TunnelQuicConnection, *, http_client: bool) -> ReversedH3Connection:
    return ReversedH3Connection(quic, http_client=http_client)
