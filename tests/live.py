"""Helpers for the live-configuration tests: reverstd with ``-w`` (and any environment),
steady public traffic in a background thread, and registrations driven in-process."""
from __future__ import annotations

import os
import re
import sys
import threading
import time

import gevent
import requests

from reverst import protocol
from reverst.auth import basic_authorization, bearer_authorization

from .conftest import READY_SERVER, Proc
from .test_registration import RawTunnel

UPDATED = r"tunnel groups updated from "
NOT_RELOADED = r"ERROR reverst.sources: tunnel groups not reloaded, the last good version stays: "


class LiveServer(Proc):
    """``reverstd -g SOURCE [extra]`` with the environment it needs (KUBECONFIG ...)."""

    def __init__(self, certs, source, extra=("-w",), env=None):
        super().__init__([sys.executable, "-m", "reverst.cli", "reverstd", "-l", "debug",
                          "-n", "localhost", "-k", certs["key"], "-c", certs["cert"],
                          "-g", str(source), "-a", "127.0.0.1:0", "-s", "127.0.0.1:0", "--drain-delay", "0s",
                          *extra], env=env)
        m = self._wait_or_kill(READY_SERVER.pattern, timeout=15)
        self.tunnel_address = m.group(1)
        self.http_port = int(m.group(2).rsplit(":", 1)[1])

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, host, path="/name", **kwargs):
        kwargs.setdefault("timeout", 5)
        return requests.get(self.url(path), headers={"Host": host}, **kwargs)

    def mark(self) -> int:
        """A position in the log: :meth:`wait_after` looks only at later lines."""
        with self._cond:
            return len(self.lines)

    def wait_after(self, mark: int, pattern: str, timeout: float = 5.0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[mark:]:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    interesting = [line for line in self.lines[mark:]
                                   if " reverst.access:" not in line and " quic:" not in line]
                    raise AssertionError(f"{pattern!r} not seen in {timeout}s after line {mark}; output "
                                         f"(no access/quic lines):\n" + "\n".join(interesting[-40:]))
                self._cond.wait(min(left, 0.1))

    def lines_after(self, mark: int, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            return [line for line in self.lines[mark:] if rx.search(line)]


class Traffic:
    """Public requests to one group from a native thread, all along a ``with`` block;
    every response must be 200 with ``expected`` as body."""

    def __init__(self, server: LiveServer, host: str, expected: str, path: str = "/name"):
        self.server, self.host, self.expected, self.path = server, host, expected, path
        self.ok = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 5
        while self.ok < 3 and not self.failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.ok >= 3, f"traffic did not start: {self.failures[:3]}"
        return self

    def __exit__(self, *exc):
        target, deadline = self.ok + 5, time.monotonic() + 5  # some more after the change, too
        while self.ok < target and not self.failures and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(10)
        if exc[0] is None:
            self.check()

    def check(self, min_ok: int = 8):
        assert not self.failures, f"{len(self.failures)} failed of {self.ok + len(self.failures)}: {self.failures[:5]}"
        assert self.ok >= min_ok, f"only {self.ok} requests"

    def _run(self):
        with requests.Session() as session:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    r = session.get(self.server.url(self.path), headers={"Host": self.host}, timeout=5)
                    if r.status_code == 200 and r.text == self.expected:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:60]!r}")
                except requests.RequestException as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - start)
                self._stop.wait(0.005)


def write_atomically(path, text: str) -> None:
    """As editors and config tools do: write a temporary file, rename it over."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_in_place(path, text: str) -> None:
    """Overwrite the same inode (as ``cat > file`` or some editors do)."""
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def apply(server: LiveServer, write, *args, timeout: float = 4.0) -> float:
    """Make a change with ``write(*args)``; wait until reverstd applied it; return the delay."""
    mark = server.mark()
    start = time.monotonic()
    write(*args)
    server.wait_after(mark, UPDATED, timeout)
    return time.monotonic() - start


class Registrar:
    """Registrations over real QUIC from this process (see test_registration.RawTunnel)."""

    def __init__(self, server, certs):
        self.server, self.certs = server, certs
        self.tunnels: list[RawTunnel] = []

    def connect(self) -> RawTunnel:
        tunnel = RawTunnel(self.server, self.certs)
        self.tunnels.append(tunnel)
        return tunnel

    def register(self, group: str, authorization: str | None, timeout: float = 5.0):
        """(tunnel, None) when accepted, (tunnel, ConnectionClosed) when refused."""
        tunnel = self.connect()
        metadata = {"Authorization": authorization} if authorization is not None else {}
        data, closed = tunnel.register(protocol.encode_request(protocol.RegisterRequest(group, metadata)),
                                       timeout=timeout)
        if closed is None:
            assert data, "no response and no close"
        return tunnel, closed

    def accepted(self, group, authorization) -> bool:
        tunnel, closed = self.register(group, authorization)
        if closed is None:
            return True
        assert (closed.error_code, closed.reason) == (0x2, "unauthorized"), closed
        return False

    def close(self):
        for tunnel in self.tunnels:
            tunnel.close()
        self.tunnels.clear()


def basic(user, password, scheme="Basic"):
    return basic_authorization(user, password, scheme)


def bearer(token, scheme="Bearer"):
    return bearer_authorization(token, scheme)


def wait_closed(tunnel: RawTunnel, timeout: float = 5.0):
    """Run the hub until the tunnel's connection is closed; its ConnectionClosed."""
    with gevent.Timeout(timeout):
        tunnel.conn.closed.wait()
    return tunnel.conn.close_reason


def steady_traffic(server) -> "Traffic":
    """Background requests to the always-present group ``steady.test``."""
    return Traffic(server, "steady.test", "steady")
