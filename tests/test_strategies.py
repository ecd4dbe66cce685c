"""Every authentication strategy through a real registration against a reverstd process:
basic, each bearer source, external (allow, deny, timeout, unreachable, redirect) and
scheme overrides; a slow authorizer delays neither other registrations nor public traffic."""
import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gevent
import pytest

from .conftest import TunnelClient
from .live import LiveServer, basic, bearer, steady_traffic

SLOW = 3.0  # the authorizer's answer to "slow" tokens comes after this long


class Authorizer:
    """An external authorization endpoint: 200 for "good" payloads, 403 otherwise."""

    def __init__(self):
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        authorizer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                value = self.headers.get("Authorization")
                authorizer.seen.append((self.command, self.path, value))
                payload = (value or "").partition(" ")[2]
                if payload == "slow":
                    time.sleep(SLOW)
                if payload == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "/check")
                elif payload in ("good", "slow"):
                    self.send_response(200)
                else:
                    self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/check"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def authorizer():
    a = Authorizer()
    yield a
    a.close()


@pytest.fixture(scope="module")
def server(certs, tmp_path_factory, authorizer):
    d = tmp_path_factory.mktemp("strategies")
    (d / "token").write_text("file-token\n")
    (d / "hashed").write_text(hashlib.sha256(b"hashed-file-token").hexdigest() + "\n")
    groups = d / "groups.yml"
    groups.write_text(f"""\
groups:
  steady.test:
    hosts: [steady.test]
    authentication:
      basic: {{username: user, password: pass}}
  basic.test:
    authentication:
      basic: {{username: alice, password: "p@ss:word"}}
  token.test:
    authentication:
      bearer: {{token: plain-token}}
  token-path.test:
    authentication:
      bearer: {{tokenPath: token}}
  hashed.test:
    authentication:
      bearer: {{hashedToken: "{hashlib.sha256(b'hashed-token').hexdigest()}"}}
  hashed-path.test:
    authentication:
      bearer: {{hashedTokenPath: hashed}}
  external.test:
    authentication:
      external: {{endpoint: "{authorizer.url}", timeout: 1s}}
  unreachable.test:
    authentication:
      external: {{endpoint: "http://svc:hunter2@127.0.0.1:{closed_port()}/check"}}
  mixed.test:
    authentication:
      basic: {{username: user, password: pass, scheme: Basic}}
      bearer: {{token: jwt-token, scheme: JWT}}
      external: {{endpoint: "{authorizer.url}", scheme: Ext}}
""")
    s = LiveServer(certs, groups, extra=())
    steady = TunnelClient(s, certs, group="steady.test", name="steady")
    yield s
    steady.stop()
    s.stop()


@pytest.mark.parametrize("group,authorization,accepted", [
    ("basic.test", basic("alice", "p@ss:word"), True),
    ("basic.test", basic("alice", "p@ss:wore"), False),
    ("basic.test", basic("bob", "p@ss:word"), False),
    ("basic.test", bearer("p@ss:word"), False),
    ("basic.test", None, False),
    ("token.test", bearer("plain-token"), True),
    ("token.test", bearer("plain-token "), False),
    ("token.test", bearer(hashlib.sha256(b"plain-token").hexdigest()), False),
    ("token-path.test", bearer("file-token"), True),
    ("token-path.test", bearer("file-token\n"), False),
    ("hashed.test", bearer("hashed-token"), True),
    ("hashed.test", bearer(hashlib.sha256(b"hashed-token").hexdigest()), False),  # the hash is no token
    ("hashed-path.test", bearer("hashed-file-token"), True),
    ("hashed-path.test", bearer("file-token"), False),
    ("external.test", bearer("good"), True),
    ("external.test", bearer("bad"), False),
    ("external.test", bearer("redirect"), False),  # anything but 200 denies; redirects are not followed
    ("external.test", "Ext good", False),  # not the strategy's scheme
    # Scheme overrides: three strategies, three schemes, one group.
    ("mixed.test", basic("user", "pass"), True),
    ("mixed.test", bearer("jwt-token", "JWT"), True),
    ("mixed.test", bearer("jwt-token", "jwt"), True),  # schemes match case-insensitively
    ("mixed.test", bearer("good", "Ext"), True),
    ("mixed.test", bearer("jwt-token"), False),  # Bearer is nobody's scheme here
    ("mixed.test", bearer("good", "JWT"), False),
    ("mixed.test", bearer("jwt-token", "Ext"), False),
])
def test_registration(registrar, group, authorization, accepted):
    assert registrar.accepted(group, authorization) is accepted


def test_external_gets_the_authorization_value_as_sent(registrar, authorizer):
    before = len(authorizer.seen)
    assert registrar.accepted("mixed.test", "ext good")  # the client's spelling of the scheme
    assert authorizer.seen[before:] == [("GET", "/check", "ext good")]


def test_external_timeout_is_unauthorized(registrar, server):
    start = time.monotonic()
    assert not registrar.accepted("external.test", bearer("slow"))  # timeout: 1s
    assert 0.9 < time.monotonic() - start < 2.0
    server.wait_for(r"external authorization at http://127.0.0.1:\d+/check: no answer within 1s")


def test_external_unreachable_is_unauthorized(registrar, server):
    start = time.monotonic()
    assert not registrar.accepted("unreachable.test", bearer("good"))
    assert time.monotonic() - start < 2.0
    line = server.wait_for(r"external authorization at \S+ failed: .*").group(0)
    assert line.endswith("failed: ConnectionError") and "good" not in line
    assert "svc:***@127.0.0.1" in line
    assert "Traceback" not in server.output() and "hunter2" not in server.output()


def test_slow_authorizer_blocks_neither_registrations_nor_traffic(server, registrar):
    slow = gevent.spawn(registrar.accepted, "mixed.test", bearer("slow", "Ext"))  # default timeout 5s
    gevent.sleep(0.3)  # its GET is now waiting on the authorizer
    with steady_traffic(server) as traffic:
        start = time.monotonic()
        for group, authorization in [("basic.test", basic("alice", "p@ss:word")),
                                     ("token.test", bearer("plain-token")),
                                     ("external.test", bearer("good"))]:
            assert registrar.accepted(group, authorization)
        fast = time.monotonic() - start
        assert not slow.ready()
        time.sleep(0.5)
    assert fast < 1.0, f"three registrations took {fast:.2f}s beside a slow one"
    assert traffic.slowest < 0.5, f"a public request took {traffic.slowest:.2f}s"
    with gevent.Timeout(SLOW + 2):
        assert slow.get() is True  # 3 s < 5 s: the slow answer still counts
