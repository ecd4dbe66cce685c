"""reverstd's public HTTP/1.1 front (reverst/http1.py) on raw sockets: pipelining,
HTTP/1.0, 100-continue, early responses to unread bodies, framing of responses."""
from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import socket
import time


class _File:
    """Lets several http.client.HTTPResponse objects read one buffered stream in turn
    (each would close the stream when its body ends)."""

    def __init__(self, f):
        self.f = f

    def makefile(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        return getattr(self.f, name)

    def close(self):
        pass


def connect(server, timeout=10):
    s = socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout)
    return s, s.makefile("rb")


def response(f, method="GET"):
    r = http.client.HTTPResponse(_File(f), method=method)
    r.begin()
    return r, r.read()


def test_pipelined_requests_are_answered_in_order(tunnel):
    s, f = connect(tunnel)
    with s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n"
                  b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nabc"
                  b"GET /status/404 HTTP/1.1\r\nHost: app.test\r\n\r\n"
                  b"GET /name HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        r1, b1 = response(f)
        r2, b2 = response(f, "POST")
        r3, b3 = response(f)
        r4, b4 = response(f)
        assert (r1.status, b1) == (200, b"Hello, World!")
        date = email.utils.parsedate_to_datetime(r1.getheader("Date"))  # IMF-fixdate, in GMT
        assert r1.getheader("Date").endswith(" GMT") and abs(date.timestamp() - time.time()) < 60
        assert (r2.status, json.loads(b2)["body_len"], json.loads(b2)["method"]) == (200, 3, "POST")
        assert (r3.status, b3) == (404, b"status 404")
        assert r4.status == 200 and r4.getheader("Connection") == "close"
        assert s.recv(1) == b""  # closed after the request that asked for it


def test_http_1_0_keep_alive_and_close_delimited_bodies(tunnel):
    s, f = connect(tunnel)
    with s:
        s.sendall(b"GET /hello HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n")
        r, body = response(f)
        assert (r.status, body, r.getheader("Connection")) == (200, b"Hello, World!", "keep-alive")
        # no length and no chunked coding in HTTP/1.0: the body ends with the connection
        s.sendall(b"GET /stream/100000 HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n")
        r, body = response(f)
        assert r.status == 200 and r.getheader("Transfer-Encoding") is None
        assert r.getheader("Connection") == "close" and len(body) == 100000
    s, f = connect(tunnel)
    with s:
        s.sendall(b"GET /hello HTTP/1.0\r\nHost: app.test\r\n\r\n")
        r, body = response(f)
        assert (r.status, body, r.getheader("Connection")) == (200, b"Hello, World!", "close")
        assert s.recv(1) == b""


def test_http_1_1_response_without_length_is_chunked(tunnel):
    s, f = connect(tunnel)
    with s:
        s.sendall(b"GET /stream/70000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        r, body = response(f)
        assert r.getheader("Transfer-Encoding") == "chunked" and len(body) == 70000
        s.sendall(b"HEAD /download/5000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        r, body = response(f, "HEAD")
        assert (r.status, r.getheader("Content-Length"), body) == (200, "5000", b"")
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n")  # the connection still works
        assert response(f)[1] == b"Hello, World!"


def test_expect_100_continue_is_answered_before_the_body_is_sent(tunnel):
    s, f = connect(tunnel)
    with s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert f.readline() == b"\r\n"
        s.sendall(b"hello")
        r, body = response(f, "POST")
        assert r.status == 200 and json.loads(body)["size"] == 5


def test_early_response_to_an_unread_body_reaches_the_client(server):
    """A 502 (no tunnel) arrives while the client is still uploading: the client reads the
    response and the connection is closed, not reset under it."""
    s, f = connect(server)
    with s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: nobody.test\r\nContent-Length: 10000000\r\n\r\n"
                  + b"x" * 65536)
        r, body = response(f, "POST")
        assert r.status == 502 and r.getheader("Connection") == "close"
        start = time.monotonic()
        with contextlib.suppress(OSError):
            while s.recv(65536):
                pass
        assert time.monotonic() - start < 5


def test_client_closing_mid_body_does_not_hurt_the_server(tunnel):
    s, _ = connect(tunnel)
    with s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    s, f = connect(tunnel)
    with s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert response(f)[1] == b"Hello, World!"


# -- the sans-io parser alone ------------------------------------------------------------

def test_an_http2_preface_or_http_0_9_gets_505_and_the_connection_closes(tunnel):
    for raw in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET /hello\r\n\r\n"):
        s, f = connect(tunnel)
        with s:
            s.sendall(raw)
            r, body = response(f)
            assert (r.status, body) == (505, b"HTTP Version Not Supported\n")
            assert s.recv(1) == b""
    s, f = connect(tunnel)  # and the front serves on
    with s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert response(f)[1] == b"Hello, World!"


def test_parser_byte_by_byte_pipelined_chunked_and_limits():
    import pytest
    from reverst.http1 import MAX_FIELDS, BadRequest, RequestParser

    p = RequestParser()
    raw = (b"POST /a?x=%2F HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-R: 1\r\nX-R: 2\r\n\r\n"
           b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
           b"GET /b HTTP/1.0\r\nHost: h\r\n\r\n")
    for i in range(len(raw)):
        p.feed(raw[i:i + 1])
    first, second = p.requests
    assert (first.method, first.target, first.version, first.chunked) == ("POST", b"/a?x=%2F", "1.1", True)
    assert [f for f in first.fields if f[0] == "X-R"] == [("X-R", "1"), ("X-R", "2")]
    assert (b"".join(first.chunks), first.complete, first.keep_alive) == (b"abcde", True, True)
    assert (second.method, second.version, second.keep_alive, second.complete) == ("GET", "1.0", False, True)

    p = RequestParser()  # trailer fields are not forwarded, nor taken for head fields
    p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
           b"X-Trailer: 1\r\nHost: other\r\n\r\n")
    (req,) = p.requests
    assert (req.fields, req.complete) == ([("Host", "h"), ("Transfer-Encoding", "chunked")], True)

    for bad, status in [(b"GET / HTTP/1.1\r\nA: 1\r\n  folded\r\n\r\n", 400),
                        (b"GET / HTTP/1.1\r\n" + b"A: 1\r\n" * (MAX_FIELDS + 1) + b"\r\n", 431),
                        (b"GET / HTTP/1.1\r\nA: " + b"a" * 70000, 431),
                        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
                        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
                        (b"GET /\r\n\r\n", 505),  # HTTP/0.9
                        (b"\x16\x03\x01\x02\x00\x01\x00", 400)]:  # a TLS ClientHello
        p = RequestParser()
        with pytest.raises(BadRequest) as info:
            p.feed(bad)
        assert info.value.status == status
        with pytest.raises(BadRequest):  # stays failed
            p.feed(b"GET / HTTP/1.1\r\n\r\n")


@contextlib.contextmanager
def front_in_process(app):
    """reverst.http1.Front on an ephemeral port in this process (gevent), swept every 0.1 s."""
    import gevent
    import gevent.server

    from reverst import http1

    front = http1.Front(app)
    server = gevent.server.StreamServer(("127.0.0.1", 0), front)
    server.start()

    def sweeper():
        while True:
            gevent.sleep(0.1)
            front.sweep()
    sweeping = gevent.spawn(sweeper)
    try:
        yield front, server
    finally:
        sweeping.kill()
        server.stop()


def test_timeouts_slow_head_408_idle_close_and_slow_body_served(monkeypatch):
    """The front's socket shell in this process (gevent sockets), its sweep() run every
    0.1 s: a head trickled in slower than HEAD_TIMEOUT is answered 408; a connection
    silent for IDLE_TIMEOUT is closed; idling before a request, or a slow body, is
    neither, and that request is served; no timer per socket call."""
    import gevent
    from gevent import socket as gsocket

    from reverst import http1

    monkeypatch.setattr(http1, "HEAD_TIMEOUT", 0.5)
    monkeypatch.setattr(http1, "IDLE_TIMEOUT", 1.5)

    def app(environ, start_response):
        body = environ["wsgi.input"].read(-1)
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    with front_in_process(app) as (front, server):
        with gevent.Timeout(15):
            s = gsocket.create_connection(server.address)
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
            for _ in range(6):  # 1.2 s of trickling, past the 0.5 s head limit
                gevent.sleep(0.2)
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:  # the server answered and closed
                    break
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), reply
            s.close()

            s = gsocket.create_connection(server.address)
            gevent.sleep(0.7)  # idle before the first byte: not the head timeout
            s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
            gevent.sleep(0.7)  # a slow body: not the head timeout either
            s.sendall(b"cd")
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nabcd"), reply
            start = gevent.get_hub().loop.now()
            assert s.recv(4096) == b""  # then silent: closed after the idle timeout
            assert 1.2 < gevent.get_hub().loop.now() - start < 3.0
            s.close()
            assert not front.connections


def test_a_client_that_stops_reading_is_dropped_after_the_idle_timeout(monkeypatch):
    import gevent
    from gevent import socket as gsocket

    from reverst import http1

    monkeypatch.setattr(http1, "IDLE_TIMEOUT", 1.0)
    big = b"x" * (32 * 1024 * 1024)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", str(len(big)))])
        return [big]

    with front_in_process(app) as (front, server):
        with gevent.Timeout(15):
            s = gsocket.create_connection(server.address)
            s.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, 65536)
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            gevent.sleep(0.3)
            assert len(front.connections) == 1
            assert next(iter(front.connections)).writing_since is not None  # blocked on us
            gevent.sleep(2.0)  # not reading: the server gives up on the response
            assert not front.connections
            got = 0
            try:
                while chunk := s.recv(1 << 20):
                    got += len(chunk)
            except OSError:
                pass
            assert got < len(big)  # cut short, not delivered in full
            s.close()
