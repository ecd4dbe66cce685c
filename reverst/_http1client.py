"""A lean HTTP/1.1 client for :class:`reverst.proxy.LocalProxy`: keep-alive sockets + llhttp.

urllib3 (and the ``http.client`` under it) spent ~40% of ``reverst expose``'s CPU on
small requests building requests and parsing response headers with ``email.parser``.
This client does only what a forwarding proxy needs: one send for the request
head (and a small body), responses parsed by llhttp (``httptools``, C), bodies handed
on chunk by chunk as they arrive, never decoded, redirects never followed.

A pool made ``cooperative`` uses gevent's sockets, ``select`` and TLS (``reverst expose``
runs its ``LocalProxy`` so, in greenlets, without monkey-patching the process); otherwise
``socket``, ``ssl`` and ``select`` are looked up at call time, never captured at import, so
that the same code runs in native threads and in a process its owner monkey-patched.  The
pool is a ``deque`` (atomic ``append``/``pop``), safe for both.
"""
from __future__ import annotations

import collections
import logging
import select
import socket
import ssl

import httptools
from gevent import select as gevent_select, socket as gevent_socket

from .http1 import send_all

logger = logging.getLogger("reverst.proxy")
CHUNK = 64 * 1024
#: Methods retried on a new connection when a kept-alive one turns out closed (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: Request bodies up to this size are read first and sent with the head in one send.
SMALL_BODY = 16 * 1024


class HTTPError(Exception):
    """Talking to the local service failed; subclasses say how."""


class ConnectError(HTTPError):
    """No TCP connection (refused, unreachable, unknown host, connect timeout)."""


class ReadTimeout(HTTPError):
    """The local service was silent for longer than the read timeout."""


class ProtocolError(HTTPError):
    """The connection broke, or the response was not valid HTTP/1.1 (urllib3's name)."""


class SSLError(HTTPError):
    """The TLS handshake failed, e.g. the certificate did not verify (urllib3's name)."""


def _timed_out(exc: BaseException) -> bool:
    # gevent's TLS sockets once raised SSLError("The read operation timed out").
    return isinstance(exc, TimeoutError) or (isinstance(exc, ssl.SSLError) and "timed out" in str(exc))


def _broken(exc: OSError, what: str) -> HTTPError:
    if _timed_out(exc):
        return ReadTimeout(f"{what}: timed out")
    return ProtocolError(f"{what}: {exc or type(exc).__name__}")


class Pool:
    """Keep-alive connections to one ``http``/``https`` origin.

    Up to ``maxsize`` idle connections are kept (most recently used first); more may be
    open at once, and those that find the pool full when released are closed.
    """

    def __init__(self, scheme: str, host: str, port: int, *, timeout: float, connect_timeout: float,
                 verify: bool = True, maxsize: int = 100, cooperative: bool = False) -> None:
        self.host, self.port = host, port
        self.cooperative = cooperative
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._tls = scheme == "https"
        self._verify = verify
        self._context = None
        self._maxsize = maxsize
        self._idle: collections.deque = collections.deque()

    def request(self, method: str, target: str, headers: list[tuple[str, str]], body=None,
                length: int | None = None) -> Response:
        """Send a request and read the response up to the end of its head.

        ``body`` is a file-like object (``wsgi.input``) sent as ``length`` bytes, or chunked
        when ``length`` is None; ``None`` means no body.  A pooled connection the server
        closed while idle is detected by the failure (send error, or EOF before any
        response byte) and, for an idempotent request without a body, retried once on a
        new connection; otherwise (a body is not replayed) an idle connection is checked
        for EOF before use instead, as urllib3 does for every request.
        """
        return self.send_request(_head(method, target, headers, chunked=body is not None and length is None),
                                 method, body, length)

    def send_request(self, head: bytes, method: str, body=None, length: int | None = None) -> Response:
        """:meth:`request` with its head already encoded (ending in the blank line; with
        ``Transfer-Encoding: chunked`` when ``body`` is given without ``length``)."""
        retry = body is None and method in IDEMPOTENT
        if body is not None and length is not None and length <= SMALL_BODY:
            head += _read_exactly(body, length)
            body = None
        sock = self._pop(check=not retry)
        while True:
            reused = sock is not None
            if sock is None:
                sock = self._connect()
            response = Response(self, sock, head_only=method == "HEAD")
            try:
                try:
                    send_all(sock, head)
                    if body is not None:
                        _send_body(sock, body, length)
                except OSError as exc:
                    raise _broken(exc, "sending the request") from None
                while not response.headers_done:
                    response.receive()
                return response
            except ProtocolError as exc:
                sock.close()
                if not (reused and retry and not response.received):
                    raise
                logger.debug("kept-alive connection to %s:%d was closed (%s); retrying on a new one",
                             self.host, self.port, exc)
                sock, retry = None, False
            except BaseException:
                sock.close()
                raise

    def upgrade(self, target: str, headers: list[tuple[str, str]]) -> "Response":
        """``GET`` with the given ``Upgrade`` headers on a new connection (never pooled), read
        up to the end of the response head. A ``101`` leaves the connection to the caller
        (:meth:`Response.detach`); any other answer is a normal response."""
        sock = self._connect()
        response = Response(self, sock, head_only=False)
        try:
            try:
                send_all(sock, _head("GET", target, headers, chunked=False))
            except OSError as exc:
                raise _broken(exc, "sending the request") from None
            while not response.headers_done:
                response.receive()
            return response
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        """Close the idle connections (in-flight ones close when their response ends)."""
        while self._idle:
            self._idle.pop().close()

    def _pop(self, check: bool):
        while True:
            try:
                sock = self._idle.pop()
            except IndexError:
                return None
            if not check or not self._select([sock], [], [], 0)[0]:
                return sock
            sock.close()  # readable while idle: EOF (or junk), not reusable

    def _release(self, sock) -> None:
        if len(self._idle) < self._maxsize:
            self._idle.append(sock)
        else:
            sock.close()

    def _connect(self):
        try:
            sock = self._create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                sock = self._ssl_context().wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.timeout)
            return sock
        except OSError as exc:
            sock.close()
            if _timed_out(exc):
                raise ConnectError(f"TLS handshake: {exc}") from None
            raise SSLError(str(exc) or type(exc).__name__) from None

    def _select(self, *args):
        return (gevent_select if self.cooperative else select).select(*args)

    def _create_connection(self, address, timeout: float):
        return (gevent_socket if self.cooperative else socket).create_connection(address, timeout=timeout)

    def _ssl_context(self):
        # Built on first use: in a process patched meanwhile, ssl's context is gevent's.
        if self._context is None:
            if self.cooperative:  # create_default_context()'s context (less its SSLKEYLOGFILE hook), gevent's class
                from gevent import ssl as gevent_ssl
                context = gevent_ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.load_default_certs()
            else:
                context = ssl.create_default_context()
            if not self._verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["http/1.1"])
            self._context = context
        return self._context


def _head(method: str, target: str, headers: list[tuple[str, str]], chunked: bool) -> bytes:
    return head_bytes(method.encode("latin-1"), target.encode("latin-1"),
                      [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers], chunked)


def head_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], chunked: bool) -> bytes:
    """An HTTP/1.1 request head (:func:`_head` takes text; an HTTP/3 request's fields are
    bytes already)."""
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    lines += [b"%s: %s" % field for field in headers]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    # One CR and one LF per line, else a name or value carried a line break (HTTP/3 forbids
    # them already; this keeps a WSGI server that doesn't from splitting the request).
    if head.count(b"\n") != len(lines) + 1 or head.count(b"\r") != len(lines) + 1:
        raise ValueError("CR or LF in the request line or a header")
    return head


def _read_exactly(body, length: int) -> bytes:
    data = body.read(length)
    while len(data) < length:
        more = body.read(length - len(data))
        if not more:
            raise ProtocolError("the request body ended before its Content-Length")
        data += more
    return data


def _send_body(sock, body, length: int | None) -> None:
    if length is None:
        while data := body.read(CHUNK):
            send_all(sock, b"%x\r\n%s\r\n" % (len(data), data))
        send_all(sock, b"0\r\n\r\n")
        return
    left = length
    while left:
        data = body.read(min(CHUNK, left))
        if not data:
            raise ProtocolError("the request body ended before its Content-Length")
        send_all(sock, data)
        left -= len(data)


class Response:
    """One response: the httptools callbacks, then the body (:meth:`stream`).

    After :meth:`Pool.request` returns, ``status``, ``reason`` (bytes) and ``headers``
    (``[(name, value)]``, latin-1, in order, repeated fields kept) are set.  The socket
    goes back to the pool only once the body was read to its end, the server did not ask
    to close, and nothing followed the response.
    """

    __slots__ = ("status", "reason", "raw_headers", "_headers", "headers_done", "done", "received", "_chunks", "_pool",
                 "_sock", "_head_only", "_keep_alive", "_until_eof", "_extra", "_parser", "upgraded")

    def __init__(self, pool: Pool, sock, *, head_only: bool) -> None:
        self.status = 0
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []  # as received
        self._headers: list[tuple[str, str]] | None = None
        self.headers_done = False
        self.done = False
        self.received = False  # a byte came back: a failure now is not a stale connection
        self._chunks: list[bytes] = []
        self._pool, self._sock = pool, sock
        self._head_only = head_only
        self._keep_alive = False
        self._until_eof = False
        self._extra = False
        self._parser = httptools.HttpResponseParser(self)
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)  # bare LF, as http.client
        self.upgraded: bytes | None = None  # after a 101: the new protocol's first bytes

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The head's fields as latin-1 text (``raw_headers`` as bytes)."""
        if self._headers is None:
            self._headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]
        return self._headers

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.done:
            self._extra = True  # bytes after the response: the connection is out of step

    def on_status(self, data: bytes) -> None:
        self.reason += data

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # trailers are dropped, as http.client did
            self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim (100 Continue, 103 Early Hints)
            self.reason, self.raw_headers = b"", []
            return
        self.status, self.headers_done = status, True
        self._keep_alive = status != 101 and self._parser.should_keep_alive()
        if self._head_only:
            # httptools cannot tell llhttp that a HEAD response has no body: it would wait
            # for Content-Length bytes that never come. The head is the whole response.
            self.done = True
        elif not self._keep_alive:
            self._until_eof = _until_eof(self.headers)

    def on_body(self, data: bytes) -> None:
        if self.done:
            self._extra = True  # a body after a HEAD response
        else:
            self._chunks.append(data)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.done = True

    # -- reading
    def receive(self) -> None:
        """Read once from the socket and parse what came (callbacks above)."""
        try:
            data = self._sock.recv(CHUNK)
        except OSError as exc:
            raise _broken(exc, "reading the response") from None
        if not data:
            if self._until_eof:
                self.done = True  # a close-delimited body ends here
                return
            raise ProtocolError("the local service closed the connection "
                                + ("mid-response" if self.received else "without a response"))
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.status == 101 and self.headers_done:  # the rest belongs to the new protocol
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                self.upgraded = data[offset:]
                self.done = True
                return
            if not self.done:
                raise ProtocolError(f"invalid response: {exc}") from None
            self._extra = True
        except httptools.HttpParserError as exc:
            if not self.done:
                raise ProtocolError(f"invalid response: {exc}") from None
            self._extra = True  # junk after the response

    def stream(self):
        """The body: an iterator of chunks, each handed on as it was received (so that
        server-sent events and chunked responses flow).  A body cut short raises
        :class:`ProtocolError` (or :class:`ReadTimeout`) from the iterator."""
        if self.done:  # the whole response came with its head: the common small case
            self._finish()
            return iter(self._chunks)
        return self._stream()

    def _stream(self):
        try:
            while True:
                if self._chunks:
                    chunks, self._chunks = self._chunks, []
                    yield from chunks
                if self.done:
                    break
                self.receive()
        except BaseException:  # GeneratorExit too: the tunnel client gave up mid-body
            self._sock.close()
            raise
        self._finish()

    def close(self) -> None:
        """Instead of :meth:`stream`: give up on the response and close its connection."""
        self._sock.close()

    def detach(self):
        """After a 101: the connection, now the new protocol's (the caller closes it)."""
        sock, self._sock = self._sock, None
        return sock

    def _finish(self) -> None:
        if self._keep_alive and not self._extra:
            self._pool._release(self._sock)
        else:
            self._sock.close()


def _until_eof(headers: list[tuple[str, str]]) -> bool:
    """Whether the body ends only when the server closes (RFC 9112 §6.3: no chunked last
    in Transfer-Encoding, no Content-Length).  httptools cannot be told about EOF."""
    te, length = None, False
    for name, value in headers:
        low = name.lower()
        if low == "transfer-encoding":
            te = value
        elif low == "content-length":
            length = True
    if te is not None:
        return not te.rstrip().lower().endswith("chunked")
    return not length
