"""Helpers for the interoperability tests against the original Go reverst (tests/test_go_peer.py).

The Go binaries live outside the repository (``../shared/peers/go-reverst``, or the
directory named by ``REVERST_GO_PEERS``); nothing here copies them.  What is here:

* :class:`GoServer`: the Go ``reverstd`` on ports picked by us (it cannot report a
  port it bound to ``:0``), restarted on the same ports when asked;
* :class:`GoClient`: the Go ``reverst http`` CLI in front of a local URL;
* :class:`PyClient`: our ``reverst client wsgi|expose`` as a process;
* :func:`local_service`: a threaded stdlib HTTP/1.1 server in the test process with the
  same routes and bodies as ``tests/apps.py`` (so one set of checks fits every pairing).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import pathlib
import signal
import socket
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

from .apps import BLOCK
from .conftest import ROOT, Proc

GO_PEERS = pathlib.Path(os.environ.get("REVERST_GO_PEERS") or ROOT.parent / "shared" / "peers" / "go-reverst")
GO_REVERSTD = GO_PEERS / "reverstd"
GO_REVERST = GO_PEERS / "reverst"

#: Logged by the Go CLI once its registration was accepted and it serves requests.
GO_CLIENT_READY = r'msg="Starting reverse server"'
#: Logged by the Go CLI when a dial got no answer (quic-go's 5 s handshake idle timeout).
GO_CLIENT_NO_HANDSHAKE = r"timeout: no recent network activity"
#: Logged by our clients once registered (see reverst/cli.py).
PY_CLIENT_READY = r"reverst: (\S+) is reachable through (\S+) in tunnel group '([^']*)'"


#: The Go binaries log to stdout (usage and fatal errors to stderr); Proc reads stderr, so
#: they run with stdout joined to it (``exec`` keeps the pid, so signals reach the Go process).
_STDOUT_TO_STDERR = ["/bin/sh", "-c", 'exec "$0" "$@" 1>&2']


def go_command(binary, *args) -> list[str]:
    return [*_STDOUT_TO_STDERR, str(binary), *map(str, args)]


def go_missing_reason() -> str | None:
    """Why the Go peers cannot be used here (None when they can)."""
    for path in (GO_REVERSTD, GO_REVERST):
        if not path.is_file():
            return f"Go reverst peer {path} is absent (set REVERST_GO_PEERS to its directory)"
        if not os.access(path, os.X_OK):
            return f"Go reverst peer {path} is not executable"
    return None


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 right now (for ``kind``); the caller retries on a clash."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pattern_sha256(size: int) -> str:
    """SHA-256 of ``size`` bytes of tests/apps.py's BLOCK pattern (what /download/<size> sends)."""
    digest = hashlib.sha256()
    while size > 0:
        chunk = BLOCK[:min(size, len(BLOCK))]
        digest.update(chunk)
        size -= len(chunk)
    return digest.hexdigest()


# -- the Go server ---------------------------------------------------------------------------------
class PortClash(Exception):
    """The Go reverstd exited at start-up because a port was taken."""


class GoServer(Proc):
    """The Go ``reverstd`` on 127.0.0.1 with the given (or freshly picked) ports.

    Ready means: the tunnel UDP socket is bound (the Go server binds it before it logs
    anything), and the public port (and management port, if any) answer as Go's
    ``net/http`` does; neither probe adds to the ``reverst_*`` metrics.
    """

    def __init__(self, certs, groups_path, *, tunnel_port: int, http_port: int,
                 management_port: int | None = None, extra=(), timeout: float = 10.0):
        args = [GO_REVERSTD, "-l", "debug", "-n", "localhost", "-k", certs["key"], "-c", certs["cert"],
                "-g", str(groups_path), "-a", f"127.0.0.1:{tunnel_port}", "-s", f"127.0.0.1:{http_port}"]
        if management_port is not None:
            args += ["--management-address", f"127.0.0.1:{management_port}"]
        super().__init__(go_command(*args, *extra))
        self.label = "Go reverstd"
        self.tunnel_port, self.http_port, self.management_port = tunnel_port, http_port, management_port
        self.tunnel_address = f"127.0.0.1:{tunnel_port}"
        self.management = f"127.0.0.1:{management_port}" if management_port is not None else None
        self.certs, self.groups_path, self.extra = certs, groups_path, tuple(extra)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    @classmethod
    def start(cls, certs, groups_path, *, management: bool = False, extra=(), attempts: int = 5) -> "GoServer":
        """Start on free ports, picking new ones when another process took one meanwhile."""
        for attempt in range(attempts):
            ports = {"tunnel_port": free_port(socket.SOCK_DGRAM), "http_port": free_port(),
                     "management_port": free_port() if management else None}
            try:
                return cls(certs, groups_path, extra=extra, **ports)
            except PortClash:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def restart(self, sig=signal.SIGTERM) -> "GoServer":
        """Stop this server with ``sig`` and start a new one on the same ports."""
        self.stop(sig)
        return GoServer(self.certs, self.groups_path, tunnel_port=self.tunnel_port, http_port=self.http_port,
                        management_port=self.management_port, extra=self.extra)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                self._reader.join(2)
                if "address already in use" in self.output():
                    raise PortClash(self.output())
                raise AssertionError(f"Go reverstd exited with {self.popen.returncode}:\n{self.output()}")
            if self._answers_like_go(self.http_port) and (
                    self.management_port is None or self._answers_like_go(self.management_port)):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Go reverstd not ready in {timeout}s:\n{self.output()}")
            time.sleep(0.02)

    @staticmethod
    def _answers_like_go(port: int) -> bool:
        """An HTTP/1.1 request without Host: Go's net/http answers 400 itself, before any
        handler (so nothing is counted), with its own wording."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                reply = b""
                while len(reply) < 4096 and (chunk := s.recv(4096)):
                    reply += chunk
        except OSError:
            return False
        return reply.startswith(b"HTTP/1.1 400") and b"missing required Host header" in reply

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.http_port}{path}"

    def mgmt(self, path: str) -> str:
        return f"http://{self.management}{path}"


# -- clients ----------------------------------------------------------------------------------------
class GoClient(Proc):
    """``reverst http [flags] URL`` (Go), verifying the server certificate with our test CA."""

    def __init__(self, server, certs, target: str, *, group="app.test", auth=("user", "pass"),
                 extra=(), wait=True, timeout: float = 10.0):
        args = [GO_REVERST, "http", "-l", "debug", "-a", server.tunnel_address, "-n", "localhost",
                "-g", group, "-c", certs["ca"]]
        if auth:
            args += ["--username", auth[0], "--password", auth[1]]
        super().__init__(go_command(*args, *extra, target))
        self.label = f"Go reverst http (group {group})"
        if wait:
            self.wait_registered(timeout)

    def wait_registered(self, timeout: float = 10.0) -> None:
        """Until the registration is accepted; fails at the first dial without a handshake."""
        m = self._wait_or_kill(f"({GO_CLIENT_READY})|({GO_CLIENT_NO_HANDSHAKE})", timeout)
        if m.group(2):
            self.stop(signal.SIGKILL)
            raise AssertionError("the Go client got no QUIC handshake from the server:\n" + self.output())


class PyClient(Proc):
    """Our client as a process: ``reverst client wsgi APP`` or ``reverst client expose URL``."""

    def __init__(self, server, certs, mode: str, target: str, *, group="app.test", auth=("user", "pass"),
                 name="py", extra=(), wait=True, timeout: float = 15.0):
        assert mode in ("wsgi", "expose"), mode
        args = [sys.executable, "-m", "reverst.cli", "client", mode, "-l", "debug",
                "-a", server.tunnel_address, "-n", "localhost", "-g", group, "-c", certs["ca"]]
        if auth:
            args += ["--username", auth[0], "--password", auth[1]]
        super().__init__(args + list(extra) + [target], env={"APP_NAME": name})
        self.mode = mode
        self.label = f"our reverst {mode} {name} (group {group})"
        if wait:
            self._wait_or_kill(PY_CLIENT_READY, timeout)


# -- the local service (behind `reverst http` / `reverst expose`) ------------------------------------
class LocalHandler(http.server.BaseHTTPRequestHandler):
    """The routes of tests/apps.py that these tests use, with the same bodies."""

    protocol_version = "HTTP/1.1"
    server_version = "GoPeerLocal/1"
    timeout = 30

    def log_message(self, fmt, *args):
        pass

    def _send(self, status, body: bytes, content_type="text/html; charset=utf-8", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _chunked(self, content_type: str, pieces, delay: float):
        """A chunked response whose pieces are produced ``delay`` seconds apart."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(delay)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path == "/hello":
            self._send(200, b"Hello, World!")
        elif path == "/name":
            self._send(200, self.server.name.encode())
        elif path.startswith("/download/"):
            size = int(path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            while size > 0 and self.command != "HEAD":
                chunk = BLOCK[:min(size, len(BLOCK))]
                self.wfile.write(chunk)
                size -= len(chunk)
        elif path == "/sse":
            delay = float(query.get("delay", ["1.0"])[0])
            self._chunked("text/event-stream; charset=utf-8", [b"data: first\n\n", b"data: second\n\n"], delay)
        elif path == "/cookies":
            self._send(200, b"cookies", headers=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly"),
                                                 ("X-Multi", "m1"), ("X-Multi", "m2")])
        else:
            self._send(404, b"not found")

    def do_POST(self):
        if urlsplit(self.path).path != "/upload":
            return self._send(404, b"not found")
        digest, size = hashlib.sha256(), 0
        for data in self._body():
            digest.update(data)
            size += len(data)
        self._send(200, json.dumps({"size": size, "sha256": digest.hexdigest()}).encode(),
                   content_type="application/json")

    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline(1024).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._exactly(size)
                self.rfile.readline(1024)
        else:
            yield from self._exactly(int(self.headers.get("Content-Length") or 0))

    def _exactly(self, left: int):
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                raise ConnectionError("request body cut short")
            left -= len(data)
            yield data


class LocalService(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str):
        self.name = name
        super().__init__(("127.0.0.1", 0), LocalHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def local_service(name: str = "local"):
    """A :class:`LocalService` answering ``name`` on /name, served from a daemon thread."""
    srv = LocalService(name)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
