"""A WSGI application that forwards every request to a local HTTP service.

``reverst expose 8080`` is the tunnel client serving ``LocalProxy("http://127.0.0.1:8080",
cooperative=True)`` in greenlets (gevent's sockets); it also works in native threads.
It keeps connections to the local service alive (:mod:`reverst._http1client`, a small
HTTP/1.1 client on llhttp: urllib3 cost ~40% of the client's CPU on small requests) and
streams both ways: the request body is read from ``wsgi.input`` as it arrives, response
chunks are passed on as they are received, so server-sent events are not buffered.
"""
from __future__ import annotations

import logging
import re
import socket as socket_module
import time
from urllib.parse import quote, urlsplit

from . import _http1client as http1
from . import websocket
from .http3 import H3_INTERNAL_ERROR, HOP_BY_HOP, connection_tokens, strip_hop_by_hop
from .wsgi import WSGIInput, status_has_body

logger = logging.getLogger("reverst.proxy")
#: Characters never sent raw in a request target (controls, space, non-ASCII): %-encoded.
_UNSAFE_TARGET = re.compile(r"[^\x21-\x7e]")
_UNSAFE_TARGET_BYTES = re.compile(rb"[^\x21-\x7e]")
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
#: ``Connection`` tokens that name no field
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close"})


def parse_target(addr: str) -> str:
    """``8080`` -> ``http://127.0.0.1:8080``; ``host:port`` -> ``http://host:port``;
    ``http(s)://host[:port][/prefix]`` as is (without a trailing slash)."""
    addr = addr.strip()
    if addr.isdigit():
        port = int(addr)
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {addr!r}")
        return f"http://127.0.0.1:{port}"
    if "://" not in addr:
        addr = "http://" + addr
    parts = urlsplit(addr)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid local address {addr!r}: expected a port, host:port or an http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError(f"invalid local address {addr!r}: no query or fragment allowed")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"invalid local address {addr!r}: {exc}") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _environ_headers(environ: dict) -> list[tuple[str, str]]:
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
    if environ.get("CONTENT_TYPE"):
        headers.append(("Content-Type", environ["CONTENT_TYPE"]))
    if environ.get("CONTENT_LENGTH"):
        headers.append(("Content-Length", environ["CONTENT_LENGTH"]))
    return headers


def _request_target(environ: dict) -> str:
    target = environ.get("REQUEST_URI")
    if not target:  # a WSGI server without REQUEST_URI: rebuild it
        target = quote(environ.get("PATH_INFO", "") or "/", safe="/;=,:@!$&'()*+~")
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
    if _UNSAFE_TARGET.search(target):  # latin-1 text: one character per byte
        target = _UNSAFE_TARGET.sub(lambda m: f"%{ord(m.group()):02X}", target)
    return target


class LocalProxy:
    """WSGI app: forward to ``target`` (see :func:`parse_target`).

    ``timeout`` is the read timeout (a silent local service gives ``504``),
    ``connect_timeout`` the TCP (and TLS handshake) one, ``verify=False`` skips the
    certificate check of an https target, ``pool_size`` is how many idle keep-alive
    connections are kept. ``cooperative=True``: its connections to the local service are
    gevent's sockets, for a proxy served in greenlets (``app_threads=0``) in a process that
    is not monkey-patched, as ``reverst expose`` serves it; otherwise they are the
    ``socket`` module's, for native threads (or a process its owner patched).
    """

    def __init__(self, target: str, *, rewrite_host: bool = False, timeout: float = 60.0,
                 connect_timeout: float = 5.0, verify: bool = True, pool_size: int = 100,
                 cooperative: bool = False) -> None:
        self.target = parse_target(target)
        parts = urlsplit(self.target)
        self._netloc = parts.netloc
        self._prefix = parts.path
        self._netloc_bytes, self._prefix_bytes = self._netloc.encode("latin-1"), self._prefix.encode("latin-1")
        self.rewrite_host = rewrite_host
        self._pool = http1.Pool(parts.scheme, parts.hostname,
                                parts.port or (443 if parts.scheme == "https" else 80),
                                timeout=timeout, connect_timeout=connect_timeout, verify=verify,
                                maxsize=pool_size, cooperative=cooperative)

    def __repr__(self) -> str:
        return f"<LocalProxy {self.target}>"

    def close(self) -> None:
        """Close the idle connections to the local service."""
        self._pool.close()

    def __call__(self, environ: dict, start_response):
        method = environ["REQUEST_METHOD"]
        target = _request_target(environ)
        path = target.split("?", 1)[0]  # for logs: a query may carry tokens
        headers = _environ_headers(environ)
        names = {k.lower() for k, _ in headers}
        if not names.isdisjoint(HOP_BY_HOP):  # rare: HTTP/3 requests have none of them
            headers = strip_hop_by_hop(headers)
            names = {k.lower() for k, _ in headers}
        host = environ.get("HTTP_HOST", "")
        if self.rewrite_host or "host" not in names:
            headers = [(k, v) for k, v in headers if k.lower() != "host"] + [("Host", self._netloc)]
        if "accept-encoding" not in names:
            headers.append(("Accept-Encoding", "identity"))  # as http.client: no surprise gzip
        if "x-forwarded-host" not in names and host:
            headers.append(("X-Forwarded-Host", host))
        if "x-forwarded-proto" not in names:
            headers.append(("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "https")))
        if "x-forwarded-for" not in names and environ.get("REMOTE_ADDR"):
            headers.append(("X-Forwarded-For", environ["REMOTE_ADDR"]))
        tunnel_socket = environ.get("werkzeug.socket")
        if tunnel_socket is not None and environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            return self._websocket(environ, start_response, tunnel_socket, target, headers)
        length = environ.get("CONTENT_LENGTH")
        if length and not length.isdigit():
            return _error(start_response, "400 Bad Request", "reverst: invalid Content-Length\n")
        has_body = bool(length and length != "0") or (not length and method not in ("GET", "HEAD", "OPTIONS", "DELETE"))
        try:
            response = self._pool.request(method, self._prefix + target, headers,
                                          environ["wsgi.input"] if has_body else None,
                                          int(length) if length else None)
        except http1.ConnectError as exc:
            logger.warning("%s %s: local service %s unreachable: %s", method, path, self.target, exc)
            return _error(start_response, "502 Bad Gateway",
                          f"reverst: local service {self.target} refused the connection\n")
        except http1.ReadTimeout:
            logger.warning("%s %s: local service %s timed out", method, path, self.target)
            return _error(start_response, "504 Gateway Timeout",
                          f"reverst: local service {self.target} timed out\n")
        except http1.HTTPError as exc:
            logger.warning("%s %s: local service %s failed: %s", method, path, self.target, exc)
            return _error(start_response, "502 Bad Gateway",
                          f"reverst: local service {self.target} failed: {type(exc).__name__}\n")
        reason = response.reason.decode("latin-1")
        try:
            start_response(f"{response.status} {reason}".rstrip(), strip_hop_by_hop(response.headers))
        except BaseException:
            response.close()
            raise
        if response.done:
            return response.stream()
        return _relay(response.stream())

    def serve_stream(self, stream) -> bool:
        """Serve an HTTP/3 request stream straight, in a greenlet: its fields become the
        HTTP/1.1 request and the local service's response head becomes HTTP/3 fields,
        bytes to bytes, with no WSGI environ between (that round trip was ~20% of
        ``expose``'s CPU on small requests). The same request and response as
        :meth:`__call__` makes, except that repeated request fields stay separate lines.
        False, doing nothing, for an extended CONNECT (a WebSocket): the WSGI path
        serves it.
        """
        if not logger.isEnabledFor(logging.DEBUG):
            return self._forward_stream(stream) is not None
        started = time.monotonic()
        outcome = self._forward_stream(stream)
        if outcome is not None:  # the path only: a query may carry tokens
            pseudo = {k: v for k, v in stream.headers if k[:1] == b":"}
            logger.debug("%s %s -> %d, %d bytes, %.1f ms", pseudo.get(b":method", b"GET").decode("latin-1"),
                         pseudo.get(b":path", b"/").split(b"?", 1)[0].decode("latin-1"), outcome[0], outcome[1],
                         (time.monotonic() - started) * 1000)
        return outcome is not None

    def _forward_stream(self, stream) -> tuple[int, int] | None:
        """serve_stream's work: (status, body bytes sent), or None for a WebSocket."""
        method = target = authority = None
        scheme = b"https"
        headers: list[tuple[bytes, bytes]] = []
        for name, value in stream.headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                elif name == b":authority":
                    authority = value
                elif name == b":scheme":
                    scheme = value
                elif name == b":protocol":
                    return None
            else:
                headers.append((name, value))
        method_text = method.decode("latin-1") if method else "GET"
        target = target or b"/"
        if _UNSAFE_TARGET_BYTES.search(target):
            target = _UNSAFE_TARGET_BYTES.sub(lambda m: b"%%%02X" % m.group()[0], target)
        names = {k for k, _ in headers}  # (HTTP/3 names are lower-case)
        if not names.isdisjoint(_HOP_BY_HOP_BYTES):
            headers = _strip_hop_by_hop_bytes(headers)
            names = {k for k, _ in headers}
        if b"host" in names:  # (HTTP/3 has :authority; a host field too is the same value)
            authority = authority or next(v for k, v in headers if k == b"host")
            headers = [(k, v) for k, v in headers if k != b"host"]
        headers.append((b"host", self._netloc_bytes if self.rewrite_host or not authority else authority))
        if b"accept-encoding" not in names:
            headers.append((b"accept-encoding", b"identity"))  # as http.client: no surprise gzip
        if b"x-forwarded-host" not in names and authority:
            headers.append((b"x-forwarded-host", authority))
        if b"x-forwarded-proto" not in names:
            headers.append((b"x-forwarded-proto", scheme))
        if b"x-forwarded-for" not in names and stream.conn.peer:
            headers.append((b"x-forwarded-for", str(stream.conn.peer[0]).encode()))
        lengths = {v for k, v in headers if k == b"content-length"} if b"content-length" in names else ()
        length = lengths.pop() if len(lengths) == 1 else None
        if lengths or (length is not None and not length.isdigit()):
            _answer(stream, 400, "reverst: invalid Content-Length\n")
            return 400, 0
        has_body = (length is not None and length != b"0") or (
            length is None and not stream.at_eof and method_text not in ("GET", "HEAD", "OPTIONS", "DELETE"))
        path = target.split(b"?", 1)[0].decode("latin-1")  # for logs: a query may carry tokens
        try:
            head = http1.head_bytes(method or b"GET", self._prefix_bytes + target, headers,
                                    chunked=has_body and length is None)
        except ValueError as exc:  # a line break in a field: a library let it through
            logger.warning("%s %s: invalid request: %s", method_text, path, exc)
            _answer(stream, 400, "reverst: invalid request\n")
            return 400, 0
        try:
            response = self._pool.send_request(head, method_text, WSGIInput(stream.read) if has_body else None,
                                               int(length) if has_body and length is not None else None)
        except http1.ConnectError as exc:
            logger.warning("%s %s: local service %s unreachable: %s", method_text, path, self.target, exc)
            _answer(stream, 502, f"reverst: local service {self.target} refused the connection\n")
            return 502, 0
        except http1.ReadTimeout:
            logger.warning("%s %s: local service %s timed out", method_text, path, self.target)
            _answer(stream, 504, f"reverst: local service {self.target} timed out\n")
            return 504, 0
        except http1.HTTPError as exc:
            logger.warning("%s %s: local service %s failed: %s", method_text, path, self.target, exc)
            _answer(stream, 502, f"reverst: local service {self.target} failed: {type(exc).__name__}\n")
            return 502, 0
        fields = _response_fields(response.status, response.raw_headers)
        if not status_has_body(response.status, method_text):
            if response.done:  # (a HEAD response's head is all of it; 204 and 304 have none)
                response.stream()  # the connection goes back to the pool
            else:
                response.close()
            stream.send_headers(fields, True)
            return response.status, 0
        if response.done:  # the whole body came with the head: one operation, the usual case
            body = b"".join(response.stream())  # (the connection is back in the pool)
            if not any(k == b"content-length" for k, _ in fields):
                fields.append((b"content-length", b"%d" % len(body)))
            stream.send_headers(fields, True, body)  # (at most a read's worth: no wait for room)
            return response.status, len(body)
        try:
            stream.send_headers(fields)
        except BaseException:
            response.close()
            raise
        chunks, sent = response.stream(), 0
        try:
            for chunk in chunks:
                stream.write(chunk)
                sent += len(chunk)
        except http1.HTTPError as exc:
            if isinstance(exc, http1.ReadTimeout):
                logger.warning("local service timed out mid-response")
            else:
                logger.warning("local service broke off the response: %s", exc)
            stream.abort(H3_INTERNAL_ERROR)
            return response.status, sent
        finally:
            chunks.close()  # a reset from the tunnel mid-body: the local connection is closed
        stream.close()
        return response.status, sent

    def _websocket(self, environ, start_response, tunnel_socket, target: str, headers):
        """A WebSocket: an HTTP/1.1 upgrade to the local service; its 101 goes back on the
        tunnel's socket and the bytes are relayed both ways; any other answer is relayed
        as a plain response."""
        path = target.split("?", 1)[0]
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "")
        headers = headers + [("Upgrade", "websocket"), ("Connection", "Upgrade")]
        try:
            response = self._pool.upgrade(self._prefix + target, headers)
        except http1.ConnectError as exc:
            logger.warning("WebSocket %s: local service %s unreachable: %s", path, self.target, exc)
            return _error(start_response, "502 Bad Gateway",
                          f"reverst: local service {self.target} refused the connection\n")
        except http1.HTTPError as exc:
            logger.warning("WebSocket %s: local service %s failed: %s", path, self.target, exc)
            return _error(start_response, "502 Bad Gateway",
                          f"reverst: local service {self.target} failed: {type(exc).__name__}\n")
        if response.status != 101:  # refused: its answer, as any response
            start_response(f"{response.status} {response.reason.decode('latin-1')}".rstrip(),
                           strip_hop_by_hop(response.headers))
            return _relay(response.stream())
        accept = [v for k, v in response.headers if k.lower() == "sec-websocket-accept"]
        local = response.detach()
        if accept != [websocket.accept_value(key)]:
            local.close()
            logger.warning("WebSocket %s: local service %s sent a wrong Sec-WebSocket-Accept", path, self.target)
            return _error(start_response, "502 Bad Gateway",
                          f"reverst: local service {self.target} botched the WebSocket handshake\n")
        head = "HTTP/1.1 101 Switching Protocols\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in response.headers) + "\r\n"
        local.settimeout(None)  # an open WebSocket may stay quiet for hours
        try:
            tunnel_socket.send(head.encode("latin-1"))
            if response.upgraded:
                tunnel_socket.send(response.upgraded)
            _relay_sockets(local, tunnel_socket)
        finally:
            local.close()
            tunnel_socket.close()
        return []


def _relay_sockets(local, tunnel) -> None:
    """Bytes both ways between the local service's socket and the tunnel's, until both
    ended (each end's close is passed on as a half-close) or one broke (both are cut)."""
    import gevent  # expose runs in greenlets (the pool's sockets are gevent's)

    def pipe(read, write, end) -> None:
        try:
            while data := read(65536):
                write(data)
            end()
        except OSError:
            local.close()
            tunnel.close()

    def end_local() -> None:
        try:
            local.shutdown(socket_module.SHUT_WR)
        except OSError:
            pass

    directions = [gevent.spawn(pipe, local.recv, tunnel.sendall, lambda: tunnel.shutdown(socket_module.SHUT_WR)),
                  gevent.spawn(pipe, tunnel.recv, local.sendall, end_local)]
    try:
        gevent.joinall(directions)
    finally:
        gevent.killall(directions)


def _relay(body):
    """Pass the body on; a response broken off mid-body raises (the stream is reset)."""
    try:
        yield from body
    except http1.ReadTimeout:
        logger.warning("local service timed out mid-response")
        raise
    except http1.HTTPError as exc:
        logger.warning("local service broke off the response: %s", exc)
        raise


def _response_fields(status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """HTTP/3 response fields of an HTTP/1.1 response head: names lower-cased, hop-by-hop
    fields (and those ``Connection`` names) dropped."""
    fields = [(b":status", b"%d" % status)]
    lows = [(k.lower(), v) for k, v in headers]
    drop = _HOP_BY_HOP_BYTES
    for name, value in lows:
        if name == b"connection":  # (nginx: "keep-alive", which names nothing more)
            named = {t.encode("latin-1") for t in connection_tokens([value.decode("latin-1")])}
            if not named <= _CONNECTION_OPTIONS:
                drop = drop | named
    fields += [field for field in lows if field[0] not in drop]
    return fields


def _strip_hop_by_hop_bytes(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in
            strip_hop_by_hop([(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers])]


def _answer(stream, status: int, text: str) -> None:
    """reverst's own plain-text answer on an HTTP/3 stream."""
    body = text.encode()
    stream.send_headers([(b":status", b"%d" % status), (b"content-type", b"text/plain; charset=utf-8"),
                         (b"content-length", b"%d" % len(body))], True, body)


def _error(start_response, status: str, text: str):
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]
