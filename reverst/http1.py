"""reverstd's public HTTP/1.1 front: a lean server for one WSGI-style application.

``gevent.pywsgi`` cost ~60% of reverstd's CPU on small proxied requests (header parsing
through ``email.parser``, a full CGI environ, its log formatting, ``sendall`` chunking),
and its parser is lenient where a proxy must not be.  Here llhttp (``httptools``, C)
parses strictly — ``Host : x``, obsolete line folding, ``Content-Length`` together with
``Transfer-Encoding``, bad chunk sizes are all 400 (RFC 9112 §5.1, §5.2, §6.1) — and a
response goes out in as few ``send`` calls as possible.

The application is called as ``app(environ, start_response)`` with a small environ:

- ``REQUEST_METHOD``, ``SERVER_PROTOCOL``, ``REMOTE_ADDR``, ``REMOTE_PORT``,
  ``CONTENT_LENGTH`` and ``HTTP_TRANSFER_ENCODING`` (when sent), ``HTTP_HOST``;
- ``reverst.raw_path``: the request target exactly as sent (latin-1);
- ``reverst.headers``: every field as ``(name, value)`` strings, in order, repeats kept;
- ``wsgi.input``: the body, read as it arrives (``read(n)``); a ``100 Continue`` goes out
  at the first read when the client asked for it.  A malformed body raises
  :class:`BadRequest`; if the application lets it escape, the client gets a 400.
- ``reverst.upgrade`` (requests with ``Upgrade``): after ``start_response("101 ...")``,
  calling it sends that head and returns the connection as an :class:`UpgradedSocket`
  (bytes the client sent after its request head come first); the application then owns
  the bytes both ways and returns an empty iterable. The connection ends after it.

The application returns an iterable of bytes; each item is sent as it comes (chunked
when the response has no length and the client speaks HTTP/1.1).  If the iterable fails
after the status went out, the connection is cut so the client sees a broken response.
"""
from __future__ import annotations

import http
import logging
import socket
import time
from collections import deque
from wsgiref.handlers import format_date_time  # (email.utils.formatdate: +0.8 MB of email modules)

import httptools

logger = logging.getLogger("reverst.server.http")

#: Most bytes of request line + header fields, and most fields (431 beyond either)
MAX_HEAD = 64 * 1024
MAX_FIELDS = 100
#: Seconds a connection may stay silent (between requests, or mid-request)
IDLE_TIMEOUT = 75.0
#: Seconds from the first byte of a request head to its end (slow-loris clients): 408
HEAD_TIMEOUT = 30.0
#: Seconds an HTTPS client has for its TLS handshake.
HANDSHAKE_TIMEOUT = 10.0
#: After an early response, how long (and how much) to read a body nobody wants before
#: closing, so the client sees the response rather than a reset
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
LINGER_QUIET = 0.2  # ... or until the client has been quiet this long
RECV = 64 * 1024

_NO_BODY_STATUS = (204, 304)


class BadRequest(ValueError):
    """The request could not be parsed; ``status`` is what the client is told."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(ConnectionError):
    """The client closed (or went silent) mid-request."""


def send_all(sock, data) -> None:
    """``sock.sendall(data)``, but one ``send()`` when that takes it all (the usual case):
    gevent's ``sendall()`` first asks the kernel for ``SO_SNDBUF`` on every call (5% of
    reverstd's CPU on small responses) and arms a timer."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


_date_cache = [0, b""]


def _date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = format_date_time(now).encode()
    return _date_cache[1]


class Request:
    """One parsed request head and its body as it arrives."""

    __slots__ = ("method", "target", "version", "fields", "keep_alive", "expect_continue", "chunks",
                 "complete", "upgrade", "upgrade_data", "_conn", "_continued", "chunked", "length")

    def __init__(self, conn: "_Connection") -> None:
        self._conn = conn
        self.target = b""
        self.fields: list[tuple[str, str]] = []
        self.chunks: deque[bytes] = deque()
        self.complete = False
        self.upgrade = False
        self.upgrade_data = b""  # what followed the head of an upgrade request
        self._continued = False

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` body bytes (all remaining if negative); b"" at the end."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.expect_continue and not self._continued:
                self._continued = True
                self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._conn.fill()
        if size < 0:
            data = b"".join(self.chunks)
            self.chunks.clear()
            while not self.complete:
                self._conn.fill()
                data += b"".join(self.chunks)
                self.chunks.clear()
            return data
        data = self.chunks.popleft()
        if len(data) > size:
            self.chunks.appendleft(data[size:])
            return data[:size]
        while self.chunks and len(data) + len(self.chunks[0]) <= size:
            data += self.chunks.popleft()
        return data


class RequestParser:
    """Sans-io: bytes in (:meth:`feed`), parsed :class:`Request` heads out (``requests``),
    each request's body chunks appended to it as they are parsed.  Raises
    :class:`BadRequest` for anything that isn't strict HTTP/1.1 or exceeds the limits."""

    def __init__(self, conn=None) -> None:
        self._conn = conn
        self._parser = httptools.HttpRequestParser(self)
        self.requests: deque[Request] = deque()  # parsed heads not taken yet (pipelining)
        self.parsing: Request | None = None      # the request being filled in
        self.head_bytes = 0                      # bytes fed while a head was incomplete
        self.in_head = True
        #: bytes fed in a body since its last body bytes came out: chunk lines and the
        #: trailer section, which llhttp buffers whole (bounded like a head)
        self.framing_bytes = 0
        self.error: BadRequest | None = None

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.in_head:
            self.head_bytes += len(data)  # (may count some body bytes too: harmless)
            if self.head_bytes > MAX_HEAD:
                self.error = BadRequest("request head too large", 431)
                raise self.error
        else:
            self.framing_bytes += len(data)  # (on_body() sets it back to 0)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Upgrade/CONNECT: nothing after it on this connection is parsed as HTTP; what
            # follows the head belongs to the new protocol (if the application switches).
            self.parsing.upgrade = True
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.parsing.upgrade_data = data[offset:]
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self.error = cause if isinstance(cause, BadRequest) else BadRequest(str(exc))
            raise self.error from None
        except httptools.HttpParserError as exc:
            if self.in_head and "PRI" in str(exc):  # llhttp stops at "PRI * HTTP/2.0"
                self.error = BadRequest("an HTTP/2 connection preface (this port speaks HTTP/1.1)", 505)
                raise self.error from None
            self.error = BadRequest(f"malformed request: {exc}")
            raise self.error from None
        if self.framing_bytes > MAX_HEAD:
            self.error = BadRequest("request trailer fields (or a chunk line) too large", 431)
            raise self.error

    @property
    def head_started(self) -> bool:
        """Some of a request head arrived and its end did not yet."""
        return self.in_head and self.head_bytes > 0

    @property
    def stopped(self) -> bool:
        """True after an upgrade request: nothing more is parsed on this connection."""
        return self.parsing is not None and self.parsing.upgrade

    # -- llhttp callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.parsing = Request(self._conn)

    def on_url(self, url: bytes) -> None:
        self.parsing.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # a trailer field of a chunked body: not forwarded (its section
            return            # is bounded by framing_bytes); the head's fields went already
        fields = self.parsing.fields
        if len(fields) >= MAX_FIELDS:
            raise BadRequest("too many header fields", 431)
        fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        req, parser = self.parsing, self._parser
        self.in_head = False
        self.head_bytes = 0
        self.framing_bytes = 0
        req.method = parser.get_method().decode("latin-1")
        req.version = parser.get_http_version()
        if req.version not in ("1.0", "1.1"):  # (llhttp takes HTTP/0.9 and any x.y; Go answers 505)
            raise BadRequest(f"HTTP version {req.version} not supported", 505)
        req.keep_alive = parser.should_keep_alive()
        req.expect_continue = False
        req.chunked = False
        req.length = None
        hosts = 0
        for name, value in req.fields:
            low = name.lower()
            if low == "host":
                hosts += 1
            elif low == "expect":
                req.expect_continue = value.lower() == "100-continue" and req.version != "1.0"
            elif low == "transfer-encoding":
                req.chunked = True
            elif low == "content-length":
                req.length = value
        # RFC 9112 §3.2 (and Go's net/http): one Host, and HTTP/1.1 must send it. Routing
        # by the first of two would let a request reach another group than a proxy saw.
        if hosts > 1:
            raise BadRequest("more than one Host field")
        if hosts == 0 and req.version == "1.1":
            raise BadRequest("missing Host field")
        self.requests.append(req)

    def on_body(self, body: bytes) -> None:
        self.framing_bytes = 0
        self.parsing.chunks.append(body)

    def on_message_complete(self) -> None:
        self.parsing.complete = True
        self.in_head = True
        self.framing_bytes = 0


class _Connection:
    """One public TCP connection (the I/O shell around :class:`RequestParser`): requests
    served one at a time, in order."""

    def __init__(self, sock, address, app, front: "Front | None" = None) -> None:
        self.sock = sock
        self.address = address
        self.app = app
        self.front = front
        self.between_requests = False  # waiting for a request head that has not begun
        self.parser = RequestParser(self)
        self.eof = False
        self.head_deadline: float | None = None
        #: since when a recv() / a send() has been waiting (None: not waiting); the
        #: front's sweep() ends waits that exceed the timeouts
        self.reading_since: float | None = None
        self.writing_since: float | None = None
        self.expired: str | None = None  # "head" or "idle", set by sweep()

    def fill(self) -> None:
        """Read once from the socket and parse; raises :class:`BadRequest` for bytes that
        aren't HTTP and :class:`ClientGone` at EOF or after the idle timeout."""
        if self.parser.error is not None:
            raise self.parser.error
        if self.eof:
            raise ClientGone("client closed the connection")
        parser = self.parser
        self.reading_since = time.monotonic()
        try:
            data = self.sock.recv(RECV)
        except OSError as exc:
            self.eof = True
            if self.expired == "head":
                raise BadRequest("request head not complete in time", 408) from None
            if self.expired:
                raise ClientGone("client idle for too long") from None
            raise ClientGone(f"client connection failed: {exc}") from None
        finally:
            self.reading_since = None
        if not data:
            self.eof = True
            raise ClientGone("client closed the connection")
        parser.feed(data)
        if not parser.head_started:
            self.head_deadline = None
        elif self.head_deadline is None:  # a head began: it has HEAD_TIMEOUT to complete
            self.head_deadline = time.monotonic() + HEAD_TIMEOUT

    def send(self, data) -> None:
        self.writing_since = time.monotonic()
        try:
            send_all(self.sock, data)
        finally:
            self.writing_since = None

    def expire(self, now: float) -> None:
        """Called by :meth:`Front.sweep`: end a wait that has gone on too long.  Shutting
        the socket down makes the waiting call fail at once (gevent cancels it); a slow
        request head is then answered 408 on the still open sending side."""
        try:
            if self.reading_since is not None and self.head_deadline is not None and now >= self.head_deadline:
                self.expired = "head"
                self.sock.shutdown(socket.SHUT_RD)
            elif self.reading_since is not None and now - self.reading_since >= IDLE_TIMEOUT:
                self.expired = "idle"
                self.sock.shutdown(socket.SHUT_RD)
            elif self.writing_since is not None and now - self.writing_since >= IDLE_TIMEOUT:
                self.expired = "idle"
                self.sock.shutdown(socket.SHUT_RDWR)  # a client that stopped reading
        except OSError:
            pass

    def next_request(self) -> Request | None:
        requests = self.parser.requests
        while not requests:
            if self.parser.stopped:
                return None
            self.between_requests = not self.parser.head_started
            try:
                self.fill()
            except ClientGone:
                return None
            finally:
                self.between_requests = False
        return requests.popleft()

    def serve(self) -> None:
        while True:
            try:
                req = self.next_request()
            except BadRequest as exc:
                self.reject(exc)
                return
            if req is None:
                return
            if not self.respond(req) or req.upgrade:
                return

    def reject(self, exc: BadRequest) -> None:
        logger.info("bad request from %s: %s", self.address[0] if self.address else "?", exc)
        phrase = http.HTTPStatus(exc.status).phrase.encode()
        body = phrase + b"\n"
        try:
            self.send(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\nDate: %s\r\n\r\n%s" % (exc.status, phrase, len(body), _date(), body))
        except OSError:
            return
        self.linger()  # what the client still sends must not reset the answer away

    def respond(self, req: Request) -> bool:
        """Run the application for ``req``; True if the connection can carry another."""
        environ = {
            "REQUEST_METHOD": req.method,
            "SERVER_PROTOCOL": f"HTTP/{req.version}",
            "REMOTE_ADDR": self.address[0] if self.address else "",
            "REMOTE_PORT": str(self.address[1]) if self.address else "",
            "reverst.raw_path": req.target.decode("latin-1"),
            "reverst.headers": req.fields,
            "wsgi.input": req,
            "wsgi.url_scheme": self.front.scheme if self.front is not None else "http",
        }
        if req.length is not None:
            environ["CONTENT_LENGTH"] = req.length
        if req.chunked:
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        for name, value in req.fields:
            if name.lower() == "host":
                environ["HTTP_HOST"] = value
                break
        response = _Response(self, req)
        if req.upgrade:
            environ["reverst.upgrade"] = response.switch
        result = None
        try:
            result = self.app(environ, response.start_response)
            for data in result:
                if data:
                    response.write(data)
            response.finish()
        except BadRequest as exc:
            if response.started:
                return False
            self.reject(exc)
            return False
        except ClientGone:
            return False
        except OSError as exc:
            logger.debug("public client %s went away: %s", self.address, exc)
            return False
        except Exception as exc:  # noqa: BLE001 (one request fails, never the server)
            if response.started:
                logger.info("%s %s: response aborted: %s", req.method, req.target.split(b"?", 1)[0].decode("latin-1"),
                            exc)
                return False
            logger.exception("%s %s failed", req.method, req.target.split(b"?", 1)[0].decode("latin-1"))
            try:
                self.send(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 22\r\nConnection: close\r\n"
                          b"Date: %s\r\n\r\ninternal server error\n" % _date())
            except OSError:
                pass
            return False
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if response.switched:
            return False
        if not req.complete:  # answered before the body was read: don't parse the rest
            self.linger()
            return False
        return response.keep_alive

    def linger(self) -> None:
        """Close after an early response without resetting it away: stop sending, read
        (and drop) what the client still sends for a while, then close."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            got = 0
            while got < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(min(left, LINGER_QUIET))
                data = self.sock.recv(RECV)
                if not data:
                    break
                got += len(data)
        except OSError:
            pass


class UpgradedSocket:
    """A public connection after ``101 Switching Protocols``: raw bytes both ways. Sends
    are watched by the front's sweep (a client not reading for IDLE_TIMEOUT is cut);
    receives are not (a WebSocket may stay quiet for hours)."""

    def __init__(self, conn: "_Connection", pending: bytes) -> None:
        self._conn = conn
        self._pending = pending

    def recv(self, size: int = RECV) -> bytes:
        """Up to ``size`` bytes; b"" once the client closed its side. OSError if broken."""
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return self._conn.sock.recv(size)

    def send(self, data) -> None:
        self._conn.send(data)

    def shutdown_write(self) -> None:
        """End our sending side (the client reads EOF); receiving goes on."""
        try:
            self._conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def abort(self) -> None:
        """Cut the connection both ways at once (a reset, not an orderly close)."""
        try:
            self._conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Response:
    __slots__ = ("conn", "req", "status", "headers", "started", "chunked", "body_allowed", "keep_alive",
                 "switched")

    def __init__(self, conn: _Connection, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.status = None
        self.headers = None
        self.started = False
        self.chunked = False
        self.body_allowed = True
        self.keep_alive = req.keep_alive
        self.switched = False

    def switch(self) -> UpgradedSocket:
        """Send the ``101`` given to start_response and hand the connection over."""
        if self.started or self.status is None or not self.status.startswith("101"):
            raise AssertionError("switch() needs start_response('101 ...') and nothing sent yet")
        self.started = self.switched = True
        self.conn.send(bytes(self._head()))
        return UpgradedSocket(self.conn, self.req.upgrade_data)

    def start_response(self, status: str, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.started:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        self.status = status
        self.headers = headers
        return self.write

    def _head(self) -> bytearray:
        req = self.req
        code = int(self.status[:3])
        self.body_allowed = req.method != "HEAD" and code not in _NO_BODY_STATUS and code >= 200
        has_length = has_date = False
        out = bytearray(b"HTTP/1.1 ")
        out += self.status.encode("latin-1")
        out += b"\r\n"
        for name, value in self.headers:
            low = name.lower()
            if low == "content-length":
                has_length = True
            elif low == "date":
                has_date = True
            out += f"{name}: {value}\r\n".encode("latin-1")
        if not has_date:
            out += b"Date: " + _date() + b"\r\n"
        if code == 101:  # the head's own Upgrade/Connection fields say what follows
            return out + b"\r\n"
        if self.body_allowed and not has_length:
            if req.version == "1.1":
                self.chunked = True
                out += b"Transfer-Encoding: chunked\r\n"
            else:
                self.keep_alive = False  # the end of the body is the end of the connection
        if req.upgrade or not req.complete or (self.conn.front is not None and self.conn.front.draining):
            self.keep_alive = False
        if not self.keep_alive:
            out += b"Connection: close\r\n"
        elif req.version == "1.0":
            out += b"Connection: keep-alive\r\n"
        out += b"\r\n"
        return out

    def write(self, data: bytes) -> None:
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if not self.started:
            self.started = True
            out = self._head()
            if self.body_allowed:
                out += b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
            self.conn.send(out)
        elif self.body_allowed:
            self.conn.send(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def finish(self) -> None:
        if self.status is None:
            raise AssertionError("the application did not call start_response()")
        if not self.started:
            self.started = True
            out = self._head()
            if self.chunked:
                out += b"0\r\n\r\n"
            self.conn.send(out)
        elif self.chunked:
            self.conn.send(b"0\r\n\r\n")


class Front:
    """A ``gevent.server.StreamServer`` handler serving ``app`` on each connection.

    Timeouts cost nothing per request: instead of a timer around every blocking socket
    call (gevent makes one per call when a socket has a timeout: 3% of reverstd's CPU on
    small requests), the owner calls :meth:`sweep` every second or so.
    """

    def __init__(self, app, *, ssl_context=None) -> None:
        self.app = app
        #: HTTPS: sockets are wrapped with it and the handshake done before the first request
        self.ssl_context = ssl_context
        self.scheme = "https" if ssl_context is not None else "http"
        self.connections: set[_Connection] = set()
        #: set by :meth:`drain`: responses close their connection, idle ones close now
        self.draining = False

    def drain(self) -> None:
        """Finish what is in flight: every response from now on closes its connection (so
        a client with a kept-alive connection opens a new one, which a load balancer sends
        elsewhere). Connections idle meanwhile stay open until :meth:`close_idle`."""
        self.draining = True

    def close_idle(self) -> None:
        """Close the connections waiting for a next request (a request that races the
        close is the client's to retry, as RFC 9112 §9.3.1 lets it; :meth:`drain` first
        keeps that to clients idle for the whole drain delay)."""
        self.drain()
        for conn in list(self.connections):
            if conn.between_requests:
                try:
                    conn.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def __call__(self, sock, address) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.ssl_context is not None:
            tls = self._handshake(sock, address)
            if tls is None:
                return
            sock = tls
        conn = _Connection(sock, address, self.app, self)
        self.connections.add(conn)
        try:
            conn.serve()
        finally:
            self.connections.discard(conn)
            sock.close()

    def _handshake(self, sock, address):
        """The TLS socket once its handshake is done (within HANDSHAKE_TIMEOUT), or None."""
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
            tls.settimeout(None)
            return tls
        except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
            logger.debug("TLS handshake with %s failed: %s", address[0] if address else "?", exc)
            sock.close()
            return None

    def sweep(self, now: float | None = None) -> None:
        """Close connections silent for IDLE_TIMEOUT (or not reading our response for
        that long); answer 408 to request heads not complete after HEAD_TIMEOUT."""
        now = time.monotonic() if now is None else now
        for conn in list(self.connections):
            conn.expire(now)

