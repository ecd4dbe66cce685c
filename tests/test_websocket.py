"""WebSockets through the tunnel (RFC 6455 on the public side, RFC 9220 extended CONNECT
inside), with real libraries at both ends: ``websockets`` as the visitor, a
``websockets`` server behind ``reverst expose``, a flask-sock app behind ``reverst wsgi``."""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import threading
import time

import pytest
import requests
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response
from websockets.sync.client import connect
from websockets.sync.server import serve

from .conftest import TunnelClient
from .observe import ManagedServer, eventually
from .test_expose import Expose

H = {"Host": "app.test"}


class LocalWebSockets:
    """A real ``websockets`` server on loopback: echo, subprotocol ``chat.v1``, and a few
    paths that refuse or close in particular ways. ``closed`` counts ended connections."""

    def __init__(self) -> None:
        self.closed = 0
        self.connections = 0
        self.close_codes: list[int | None] = []
        self._lock = threading.Lock()
        self.server = serve(self._handler, "127.0.0.1", 0, select_subprotocol=self._subprotocol,
                            process_request=self._process_request, ping_interval=None, max_size=2 ** 21)
        self.port = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def _subprotocol(connection, offered):
        return "chat.v1" if "chat.v1" in offered else None

    @staticmethod
    def _process_request(connection, request):
        if request.path == "/refuse":
            return connection.respond(403, "no websockets here\n")
        if request.path == "/plain":  # a 200 without switching (an SPA fallback, say)
            return Response(200, "OK", Headers([("Content-Type", "text/plain"), ("Content-Length", "6")]),
                            b"plain\n")
        return None

    def _handler(self, ws) -> None:
        with self._lock:
            self.connections += 1
        try:
            if ws.request.path.startswith("/close/"):
                ws.close(int(ws.request.path.rsplit("/", 1)[1]), "closing as asked")
                return
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self.closed += 1
                self.close_codes.append(ws.close_code)

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(5)


@pytest.fixture
def local_ws():
    srv = LocalWebSockets()
    yield srv
    srv.stop()


@pytest.fixture
def exposed(server, certs, local_ws, procs):
    """reverstd with ``reverst expose`` in front of the local WebSocket server."""
    p = Expose(server, certs, local_ws.port)
    procs.append(p)
    return p


@pytest.fixture
def flask_sock(server, start_client):
    """reverstd with the flask-sock app of tests/ws_apps.py behind ``reverst wsgi``."""
    return start_client(app="tests.ws_apps:app")


def ws_url(server, path: str) -> str:
    return f"ws://127.0.0.1:{server.http_port}{path}"  # 127.0.0.1 is a host of app.test


def check_echo(url: str, subprotocol: str | None = None) -> None:
    """Text, binary, a 1 MB message, 1,000 messages in order, ping/pong."""
    with connect(url, subprotocols=["chat.v1", "other"] if subprotocol else None, open_timeout=5,
                 max_size=2 ** 21) as ws:
        assert ws.subprotocol == subprotocol
        ws.send("héllo")
        assert ws.recv(timeout=5) == "héllo"
        ws.send(b"\x00\x01\x02")
        assert ws.recv(timeout=5) == b"\x00\x01\x02"
        big = os.urandom(1024 * 1024)  # random: permessage-deflate cannot shrink it
        ws.send(big)
        assert ws.recv(timeout=10) == big
        for i in range(1000):
            ws.send(f"message {i}")
        assert [ws.recv(timeout=5) for _ in range(1000)] == [f"message {i}" for i in range(1000)]
        assert ws.ping().wait(5)


# -- through `reverst expose` ----------------------------------------------------------------------
def test_echo_through_expose_with_subprotocol(server, exposed, local_ws):
    check_echo(ws_url(server, "/chat"), subprotocol="chat.v1")
    eventually(lambda: local_ws.closed == 1, timeout=5)
    assert local_ws.close_codes == [1000]


def test_close_codes_pass_both_ways_through_expose(server, exposed, local_ws):
    with connect(ws_url(server, "/echo"), open_timeout=5) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
        ws.close(4001, "visitor says bye")
    eventually(lambda: local_ws.closed == 1, timeout=5)
    assert local_ws.close_codes == [4001]

    with connect(ws_url(server, "/close/4002"), open_timeout=5) as ws:
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    assert (ws.close_code, ws.close_reason) == (4002, "closing as asked")


def test_a_refused_upgrade_is_relayed_as_its_answer(server, exposed):
    with pytest.raises(InvalidStatus) as info:
        connect(ws_url(server, "/refuse"), open_timeout=5)
    assert info.value.response.status_code == 403
    assert info.value.response.body == b"no websockets here\n"
    # A 200 without switching is a plain response, not an opened WebSocket.
    with pytest.raises(InvalidStatus) as info:
        connect(ws_url(server, "/plain"), open_timeout=5)
    assert info.value.response.status_code == 200 and info.value.response.body == b"plain\n"
    assert "reverst-websocket-declined" not in {k.lower() for k in info.value.response.headers}
    assert requests.get(server.url("/anything"), headers=H, timeout=5).status_code in (200, 404, 426)


def test_200_concurrent_websockets_on_one_tunnel_while_plain_requests_are_served(server, exposed, local_ws):
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(connect(ws_url(server, f"/echo/{i}"), open_timeout=10))
                   for i in range(200)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            def round_trip(i):
                sockets[i].send(f"ws {i}")
                return sockets[i].recv(timeout=10)
            echoes = pool.map(round_trip, range(200))
            plain = [pool.submit(requests.get, server.url("/"), headers={"Host": "app.test"}, timeout=10)
                     for _ in range(20)]
            assert list(echoes) == [f"ws {i}" for i in range(200)]
            assert all(f.result().status_code < 500 for f in plain)  # the local service is no HTTP app
        assert local_ws.connections == 200
    eventually(lambda: local_ws.closed == 200, timeout=10)


def test_a_visitor_that_vanishes_closes_the_local_socket(server, exposed, local_ws):
    sock = raw_handshake(server, "/echo")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a TCP reset, no close frame
    start = time.monotonic()
    eventually(lambda: local_ws.closed == 1, timeout=5)
    assert time.monotonic() - start < 5


def test_a_local_service_that_dies_closes_the_visitors_socket(server, exposed, local_ws):
    with connect(ws_url(server, "/echo"), open_timeout=5) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
        local_ws.stop()  # shuts the server and its connections down
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)


def test_a_killed_tunnel_client_closes_the_visitors_socket(server, exposed):
    with connect(ws_url(server, "/echo"), open_timeout=5) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
        exposed.stop(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises((ConnectionClosed, TimeoutError)):
            ws.send("are you there")
            ws.recv(timeout=10)
        assert time.monotonic() - start < 10


def test_an_idle_websocket_outlives_the_quic_keep_alive_and_idle_timeout(certs, groups_file, procs, local_ws):
    from .conftest import Server
    server = Server(certs, groups_file, extra=["--max-idle-timeout", "2s", "--keep-alive-period", "500ms"])
    procs.append(server)
    p = Expose(server, certs, local_ws.port, extra=["--max-idle-timeout", "2s", "--keep-alive-period", "500ms"])
    procs.append(p)
    with connect(ws_url(server, "/echo"), open_timeout=5) as ws:
        time.sleep(5)  # more than twice the idle timeout
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"


# -- a flask-sock app through `reverst wsgi` --------------------------------------------------------
def test_a_flask_sock_route_works_unchanged(server, flask_sock):
    check_echo(ws_url(server, "/echo"))
    with connect(ws_url(server, "/echo"), open_timeout=5) as ws:
        ws.close(4003, "bye")
    assert requests.get(server.url("/plain"), headers=H, timeout=5).text == "not a websocket"


def test_flask_sock_with_ping_interval_selects_on_the_tunnel_socket(server, start_client):
    """``SOCK_SERVER_OPTIONS = {"ping_interval": ...}`` makes simple-websocket select() on the
    socket's fileno(): it must poll readable exactly when a recv() would not block."""
    start_client(app="tests.ws_apps:pinging")
    with connect(ws_url(server, "/echo"), open_timeout=5) as ws:
        for i in range(3):
            time.sleep(0.8)  # quiet longer than the ping interval: pings go out and are answered
            ws.send(f"after {i}")
            assert ws.recv(timeout=5) == f"after {i}"


# -- handshakes reverstd refuses, before anything reaches a tunnel ------------------------------------
def raw_handshake(server, path: str, headers: dict | None = None, body: bytes = b"", method: str = "GET"):
    """A WebSocket handshake by hand; returns the socket after a 101 (asserted)."""
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
    sock.sendall(request_bytes(path, headers, body, method))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def request_bytes(path, headers=None, body=b"", method="GET") -> bytes:
    fields = {"Host": "app.test", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Sec-WebSocket-Version": "13"}
    for name, value in (headers or {}).items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    if body:
        fields["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode() + body


def answer(server, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                out += chunk
    return out


@pytest.mark.parametrize("headers,body,method,status,reason", [
    ({"Sec-WebSocket-Key": None}, b"", "GET", 400, b"exactly one Sec-WebSocket-Key"),
    ({"Sec-WebSocket-Key": "c2hvcnQ="}, b"", "GET", 400, b"not 16 bytes"),
    ({"Sec-WebSocket-Version": "8"}, b"", "GET", 426, b"only 13"),
    ({"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings", "HTTP2-Settings": "AAMAAABkAAQAAP__"},
     b"", "GET", 501, b"upgrade to h2c is not supported"),
    ({}, b"hello", "POST", 400, b"must be a GET"),
    ({}, b"hello", "GET", 400, b"carries no body"),
    ({"Connection": "keep-alive"}, b"", "GET", 400, b"needs Connection: Upgrade"),
])
def test_bad_handshakes_are_refused_with_a_one_line_reason_and_never_reach_the_tunnel(
        server, exposed, local_ws, headers, body, method, status, reason):
    out = answer(server, request_bytes("/echo", headers, body, method))
    head, _, text = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), out
    assert reason in text and text.count(b"\n") == 1, text
    if status == 426:
        assert b"Sec-WebSocket-Version: 13" in head
    assert local_ws.connections == 0
    assert not [line for line in exposed.lines if re.search(r"reverst\.(client|proxy): .*(GET|WebSocket)", line)]


# -- accounting ----------------------------------------------------------------------------------------
def test_open_websockets_and_their_bytes_are_counted_and_logged_when_they_end(certs, groups_file, procs,
                                                                              local_ws):
    server = ManagedServer(certs, groups_file)
    procs.append(server)
    procs.append(Expose(server, certs, local_ws.port))
    with connect(ws_url(server, "/echo"), open_timeout=5, compression=None) as ws:
        ws.send("a" * 1000)
        assert ws.recv(timeout=5) == "a" * 1000
        m = server.metrics()
        assert m["reverst_tunnel_group_websockets_open", {"tunnel_group": "app.test"}] == 1
        status = server.get("/status").json()
        assert [t["websockets"] for g in status["groups"] if g["name"] == "app.test" for t in g["tunnels"]] == [1]
        ws.close(1000, "done")
    line = server.wait_for(r"reverst\.access: method=GET host=127\.0\.0\.1 path=/echo status=101 websocket "
                           r"bytes=(\d+) bytes_in=(\d+) duration_ms=[\d.]+ close=closed ")
    sent, received = int(line.group(1)), int(line.group(2))
    assert 1000 < sent < 1100 and 1000 < received < 1200  # one message and the close, framed (masked in)
    m = eventually(lambda: (m := server.metrics())["reverst_tunnel_group_websockets_total",
                                                   {"tunnel_group": "app.test"}] == 1 and m)
    assert m["reverst_tunnel_group_websockets_open", {"tunnel_group": "app.test"}] == 0
    assert m["reverst_tunnel_group_websocket_bytes_total", {"tunnel_group": "app.test", "direction": "out"}] == sent
    assert m["reverst_tunnel_group_websocket_bytes_total", {"tunnel_group": "app.test", "direction": "in"}] == received
    assert re.search(r"status=\"1XX\"", m.text) or m["reverst_tunnel_group_proxy_requests_total",
                                                     {"host": "127.0.0.1", "status": "1XX"}] == 1
