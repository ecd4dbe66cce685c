"""The aioquic backend: aioquic's QuicConnection and H3Connection with what a long-lived
tunnel needs (sans-io).

* Receive windows follow what the application consumed, not what arrived: aioquic
  doubles a window whenever half of it has been *received*, so a fast sender could fill
  unbounded memory behind a slow reader.  Here the owner reports bytes it holds
  (:meth:`TunnelQuicConnection.hold`) and releases them as they are read
  (:meth:`~TunnelQuicConnection.release`); windows only grow past bytes released, per stream.
* Liveness (keep-alive, dead-peer probe, suspect) from :class:`~reverst.quic._common.Liveness`.
* :attr:`~TunnelQuicConnection.closed_event` exposes a peer's or our own close as soon as
  the connection enters closing/draining; aioquic only emits ConnectionTerminated ~3 PTO later.
* Stateless resets: tokens derived from the server key on every connection id we issue,
  and detection of incoming resets (aioquic has none).
* Delayed ACKs that ride on the data of the next answer.
* Loss detection that adapts to reordering (:class:`_ReorderingRecovery`): a packet
  declared lost and acknowledged later raises the packet/time thresholds past what the
  path did, and undoes the window cut when the whole congestion event was spurious; and
  CUBIC instead of aioquic's default Reno.

Touches private aioquic names: keep the pin in setup.cfg and the loopback tests.
"""
from __future__ import annotations

import contextlib
import hmac
import ssl
from types import SimpleNamespace

import pylsqpack
from aioquic import tls
from aioquic.buffer import Buffer, encode_uint_var
from aioquic.h3 import events as h3_events
from aioquic.h3.connection import FrameType, H3Connection, H3Stream, MessageError, encode_frame
from aioquic.h3.connection import ProtocolError as H3ProtocolError
from aioquic.h3.exceptions import H3Error
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import END_STATES, QuicConnection
from aioquic.quic.recovery import K_PACKET_THRESHOLD, K_TIME_THRESHOLD, QuicPacketRecovery

from ..http3 import MAX_HEADERS_FRAME, ReversedRoles
from ..protocol import ALPN, AppErrorCode
from ._common import Liveness, is_stateless_reset_candidate, split_coalesced, stateless_reset_token

NAME = "aioquic"
SERVES_EMPTY_CLIENT_CIDS = True  # (see reverst.quic._qh3)
#: A writer blocks while more bytes than this are queued and unacknowledged on a stream
#: (:meth:`TunnelQuicConnection.send_buffered` counts the bytes in flight too).
SEND_HIGH_WATER = 1024 * 1024
#: aioquic builds all it may send in one call: no limit per transmit (see reverst.quic._qh3)
TRANSMIT_LIMIT = None

import aioquic as _library  # noqa: E402

#: The versions whose private names this module was tested with (setup.cfg pins them too).
SUPPORTED = ">=1.7,<1.8"
if not (1, 7) <= tuple(int(p) for p in _library.__version__.split(".")[:2]) < (1, 8):
    raise ImportError(f"aioquic {_library.__version__} is not supported by this reverst (needs aioquic{SUPPORTED})")

#: Delay an ACK up to this long (aioquic: 1 ms) unless a second datagram needs one: a
#: request/response exchange then carries its ACKs instead of paying for ACK-only packets.
ACK_DELAY = 0.005

_EPOCH_SETS: dict[frozenset, frozenset] = {}

#: aioquic's default is Reno; CUBIC (as quic-go) regrows the window faster after a loss
#: (bench/impaired.py, 1% loss: downloads 0.6-1.0 -> 1.0-1.6 MB/s).
CONGESTION_CONTROL = "cubic"

#: Reordering tolerance (RFC 9002 §6.1: thresholds MAY adapt): a packet declared lost and
#: then acknowledged after all raises the packet threshold past its reordering distance and
#: the time threshold past its delay, up to these; and when every packet a congestion event
#: was for turns out so, the congestion window it cut is restored.
MAX_PACKET_THRESHOLD = 1000  # (loss detection is then by time alone, as RACK)
MAX_TIME_THRESHOLD = 2.0     # round trips
_SUSPECTS = 1024             # packets declared lost that an ACK may still prove delivered


class _ReorderingRecovery(QuicPacketRecovery):
    """aioquic's loss recovery with thresholds that adapt to the path's reordering.

    aioquic declares a packet lost 3 packets or 9/8 RTT after a later one was acknowledged,
    and halves its window each time: on a path whose delay jitters (reordering), most of
    those "losses" arrive a few milliseconds late, and the window collapses to the rate at
    which no packet overtakes another.  Installed on a connection's ``_loss`` (its class
    swapped) by :meth:`install`."""

    def install(self) -> None:
        self.__class__ = _ReorderingRecovery
        self.packet_threshold = K_PACKET_THRESHOLD
        self.time_threshold = K_TIME_THRESHOLD
        self.lost_total = 0      # declared lost by loss detection (congestion events)
        self.spurious_total = 0  # of those, acknowledged later
        #: application-space packet number -> (largest acknowledged then, declared by time?)
        self._suspects: dict[int, tuple[int, bool]] = {}
        #: the last congestion event: (congestion controller state before it, its packets)
        self._episode: tuple[dict, set] | None = None
        self._by_time: set[int] = set()

    def _detect_loss(self, *, now: float, space) -> None:
        # aioquic's, with this connection's thresholds, remembering why each packet was lost
        loss_delay = self.time_threshold * (
            max(self._rtt_latest, self._rtt_smoothed) if self._rtt_initialized else self._rtt_initial)
        packet_threshold = space.largest_acked_packet - self.packet_threshold
        time_threshold = now - loss_delay
        lost_packets = []
        by_time = self._by_time
        by_time.clear()
        space.loss_time = None
        for packet_number, packet in space.sent_packets.items():
            if packet_number > space.largest_acked_packet:
                break
            if packet_number <= packet_threshold:
                lost_packets.append(packet)
            elif packet.sent_time <= time_threshold:
                lost_packets.append(packet)
                by_time.add(packet_number)
            else:
                packet_loss_time = packet.sent_time + loss_delay
                if space.loss_time is None or space.loss_time > packet_loss_time:
                    space.loss_time = packet_loss_time
        self._on_packets_lost(now=now, packets=lost_packets,
                              persistent_congestion=self._in_persistent_congestion(packets=lost_packets),
                              space=space)

    def _on_packets_lost(self, *, congestion_event: bool = True, now: float, packets, space,
                         persistent_congestion: bool = False) -> None:
        if congestion_event and packets:
            packets = list(packets)
            self.lost_total += len(packets)
            if space.is_application_data:
                self._remember(packets, space, persistent_congestion)
        super()._on_packets_lost(congestion_event=congestion_event, now=now, packets=packets, space=space,
                                 persistent_congestion=persistent_congestion)

    def _remember(self, packets, space, persistent_congestion: bool) -> None:
        suspects, largest, by_time = self._suspects, space.largest_acked_packet, self._by_time
        pns = set()
        for packet in packets:
            if packet.in_flight:
                pn = packet.packet_number
                suspects[pn] = (largest, pn in by_time)
                pns.add(pn)
        while len(suspects) > _SUSPECTS:
            del suspects[next(iter(suspects))]
        cc = self._cc
        start = getattr(cc, "_congestion_recovery_start_time", None)
        if persistent_congestion or start is None:
            self._episode = None
        elif self._episode is None or max(p.sent_time for p in packets) > start:
            state = dict(cc.__dict__)  # (what on_packets_lost is about to change)
            state.pop("bytes_in_flight", None)
            self._episode = (state, pns)
        else:
            self._episode[1].update(pns)

    def on_ack_received(self, *, ack_rangeset, ack_delay: float, now: float, space) -> None:
        suspects = self._suspects
        if suspects and space.is_application_data:
            late = [pn for pn in suspects if pn in ack_rangeset]
            if late:
                self._spurious(late, now)
        super().on_ack_received(ack_rangeset=ack_rangeset, ack_delay=ack_delay, now=now, space=space)

    def _spurious(self, late: list[int], now: float) -> None:
        self.spurious_total += len(late)
        episode = self._episode
        for pn in late:
            largest, by_time = self._suspects.pop(pn)
            if by_time:
                self.time_threshold = min(MAX_TIME_THRESHOLD, self.time_threshold + 0.125)
            else:
                self.packet_threshold = min(MAX_PACKET_THRESHOLD, max(self.packet_threshold, largest - pn + 1))
            if episode is not None:
                episode[1].discard(pn)
        if episode is not None and not episode[1]:
            # every packet of the last congestion event arrived: it was none, undo it
            self._episode = None
            cc = self._cc
            cc.__dict__.update(episode[0])
            self._pacer.update_rate(congestion_window=cc.congestion_window, smoothed_rtt=self._rtt_smoothed)


class TunnelQuicConnection(Liveness, QuicConnection):
    def __init__(self, *, keep_alive: float | None = None, dead_peer_timeout: float = 5.0,
                 reset_key: bytes | None = None, request_streams: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._init_liveness(keep_alive, dead_peer_timeout)
        if request_streams:  # streams the peer may have open at once (aioquic: 128)
            self._local_max_streams_bidi.value = request_streams
        self._reset_key = reset_key
        if reset_key is not None and not self._is_client:
            for cid in self._host_cids:
                cid.stateless_reset_token = stateless_reset_token(reset_key, cid.cid)
        self._share_frame_epochs()
        cfg = self._configuration
        self._stream_window = cfg.max_stream_data
        self._conn_window = cfg.max_data
        self._held: dict[int, int] = {}
        self._held_total = 0
        self._unacked = 0
        self._eliciting = 0  # ack-eliciting packets received
        self._data_queued = False
        _ReorderingRecovery.install(self._loss)

    def _share_frame_epochs(self) -> None:
        # aioquic builds ~30 frozensets per connection for its frame-handler table
        # (~7 KiB); with 1,000 idle tunnels that is 7 MB of identical sets.
        handlers = self._QuicConnection__frame_handlers
        for frame_type, (handler, epochs) in handlers.items():
            handlers[frame_type] = (handler, _EPOCH_SETS.setdefault(epochs, epochs))

    # -- what the shell asks --------------------------------------------------------------
    @property
    def handshake_complete(self) -> bool:
        return self._handshake_complete

    @property
    def lost_packets(self) -> int:
        """Packets declared lost by loss detection (congestion events; a PTO's early
        retransmissions are not counted)."""
        return self._loss.lost_total

    @property
    def smoothed_rtt(self) -> float | None:
        loss = self._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    def open_stream(self) -> int:
        """The id of a new locally initiated bidirectional stream (used by the next send).
        Beyond the peer's stream limit aioquic queues the stream's data until it may."""
        return self.get_next_available_stream_id()

    def can_open_stream(self) -> bool:
        return True

    def receive_datagrams(self, datagrams: list[bytes], addr, now: float) -> None:
        for data in datagrams:
            self.receive_datagram(data, addr, now)

    def receive_coalesced(self, buffer: bytes, segment_size: int, addr, now: float) -> None:
        """Datagrams the kernel coalesced (UDP GRO): each ``segment_size`` bytes, the last
        one shorter or equal."""
        self.receive_datagrams(split_coalesced(buffer, segment_size), addr, now)

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

    #: what counts against a writer's high water (its unacknowledged bytes bound it already)
    send_backlog = send_buffered

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

    # -- closing and liveness ----------------------------------------------------------------
    @property
    def closed_event(self) -> quic_events.ConnectionTerminated | None:
        """Why the connection is closing, as soon as it is (None while it is open)."""
        if self._state in END_STATES:
            return self._close_event or quic_events.ConnectionTerminated(
                error_code=AppErrorCode.OK, frame_type=None, reason_phrase="closed")
        return None

    def _closing(self) -> bool:
        return self._state in END_STATES

    def _idle_timeout_in_force(self) -> float:
        return self._idle_timeout()

    def _rtt(self) -> float | None:
        return self.smoothed_rtt

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
        if not self._handshake_complete or not is_stateless_reset_candidate(data):
            return False
        tail = data[-16:]
        token = self._peer_cid.stateless_reset_token
        if token and hmac.compare_digest(token, tail):
            return True
        return any(c.stateless_reset_token and hmac.compare_digest(c.stateless_reset_token, tail)
                   for c in self._peer_cid_available)

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        if self._state not in END_STATES and self._is_stateless_reset(data):
            self._close_event = quic_events.ConnectionTerminated(
                error_code=AppErrorCode.SERVER_ERROR, frame_type=None,
                reason_phrase="stateless reset: the peer lost the connection")
            self._close_begin(is_initiator=False, now=now)
            return
        self._heard_from_peer(now)
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

    def datagrams_to_send(self, now: float, limit: int | None = None):  # (limit: TRANSMIT_LIMIT)
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


_NO_CONTENT = ((b":status", b"204"), (b":status", b"304"))


class ReversedH3Connection(ReversedRoles, H3Connection):
    """aioquic's H3Connection with the HTTP role given (see reverst.http3.ReversedRoles),
    a bound on HEADERS frames (aioquic buffers one whole, however long it says it is),
    and Content-Length checked as the body arrives (aioquic checks it at the end only, after
    relaying whatever came)."""

    _stream_class = H3Stream
    _message_error = MessageError
    _stream_errors = (MessageError,)

    @staticmethod
    def _goaway_frame(stream_id: int) -> bytes:
        return encode_frame(FrameType.GOAWAY, encode_uint_var(stream_id))

    def _no_dynamic_table_decoder(self):
        return pylsqpack.Decoder(0, 0)

    def _static_table_encoder(self):
        return pylsqpack.Encoder()  # (never configured: no dynamic table)

    def _check_control_frame_type(self, frame_type: int) -> None:
        super()._check_control_frame_type(frame_type)
        if frame_type == FrameType.GOAWAY:  # (aioquic skips its payload: that it came is enough)
            self.goaway_received = True

    def _check_request_or_push_frame_type(self, frame_type: int, stream: H3Stream) -> None:
        super()._check_request_or_push_frame_type(frame_type, stream)
        if frame_type == 0x1 and stream.frame_size > MAX_HEADERS_FRAME:  # (called once a frame's header is read)
            raise MessageError(f"header section too large (a HEADERS frame of {stream.frame_size} bytes, "
                               f"more than {MAX_HEADERS_FRAME})")

    def _receive_request_or_push_data(self, stream: H3Stream, data: bytes, stream_ended: bool):
        events = super()._receive_request_or_push_data(stream, data, stream_ended)
        expected = stream.expected_content_length
        if expected is not None and stream.content_length > expected and stream.stream_id not in self.malformed:
            self.malformed[stream.stream_id] = "content-length exceeded"
            return []  # not a byte past the declared length reaches the owner
        return events

    @contextlib.contextmanager
    def _get_or_create_stream(self, stream_id: int):
        stream = self._stream.get(stream_id)
        if stream is None:
            stream = self._new_stream(stream_id)
        try:
            yield stream
        finally:
            if stream.is_ended():
                self._stream.pop(stream_id)

    def _decode_headers(self, stream_id: int, frame_data):
        headers = super()._decode_headers(stream_id, frame_data)
        if self._http_client and headers and headers[0] in _NO_CONTENT:
            # A 204 or 304 may announce a length and has no content (RFC 9114 §4.1.2):
            # aioquic would hold the missing bytes against it.
            self._stream[stream_id].no_content = True
        return headers

    def _check_content_length(self, stream: H3Stream) -> None:
        if stream.stream_id not in self._head_requests and not getattr(stream, "no_content", False):
            super()._check_content_length(stream)

    def _handle_request_or_push_end(self, stream):
        if stream.stream_id in self.malformed:
            return []
        try:
            return super()._handle_request_or_push_end(stream)
        except MessageError as exc:
            self.malformed[stream.stream_id] = exc.reason_phrase
            return []


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
STREAM_ERRORS = (H3Error, H3ProtocolError, ValueError)


def client_configuration(*, server_name: str, idle_timeout: float, max_datagram_size: int,
                         insecure: bool = False, ca_file: str | None = None, ca_data: bytes | None = None,
                         window: int = 4 * 1024 * 1024) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], server_name=server_name, idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size, max_stream_data=window, max_data=4 * window,
        congestion_control_algorithm=CONGESTION_CONTROL)
    if insecure:
        cfg.verify_mode = ssl.CERT_NONE
    elif ca_file or ca_data:
        cfg.load_verify_locations(cafile=ca_file, cadata=ca_data)
    return cfg


def server_configuration(*, certificate_path: str, private_key_path: str, idle_timeout: float,
                         max_datagram_size: int = 1452, window: int = 4 * 1024 * 1024) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=False, alpn_protocols=[ALPN], idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size, max_stream_data=window, max_data=4 * window,
        congestion_control_algorithm=CONGESTION_CONTROL)
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
