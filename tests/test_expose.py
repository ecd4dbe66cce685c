"""End to end: public HTTP/1.1 -> reverstd -> QUIC/HTTP/3 -> `reverst expose` -> a real local HTTP server.

The local service is a stdlib ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive) running in a
daemon thread of the test process; ``reverstd`` and ``reverst expose`` are real processes.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import http.server
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from reverst.client import GOAWAY_GRACE_MAX
from reverst.proxy import LocalProxy
from reverst.wsgi import make_environ

from .conftest import READY_SERVER, Proc

H = {"Host": "app.test"}
READY = r"reverst: (\S+) is reachable through (\S+) in tunnel group '([^']*)'"


# -- the local service -------------------------------------------------------------------------
class LocalHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalService/1"
    timeout = 30  # an idle keep-alive connection never pins a thread for ever

    def log_message(self, fmt, *args):  # keep pytest's output clean
        pass

    # helpers
    def _send(self, status, body: bytes, content_type="text/plain", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _read_body(self):
        """Yield the request body, Content-Length or chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._read_exactly(size)
                self.rfile.readline(1024)  # CRLF after the chunk
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))

    def _read_exactly(self, left: int):
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                raise ConnectionError("body cut short")
            left -= len(data)
            yield data

    # routes
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path == "/hello":
            self._send(200, b"Hello, local!")
        elif path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(b"data: first\n\n")
            time.sleep(1.5)
            self._chunk(b"data: second\n\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/cookies":
            self._send(200, b"cookies", headers=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly")])
        elif path == "/redirect":
            self._send(302, b"moved", headers=[("Location", "/hello")])
        elif path == "/echo":
            body = json.dumps({"path": self.path, "method": self.command,
                               "headers": [[k, v] for k, v in self.headers.items()]}).encode()
            self._send(200, body, content_type="application/json")
        elif path.startswith("/prefix/"):
            self._send(200, f"prefixed {self.path}".encode())
        elif path == "/slow":
            seconds = float(query.get("s", ["1"])[0])
            time.sleep(seconds)
            self._send(200, f"slept {seconds:g}".encode())
        elif path == "/close-delimited":  # no Content-Length, not chunked: the body ends at EOF
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until ")
            self.wfile.flush()
            time.sleep(0.2)
            self.wfile.write(b"the end")
            self.close_connection = True
        elif path == "/broken":  # promises 100 bytes, sends 10, closes
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            time.sleep(0.5)  # the status is public by then: only a cut can tell
            self.close_connection = True
        elif path == "/early-hints":  # an interim 103 before the response
            self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            self._send(200, b"after the hints")
        else:
            self._send(404, f"no route {path}".encode())

    def do_POST(self):
        if urlsplit(self.path).path != "/upload":
            return self._send(404, b"no route")
        digest, size = hashlib.sha256(), 0
        for data in self._read_body():
            digest.update(data)
            size += len(data)
        body = json.dumps({"size": size, "sha256": digest.hexdigest(),
                           "transfer_encoding": self.headers.get("Transfer-Encoding"),
                           "content_length": self.headers.get("Content-Length")}).encode()
        self._send(200, body, content_type="application/json")


class LocalServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    connections = 0  # TCP connections accepted (keep-alive reuse shows as few)

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # e.g. the proxy gave up (504)
            super().handle_error(request, client_address)


@contextlib.contextmanager
def local_server(handler=LocalHandler, tls=None):
    """A :class:`LocalServer` in a daemon thread (``tls``: an ``ssl.SSLContext``)."""
    srv = LocalServer(("127.0.0.1", 0), handler)
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def local():
    """The local HTTP service on 127.0.0.1:<ephemeral>; yields its port."""
    with local_server() as srv:
        yield srv.server_address[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ---------------------------------------------------------------------------------
class FixedServer(Proc):
    """``reverstd`` on explicit addresses (to restart it on the same ports)."""

    def __init__(self, certs, groups_path, tunnel="127.0.0.1:0", http="127.0.0.1:0"):
        super().__init__([sys.executable, "-m", "reverst.cli", "reverstd", "-l", "debug",
                          "-n", "localhost", "-k", certs["key"], "-c", certs["cert"],
                          "-g", str(groups_path), "-a", tunnel, "-s", http, "--drain-delay", "0s"])
        m = self._wait_or_kill(READY_SERVER.pattern)
        self.tunnel_address = m.group(1)
        self.http_port = int(m.group(2).rsplit(":", 1)[1])

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.http_port}{path}"


class Expose(Proc):
    def __init__(self, server, certs, addr, *, password="pass", group="app.test", extra=(), wait=True):
        super().__init__([sys.executable, "-m", "reverst.cli", "client", "expose", "-l", "debug",
                          "-a", server.tunnel_address, "-n", "localhost", "-g", group,
                          "-c", certs["ca"], "--username", "user", "--password", password,
                          *extra, str(addr)])
        if wait:
            self._wait_or_kill(READY, timeout=15)


@pytest.fixture
def expose(server, certs, procs):
    def start(addr, **kwargs):
        p = Expose(server, certs, addr, **kwargs)
        procs.append(p)
        return p
    return start


@pytest.fixture
def exposed(local, expose, server):
    """reverstd + `reverst expose PORT` in front of the local service."""
    expose(local)
    return server


@pytest.fixture(autouse=True)
def show_process_logs_on_failure(request, procs):
    """When a test fails, print the end of each process's log (without aioquic's and
    urllib3's debug lines): a cut connection is otherwise hard to explain."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        for p in procs:
            lines = [line for line in p.lines if " quic: " not in line and " urllib3." not in line]
            name = " ".join(a for a in p.args[3:5] if not a.startswith("-"))
            reporter.write_line(f"\n----- {name} pid {p.pid} (last {min(len(lines), 60)} lines)")
            for line in lines[-60:]:
                reporter.write_line(line)


def get(server, path, **kw):
    kw.setdefault("timeout", 10)
    headers = {**H, **kw.pop("headers", {})}
    return requests.get(server.url(path), headers=headers, **kw)


def wait_exit(proc: Proc, timeout: float) -> int:
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"process still running after {timeout}s; output:\n{proc.output()}") from None


# -- forwarding --------------------------------------------------------------------------------
def test_ready_line_names_target_address_and_group(local, expose, server):
    p = expose(local)
    m = p.wait_for(READY)
    assert m.group(1) == f"http://127.0.0.1:{local}"
    assert m.group(2) == server.tunnel_address
    assert m.group(3) == "app.test"


def test_get(exposed):
    r = get(exposed, "/hello")
    assert (r.status_code, r.text) == (200, "Hello, local!")
    assert r.headers["Content-Length"] == "13"
    assert r.headers["Content-Type"] == "text/plain"


def test_each_request_is_logged_at_debug_without_its_query(local, expose, server):
    client = expose(local)  # (-l debug)
    assert get(server, "/hello?token=secret-in-query").status_code == 200
    client.wait_for(r"DEBUG reverst\.proxy: GET /hello -> 200, 13 bytes, \d+\.\d ms$")
    assert "secret-in-query" not in client.output()


def test_unknown_path_status_passes_through(exposed):
    r = get(exposed, "/nope?x=1")
    assert (r.status_code, r.text) == (404, "no route /nope")


def test_head(exposed):
    r = requests.head(exposed.url("/hello"), headers=H, timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == "13"
    assert r.content == b""
    assert get(exposed, "/hello").text == "Hello, local!"  # the keep-alive connection is still sane


def test_post_upload_50mb_chunked_with_checksum(exposed):
    block = hashlib.sha256(b"seed").digest() * (65536 // 32)  # 64 KiB, not all zeros
    count = 50 * 1024 * 1024 // len(block)
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(block)

    def body():
        for _ in range(count):
            yield block

    r = requests.post(exposed.url("/upload"), headers=H, data=body(), timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["size"] == 50 * 1024 * 1024
    assert result["sha256"] == expected.hexdigest()
    assert result["transfer_encoding"] == "chunked"


def test_post_upload_with_content_length(exposed):
    data = os.urandom(3 * 1024 * 1024 + 7)
    r = requests.post(exposed.url("/upload"), headers=H, data=data, timeout=30)
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["size"], result["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert result["content_length"] == str(len(data))


def test_chunked_sse_first_event_arrives_before_the_stream_ends(exposed):
    start = time.monotonic()
    with get(exposed, "/sse", stream=True) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        chunks = r.iter_content(None)
        first = next(chunks)
        first_at = time.monotonic() - start
        rest = b"".join(chunks)
        end_at = time.monotonic() - start
    assert first == b"data: first\n\n"
    assert first_at < 1.2, f"first event after {first_at:.2f}s: buffered"
    assert rest == b"data: second\n\n"
    assert end_at >= 1.4


def test_multiple_set_cookie_stay_separate(exposed):
    r = get(exposed, "/cookies")
    assert r.status_code == 200
    assert r.raw._original_response.msg.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    assert r.cookies.get("a") == "1" and r.cookies.get("b") == "2"


def test_redirect_is_passed_through_not_followed(exposed):
    r = get(exposed, "/redirect", allow_redirects=False)
    assert r.status_code == 302
    assert r.headers["Location"] == "/hello"
    assert r.text == "moved"


def test_host_passed_as_received_and_forwarded_headers_set(exposed):
    r = get(exposed, "/echo?a=1", headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-Kept": "yes"})
    body = r.json()
    headers = {k.lower(): v for k, v in body["headers"]}
    assert body["path"] == "/echo?a=1"
    assert headers["host"] == "app.test"
    assert headers["x-forwarded-host"] == "app.test"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"].split(",")[-1].strip() == "127.0.0.1"
    assert headers["x-kept"] == "yes"
    assert "x-hop" not in headers


def test_repeated_request_fields_reach_the_local_service_as_sent(exposed):
    # expose serves HTTP/3 fields straight as HTTP/1.1 (no WSGI environ, which joins them)
    with socket.create_connection(("127.0.0.1", exposed.http_port), timeout=10) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: app.test\r\nX-Multi: a\r\nX-Multi: b\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    headers = json.loads(body)["headers"]
    assert [v for k, v in headers if k.lower() == "x-multi"] == ["a", "b"]


def test_rewrite_host_sends_the_local_address(local, expose, server):
    expose(local, extra=["--rewrite-host"])
    headers = {k.lower(): v for k, v in get(server, "/echo").json()["headers"]}
    assert headers["host"] == f"127.0.0.1:{local}"
    assert headers["x-forwarded-host"] == "app.test"


def test_local_service_down_is_502_naming_the_local_address(expose, server):
    port = free_tcp_port()  # nothing listens there
    expose(port)
    r = get(server, "/hello")
    assert r.status_code == 502
    assert f"127.0.0.1:{port}" in r.text
    assert "refused" in r.text


def test_local_timeout_is_504(local, expose, server):
    expose(local, extra=["--local-timeout", "1s"])
    start = time.monotonic()
    r = get(server, "/slow?s=3")
    assert r.status_code == 504
    assert "timed out" in r.text
    assert time.monotonic() - start < 2.8
    assert get(server, "/slow?s=0.1").text == "slept 0.1"  # still serving


@pytest.mark.parametrize("form", ["port", "host:port", "url"])
def test_addr_forms(local, expose, server, form):
    addr = {"port": f"{local}", "host:port": f"127.0.0.1:{local}", "url": f"http://127.0.0.1:{local}"}[form]
    p = expose(addr)
    assert p.wait_for(READY).group(1) == f"http://127.0.0.1:{local}"
    assert get(server, "/hello").text == "Hello, local!"


def test_url_with_prefix_maps_paths_under_it(local, expose, server):
    p = expose(f"http://127.0.0.1:{local}/prefix/")
    assert p.wait_for(READY).group(1) == f"http://127.0.0.1:{local}/prefix"
    r = get(server, "/x?q=1")
    assert (r.status_code, r.text) == (200, "prefixed /prefix/x?q=1")
    assert get(server, "/").text == "prefixed /prefix/"


# -- connection life ---------------------------------------------------------------------------
def poll(fn, deadline: float, interval=0.1):
    """Call ``fn`` until it returns a truthy value or ``deadline`` (monotonic) passes."""
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except requests.RequestException as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"not true before the deadline; last: {last!r}")


def restart_and_measure(local, certs, groups_file, procs, extra):
    """Expose through reverstd, SIGKILL it, start a new one on the same ports; returns the
    expose process, the new server and the request that succeeded through it (or the
    AssertionError if none did within 5 s of the new server being ready)."""
    first = FixedServer(certs, groups_file)
    procs.append(first)
    p = Expose(first, certs, local, extra=extra)
    procs.append(p)
    assert get(first, "/hello").status_code == 200

    first.stop(signal.SIGKILL)
    second = FixedServer(certs, groups_file, tunnel=first.tunnel_address, http=f"127.0.0.1:{first.http_port}")
    procs.append(second)
    assert (second.tunnel_address, second.http_port) == (first.tunnel_address, first.http_port)
    ready_at = time.monotonic()

    def served():
        with get(second, "/hello", timeout=2) as r:
            return r if r.status_code == 200 else None
    return p, second, poll(served, ready_at + 5)


def test_reconnects_to_a_restarted_reverstd_on_the_same_ports(local, certs, groups_file, procs):
    # Nothing tells an idle client that its server died: it finds out from the QUIC idle
    # timeout (or an unanswered keep-alive PING), so the test shortens both.
    p, second, r = restart_and_measure(local, certs, groups_file, procs,
                                       ["--keep-alive-period", "500ms", "--max-idle-timeout", "2s"])
    assert r.text == "Hello, local!"
    assert p.popen.poll() is None  # the same process, never restarted
    assert len(re.findall(READY, p.output())) == 1  # announced once, not on every reconnect
    p.wait_for(r"connection lost \(.+\); reconnecting in \d+\.\ds")
    second.wait_for(r"registered in group 'app.test'")


def test_an_idle_client_of_a_restarted_reverstd_is_back_within_1s_of_its_next_packet(
        local, certs, groups_file, procs):
    """The new reverstd (same key) answers the client's next packet, here its keep-alive
    PING, with a stateless reset: the client reconnects at once instead of waiting for
    the PING to go unanswered. (An idle client sends one every --keep-alive-period.)"""
    first = FixedServer(certs, groups_file)
    procs.append(first)
    p = Expose(first, certs, local, extra=["--keep-alive-period", "1s"])
    procs.append(p)
    assert get(first, "/hello").status_code == 200
    time.sleep(1.5)  # idle: nothing of the last exchange is still unacknowledged
    first.stop(signal.SIGKILL)
    second = FixedServer(certs, groups_file, tunnel=first.tunnel_address, http=f"127.0.0.1:{first.http_port}")
    procs.append(second)
    ready_at = time.monotonic()

    def served():
        with get(second, "/hello", timeout=2) as r:
            return r if r.status_code == 200 else None
    assert poll(served, ready_at + 1.0 + 1.0).text == "Hello, local!"  # keep-alive + 1 s
    p.wait_for(r"connection lost \(stateless reset: the peer lost the connection")


def test_wrong_password_exits_2_with_a_one_line_reason(local, expose):
    p = expose(local, password="wrong", wait=False)
    assert wait_exit(p, 15) == 2
    p.stop()
    reason = [line for line in p.lines if line.startswith("reverst:")]
    assert len(reason) == 1, p.output()
    assert "unauthorized" in reason[0].lower()
    assert "is reachable" not in p.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_when_idle_closes_the_tunnel_with_code_0_and_exits_0(local, expose, server, sig):
    p = expose(local)
    assert get(server, "/hello").status_code == 200
    p.popen.send_signal(sig)
    assert wait_exit(p, 10) == 0
    server.wait_for(r"left group 'app.test': client closing \(application error 0x0\)", timeout=5)
    assert get(server, "/hello").status_code == 502


def test_unknown_group_keeps_retrying_and_says_so(local, expose):
    p = expose(local, group="nosuch.test", wait=False)
    deadline = time.monotonic() + 10
    unknown = re.compile(r"tunnel group 'nosuch.test' is unknown to .*; retrying in \d+\.\ds")
    while len([line for line in p.lines if unknown.search(line)]) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len([line for line in p.lines if unknown.search(line)]) >= 3, p.output()
    assert p.popen.poll() is None
    assert "is reachable" not in p.output()


def test_graceful_stop_finishes_in_flight_and_refuses_new(local, expose, server):
    p = expose(local, extra=["--grace-period", "10s"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, server, "/slow?s=2", timeout=5)
        time.sleep(0.5)  # the slow request is in the local service now
        start = time.monotonic()
        p.popen.send_signal(signal.SIGTERM)
        # After the first GOAWAY, requests already on their way are served for up to
        # GOAWAY_GRACE_MAX (4 smoothed RTTs, which a loaded machine inflates past 0.2 s);
        # one sent after that is refused at once, while the slow one is still served.
        time.sleep(GOAWAY_GRACE_MAX + 0.2)
        sent = time.monotonic()
        late = get(server, "/hello", timeout=3)
        late_took = time.monotonic() - sent
        r = slow.result(timeout=10)
    assert (r.status_code, r.text) == (200, "slept 2")
    assert late.status_code == 502
    assert late_took < 0.5, f"the refused request took {late_took:.1f}s"
    assert wait_exit(p, 10) == 0
    assert time.monotonic() - start < 10
    server.wait_for(r"left group 'app.test': client closing \(application error 0x0\)", timeout=5)


def test_uploads_move_to_the_other_tunnel_when_one_stops(local, expose, server):
    """A stopping client says GOAWAY first and keeps serving what is on its way, so
    reverstd sends its next uploads (which it could not retry once refused) to the other
    tunnel: none fails. (With one step, a refusal at once, about every other upload sent
    in the stop's first moments was a 502.)"""
    stopping = expose(local, extra=["--grace-period", "10s"])
    stop = threading.Event()
    slow_pool = concurrent.futures.ThreadPoolExecutor(1)
    slow = slow_pool.submit(get, server, "/slow?s=3", timeout=10)  # (keeps the stopping tunnel
    time.sleep(0.3)                                                # open for a while after SIGTERM)
    expose(local)

    def upload_loop(worker: int) -> list:
        results, session = [], requests.Session()
        rng = random.Random(worker)
        while not stop.is_set():
            data = rng.randbytes(rng.randrange(64 * 1024, 512 * 1024))
            try:
                r = session.post(server.url("/upload"), headers=H, data=data, timeout=10)
                results.append((r.status_code, r.json() if r.status_code == 200 else r.text,
                                len(data), hashlib.sha256(data).hexdigest()))
            except requests.RequestException as exc:
                results.append((None, repr(exc), len(data), None))
        return results

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(upload_loop, i) for i in range(4)]
        time.sleep(1.0)
        stopping.popen.send_signal(signal.SIGTERM)
        assert wait_exit(stopping, 10) == 0
        time.sleep(0.5)
        stop.set()
        results = [r for f in futures for r in f.result(timeout=20)]
    assert (slow.result(timeout=10).status_code, slow.result().text) == (200, "slept 3")
    slow_pool.shutdown()
    failed = [(status, body) for status, body, _, _ in results if status != 200]
    assert not failed, f"{len(failed)} of {len(results)} uploads failed: {failed[:3]}"
    assert all((body["size"], body["sha256"]) == (size, digest) for _, body, size, digest in results)
    assert len(results) > 20
    server.wait_for(r"left group 'app.test': client closing \(application error 0x0\)", timeout=5)


def test_four_connections_register_and_share_the_requests(local, expose, server):
    expose(local, extra=["--connections", "4"])
    deadline = time.monotonic() + 10
    peers: set[str] = set()
    while len(peers) < 4 and time.monotonic() < deadline:
        peers = set(re.findall(r"tunnel (\S+) registered in group 'app.test'", server.output()))
        time.sleep(0.1)
    assert len(peers) == 4, server.output()
    assert len({peer.rsplit(":", 1)[1] for peer in peers}) == 4

    for _ in range(20):
        assert get(server, "/echo").status_code == 200
    # reverstd's access log names the tunnel connection (its peer address) of each request.
    time.sleep(0.3)
    per_conn = collections.Counter(re.findall(r"path=/echo status=200 .* tunnel=(\S+)", server.output()))
    assert set(per_conn) == peers
    assert sum(per_conn.values()) == 20, per_conn
    assert len(per_conn) == 4, per_conn
    assert sorted(per_conn.values()) == [5, 5, 5, 5]  # round-robin



# -- the HTTP/1.1 client to the local service ----------------------------------------------------
class ShortIdleHandler(LocalHandler):
    timeout = 0.3  # closes a keep-alive connection idle for 0.3 s, as nginx does after 75 s


def test_stale_keep_alive_connection_is_retried_or_checked(expose, server):
    with local_server(ShortIdleHandler) as srv:
        p = expose(srv.server_address[1])
        assert get(server, "/hello").text == "Hello, local!"
        time.sleep(1)  # the local service closes the idle pooled connection
        assert get(server, "/hello").text == "Hello, local!"  # send or read fails: retried once
        p.wait_for(r"kept-alive connection to 127\.0\.0\.1:\d+ was closed .*; retrying on a new one")
        time.sleep(1)
        # A body is not replayed: the idle connection is checked (and dropped) before use.
        r = requests.post(server.url("/upload"), headers=H, data=b"x" * 1000, timeout=10)
        assert (r.status_code, r.json()["size"]) == (200, 1000)
        assert srv.connections == 3


def test_one_connection_kept_alive_across_head_get_and_posts(expose, server):
    with local_server() as srv:
        expose(srv.server_address[1])
        for _ in range(3):
            r = requests.head(server.url("/hello"), headers=H, timeout=10)
            assert r.headers["Content-Length"] == "13"
            assert get(server, "/hello").text == "Hello, local!"
            r = requests.post(server.url("/upload"), headers=H, data=b"abc", timeout=10)
            assert (r.json()["size"], r.json()["content_length"]) == (3, "3")
            r = requests.post(server.url("/upload"), headers=H, data=iter([b"a", b"bc"]), timeout=10)
            assert (r.json()["size"], r.json()["transfer_encoding"]) == (3, "chunked")
        assert srv.connections == 1


def test_close_delimited_response_is_read_until_eof(exposed):
    r = get(exposed, "/close-delimited")
    assert (r.status_code, r.text) == (200, "until the end")
    assert get(exposed, "/hello").text == "Hello, local!"  # that connection was not pooled


def test_interim_103_is_skipped(exposed):
    r = get(exposed, "/early-hints")
    assert (r.status_code, r.text) == (200, "after the hints")
    assert get(exposed, "/hello").text == "Hello, local!"


def test_response_broken_off_mid_body_is_cut_and_logged(local, expose, server):
    p = expose(local)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        get(server, "/broken").content
    p.wait_for(r"local service broke off the response")
    assert get(server, "/hello").text == "Hello, local!"


def test_https_local_service_verified_then_insecure(expose, server, certs):
    """The certificate of the local service is signed by the test CA, which `expose`
    does not trust: 502 unless --local-insecure."""
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certs["cert"], certs["key"])
    with local_server(tls=tls) as srv:
        url = f"https://127.0.0.1:{srv.server_address[1]}"
        p = expose(url)
        r = get(server, "/hello")
        assert r.status_code == 502
        assert r.text == f"reverst: local service {url} failed: SSLError\n"
        p.stop()
        expose(url, extra=["--local-insecure"])
        for _ in range(2):
            r = get(server, "/hello")
            assert (r.status_code, r.text) == (200, "Hello, local!")
        assert get(server, "/sse").text == "data: first\n\ndata: second\n\n"
        assert srv.connections == 1  # kept alive (the refused handshake never reached a handler)


# -- LocalProxy in this process: native threads, no gevent ---------------------------------------
def call(proxy, method, path, body=None, headers=()):
    """Run ``proxy`` as a WSGI server would; returns (status, headers, body)."""
    fields = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", b"app.test"),
              (b":path", path.encode())] + [(k.encode(), v.encode()) for k, v in headers]
    if body is not None:
        fields.append((b"content-length", str(len(body)).encode()))
    environ = make_environ(fields, io.BytesIO(body or b""), peer=("127.0.0.1", 1))
    out = {}

    def start_response(status, response_headers, exc_info=None):
        out["status"], out["headers"] = status, response_headers
    result = proxy(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return out["status"], out["headers"], data


def test_in_threads_connections_are_pooled_and_bounded():
    with local_server() as srv:
        proxy = LocalProxy(str(srv.server_address[1]), pool_size=2)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: call(proxy, "GET", f"/slow?s=0.2&i={i}"), range(8)))
        assert [r[2] for r in results] == [b"slept 0.2"] * 8
        assert srv.connections == 8  # all at once: 8 connections...
        assert len(proxy._pool._idle) == 2  # ...of which 2 are kept
        for _ in range(5):
            assert call(proxy, "GET", "/hello")[2] == b"Hello, local!"
        assert srv.connections == 8
        proxy.close()


def test_in_threads_head_prefix_and_unsafe_target():
    with local_server() as srv:
        proxy = LocalProxy(f"http://127.0.0.1:{srv.server_address[1]}/prefix")
        status, headers, body = call(proxy, "HEAD", "/hello")
        assert (status, body) == ("200 OK", b"")
        assert ("Content-Length", str(len("prefixed /prefix/hello"))) in headers
        status, headers, body = call(proxy, "GET", "/a b?q=1")  # a space is %-encoded
        assert (status, body) == ("200 OK", b"prefixed /prefix/a%20b?q=1")
        assert srv.connections == 1  # kept alive after the HEAD response (llhttp was told)
        proxy.close()


@contextlib.contextmanager
def scripted_server(responses: list[bytes]):
    """A raw HTTP/1.1 server: answers the n-th request (on any connection) with
    ``responses[n]``, then keeps the connection open (closes it after an ``HTTP/1.0`` one);
    yields its port and the list of requests received, as (connection number, head)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[tuple[int, bytes]] = []

    def serve(conn, number):
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                seen.append((number, head))
                response = responses[len(seen) - 1]
                conn.sendall(response)
                if response.startswith(b"HTTP/1.0"):
                    return

    def accept():
        number = 0
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.settimeout(10)
            number += 1
            threading.Thread(target=serve, args=(conn, number), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        listener.close()


def test_in_threads_odd_responses():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHEAD!",  # a body after HEAD: not reused
        b"HTTP/1.0 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nuntil EOF",  # close-delimited
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nX-Kept: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF, accepted as http.client did
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bad\r\n\r\n",  # malformed
    ]
    with scripted_server(responses) as (port, seen):
        proxy = LocalProxy(str(port), timeout=5)
        assert call(proxy, "HEAD", "/")[::2] == ("200 OK", b"")
        status, headers, body = call(proxy, "GET", "/")
        assert (status, body) == ("200 OK", b"until EOF")
        assert headers == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
        status, headers, body = call(proxy, "GET", "/")
        assert (status, headers, body) == ("204 No Content", [("X-Kept", "2")], b"")
        assert call(proxy, "GET", "/")[::2] == ("200 OK", b"ok")
        assert call(proxy, "GET", "/")[::2] == ("304 Not Modified", b"")
        assert call(proxy, "GET", "/")[::2] == ("200 OK", b"abc")
        status, _, body = call(proxy, "GET", "/")
        assert status == "502 Bad Gateway"
        assert body == f"reverst: local service {proxy.target} failed: ProtocolError\n".encode()
        assert [number for number, _ in seen] == [1, 2, 3, 3, 3, 3, 3]
        proxy.close()


def test_in_threads_local_service_down_and_timeout():
    proxy = LocalProxy(str(free_tcp_port()), timeout=0.5)
    status, _, body = call(proxy, "GET", "/")
    assert status == "502 Bad Gateway" and b"refused the connection" in body
    with local_server() as srv:
        proxy = LocalProxy(str(srv.server_address[1]), timeout=0.5)
        start = time.monotonic()
        status, _, body = call(proxy, "GET", "/slow?s=2")
        assert status == "504 Gateway Timeout" and b"timed out" in body
        assert time.monotonic() - start < 1.5


# -- LocalProxy in greenlets of this (unpatched) process, as `reverst expose` runs it ------------
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_cooperative_proxy_in_greenlets_overlaps_requests_without_monkey_patching(scheme, certs):
    """``cooperative=True``: the pool's sockets are gevent's, so four requests to a local
    service that takes 0.5 s each overlap in greenlets, and the hub keeps running meanwhile
    (this process's socket module is not patched: blocking sockets would take 2 s in a row)."""
    import ssl

    import gevent
    from gevent import monkey
    assert not monkey.is_module_patched("socket")
    tls = None
    if scheme == "https":
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(certs["cert"], certs["key"])
    with local_server(tls=tls) as srv:
        proxy = LocalProxy(f"{scheme}://127.0.0.1:{srv.server_address[1]}", cooperative=True, verify=False,
                           timeout=5)
        ticks = []

        def tick():
            while True:
                ticks.append(time.monotonic())
                gevent.sleep(0.05)
        ticker = gevent.spawn(tick)
        start = time.monotonic()
        calls = [gevent.spawn(call, proxy, "GET", f"/slow?s=0.5&i={i}") for i in range(4)]
        try:
            done = gevent.joinall(calls, timeout=10)
        finally:
            ticker.kill()
        elapsed = time.monotonic() - start
        assert len(done) == 4 and [c.value[2] for c in calls] == [b"slept 0.5"] * 4
        assert elapsed < 1.5  # overlapped (in a row: 2 s)
        assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.3  # the hub was never blocked
        assert srv.connections == 4  # one connection each, kept alive
        assert call(proxy, "GET", "/hello")[2] == b"Hello, local!"
        assert srv.connections == 4
        proxy.close()
