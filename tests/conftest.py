"""Fixtures that run the real thing: reverstd and tunnel clients as processes on loopback."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import trustme

from .inmemory import SERVER_NAME

ROOT = pathlib.Path(__file__).resolve().parent.parent
READY_SERVER = re.compile(r"listening for tunnels on udp (\S+), public http on tcp (\S+)")


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA and a server certificate for localhost / 127.0.0.1 (never committed)."""
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "tunnel.test")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return {k: str(v) for k, v in paths.items()}


GROUPS = """\
groups:
  app.test:
    hosts: ["app.test", "127.0.0.1"]
    authentication:
      basic: {username: user, password: pass}
  bearer.test:
    hosts: ["bearer.test"]
    authentication:
      bearer: {token: some-token}
  local.example:
    hosts: ["local.example"]
    authentication:
      basic: {username: user, password: pass}
      bearer: {token: some-token}
  empty.test:
    hosts: ["empty.test"]
    authentication:
      basic: {username: user, password: pass}
"""


class Proc:
    """A child process whose stderr is collected line by line (never blocks the pipe)."""

    def __init__(self, args, env=None):
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._eof = False
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self):
        for line in self.popen.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pattern, timeout=10.0):
        """The first stderr line matching ``pattern`` (regex), or fail after ``timeout``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"{pattern!r} not seen in {timeout}s; output:\n" + self.output())
                self._cond.wait(min(left, 0.2))

    def _wait_or_kill(self, pattern, timeout=10.0):
        """wait_for() in a constructor: on failure nobody holds the process, so stop it."""
        try:
            return self.wait_for(pattern, timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def pid(self):
        return self.popen.pid

    def rss_kb(self, field="VmRSS") -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(field)

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        self.popen.stderr.close()
        return self.popen.returncode


class Server(Proc):
    def __init__(self, certs, groups_path, extra=()):
        super().__init__([sys.executable, "-m", "reverst.cli", "reverstd", "-l", "debug",
                          "-n", "localhost", "-k", certs["key"], "-c", certs["cert"],
                          "-g", str(groups_path), "-a", "127.0.0.1:0", "-s", "127.0.0.1:0", "--drain-delay", "0s",
                          *extra])
        m = self._wait_or_kill(READY_SERVER.pattern)
        self.tunnel_address = m.group(1)
        host, port = m.group(2).rsplit(":", 1)
        self.http_port = int(port)

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.http_port}{path}"


class TunnelClient(Proc):
    def __init__(self, server, certs, group="app.test", app="tests.apps:app", auth=("user", "pass"),
                 name="app", extra=(), wait=True):
        args = [sys.executable, "-m", "reverst.cli", "client", "wsgi", "-l", "debug",
                "-a", server.tunnel_address, "-n", "localhost", "-g", group, "-c", certs["ca"]]
        if auth:
            args += ["--username", auth[0], "--password", auth[1]]
        super().__init__(args + list(extra) + [app], env={"APP_NAME": name})
        if wait:
            self._wait_or_kill("is reachable through")


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    """(certfile, keyfile, CA PEM) for a trustme-issued server certificate."""
    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_NAME)
    d = tmp_path_factory.mktemp("tls")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    return str(d / "cert.pem"), str(d / "key.pem"), ca.cert_pem.bytes()


@pytest.fixture
def registrar(server, certs):
    """Registers tunnels by hand against the module's ``server`` (see tests/live.py)."""
    from .live import Registrar  # live imports this module
    r = Registrar(server, certs)
    yield r
    r.close()


@pytest.fixture
def groups_file(tmp_path):
    path = tmp_path / "groups.yml"
    path.write_text(GROUPS)
    return path


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop(signal.SIGKILL)


@pytest.fixture
def server(certs, groups_file, procs):
    s = Server(certs, groups_file)
    procs.append(s)
    return s


@pytest.fixture
def start_client(server, certs, procs):
    def start(**kwargs):
        c = TunnelClient(server, certs, **kwargs)
        procs.append(c)
        return c
    return start


@pytest.fixture
def tunnel(server, start_client):
    """reverstd with one Flask client registered in group app.test."""
    start_client()
    return server
