"""HTTP/3 with the roles reversed (sans-io), and the hop-by-hop rules.

In a tunnel the QUIC client (the tunnel client) is the HTTP/3 *server* and ``reverstd``
(the QUIC server) is the HTTP/3 *client*, sending requests on server-initiated
bidirectional streams 1, 5, 9...  Both aioquic's and qh3's ``H3Connection`` take their
HTTP role from the QUIC role; :class:`ReversedRoles` is the one place that bends it, as a
mixin each QUIC backend puts in front of its library's class (reverst.quic._aioquic,
reverst.quic._qh3).  It touches private names: the backends pin their library's version
and tests/test_http3.py runs on both.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

#: Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1, Go's list).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
#: Connection-specific fields that make an HTTP/3 peer reject the message (RFC 9114 §4.2).
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade"})

SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8  # RFC 8441 §3, RFC 9220 §3
#: reverst's own setting (an unregistered id, not a GREASE value; peers ignore it): the
#: extensions this HTTP/3 server (a tunnel client) serves, as bits.
SETTINGS_REVERST_FEATURES = 0x52565354  # "RVST"
FEATURE_WEBSOCKET = 0x1

H3_NO_ERROR = 0x100
H3_INTERNAL_ERROR = 0x102
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_CANCELLED = 0x10C
H3_MESSAGE_ERROR = 0x10E
#: RFC 9114 §8.1 and RFC 9204 §6: names for the log when a close carries no reason phrase.
H3_ERROR_NAMES = {
    0x100: "H3_NO_ERROR", 0x101: "H3_GENERAL_PROTOCOL_ERROR", 0x102: "H3_INTERNAL_ERROR",
    0x103: "H3_STREAM_CREATION_ERROR", 0x104: "H3_CLOSED_CRITICAL_STREAM", 0x105: "H3_FRAME_UNEXPECTED",
    0x106: "H3_FRAME_ERROR", 0x107: "H3_EXCESSIVE_LOAD", 0x108: "H3_ID_ERROR", 0x109: "H3_SETTINGS_ERROR",
    0x10A: "H3_MISSING_SETTINGS", 0x10B: "H3_REQUEST_REJECTED", 0x10C: "H3_REQUEST_CANCELLED",
    0x10D: "H3_REQUEST_INCOMPLETE", 0x10E: "H3_MESSAGE_ERROR", 0x10F: "H3_CONNECT_ERROR",
    0x110: "H3_VERSION_FALLBACK", 0x200: "QPACK_DECOMPRESSION_FAILED", 0x201: "QPACK_ENCODER_STREAM_ERROR",
    0x202: "QPACK_DECODER_STREAM_ERROR",
}

FRAME_SETTINGS = 0x4  # RFC 9114 §7.2.4
SETTINGS_MAX_FIELD_SECTION_SIZE = 0x6  # RFC 9114 §7.2.4.1
#: The largest response field section reverstd takes from a tunnel, by RFC 9114 §4.2.2's
#: measure (each field's name and value plus 32 bytes); it says so in its SETTINGS. A
#: HEADERS frame is bounded to as much encoded, on either side: a bigger one fails its
#: request before it is buffered. (Both QPACK libraries refuse a string of 64 KiB or more
#: as a decompression failure, a connection error: this bound keeps every literal under it.
#: Only a Huffman string that inflates past it still closes the connection.)
MAX_FIELD_SECTION_SIZE = 64 * 1024
MAX_HEADERS_FRAME = MAX_FIELD_SECTION_SIZE
_FIELD_NAME = re.compile(rb":?[!#$%&'*+\-.^_`|~0-9a-z]+")  # an RFC 9110 token, lower-case
_FIELD_NAMES = re.compile(rb"(?::?[!#$%&'*+\-.^_`|~0-9a-z]+\n)*:?[!#$%&'*+\-.^_`|~0-9a-z]+")  # joined by LF
_FIELD_VALUE_BREAK = re.compile(rb"[\x00\r\n]")  # would end the field in HTTP/1.1
_CONNECTION_SPECIFIC_NAMES = frozenset(name.encode() for name in CONNECTION_SPECIFIC)
#: The response fields _check_response looks at one by one.
_RESPONSE_CHECKED = _CONNECTION_SPECIFIC_NAMES | {b":status", b"content-length"}


def stream_is_unidirectional(stream_id: int) -> bool:
    return bool(stream_id & 2)


def stream_is_client_initiated(stream_id: int) -> bool:
    return not stream_id & 1


class ReversedRoles:
    """An ``H3Connection`` whose HTTP role is given, not taken from QUIC.

    ``http_client=True`` on the QUIC server (reverstd sends requests);
    ``http_client=False`` on the QUIC client (the tunnel client answers them).

    The backend's subclass sets ``_stream_class`` (its library's H3Stream),
    ``_message_error`` (its MessageError), ``_stream_errors`` (what fails just one
    message: MessageError and its "field section too large", where it has one),
    :meth:`_no_dynamic_table_decoder` and :meth:`_static_table_encoder`, and bounds an
    encoded HEADERS frame to MAX_HEADERS_FRAME before it is buffered.
    """

    _stream_class: type
    _message_error: type
    _stream_errors: tuple
    #: ``stream_id -> bytes``: a GOAWAY frame (the library's encoder)
    _goaway_frame: Callable[[int], bytes]

    #: The peer sent a GOAWAY (RFC 9114 §5.2): a tunnel client that is stopping. reverstd
    #: sends it no new request; those it already sent are still answered.
    goaway_received = False

    def __init__(self, quic, *, http_client: bool) -> None:
        self._http_client = http_client
        self._head_requests: set[int] = set()
        #: stream id -> why its message was malformed; the owner resets just that stream
        #: (the libraries would close the whole connection, and with it every other request).
        self.malformed: dict[int, str | None] = {}
        super().__init__(quic)

    def _init_connection(self) -> None:
        # No QPACK dynamic table, as the Go peers: with one, every request's headers were
        # acknowledged on the decoder stream in a datagram of its own (~1 more datagram per
        # request each way at one request in flight), and a tunnel's few headers gain little.
        # H3Connection.__init__ sets the capacities and its decoder just before this call;
        # the SETTINGS sent below are built from these attributes.
        self._max_table_capacity = self._blocked_streams = 0
        if self._http_client:  # (qh3's decoder enforces it; aioquic's: _check_response)
            self._max_field_section_size = MAX_FIELD_SECTION_SIZE
        self._decoder = self._no_dynamic_table_decoder()
        super()._init_connection()

    def _no_dynamic_table_decoder(self):
        raise NotImplementedError

    def _static_table_encoder(self):
        """A QPACK encoder of the library that inserts nothing in a dynamic table."""
        raise NotImplementedError

    def _handle_control_frame(self, frame_type: int, frame_data: bytes):
        events = super()._handle_control_frame(frame_type, frame_data)
        if frame_type == FRAME_SETTINGS:
            # The library has set its encoder up with the dynamic table the peer allows
            # (none, from our peers and Go's). Ours uses the static table alone, whatever
            # the peer allows (RFC 9204 lets an encoder never insert): it then holds
            # nothing the peer's decoder depends on, and a backend may replace it at will.
            self._encoder = self._static_table_encoder()
        return events

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        if self._http_client:
            settings[SETTINGS_MAX_FIELD_SECTION_SIZE] = MAX_FIELD_SECTION_SIZE
        else:  # the tunnel client: it serves WebSockets (reverst.websocket)
            settings[SETTINGS_ENABLE_CONNECT_PROTOCOL] = 1
            settings[SETTINGS_REVERST_FEATURES] = FEATURE_WEBSOCKET
        return settings

    @property
    def peer_serves_websockets(self) -> bool:
        """The peer (a tunnel client) accepts WebSockets as extended CONNECT: it advertised
        both ENABLE_CONNECT_PROTOCOL and reverst's WebSocket feature (a Go client advertises
        only the first, and cannot serve it). False until its SETTINGS arrived."""
        settings = self._received_settings
        return bool(settings) and settings.get(SETTINGS_ENABLE_CONNECT_PROTOCOL) == 1 and bool(
            settings.get(SETTINGS_REVERST_FEATURES, 0) & FEATURE_WEBSOCKET)

    # H3Connection assigns self._is_client from the QUIC role in __init__; every use of
    # it is an HTTP-role decision except the unidirectional-stream bookkeeping below.
    @property
    def _is_client(self) -> bool:  # type: ignore[override]
        return self._http_client

    @_is_client.setter
    def _is_client(self, quic_is_client: bool) -> None:
        self._quic_is_client = quic_is_client

    def _new_stream(self, stream_id: int):
        stream = self._stream_class(stream_id)
        if stream_is_unidirectional(stream_id):
            # Which half of a unidirectional stream exists follows the QUIC role.
            if stream_is_client_initiated(stream_id) == self._quic_is_client:
                stream.receiving_ended = True
            else:
                stream.sending_ended = True
        self._stream[stream_id] = stream
        return stream

    def send_goaway(self, stream_id: int) -> None:
        """Tell the peer that requests on ``stream_id`` and above will not be processed."""
        self._quic.send_stream_data(self._local_control_stream_id, self._goaway_frame(stream_id))

    def forget_stream(self, stream_id: int) -> None:
        """Drop a request stream's state after a reset (the libraries only do it for 0 mod 4)."""
        self._stream.pop(stream_id, None)
        self._head_requests.discard(stream_id)
        self.malformed.pop(stream_id, None)

    def send_headers(self, stream_id: int, headers, end_stream: bool = False) -> None:
        if self._http_client and (b":method", b"HEAD") in headers:
            self._head_requests.add(stream_id)  # its response has a length but no content
        super().send_headers(stream_id, headers, end_stream)

    def send_head(self, stream_id: int, headers, data: bytes, end_stream: bool) -> None:
        """A message's head and the first piece of its body (``data``, not empty)."""
        self.send_headers(stream_id, headers)
        self.send_data(stream_id, data, end_stream)

    def _handle_request_or_push_frame(self, frame_type, frame_data, stream, stream_ended, **kwargs):
        if stream.stream_id in self.malformed:
            return []
        try:
            events = super()._handle_request_or_push_frame(frame_type, frame_data, stream, stream_ended,
                                                           **kwargs)
            if self._http_client and frame_type == 0x1:  # HEADERS: a response, or its trailers
                for event in events:  # (qh3 has an event of its own for 1xx: no stream_ended)
                    headers = getattr(event, "headers", None)
                    if headers is not None:
                        self._check_response(headers, getattr(event, "stream_ended", False))
            return events
        except self._stream_errors as exc:
            self._malformed(stream.stream_id, exc)
            return []

    def _receive_request_or_push_data(self, stream, data: bytes, stream_ended: bool):
        # What a frame's header already rules out (a HEADERS frame too large) fails its
        # stream here, as do frames of a stream found malformed (they are dropped).
        if stream.stream_id in self.malformed:
            return []
        try:
            return super()._receive_request_or_push_data(stream, data, stream_ended)
        except self._stream_errors as exc:
            self._malformed(stream.stream_id, exc)
            return []

    def _malformed(self, stream_id: int, exc: Exception) -> None:
        if isinstance(exc, self._message_error):
            self.malformed[stream_id] = exc.reason_phrase
        else:  # the library's own limit on field sections
            self.malformed[stream_id] = (f"header section too large (more than {MAX_FIELD_SECTION_SIZE} bytes, "
                                         f"or a HEADERS frame over {MAX_HEADERS_FRAME})")

    def _check_response(self, headers, ended: bool) -> None:
        """What a response (or its trailers) must also be before reverstd relays it to an
        HTTP/1.1 visitor, where the libraries check less (qh3: no values, no status range,
        no repeated Content-Length; aioquic: no section size): the library's MessageError."""
        names = [name for name, _ in headers]
        values = [value for _, value in headers]
        size = 32 * len(headers) + sum(map(len, names)) + sum(map(len, values))
        if size > MAX_FIELD_SECTION_SIZE:
            raise self._message_error(f"header section too large ({size} bytes, more than {MAX_FIELD_SECTION_SIZE})")
        # One match over all names and one search over all values: the usual valid
        # response costs two regex calls, not two per field. Only a failure looks closer.
        if names and not _FIELD_NAMES.fullmatch(b"\n".join(names)):
            bad = next(name for name in names if not _FIELD_NAME.fullmatch(name))
            raise self._message_error(f"invalid field name {bad[:64]!r}")
        if _FIELD_VALUE_BREAK.search(b"".join(values)):
            bad = next(name for name, value in headers if _FIELD_VALUE_BREAK.search(value))
            raise self._message_error(f"field {bad[:64]!r} has a NUL, CR or LF in its value")
        status = None
        lengths = set()
        for name, value in headers:
            if name in _RESPONSE_CHECKED:
                if name == b":status":
                    status = value
                elif name == b"content-length":
                    lengths.add(value)
                else:
                    raise self._message_error(f"connection-specific field {name!r}")
        if status is not None:  # (the libraries have checked it is there, once, and not in trailers)
            if len(status) != 3 or not status.isdigit() or not b"100" <= status <= b"599" or status == b"101":
                raise self._message_error(f"invalid :status {status[:16]!r}")
            if ended and status[:1] == b"1":
                raise self._message_error("an interim response ended the stream")
        if lengths and (len(lengths) > 1 or not next(iter(lengths)).isdigit()):
            raise self._message_error(f"invalid content-length {sorted(lengths)[:2]!r}")

    def is_request_stream(self, stream_id: int) -> bool:
        """Bidirectional streams opened by the HTTP client side carry requests."""
        return not stream_is_unidirectional(stream_id) and (
            stream_is_client_initiated(stream_id) != (self._http_client != self._quic_is_client))


def connection_tokens(values: Iterable[str]) -> set[str]:
    """Header names listed in ``Connection`` values (lower-case)."""
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def strip_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Remove hop-by-hop fields and those named by ``Connection``; keep ``TE: trailers``."""
    if HOP_BY_HOP.isdisjoint([k.lower() for k, _ in headers]):
        return list(headers)  # the usual case (``Connection`` is hop-by-hop too): one pass
    named = connection_tokens(v for k, v in headers if k.lower() == "connection")
    out = []
    for name, value in headers:
        low = name.lower()
        if low == "te":
            if "trailers" in connection_tokens([value]):
                out.append((name, "trailers"))  # as Go: only the trailers token survives
        elif low not in HOP_BY_HOP and low not in named:
            out.append((name, value))
    return out
