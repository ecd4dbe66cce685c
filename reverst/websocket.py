"""WebSockets through the tunnel (sans-io): RFC 6455 on the public HTTP/1.1 side,
RFC 9220 extended CONNECT on the HTTP/3 side.

* ``reverstd`` receives ``GET`` with ``Upgrade: websocket`` (:func:`check_upgrade`),
  sends ``:method CONNECT`` / ``:protocol websocket`` into the tunnel
  (:func:`connect_fields`) and turns a 2xx answer into ``101 Switching Protocols``
  (:func:`switching_protocols_fields`); the bytes of the WebSocket then ride the
  stream's DATA frames.
* The tunnel client presents the CONNECT to the application as the HTTP/1.1 upgrade
  request a WSGI server would see (:func:`upgrade_environ_fields`), and turns the
  application's ``101`` back into ``:status 200`` (:func:`response_for_101`).

Only the tunnel clients that say they serve it get a CONNECT: they advertise
SETTINGS_ENABLE_CONNECT_PROTOCOL and reverst's own feature setting (reverst.http3), so
a Go client (which advertises the first but cannot serve it) never gets one.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os

from .http3 import HOP_BY_HOP, connection_tokens

#: RFC 6455 §1.3
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Fields of the HTTP/1.1 handshake that HTTP/3 does not carry (RFC 8441 §5, RFC 9220 §3)
_HANDSHAKE_ONLY = frozenset({"sec-websocket-key", "sec-websocket-accept"})
#: A tunnel client marks a 2xx that does *not* open a WebSocket (the application answered
#: the upgrade request with a plain response) so that reverstd relays it as one.
DECLINED = b"reverst-websocket-declined"


class HandshakeError(ValueError):
    """A public upgrade request reverstd refuses; ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str, headers: tuple = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


def _field(headers, name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def is_upgrade(headers) -> bool:
    """The request asks to switch protocols (any ``Upgrade`` field)."""
    return any(k.lower() == "upgrade" for k, _ in headers)


def check_upgrade(method: str, version: str, headers, has_body: bool) -> str:
    """Validate a public upgrade request (RFC 6455 §4.1, §4.2.1); its key, else raise
    :class:`HandshakeError` with the status the visitor gets."""
    protocols = connection_tokens(_field(headers, "upgrade"))
    if "websocket" not in protocols:
        offered = ", ".join(sorted(protocols)) or "nothing"
        raise HandshakeError(501, f"upgrade to {offered} is not supported (only websocket)")
    if method != "GET":
        raise HandshakeError(400, f"a WebSocket handshake must be a GET, not {method}")
    if version != "1.1":
        raise HandshakeError(400, f"a WebSocket handshake needs HTTP/1.1, not HTTP/{version}")
    if has_body:
        raise HandshakeError(400, "a WebSocket handshake carries no body")
    if "upgrade" not in connection_tokens(_field(headers, "connection")):
        raise HandshakeError(400, "a WebSocket handshake needs Connection: Upgrade")
    versions = _field(headers, "sec-websocket-version")
    if versions != ["13"]:
        raise HandshakeError(426, "unsupported WebSocket version (only 13)",
                             headers=[("Sec-WebSocket-Version", "13")])
    keys = _field(headers, "sec-websocket-key")
    if len(keys) != 1:
        raise HandshakeError(400, "a WebSocket handshake needs exactly one Sec-WebSocket-Key")
    try:
        raw = base64.b64decode(keys[0].strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    return keys[0].strip()


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key`` (for a hop that starts a new HTTP/1.1 handshake)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def connect_fields(authority: str, path: str, headers, forwarded_for: str,
                   scheme: str = "https") -> list[tuple[bytes, bytes]]:
    """The HTTP/3 extended CONNECT for a public upgrade request (RFC 9220 §3): hop-by-hop
    fields and the HTTP/1.1-only key dropped, the rest (subprotocols, extensions, origin,
    cookies...) kept, ``X-Forwarded-For`` extended."""
    named = connection_tokens(_field(headers, "connection"))
    xff = _field(headers, "x-forwarded-for")
    fields = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", scheme.encode()),
              (b":authority", authority.encode("latin-1")), (b":path", path.encode("latin-1"))]
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low in _HANDSHAKE_ONLY or low in ("host", "x-forwarded-for"):
            continue
        fields.append((low.encode("latin-1"), value.encode("latin-1")))
    fields.append((b"x-forwarded-for", ", ".join(xff + [forwarded_for]).encode("latin-1")))
    return fields


def switching_protocols_fields(response_fields, key: str) -> list[tuple[str, str]]:
    """The public ``101`` for a 2xx answer to the CONNECT: the visitor's accept value and
    the answer's own fields (chosen subprotocol and extensions, cookies...)."""
    out = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_value(key))]
    for name, value in response_fields:
        if name.startswith(b":"):
            continue
        low = name.decode("latin-1")
        if low in HOP_BY_HOP or low in _HANDSHAKE_ONLY or low == "content-length":
            continue
        out.append((low, value.decode("latin-1")))
    return out


def is_extended_connect(fields) -> bool:
    """An HTTP/3 request that opens a WebSocket (``:method CONNECT``, ``:protocol websocket``)."""
    return (b":method", b"CONNECT") in fields and (b":protocol", b"websocket") in fields


def upgrade_environ_fields(fields) -> list[tuple[bytes, bytes]]:
    """An extended CONNECT as the HTTP/1.1 upgrade request WSGI servers present (and
    WebSocket libraries for WSGI expect): ``GET`` with ``Upgrade``, ``Connection`` and a
    fresh ``Sec-WebSocket-Key`` (HTTP/3 carries none; the application's accept value for
    it is never sent on)."""
    out = []
    for name, value in fields:
        if name == b":method":
            out.append((name, b"GET"))
        elif name != b":protocol":
            out.append((name, value))
    out += [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-key", new_key().encode())]
    return out


def response_for_101(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Parse the HTTP/1.1 response head an application wrote on the upgraded socket:
    ``(status, fields for HTTP/3)``. A 101 becomes 200 (the CONNECT succeeded) without
    the fields HTTP/3 does not carry; anything else keeps its status. ValueError if it
    is not an HTTP/1.1 response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.1 response head: {lines[0][:80]!r}")
    status = int(parts[1])
    fields = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed response field: {line[:80]!r}")
        low = name.strip().lower()
        if low in HOP_BY_HOP or low in _HANDSHAKE_ONLY:
            continue
        fields.append((low.encode("latin-1"), value.strip().encode("latin-1")))
    return (200 if status == 101 else status), fields
