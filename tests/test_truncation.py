"""Never a truncated body that looks complete: 50 concurrent transfers, one end of the
tunnel killed (SIGKILL) or the path lost at a random point, and every body a receiver
accepted as whole must have the right SHA-256.

Receivers are strict: the visitor is ``http.client`` (IncompleteRead on a chunked body
without its last chunk) that also counts a Content-Length body's bytes; the local
service behind ``reverst expose`` parses its request bodies itself and says which ended
early."""
from __future__ import annotations

import hashlib
import http.client
import http.server
import random
import signal
import socket
import struct
import threading
import time

import pytest

from .apps import pattern
from .conftest import Server, TunnelClient
from .relay import Impairment, relay_factory, through  # noqa: F401 (fixture)
from .test_expose import Expose, local_server

TRANSFERS = 50
SEED = 20261203


def sha_of_pattern(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern(size):
        digest.update(chunk)
    return digest.hexdigest()


class Outcomes:
    """What receivers saw: whole bodies (with their checksum verdict) and broken ones."""

    def __init__(self):
        self.lock = threading.Lock()
        self.whole_ok = self.whole_bad = self.broken = self.started = self.refused = 0
        self.bad: list[str] = []

    def whole(self, ok: bool, what: str):
        with self.lock:
            if ok:
                self.whole_ok += 1
            else:
                self.whole_bad += 1
                self.bad.append(what)

    def cut(self):
        with self.lock:
            self.broken += 1

    def refuse(self):  # an error status, not a body: nothing to mistake for a whole one
        with self.lock:
            self.refused += 1

    def start(self):
        with self.lock:
            self.started += 1

    def unfinished(self) -> int:
        with self.lock:
            return self.started - self.whole_ok - self.whole_bad - self.broken

    def __repr__(self):
        return (f"whole and right {self.whole_ok}, whole and WRONG {self.whole_bad}, cut {self.broken}, "
                f"refused {self.refused}")


def breaker(kind, *, server, client, relay):
    return {"tunnel-client-killed": lambda: client.stop(signal.SIGKILL, timeout=5),
            "reverstd-killed": lambda: server.stop(signal.SIGKILL, timeout=5),
            "path-lost": lambda: relay.blackhole(True)}[kind]


def run_and_break(work, n, brk, rng):
    """``work(i)`` in ``n`` threads started over 1.5 s (some finish, some are cut, some come
    too late); ``brk()`` at a random point while they are under way."""
    offsets = [rng.uniform(0, 1.5) for _ in range(n)]

    def staggered(i):
        time.sleep(offsets[i])
        work(i)
    threads = [threading.Thread(target=staggered, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.5, 1.5))
    brk()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a transfer hung after the break"


# -- downloads: a WSGI app through reverst.client.serve --------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["tunnel-client-killed", "reverstd-killed", "path-lost"])
def test_no_download_is_accepted_whole_when_cut(kind, certs, groups_file, procs, relay_factory):
    rng = random.Random(f"{SEED}-{kind}")
    server = Server(certs, groups_file)
    procs.append(server)
    relay = relay_factory(server, seed=1)
    client = TunnelClient(through(relay), certs)
    procs.append(client)
    sizes = [rng.randrange(256 * 1024, 6 * 1024 * 1024) for _ in range(TRANSFERS)]
    chunked = [rng.random() < 0.5 for _ in range(TRANSFERS)]
    expected = {size: sha_of_pattern(size) for size in set(sizes)}
    seen = Outcomes()

    def download(i):
        path = f"/stream/{sizes[i]}" if chunked[i] else f"/download/{sizes[i]}"
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=20)
        digest = hashlib.sha256()
        try:
            conn.request("GET", path, headers={"Host": "app.test"})
            resp = conn.getresponse()
            if resp.status != 200:  # came after the break: 502 (no tunnel) or 503
                seen.refuse()
                return
            assert resp.chunked == chunked[i]
            got = 0
            while chunk := resp.read(65536):
                digest.update(chunk)
                got += len(chunk)
                time.sleep(0.002)  # a visitor a little slower than the tunnel
            # http.client's read(amt) returns b"" at an early EOF of a Content-Length body
            # (it raises IncompleteRead only for chunked ones): count as a client must
            length = resp.getheader("Content-Length")
            if length is not None and got < int(length):
                raise http.client.IncompleteRead(b"", int(length) - got)
        except (http.client.HTTPException, OSError):
            seen.cut()
            return
        finally:
            conn.close()
        seen.whole(digest.hexdigest() == expected[sizes[i]], path)

    run_and_break(download, TRANSFERS, breaker(kind, server=server, client=client, relay=relay), rng)
    print(f"{kind}: {seen}")
    assert seen.whole_bad == 0, seen.bad
    assert seen.broken > 0, "the break came after every transfer: it tested nothing"
    assert seen.whole_ok + seen.broken + seen.refused == TRANSFERS


# -- uploads: through reverst expose to a local service that checks what it got -----------------
class StrictUploads(http.server.BaseHTTPRequestHandler):
    """POST /upload with ``X-Sha256``: reads the body as framed (Content-Length or chunked)
    and records whether it was whole and, if so, whether its checksum is right."""
    protocol_version = "HTTP/1.1"
    seen: Outcomes  # set per test

    def log_message(self, *args):
        pass

    def _chunked(self, digest) -> bool:
        while True:
            line = self.rfile.readline(100)
            if not line.endswith(b"\r\n"):
                return False
            size = int(line.split(b";")[0], 16)
            data = self.rfile.read(size + 2) if size else b""
            if size == 0:
                return self.rfile.readline(100) == b"\r\n"  # no trailers are sent
            if len(data) != size + 2:
                return False
            digest.update(data[:-2])

    def do_POST(self):
        self.seen.start()
        digest = hashlib.sha256()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            whole = self._chunked(digest)
        else:
            left = int(self.headers["Content-Length"])
            while left and (data := self.rfile.read(min(left, 65536))):
                digest.update(data)
                left -= len(data)
            whole = left == 0
        if not whole:
            self.seen.cut()
            self.close_connection = True
            return
        ok = digest.hexdigest() == self.headers["X-Sha256"]
        self.seen.whole(ok, self.headers["X-Sha256"])
        body = b"ok" if ok else b"bad"
        self.send_response(200 if ok else 422)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def send_upload(port, body: bytes, chunked: bool, gone_at: int | None, rng):
    """POST ``body`` in 64 KiB pieces; ``gone_at``: the visitor vanishes after that many bytes
    (half the time with a FIN, half with a reset)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
    except OSError:  # came after reverstd was killed
        return
    try:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
        s.sendall((f"POST /upload HTTP/1.1\r\nHost: app.test\r\nX-Sha256: {hashlib.sha256(body).hexdigest()}\r\n"
                   f"{framing}\r\n\r\n").encode())
        sent = 0
        for off in range(0, len(body), 65536):
            piece = body[off:off + 65536]
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
            if gone_at is not None and sent >= gone_at:
                if rng.random() < 0.5:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            time.sleep(0.01)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        s.settimeout(20)
        s.recv(4096)
    except OSError:
        pass
    finally:
        s.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["reverstd-killed", "tunnel-client-killed", "path-lost", "visitors-gone"])
def test_no_upload_reaches_the_local_service_whole_when_cut(kind, certs, groups_file, procs, relay_factory):
    rng = random.Random(f"{SEED}-up-{kind}")
    seen = Outcomes()
    handler = type("Handler", (StrictUploads,), {"seen": seen})
    with local_server(handler) as local:
        server = Server(certs, groups_file)
        procs.append(server)
        relay = relay_factory(server, seed=2)
        exposed = Expose(through(relay), certs, local.server_address[1])
        procs.append(exposed)
        bodies = [rng.randbytes(rng.randrange(128 * 1024, 2 * 1024 * 1024)) for _ in range(TRANSFERS)]
        chunked = [rng.random() < 0.5 for _ in range(TRANSFERS)]
        gone_at = [rng.randrange(1, len(b)) if kind == "visitors-gone" and i % 2 == 0 else None
                   for i, b in enumerate(bodies)]
        brk = (lambda: None) if kind == "visitors-gone" else \
            breaker(kind, server=server, client=exposed, relay=relay)

        run_and_break(lambda i: send_upload(server.http_port, bodies[i], chunked[i], gone_at[i], rng),
                      TRANSFERS, brk, rng)
        deadline = time.monotonic() + 10  # each upload the local service has in hand ends, or is aborted
        while seen.unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
    print(f"{kind}: {seen}")
    assert seen.unfinished() == 0, f"{seen.unfinished()} uploads left hanging at the local service"
    assert seen.whole_bad == 0, seen.bad
    assert seen.broken > 0, "nothing was cut: the test tested nothing"
    if kind == "visitors-gone":
        assert seen.whole_ok >= TRANSFERS // 2 - 2, seen  # the visitors that stayed were served
