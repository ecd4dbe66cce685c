"""The reverst registration protocol (sans-io).

The first client-initiated bidirectional QUIC stream carries one msgpack map from the
client (:class:`RegisterRequest`) and, on success, one msgpack map back
(:class:`RegisterResponse`), keyed by the Go field names.  Failures are not answered on
the stream: the server closes the connection with an :class:`AppErrorCode` and a reason.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping

import msgpack

from .errors import BadRequest, NotFound, ProtocolViolation, ServerError, Unauthorized

ALPN = "quic-h3-tunnel"
VERSION = 1
#: Upper bound for one registration message; real ones are < 1 KiB.
MAX_REGISTRATION_SIZE = 64 * 1024


class AppErrorCode(enum.IntEnum):
    """QUIC application error codes used in CONNECTION_CLOSE."""

    OK = 0x0  # orderly shutdown
    SERVER_ERROR = 0x1  # Go: ApplicationError (retried by clients)
    CLIENT_ERROR = 0x2  # Go: ApplicationClientError (fatal for clients)


class ResponseCode(enum.IntEnum):
    """``RegisterListenerResponse.Code``; only OK is sent, the rest are deprecated."""

    OK = 0
    BAD_REQUEST = 1
    NOT_FOUND = 2
    UNAUTHORIZED = 3
    SERVER_ERROR = 4


REASON_UNAUTHORIZED = "unauthorized"
REASON_BAD_REQUEST = "bad request"
REASON_NOT_FOUND = "not found"
#: Ours, not Go's: a group at its maxTunnels (sent with code 0x1, so clients retry).
REASON_GROUP_FULL = "tunnel group full"


@dataclass(frozen=True)
class RegisterRequest:
    tunnel_group: str
    metadata: Mapping[str, str] | None = None
    version: int = VERSION

    def __repr__(self) -> str:  # never show credentials
        keys = sorted(self.metadata) if self.metadata else []
        return f"RegisterRequest(tunnel_group={self.tunnel_group!r}, metadata_keys={keys})"


@dataclass(frozen=True)
class RegisterResponse:
    code: int = ResponseCode.OK
    metadata: Mapping[str, str] | None = None
    body: bytes | None = None
    version: int = VERSION


def _uint8(value: int) -> bytes:
    # Go's encoder writes small unsigned ints as "uint 8" (0xcc NN), not positive fixint.
    return bytes((0xCC, value)) if 0 <= value <= 0xFF else msgpack.packb(value)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def encode_request(req: RegisterRequest) -> bytes:
    """Encode exactly as the Go client does (byte for byte)."""
    return b"".join((
        b"\x83",
        _pack("Version"), _uint8(req.version),
        _pack("TunnelGroup"), _pack(req.tunnel_group),
        _pack("Metadata"), _pack(dict(req.metadata) if req.metadata is not None else None),
    ))


def encode_response(resp: RegisterResponse = RegisterResponse()) -> bytes:
    """Encode exactly as the Go server does (byte for byte)."""
    return b"".join((
        b"\x84",
        _pack("Version"), _uint8(resp.version),
        _pack("Code"), _uint8(int(resp.code)),
        _pack("Metadata"), _pack(dict(resp.metadata) if resp.metadata is not None else None),
        _pack("Body"), _pack(resp.body),
    ))


class MessageDecoder:
    """Incrementally decodes one msgpack object from untrusted stream bytes.

    ``feed()`` returns the decoded object once complete, else ``None``; it raises
    :class:`ProtocolViolation` for malformed or oversized input.  (Not a
    ``msgpack.Unpacker``: that preallocates ~100 KiB, per registration in flight.)
    """

    def __init__(self, max_size: int = MAX_REGISTRATION_SIZE) -> None:
        self._buf = bytearray()
        self._max_size = max_size
        self._limits = dict(max_str_len=max_size, max_bin_len=max_size, max_array_len=1024,
                            max_map_len=1024, max_ext_len=max_size)

    def feed(self, data: bytes) -> Any | None:
        self._buf += data
        if len(self._buf) > self._max_size:
            raise ProtocolViolation(f"registration message larger than {self._max_size} bytes")
        if not self._buf:
            return None
        try:
            obj = msgpack.unpackb(self._buf, raw=False, strict_map_key=False, **self._limits)
        except msgpack.ExtraData as exc:  # Go reads one object and ignores what follows
            obj = exc.unpacked
        except ValueError as exc:
            if str(exc) == "Unpack failed: incomplete input":
                return None
            raise ProtocolViolation(f"malformed msgpack: {str(exc) or type(exc).__name__}") from exc
        except Exception as exc:  # msgpack raises several unrelated types
            raise ProtocolViolation(f"malformed msgpack: {str(exc) or type(exc).__name__}") from exc
        # A complete nil is not "incomplete": Go decodes it into a struct as its zero value.
        return {} if obj is None else obj


_REQUEST_FIELDS = ("Version", "TunnelGroup", "Metadata")
_RESPONSE_FIELDS = ("Version", "Code", "Metadata", "Body")


def _as_fields(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    # Go decodes a struct from a map keyed by field names (case-sensitive, unknown keys
    # ignored) or positionally from an array.
    if isinstance(obj, dict):
        return {k: obj[k] for k in names if k in obj}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, msgpack.ExtType):  # (a namedtuple)
        return dict(zip(names, obj))
    raise ProtocolViolation(f"expected a msgpack map, got {type(obj).__name__}")


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(f"{name}: invalid UTF-8") from exc
    if isinstance(value, str):
        return value
    raise ProtocolViolation(f"{name}: expected a string, got {type(value).__name__}")


def _uint(value: Any, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ProtocolViolation(f"{name}: expected an unsigned integer")


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolViolation("Metadata: expected a map")
    return {_text(k, "Metadata key"): _text(v, "Metadata value") for k, v in value.items()}


def decode_request_untrusted(obj: Any) -> RegisterRequest:
    """Validate a decoded msgpack object as a registration request."""
    f = _as_fields(obj, _REQUEST_FIELDS)
    return RegisterRequest(
        version=_uint(f.get("Version"), "Version"),
        tunnel_group=_text(f.get("TunnelGroup"), "TunnelGroup"),
        metadata=_metadata(f.get("Metadata")),
    )


def decode_response_untrusted(obj: Any) -> RegisterResponse:
    """Validate a decoded msgpack object as a registration response."""
    f = _as_fields(obj, _RESPONSE_FIELDS)
    body = f.get("Body")
    if isinstance(body, str):
        body = body.encode("utf-8")
    elif body is not None and not isinstance(body, bytes):
        raise ProtocolViolation("Body: expected bytes")
    return RegisterResponse(
        version=_uint(f.get("Version"), "Version"),
        code=_uint(f.get("Code"), "Code"),
        metadata=_metadata(f.get("Metadata")),
        body=body,
    )


def close_for_error(exc: Exception) -> tuple[int, str]:
    """The CONNECTION_CLOSE (code, reason) a server sends for a failed registration."""
    if isinstance(exc, Unauthorized):
        return AppErrorCode.CLIENT_ERROR, REASON_UNAUTHORIZED
    if isinstance(exc, (BadRequest, ProtocolViolation)):
        return AppErrorCode.CLIENT_ERROR, REASON_BAD_REQUEST
    if isinstance(exc, NotFound):
        return AppErrorCode.SERVER_ERROR, REASON_NOT_FOUND
    return AppErrorCode.SERVER_ERROR, (str(exc) or type(exc).__name__)[:200]


def error_for_close(error_code: int, reason: str) -> Exception:
    """Map the server's CONNECTION_CLOSE on a registration to the client's exception.

    Mirrors the Go client: 0x2 is fatal (unauthorized / bad request / other client
    error); 0x1 is a server error that may be retried ("not found" among them).
    """
    if error_code == AppErrorCode.CLIENT_ERROR:
        if reason == REASON_UNAUTHORIZED:
            return Unauthorized("client error: unauthorized")
        if reason == REASON_NOT_FOUND:
            return NotFound("client error: not found")
        return BadRequest(f"client error: {reason or 'bad request'}")
    if reason == REASON_NOT_FOUND:
        return NotFound("not found: server error")
    return ServerError(f"{reason or 'connection closed'}: server error")


def error_for_response_code(code: int) -> Exception | None:
    """Deprecated non-zero response codes, for servers that still send them."""
    return {
        ResponseCode.BAD_REQUEST: BadRequest("client error: bad request"),
        ResponseCode.NOT_FOUND: NotFound("not found: server error"),
        ResponseCode.UNAUTHORIZED: Unauthorized("client error: unauthorized"),
        ResponseCode.SERVER_ERROR: ServerError("server error"),
    }.get(code)
