"""Bulk transfers through tunnels over a bad network: loss, delay and jitter from bench/relay.py.

    python bench/impaired.py [--down-mb 20] [--up-mb 5] [--timeout 120] [--stacks qh3,aioquic,go]
                             [--profiles 0] [--json bench/results/impaired.json]

For each impairment profile (symmetric: the same loss and one-way delay on both directions;
the round trip is twice the delay) and each stack, it starts fresh:

* a UDP impairment relay (``bench/relay.py``, its own process) in front of the stack's
  tunnel port, seeded (``--seed``) so a run replays;
* the stack, its tunnel client dialling the relay:
  - ``qh3`` / ``aioquic``: our ``reverstd --quic-backend B`` and ``reverst expose
    --quic-backend B``;
  - ``go``: the Go ``reverstd`` and Go ``reverst http`` (``../shared/peers/go-reverst`` or
    ``--go-peers``; skipped with a note when absent);

  both in front of one local HTTP backend: nginx when installed (downloads; ``/upload``
  proxied to a small Python server that hashes the body), else that Python server alone;
* then a ``--down-mb`` download and a ``--up-mb`` upload through the public HTTP port,
  each bounded by ``--timeout`` (and ``--stall`` without a byte), and checked with SHA-256.

The table shows per (profile, stack): MB/s down and up (``timeout`` or ``error`` instead
when a transfer did not finish), whether both arrived intact, and ours/Go ratios; the notes
say what the logs and the relay saw (reconnections, warnings, datagrams dropped).  The
JSON holds every figure, the relay's counters and the warning lines.  Every process it
starts, it stops (also on Ctrl-C and errors).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RELAY = ROOT / "bench" / "relay.py"
DEFAULT_GO_PEERS = ROOT.parent / "shared" / "peers" / "go-reverst"
USER, PASSWORD = "bench", "bench"
START_TIMEOUT = 30.0
CHUNK = 256 * 1024

sys.path.insert(0, str(ROOT / "bench"))
from relay import Impairment, impairment_flags  # noqa: E402  (bench/ is not a package)
import run as bench  # noqa: E402  (bench/run.py: certificates)

#: (label, impairment of each direction)
PROFILES = [
    ("0%/10ms", Impairment(delay=0.010)),
    ("1%/10ms", Impairment(loss=0.01, delay=0.010)),
    ("1%/10ms+5ms", Impairment(loss=0.01, delay=0.010, jitter=0.005)),
    ("3%/20ms+10ms", Impairment(loss=0.03, delay=0.020, jitter=0.010)),
    ("5%/50ms", Impairment(loss=0.05, delay=0.050)),
    # issue 15: 1% and 5% loss at 20-100 ms RTT, with jitter that reorders
    ("1%/25ms+10ms", Impairment(loss=0.01, delay=0.025, jitter=0.010)),
    ("1%/50ms+10ms", Impairment(loss=0.01, delay=0.050, jitter=0.010)),
    ("5%/10ms+5ms", Impairment(loss=0.05, delay=0.010, jitter=0.005)),
    ("5%/25ms+10ms", Impairment(loss=0.05, delay=0.025, jitter=0.010)),
    ("5%/50ms+10ms", Impairment(loss=0.05, delay=0.050, jitter=0.010)),
    # a long path without loss: more than 2 MB must be in flight to fill it (qh3's in-flight gate)
    ("0%/50ms", Impairment(delay=0.050)),
]


#: The local service: GET /<file> from the www directory, POST /upload answered with the
#: body's size and SHA-256 (as JSON), read as it arrives (Content-Length or chunked).
PY_BACKEND = r"""
import hashlib, http.server, json, os, shutil, socket, socketserver, sys
port, www = int(sys.argv[1]), sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def do_GET(self):
        path = os.path.join(www, os.path.basename(self.path.split("?")[0]))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.end_headers()
        with open(path, "rb") as f:
            shutil.copyfileobj(f, self.wfile, 256 * 1024)
    def do_POST(self):
        digest, size = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(n)
                digest.update(data)
                size += len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 256 * 1024))
                if not data:
                    break
                digest.update(data)
                size += len(data)
                left -= len(data)
        body = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
Server(("127.0.0.1", port), Handler).serve_forever()
"""

#: the /upload location: proxied, unbuffered, to the Python server that hashes the body
NGINX_UPLOAD = ("location = /upload {{ client_max_body_size 1g; proxy_request_buffering off; proxy_buffering off; "
                'proxy_http_version 1.1; proxy_set_header Connection ""; proxy_pass http://127.0.0.1:{hasher}; }}')


def data_of(size: int, seed: int) -> bytes:
    """``size`` seeded random bytes (in 64 MiB pieces: randbytes takes at most 2**31 bits)."""
    rng, piece = random.Random(seed), 64 << 20
    return b"".join(rng.randbytes(min(piece, size - at)) for at in range(0, size, piece))


# -- processes ---------------------------------------------------------------------------------------
class Proc:
    """A child process with its output (stderr, or stdout and stderr merged) kept and searchable."""

    def __init__(self, name, args, env=None, merge_stdout=False, stdout_pipe=False):
        self.name = name
        self.lines: list[str] = []
        self.out_lines: list[str] = []
        stdout = subprocess.PIPE if (merge_stdout or stdout_pipe) else subprocess.DEVNULL
        self.popen = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                      stdin=subprocess.DEVNULL, stdout=stdout,
                                      stderr=subprocess.STDOUT if merge_stdout else subprocess.PIPE, text=True,
                                      start_new_session=True)
        self._readers = [threading.Thread(target=self._pump, args=(self.popen.stdout if merge_stdout
                                                                   else self.popen.stderr, self.lines),
                                          daemon=True)]
        if stdout_pipe:
            self._readers.append(threading.Thread(target=self._pump, args=(self.popen.stdout, self.out_lines),
                                                  daemon=True))
        for t in self._readers:
            t.start()

    @staticmethod
    def _pump(stream, into):
        for line in stream:
            into.append(line.rstrip())

    def failure(self, what):
        if self.popen.poll() is not None:
            for t in self._readers:
                t.join(2)
            what += f" (exited with status {self.popen.returncode})"
        return RuntimeError(f"{self.name}: {what}; last output:\n  " + "\n  ".join(self.lines[-15:] or ["(none)"]))

    def wait_for(self, pattern, timeout=START_TIMEOUT, lines=None):
        rx, lines = re.compile(pattern), self.lines if lines is None else lines
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if m := rx.search(line):
                    return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise self.failure(f"{pattern!r} not seen within {timeout:.0f} s")

    def wait_listening(self, port, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.popen.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.05)
        raise self.failure(f"nothing listening on tcp {port} within {timeout:.0f} s")

    def alive(self):
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for t in self._readers:
            t.join(2)


class Procs(list):
    def start(self, *args, **kwargs) -> Proc:
        self.append(Proc(*args, **kwargs))
        return self[-1]

    def stop_all(self):
        while self:
            with contextlib.suppress(Exception):
                self.pop().stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()


def start_backend(tmp: pathlib.Path, procs: Procs, down: bytes) -> tuple[str, int]:
    """The local service the tunnels expose: (its name, its port)."""
    www = tmp / "www"
    www.mkdir()
    (www / "download").write_bytes(down)
    hasher = bench.free_port()
    procs.start("py-backend", [sys.executable, "-c", PY_BACKEND, str(hasher), str(www)]).wait_listening(hasher)
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not nginx:
        return "python", hasher
    port = bench.free_port()
    (tmp / "nginx.conf").write_text(bench.NGINX_CONF.format(tmp=tmp, port=port, upload=NGINX_UPLOAD.format(hasher=hasher)))
    procs.start("nginx", [nginx, "-c", str(tmp / "nginx.conf")]).wait_listening(port)
    return "nginx", port


# -- stacks ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    tmp: pathlib.Path
    ca: pathlib.Path
    cert: pathlib.Path
    key: pathlib.Path
    groups: pathlib.Path
    backend_port: int
    go_dir: pathlib.Path


@dataclasses.dataclass
class Running:
    stack: str
    server: Proc
    client: Proc
    relay: Proc
    http_port: int
    host: str


def launch(stack: str, imp: Impairment, seed, setup: Setup, procs: Procs) -> Running:
    tunnel_port, http_port = bench.free_port(socket.SOCK_DGRAM), bench.free_port()
    if stack == "go":
        host = "bench.go"
        server = procs.start("go-reverstd", [
            str(setup.go_dir / "reverstd"), "-l", "info", "-n", "localhost", "-c", str(setup.cert),
            "-k", str(setup.key), "-g", str(setup.groups), "-a", f"127.0.0.1:{tunnel_port}",
            "-s", f"127.0.0.1:{http_port}"], merge_stdout=True)
    else:
        host = "bench.expose"
        server = procs.start(f"{stack}-reverstd", [
            sys.executable, "-m", "reverst.cli", "reverstd", "-l", "info", "--no-access-log", "-n", "localhost",
            "-c", str(setup.cert), "-k", str(setup.key), "-g", str(setup.groups),
            "-a", f"127.0.0.1:{tunnel_port}", "-s", f"127.0.0.1:{http_port}", "--quic-backend", stack])
    server.wait_listening(http_port)
    relay = procs.start(f"{stack}-relay", [
        sys.executable, str(RELAY), "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{tunnel_port}",
        "--seed", str(seed), "--stats-interval", "0", "--final-stats", *impairment_flags(imp)], stdout_pipe=True)
    m = relay.wait_for(r"listening on (\S+) ->", lines=relay.out_lines)
    via = m.group(1)
    if stack == "go":  # flags before the address
        client = procs.start("go-reverst-http", [
            str(setup.go_dir / "reverst"), "http", "-l", "info", "-a", via, "-n", "localhost", "-g", host,
            "--insecure", "--username", USER, "--password", PASSWORD,
            f"http://127.0.0.1:{setup.backend_port}"], merge_stdout=True)
    else:
        client = procs.start(f"{stack}-expose", [
            sys.executable, "-m", "reverst.cli", "client", "expose", "-l", "info", "-a", via, "-n", "localhost",
            "-g", host, "-c", str(setup.ca), "--username", USER, "--password", PASSWORD,
            "--quic-backend", stack, "--local-timeout", "10m", str(setup.backend_port)])
    running = Running(stack, server, client, relay, http_port, host)
    wait_routed(running)
    return running


def wait_routed(r: Running, timeout=START_TIMEOUT):
    """Until a small GET goes through the tunnel (the client registered)."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        for p in (r.server, r.client, r.relay):
            if not p.alive():
                raise p.failure("died before the tunnel answered")
        conn = http.client.HTTPConnection("127.0.0.1", r.http_port, timeout=10)
        try:
            conn.request("POST", "/upload", body=b"ping", headers={"Host": r.host})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200 and b"sha256" in body:
                return
            last = f"{resp.status} {body[:80]!r}"
        except OSError as exc:
            last = repr(exc)
        finally:
            conn.close()
        time.sleep(0.2)
    raise r.client.failure(f"no answer through the tunnel within {timeout:.0f} s (last: {last})")


def relay_stats(relay: Proc) -> dict | None:
    relay.stop()
    for line in reversed(relay.out_lines):
        with contextlib.suppress(ValueError):
            return json.loads(line)
    return None


# -- transfers -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    mb_s: float | None = None
    ok: bool = False
    status: str = "ok"        # ok, timeout, error, corrupt
    detail: str = ""
    seconds: float = 0.0
    bytes: int = 0
    max_gap: float = 0.0      # the longest wait for one read (down) or one send (up), s


def download(r: Running, size: int, expected: str, timeout: float, stall: float) -> Result:
    start = time.monotonic()
    res = Result()
    conn = http.client.HTTPConnection("127.0.0.1", r.http_port, timeout=stall)
    digest = hashlib.sha256()
    try:
        conn.request("GET", "/download", headers={"Host": r.host})
        resp = conn.getresponse()
        if resp.status != 200:
            res.status, res.detail = "error", f"HTTP {resp.status} {resp.read(200)!r}"
            return res
        while True:
            t0 = time.monotonic()
            chunk = resp.read1(CHUNK)
            res.max_gap = max(res.max_gap, time.monotonic() - t0)
            if not chunk:
                break
            digest.update(chunk)
            res.bytes += len(chunk)
            if time.monotonic() - start > timeout:
                res.status, res.detail = "timeout", f"{res.bytes / 1e6:.1f} of {size / 1e6:.1f} MB in {timeout:.0f} s"
                return res
    except socket.timeout:
        res.status, res.detail = "timeout", f"stalled {stall:.0f} s at {res.bytes / 1e6:.1f} of {size / 1e6:.1f} MB"
        return res
    except (OSError, http.client.HTTPException) as exc:
        res.status, res.detail = "error", f"{exc!r} at {res.bytes / 1e6:.1f} MB"
        return res
    finally:
        conn.close()
        res.seconds = time.monotonic() - start
    res.ok = res.bytes == size and digest.hexdigest() == expected
    if not res.ok:
        res.status, res.detail = "corrupt", f"{res.bytes} bytes, sha256 {digest.hexdigest()[:12]}"
    res.mb_s = size / res.seconds / 1e6
    return res


def upload(r: Running, body: bytes, expected: str, timeout: float, stall: float) -> Result:
    start = time.monotonic()
    res = Result()
    conn = http.client.HTTPConnection("127.0.0.1", r.http_port, timeout=stall)
    try:
        conn.putrequest("POST", "/upload", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", r.host)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        view = memoryview(body)
        for i in range(0, len(body), CHUNK):
            t0 = time.monotonic()
            conn.send(view[i:i + CHUNK])
            res.max_gap = max(res.max_gap, time.monotonic() - t0)
            res.bytes = min(len(body), i + CHUNK)
            if time.monotonic() - start > timeout:
                res.status, res.detail = ("timeout", f"{res.bytes / 1e6:.1f} of {len(body) / 1e6:.1f} MB sent "
                                          f"in {timeout:.0f} s")
                return res
        conn.sock.settimeout(max(1.0, min(stall, timeout - (time.monotonic() - start))))
        resp = conn.getresponse()
        answer = resp.read()
        if resp.status != 200:
            res.status, res.detail = "error", f"HTTP {resp.status} {answer[:200]!r}"
            return res
        got = json.loads(answer)
    except socket.timeout:
        res.status = "timeout"
        res.detail = (f"stalled at {res.bytes / 1e6:.1f} of {len(body) / 1e6:.1f} MB sent" if res.bytes < len(body)
                      else "no answer after the whole body was sent")
        return res
    except (OSError, http.client.HTTPException, ValueError) as exc:
        res.status, res.detail = "error", f"{exc!r} at {res.bytes / 1e6:.1f} MB sent"
        return res
    finally:
        conn.close()
        res.seconds = time.monotonic() - start
    res.ok = got.get("size") == len(body) and got.get("sha256") == expected
    if not res.ok:
        res.status, res.detail = "corrupt", f"backend got {got}"
    res.mb_s = len(body) / res.seconds / 1e6
    return res


WARN = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL)\b|Traceback|level=(WARN|ERROR)")
ERRORISH = re.compile(r"error|cancel|reset|timeout|timed out|abort", re.I)
RECONNECT = re.compile(r"lost \(|reconnecting|retrying in|connection closed|dial.*fail", re.I)


def notes_of(run: Running, relay: dict | None, start_lines: dict) -> dict:
    out = {}
    for p in (run.server, run.client):
        new = p.lines[start_lines[p.name]:]
        out[p.name] = {"warnings": [l for l in new if WARN.search(l)][:20],
                       "errorish": [l for l in new if ERRORISH.search(l) and not WARN.search(l)][:20],
                       "reconnects": [l for l in new if RECONNECT.search(l)][:20],
                       "alive": p.alive()}
    out["relay"] = relay
    return out


def summarize_notes(n: dict) -> str:
    parts = []
    for name, v in n.items():
        if name == "relay" or not isinstance(v, dict):
            continue
        if not v["alive"]:
            parts.append(f"{name} exited")
        if v["reconnects"]:
            parts.append(f"{name}: {len(v['reconnects'])} reconnect lines")
        if v["warnings"]:
            parts.append(f"{name}: {len(v['warnings'])} warnings")
        if v["errorish"]:
            parts.append(f"{name}: {len(v['errorish'])} lines on errors/cancels")
    r = n.get("relay")
    if r:
        up, down = r["up"], r["down"]
        parts.append(f"relay client->server {up['received']} dgrams {up['bytes_received'] / 1e6:.1f} MB "
                     f"({up['dropped_total']} dropped), server->client {down['received']} dgrams "
                     f"{down['bytes_received'] / 1e6:.1f} MB ({down['dropped_total']} dropped)")
    return "; ".join(parts)


# -- table --------------------------------------------------------------------------------------------------
def cell(res: Result) -> str:
    if res.status in ("timeout", "error"):
        return res.status
    return f"{res.mb_s:.2f}"


def ratio(ours: Result, go: Result | None) -> str:
    if go is None or not go.mb_s or ours.mb_s is None or ours.status in ("timeout", "error"):
        return "-"
    if go.status in ("timeout", "error"):
        return "-"
    return f"{ours.mb_s / go.mb_s:.2f}"


def print_table(rows, args, backend):
    head = ["profile", "stack", "MB/s down", "MB/s up", "intact", "down/Go", "up/Go", "max gap s", "notes"]
    table = [head]
    for row in rows:
        go = next((r for r in rows if r["profile"] == row["profile"] and r["stack"] == "go" and "down" in r), None)
        if "down" not in row:
            table.append([row["profile"], row["stack"], "-", "-", "-", "-", "-", "-", row["skipped"]])
            continue
        down, up = row["down"], row["up"]
        intact = "yes" if down.ok and up.ok else "/".join(
            f"{what}:{'ok' if r.ok else r.status}" for what, r in (("down", down), ("up", up)))
        is_go = row["stack"] == "go"
        table.append([row["profile"], row["stack"], cell(down), cell(up), intact,
                      "-" if is_go or go is None else ratio(down, go["down"]),
                      "-" if is_go or go is None else ratio(up, go["up"]),
                      f"{down.max_gap:.1f}/{up.max_gap:.1f}",
                      "; ".join(x for x in [down.detail and f"down {down.detail}", up.detail and f"up {up.detail}",
                                            row["summary"]] if x)])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print(f"\n{args.down_mb:g} MB down, {args.up_mb:g} MB up; profile = loss/one-way delay(+jitter) on each "
          f"direction{' (jitter without reordering)' if args.no_reorder else ''}; backend {backend}; "
          f"timeout {args.timeout:g} s (stall {args.stall:g} s); seed {args.seed}; max gap = longest single "
          f"read (down) / send (up)")
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down-mb", type=float, default=20.0, help="download size, MB (default 20)")
    parser.add_argument("--up-mb", type=float, default=5.0, help="upload size, MB (default 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a transfer may take (default 120)")
    parser.add_argument("--stall", type=float, default=30.0, help="seconds without progress that end a transfer")
    parser.add_argument("--stacks", default="qh3,aioquic,go", help="comma-separated: qh3, aioquic, go")
    parser.add_argument("--profiles", default=None,
                        help="comma-separated indexes or labels of the profiles to run (default: all): "
                             + ", ".join(f"{i}={label}" for i, (label, _) in enumerate(PROFILES)).replace("%", "%%"))
    parser.add_argument("--go-peers", type=pathlib.Path, default=DEFAULT_GO_PEERS)
    parser.add_argument("--seed", default="1", help="the relay's seed (default 1)")
    parser.add_argument("--no-reorder", action="store_true",
                        help="jitter without reordering (a datagram never overtakes an earlier one)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "impaired.json"))
    args = parser.parse_args()

    profiles = PROFILES
    if args.profiles:
        wanted = [p.strip() for p in args.profiles.split(",")]
        profiles = [p for i, p in enumerate(PROFILES) if str(i) in wanted or p[0] in wanted]
    if args.no_reorder:
        profiles = [(label, imp.replace(reorder=False)) for label, imp in profiles]
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    go_missing = next((f"{args.go_peers / b} is absent" for b in ("reverstd", "reverst")
                       if not os.access(args.go_peers / b, os.X_OK)), None)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    down_size, up_size = int(args.down_mb * 1e6), int(args.up_mb * 1e6)
    down_data, up_data = data_of(down_size, 1), data_of(up_size, 2)
    down_sha, up_sha = hashlib.sha256(down_data).hexdigest(), hashlib.sha256(up_data).hexdigest()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="reverst-impaired-"))
    tmp.chmod(0o755)  # nginx workers run as another user
    rows = []
    with Procs() as backend_procs:
        try:
            ca, cert, key = bench.make_certs(tmp / "certs")
            groups = tmp / "groups.yml"
            groups.write_text("groups:\n" + "".join(
                f"  {g}: {{hosts: [{g}], authentication: {{basic: {{username: {USER}, password: {PASSWORD}}}}}}}\n"
                for g in ("bench.expose", "bench.go")))
            backend, backend_port = start_backend(tmp, backend_procs, down_data)
            del down_data
            setup = Setup(tmp, ca, cert, key, groups, backend_port, args.go_peers)
            for label, imp in profiles:
                for stack in stacks:
                    row = {"profile": label, "stack": stack, "impairment": dataclasses.asdict(imp)}
                    rows.append(row)
                    if stack == "go" and go_missing:
                        row["skipped"] = f"Go peer absent ({go_missing})"
                        continue
                    print(f"{label} {stack}: starting", flush=True)
                    with Procs() as procs:
                        try:
                            run = launch(stack, imp, args.seed, setup, procs)
                        except RuntimeError as exc:
                            row["skipped"] = f"failed to start: {str(exc).splitlines()[0]}"
                            row["start_error"] = str(exc)
                            print(f"  {row['skipped']}", flush=True)
                            continue
                        marks = {p.name: len(p.lines) for p in (run.server, run.client)}
                        row["down"] = download(run, down_size, down_sha, args.timeout, args.stall)
                        print(f"  down {row['down']}", flush=True)
                        row["up"] = upload(run, up_data, up_sha, args.timeout, args.stall)
                        print(f"  up   {row['up']}", flush=True)
                        time.sleep(0.2)
                        row["notes"] = notes_of(run, relay_stats(run.relay), marks)
                        row["summary"] = summarize_notes(row["notes"])
                        print(f"  {row['summary']}", flush=True)
        finally:
            backend_procs.stop_all()
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(rows, args, backend)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "backend": backend, "down_bytes": down_size,
        "up_bytes": up_size, "timeout_s": args.timeout, "stall_s": args.stall, "seed": args.seed,
        "nproc": os.cpu_count(), "go_peers": None if go_missing else str(args.go_peers),
        "rows": [{k: (dataclasses.asdict(v) if isinstance(v, Result) else v) for k, v in r.items()} for r in rows],
    }, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
