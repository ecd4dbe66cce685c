"""Benchmark reverst against the Go reverst on loopback, print one table, write it as JSON.

    python bench/run.py [--duration 10] [--repeat 1] [--only small] [--backends qh3,aioquic]

Starts a backend (nginx if installed, else a gevent WSGI backend) and, side by side, one
tunnel *stack* per implementation:

* ``go``: the Go ``reverstd`` and the Go ``reverst http`` in front of the backend (from
  ``../shared/peers/go-reverst``, or ``--go-peers DIR``; skipped with a note when absent);
* one per QUIC backend of ours (``--backends``, default: every one that imports): our
  ``reverstd --quic-backend B`` with two clients on the same backend, ``reverst expose``
  in front of the backend and a WSGI app through ``reverst.client.serve``.

Each case is driven with ``wrk`` ``--repeat`` times; in each repetition the stacks run in
a rotated order, and the table shows the median per (case, stack, client): the figure,
its ratio to the Go stack's (only ratios from one session mean anything on a shared
machine), p50/p99, CPU seconds and peak RSS of the server, the client and both together,
and the direct (no tunnel) figure.  Every raw run is kept in the JSON.  It also
registers ``--idle`` idle tunnel connections to each of our reverstd.  Every process it
starts, it stops (also on Ctrl-C and errors).

Needs ``wrk`` (``apt-get install wrk``; ``nginx-light`` optional; ``py-spy`` for --profile).
"""
from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import http.client
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_GO_PEERS = ROOT.parent / "shared" / "peers" / "go-reverst"
OUR_BACKENDS = ("qh3", "aioquic")  # reverst.quic.BACKENDS, fastest first
SMALL = b"hello, world\n"
TEN_MB = 10 * 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
USER, PASSWORD = "bench", "bench"
START_TIMEOUT = 20.0  # seconds any process may take to become ready

#: (name, path, connections, POST body?[, background]) -- the body is a 10 MB POST through
#: wrk's script; a background (path, connections) is driven through the same stack (or
#: straight to the backend for the direct figure) from a second before until the case ends:
#: a small request's latency beside downloads through the same tunnel
CASES = [
    ("small GET c=1", "/small", 1, False),
    ("small GET c=16", "/small", 16, False),
    ("small GET c=64", "/small", 64, False),
    ("10MB GET c=1", "/10mb", 1, False),
    ("10MB GET c=4", "/10mb", 4, False),
    ("10MB POST c=1", "/upload", 1, True),
    ("small GET c=1 + 10MB GET c=4", "/small", 1, False, ("/10mb", 4)),
]
BACKGROUND_LEAD = 1.0  # seconds the background load runs before the case's measured run


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes --------------------------------------------------------------------------------------
class Proc:
    """A child process with its log kept (and searchable) and its resources sampled.

    Our processes log to stderr; the Go binaries log to stdout (``merge_stdout``)."""

    def __init__(self, name, args, env=None, cwd=ROOT, merge_stdout=False, python=True):
        self.name, self.python = name, python
        self.lines: list[str] = []
        self.popen = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})},
                                      stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE if merge_stdout else subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT if merge_stdout else subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self):
        for line in self.popen.stdout or self.popen.stderr:
            self.lines.append(line.rstrip())

    def failure(self, what: str) -> RuntimeError:
        """An error naming this process, ``what`` went wrong, and its last output."""
        if self.popen.poll() is not None:
            self._reader.join(2)
            what += f" (it exited with status {self.popen.returncode})"
        return RuntimeError(f"{self.name}: {what}; last output:\n  " + "\n  ".join(self.lines[-20:] or ["(none)"]))

    def wait_for(self, pattern, timeout=START_TIMEOUT, count=1):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for line in list(self.lines) if (m := rx.search(line))]
            if len(found) >= count:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise self.failure(f"{pattern!r} x{count} not seen within {timeout:.0f} s")

    def wait_listening(self, port, timeout=START_TIMEOUT):
        """Until something accepts TCP connections on ``port`` (and this process still runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.popen.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.05)
        raise self.failure(f"nothing listening on tcp {port}" + ("" if self.popen.poll() is not None
                                                                 else f" within {timeout:.0f} s"))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.popen.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / TICKS
        except OSError:
            return 0.0

    def rss_mb(self) -> float:
        return self.memory_mb()[0]

    def memory_mb(self) -> tuple[float, float]:
        """(RSS, its anonymous part) in MB, 0 where the process is gone. The anonymous part
        (heaps, stacks) is the RSS without the pages of the files a process maps (its
        executable and shared libraries), which the kernel can drop and read again, and
        which processes running the same files share."""
        rss = anon = 0.0
        try:
            with open(f"/proc/{self.popen.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024 / 1e6
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1]) * 1024 / 1e6
        except OSError:
            pass
        return rss, anon

    def stop(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)  # (its log is complete), then its pipe closed
        (self.popen.stdout or self.popen.stderr).close()


class Procs(list):
    """Every process started, stopped in reverse order on exit (errors and Ctrl-C included)."""

    def start(self, *args, **kwargs) -> Proc:
        proc = Proc(*args, **kwargs)
        self.append(proc)
        return proc

    def __enter__(self):
        compile_package()  # (every benchmark starts its processes here)
        return self

    def __exit__(self, *exc):
        for p in reversed(self):
            with contextlib.suppress(Exception):
                p.stop()


def interrupt_on_sigterm():
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the ``finally`` blocks stop every child."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# -- measuring --------------------------------------------------------------------------------------
class Profiler:
    """py-spy (``pip install py-spy``) on some processes while a case runs: raw stacks in
    ``<dir>/<case>-<proc>.txt`` and the functions with the most samples printed."""

    def __init__(self, directory, case, procs, duration, native=False):
        self.directory, self.case, self.procs, self.duration = directory, case, procs, duration
        self.native = native  # also the native frames (C, Rust): where the time in a library goes
        self.spies = []

    def __enter__(self):
        if self.directory is None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", self.case.lower()).strip("-")
        for p in self.procs:
            out = self.directory / f"{slug}-{p.name}.txt"
            self.spies.append((p.name, out, subprocess.Popen(
                ["py-spy", "record", "-p", str(p.popen.pid), "-d", str(self.duration), "-r", "100", "--gil",
                 *(["--native"] if self.native else []), "--format", "raw", "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        return self

    def __exit__(self, exc_type, *exc):
        for name, out, spy in self.spies:
            try:
                if exc_type is not None:
                    raise subprocess.TimeoutExpired(spy.args, 0)  # failing: do not wait for it
                spy.wait(self.duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
            if exc_type is None and out.exists():
                print(f"  profile {name}: {profile_headline(out)}", flush=True)


def _short_frame(frame: str) -> str:
    """A py-spy frame with its file's directory and line number dropped: ``f (file.py)``."""
    return re.sub(r" \((?:.*/)?([^/]+?)(?::\d+)?\)$", r" (\1)", frame)


def profile_headline(path, top=8) -> str:
    """The files and functions with the most self samples in a py-spy raw (collapsed) file;
    with native frames (``--native``), also the time in the C library counted to the code
    that called it (whose memcpy and malloc they are)."""
    own, files, callers, total = {}, {}, {}, 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if "(libc.so" in leaf:
            caller = next((f for f in reversed(frames) if "(libc.so" not in f), "?")
            caller = _short_frame(caller).rpartition(" (")[2].rstrip(")")
            callers[caller] = callers.get(caller, 0) + int(count)
        leaf = _short_frame(leaf)
        own[leaf] = own.get(leaf, 0) + int(count)
        file = leaf.rpartition(" (")[2].rstrip(")") or "?"
        files[file] = files.get(file, 0) + int(count)
        total += int(count)
    if not total:
        return "no samples"

    def share(d):
        return ", ".join(f"{100 * n / total:.0f}% {k}" for k, n in sorted(d.items(), key=lambda kv: -kv[1])[:top])
    headline = f"files: {share(files)}\n    functions: {share(own)}"
    if callers:
        headline += f"\n    libc called from: {share(callers)}"
    return headline


def memray_headline(path, top=6) -> str:
    """What a process held at its heap's peak (a ``memray run --aggregate`` capture): by
    owner (module import, our package, qh3, the other libraries, native-only stacks), then
    the largest places."""
    import memray
    reader = memray.FileReader(str(path))
    owners: dict[str, int] = {}
    places: dict[str, int] = {}
    for record in reader.get_high_watermark_allocation_records(merge_threads=True):
        frames = record.stack_trace()
        files = [f[1] for f in frames]
        if any("importlib._bootstrap" in f or "<frozen runpy>" in f for f in files):
            owner, place = "imports", None
        elif not frames:
            native = [f[0] for f in record.native_stack_trace()[:3]]
            owner, place = "native", "native " + " < ".join(native)
        else:
            f = frames[0]  # (the innermost: whose code allocated)
            lib = re.search(r"site-packages/([^/.]+)", f[1])
            owner = "ours" if "/reverst/" in f[1] else lib.group(1) if lib else "stdlib"
            ours = [f for f in frames if "/reverst/" in f[1]]
            place = f"{f[0]} ({f[1].rsplit('/', 1)[-1]}:{f[2]})" + \
                (f" < {ours[0][0]} ({ours[0][1].rsplit('/', 1)[-1]}:{ours[0][2]})" if ours and ours[0] is not f else "")
        owners[owner] = owners.get(owner, 0) + record.size
        if place:
            places[place] = places.get(place, 0) + record.size

    def mb(n):
        return f"{n / 1e6:.1f} MB"
    by_owner = ", ".join(f"{k} {mb(v)}" for k, v in sorted(owners.items(), key=lambda kv: -kv[1]))
    largest = "; ".join(f"{mb(v)} {k}" for k, v in sorted(places.items(), key=lambda kv: -kv[1])[:top])
    return f"peak heap {mb(reader.metadata.peak_memory)}: {by_owner}\n    largest: {largest}"


class Sampler:
    """CPU seconds, peak RSS of each process and peak of their sum while a case runs."""

    def __init__(self, procs):
        self.procs = procs
        now = {p.name: p.memory_mb() for p in procs}
        self.peak = {name: rss for name, (rss, _) in now.items()}
        self.peak_total = sum(self.peak.values())
        self.peak_anon_total = sum(anon for _, anon in now.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            now = {p.name: p.memory_mb() for p in self.procs}
            for name, (rss, _) in now.items():
                self.peak[name] = max(self.peak[name], rss)
            self.peak_total = max(self.peak_total, sum(rss for rss, _ in now.values()))
            self.peak_anon_total = max(self.peak_anon_total, sum(anon for _, anon in now.values()))

    def __enter__(self):
        self.cpu0 = {p.name: p.cpu_seconds() for p in self.procs}
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.cpu = {p.name: p.cpu_seconds() - self.cpu0[p.name] for p in self.procs}


def wrk(url, connections, duration, host=None, script=None) -> dict:
    args = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{duration}s",
            "--latency", "--timeout", "10s"]
    if host:
        args += ["-H", f"Host: {host}"]
    if script:
        args += ["-s", script]
    done = subprocess.run(args + [url], capture_output=True, text=True, timeout=duration + 60)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if not rps:
        raise RuntimeError(f"wrk {url} failed (status {done.returncode}): {(done.stderr or done.stdout).strip()}")
    requests = re.search(r"(\d+) requests in", done.stdout)
    result = {"rps": float(rps.group(1)), "requests": int(requests.group(1)) if requests else None}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", done.stdout, re.M)
        if m and result["requests"] != 0:  # with none completed wrk prints 0.00us
            result[f"p{pct}"] = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    socket_errors = re.search(r"Socket errors: (.*)", done.stdout)
    result["errors"] = int(errors.group(1)) if errors else 0
    if socket_errors:
        result["socket_errors"] = socket_errors.group(1)
        result["errors"] += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return result


def wait_routed(public_port, host, procs, timeout=START_TIMEOUT):
    """Until GET /small through ``public_port`` with ``Host: host`` answers the small body."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise p.failure(f"died before {host} answered through the tunnel")
        conn = http.client.HTTPConnection("127.0.0.1", public_port, timeout=5)
        try:
            conn.request("GET", "/small", headers={"Host": host})
            response = conn.getresponse()
            body = response.read()
            if response.status == 200 and body == SMALL:
                return
            last = f"{response.status} {body[:100]!r}"
        except OSError as exc:
            last = repr(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise procs[-1].failure(f"GET /small with Host {host} through port {public_port} never answered "
                            f"within {timeout:.0f} s (last: {last})")


# -- the backend ------------------------------------------------------------------------------------
BACKEND_APP = '''
import sys
from gevent import pywsgi, socket
SMALL = b"hello, world\\n"
PIECE = b"x" * 262144  # the 10 MB body is 40 of it: the WSGI client's RSS is the tunnel's, not a kept body
def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/upload":
        stream = environ["wsgi.input"]
        while stream.read(262144):
            pass
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    body = [PIECE] * 40 if path == "/10mb" else [SMALL]
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(sum(map(len, body))))])
    return body
class Handler(pywsgi.WSGIHandler):
    def handle(self):
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()
pywsgi.WSGIServer(("127.0.0.1", int(sys.argv[1])), app, handler_class=Handler, log=None).serve_forever()
'''

#: nginx serving {tmp}/www on {port}; ``upload``: its /upload location (other benches
#: proxy it elsewhere)
NGINX_UPLOAD = 'location = /upload {{ client_max_body_size 100m; client_body_buffer_size 1m; return 200 "ok"; }}'
NGINX_CONF = '''
daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; sendfile on; tcp_nodelay on; keepalive_requests 1000000;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {tmp}/www;
    {upload}
  }}
}}
'''

WSGI_APP = f'''
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from reverst.client import serve, BasicAuth
exec({BACKEND_APP.split("class Handler")[0]!r})
serve(app, sys.argv[1], tunnel_group=sys.argv[2], server_name="localhost", ca_file=sys.argv[3],
      auth=BasicAuth({USER!r}, {PASSWORD!r}), max_datagram_size=int(sys.argv[4]), app_threads=int(sys.argv[5]),
      quic_backend=sys.argv[6], on_ready=lambda c: print("ready", file=sys.stderr, flush=True))
'''

IDLE_CLIENTS = f'''
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from reverst.client import Client, BasicAuth
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
n = int(sys.argv[3])
count = [0]
def ready(client):
    count[0] += 1
    if count[0] == n:
        print("all registered", file=sys.stderr, flush=True)
Client(app, sys.argv[1], tunnel_group="bench.idle", server_name="localhost", ca_file=sys.argv[2],
       auth=BasicAuth({USER!r}, {PASSWORD!r}), connections=n, app_threads=0, on_ready=ready,
       handshake_timeout=60, quic_backend=sys.argv[4]).dial_and_serve()
'''


@dataclasses.dataclass
class Backend:
    name: str       # nginx or gevent
    port: int       # what the tunnels forward to (and the direct GETs)
    post_port: int  # a gevent backend that reads POST bodies (the direct POST figure)


def start_backend(tmp, procs) -> Backend:
    port = free_port()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx:
        www = tmp / "www"
        www.mkdir()
        (www / "small").write_bytes(SMALL)
        (www / "10mb").write_bytes(b"x" * TEN_MB)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port, upload=NGINX_UPLOAD.format()))
        procs.start("nginx", [nginx, "-c", str(tmp / "nginx.conf")], python=False).wait_listening(port)
    else:
        procs.start("backend", [sys.executable, "-c", BACKEND_APP, str(port)]).wait_listening(port)
    # nginx answers POST /upload without reading the body the way a service does:
    # the direct POST figure always comes from the gevent backend, which reads it.
    post_port = free_port()
    procs.start("post-backend", [sys.executable, "-c", BACKEND_APP, str(post_port)]).wait_listening(post_port)
    return Backend("nginx" if nginx else "gevent", port, post_port)


# -- stacks: a reverstd and the tunnel clients registered to it --------------------------------------
@dataclasses.dataclass
class Setup:
    """What every stack is built from."""
    tmp: pathlib.Path
    ca: pathlib.Path     # what our clients trust (the Go client runs --insecure)
    cert: pathlib.Path
    key: pathlib.Path
    backend: Backend
    datagram_size: int
    app_threads: int
    memray: pathlib.Path | None = None  # run our processes under memray, writing here


def python_command(setup: Setup, name: str) -> list[str]:
    """The interpreter for one of our processes: under ``memray run`` with ``--memray``
    (native frames too, aggregated: the allocations at the heap's peak, written at exit)."""
    if setup.memray is None:
        return [sys.executable]
    return [sys.executable, "-m", "memray", "run", "--native", "--aggregate", "-q", "-f",
            "-o", str(setup.memray / f"{name}.bin")]


@dataclasses.dataclass
class ClientSpec:
    name: str               # expose, wsgi, http (the Go CLI)
    group: str              # its tunnel group, and the Host it is reached by
    args: Callable[[str], list]  # tunnel address -> command line
    ready: str              # a log line (regex) meaning it registered
    merge_stdout: bool = False


@dataclasses.dataclass
class StackSpec:
    name: str               # go, qh3, aioquic
    server_args: Callable[[int, int], list]  # (tunnel port, http port) -> command line
    clients: list[ClientSpec]
    python: bool


@dataclasses.dataclass
class Target:
    """One (stack, client) pair a case is driven through."""
    stack: "Stack"
    client: str
    proc: Proc
    host: str


@dataclasses.dataclass
class Stack:
    name: str
    server: Proc
    tunnel: str             # 127.0.0.1:port (udp)
    http_port: int
    targets: list = dataclasses.field(default_factory=list)
    dead: str | None = None  # why its remaining runs are skipped

    def check_alive(self) -> bool:
        for p in [self.server] + [t.proc for t in self.targets]:
            if not self.dead and not p.alive():
                self.dead = str(p.failure("exited during the benchmark"))
                print(f"stack {self.name} is down, its remaining runs are skipped: {self.dead}", flush=True)
        return not self.dead

    def stop(self):
        for p in [t.proc for t in reversed(self.targets)] + [self.server]:
            p.stop()


def write_groups(path: pathlib.Path, names) -> pathlib.Path:
    """A groups file (the schema both implementations read): each group reached by its own name."""
    path.write_text("groups:\n" + "".join(
        f"  {n}: {{hosts: [{n}], authentication: {{basic: {{username: {USER}, password: {PASSWORD}}}}}}}\n"
        for n in names))
    return path


def go_stack_spec(go_dir: pathlib.Path, setup: Setup) -> StackSpec:
    groups = write_groups(setup.tmp / "go-groups.yml", ["bench.go"])

    def server(tunnel_port, http_port):
        return [str(go_dir / "reverstd"), "-l", "warn", "-n", "localhost", "-c", str(setup.cert),
                "-k", str(setup.key), "-g", str(groups), "-a", f"127.0.0.1:{tunnel_port}",
                "-s", f"127.0.0.1:{http_port}"]

    def client(tunnel):  # flags before the address
        return [str(go_dir / "reverst"), "http", "-l", "info", "-a", tunnel, "-n", "localhost", "-g", "bench.go",
                "--insecure", "--username", USER, "--password", PASSWORD,
                f"http://127.0.0.1:{setup.backend.port}"]
    return StackSpec("go", server, [ClientSpec("http", "bench.go", client, r"Starting reverse server",
                                               merge_stdout=True)], python=False)


def our_stack_spec(quic: str, setup: Setup) -> StackSpec:
    groups = write_groups(setup.tmp / "groups.yml", ["bench.expose", "bench.wsgi", "bench.idle"])
    common = ["--max-datagram-size", str(setup.datagram_size), "--quic-backend", quic]

    def server(tunnel_port, http_port):
        return [*python_command(setup, f"{quic}-reverstd"), "-m", "reverst.cli", "reverstd", "-l", "warn", "-n", "localhost",
                "-c", str(setup.cert), "-k", str(setup.key), "-g", str(groups),
                "-a", f"127.0.0.1:{tunnel_port}", "-s", f"127.0.0.1:{http_port}", *common]

    def expose(tunnel):
        return [*python_command(setup, f"{quic}-expose"), "-m", "reverst.cli", "client", "expose", "-l", "info", "-a", tunnel,
                "-n", "localhost", "-g", "bench.expose", "-c", str(setup.ca),
                "--username", USER, "--password", PASSWORD, *common, str(setup.backend.port)]

    def wsgi(tunnel):
        return [*python_command(setup, f"{quic}-wsgi"), "-c", WSGI_APP, tunnel, "bench.wsgi", str(setup.ca), str(setup.datagram_size),
                str(setup.app_threads), quic]
    return StackSpec(quic, server, [ClientSpec("expose", "bench.expose", expose, r"reachable through"),
                                    ClientSpec("wsgi", "bench.wsgi", wsgi, r"^ready$")], python=True)


@contextlib.contextmanager
def stack_specs(prefix: str, go_dir: pathlib.Path, go_problem: str | None, backends: list[str],
                app_threads: int, datagram_size: int = 1452):
    """For a benchmark that starts stacks itself: a temporary directory, certificates, the
    backend and every stack's spec (Go's unless ``go_problem``), as ``(procs, specs)``.
    On exit every process started in ``procs`` is stopped and the directory removed."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    tmp.chmod(0o755)  # nginx workers run as another user
    try:
        with Procs() as procs:
            ca, cert, key = make_certs(tmp / "certs")
            backend = start_backend(tmp, procs)
            setup = Setup(tmp, ca, cert, key, backend, datagram_size, app_threads)
            yield procs, ([] if go_problem else [go_stack_spec(go_dir, setup)]) + \
                [our_stack_spec(b, setup) for b in backends]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def launch_stack(spec: StackSpec, procs: Procs) -> Stack:
    """Start the server, then each client, each ready (logged, and a request routed through it)."""
    tunnel_port, http_port = free_port(socket.SOCK_DGRAM), free_port()
    server = procs.start(f"{spec.name}-reverstd", spec.server_args(tunnel_port, http_port),
                         merge_stdout=not spec.python, python=spec.python)
    stack = Stack(spec.name, server, f"127.0.0.1:{tunnel_port}", http_port)
    try:
        server.wait_listening(http_port)
        for c in spec.clients:
            proc = procs.start(f"{spec.name}-{c.name}", c.args(stack.tunnel), merge_stdout=c.merge_stdout,
                               python=spec.python)
            stack.targets.append(Target(stack, c.name, proc, c.group))
            proc.wait_for(c.ready)
            wait_routed(http_port, c.group, [server, proc])
    except RuntimeError:
        stack.stop()  # a half-started stack does not run beside the others
        raise
    return stack


def launch_stacks(specs, procs, skipped) -> list[Stack]:
    """Every stack that starts; the others are reported in ``skipped`` (name -> why)."""
    stacks = []
    for spec in specs:
        try:
            stacks.append(launch_stack(spec, procs))
            print(f"stack {spec.name}: ready", flush=True)
        except RuntimeError as exc:
            skipped[spec.name] = f"failed to start: {exc}"
            print(f"stack {spec.name} failed to start, skipped: {exc}", flush=True)
    return stacks


def go_peer_problem(go_dir: pathlib.Path) -> str | None:
    """Why the Go binaries in ``go_dir`` cannot be used (None when they can)."""
    for binary in ("reverstd", "reverst"):
        path = go_dir / binary
        if not path.is_file():
            return f"{path} is absent"
        if not os.access(path, os.X_OK):
            return f"{path} is not executable"
    return None


def our_backends(requested: str | None) -> list[str]:
    """The QUIC backends to benchmark: those requested (each must import), default all that import."""
    names = OUR_BACKENDS if requested is None else [n.strip() for n in requested.split(",") if n.strip()]
    if requested is not None and names == ["none"]:
        return []
    unknown = [n for n in names if n not in OUR_BACKENDS]
    if unknown:
        sys.exit(f"--backends: unknown {', '.join(unknown)} (expected {', '.join(OUR_BACKENDS)} or none)")
    versions = quic_versions()
    missing = [n for n in names if versions[n] is None]
    if requested is not None and missing:
        sys.exit(f"--backends: {', '.join(missing)} does not import here")
    return [n for n in names if versions[n] is not None]


def quic_versions() -> dict:
    versions = {}
    for name in OUR_BACKENDS:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except ImportError:
            versions[name] = None
    return versions


# -- running the cases ------------------------------------------------------------------------------
def rotated(items, n):
    n %= max(len(items), 1)
    return items[n:] + items[:n]


def case_url(case, backend: Backend, port=None) -> tuple[str, int | None]:
    """(URL, MB per request or None): through ``port``, or direct to the backend when None."""
    _, path, _, post = case[:4]
    if port is None:
        port = backend.post_port if post else backend.port
    return f"http://127.0.0.1:{port}{path}", (TEN_MB / 1e6 if path != "/small" else None)


@contextlib.contextmanager
def background_load(case, duration, port, host=None):
    """The case's background load (if any) through ``port`` (a stack's, or the backend's
    for the direct figure), started BACKGROUND_LEAD seconds before the block and running
    past it: yields a dict that holds its wrk result (``mb_s``) after the block."""
    result: dict = {}
    if len(case) < 5:
        yield result
        return
    path, conns = case[4]
    url = f"http://127.0.0.1:{port}{path}"

    def drive():
        try:
            res = wrk(url, conns, math.ceil(duration + BACKGROUND_LEAD + 1), host=host)
            result.update(mb_s=res["rps"] * TEN_MB / 1e6, errors=res["errors"])
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result["failed"] = str(exc)
    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    time.sleep(BACKGROUND_LEAD)
    try:
        yield result
    finally:
        thread.join(duration + 90)


def run_direct(case, rep, backend, post_lua, duration) -> dict:
    name, _, conns, post = case[:4]
    url, mb = case_url(case, backend)
    with background_load(case, duration, backend.port) as bg:
        res = wrk(url, conns, duration, script=post_lua if post else None)
    if bg.get("failed"):
        raise RuntimeError(f"{name}: the backend's background load failed: {bg['failed']}")
    if res["errors"]:
        raise RuntimeError(f"{name}: the backend itself answered {res['errors']} errors")
    return {"case": name, "stack": "direct", "client": "-", "rep": rep, "value": res["rps"] * (mb or 1),
            "unit": "MB/s" if mb else "req/s", "p50_ms": res.get("p50"), "p99_ms": res.get("p99"),
            "errors": 0, **({"background_mb_s": bg.get("mb_s")} if bg else {})}


def run_target(case, rep, target: Target, backend, post_lua, args) -> dict:
    name, _, conns, post = case[:4]
    url, mb = case_url(case, backend, target.stack.http_port)
    server, client = target.stack.server, target.proc
    row = {"case": name, "stack": target.stack.name, "client": target.client, "rep": rep,
           "unit": "MB/s" if mb else "req/s"}
    python_procs = [p for p in (server, client) if p.python]  # what py-spy can profile
    profile_dir = args.profile if python_procs else None
    try:
        with Sampler([server, client]) as s, \
                background_load(case, args.duration, target.stack.http_port, target.host) as bg, \
                Profiler(profile_dir, f"{name} {target.client} r{rep + 1}", python_procs, args.duration,
                         args.native):
            res = wrk(url, conns, args.duration, host=target.host, script=post_lua if post else None)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {**row, "failed": str(exc)}
    if bg.get("failed") or bg.get("errors"):
        return {**row, "failed": f"background load: {bg.get('failed') or str(bg['errors']) + ' errors'}"}
    if bg:
        row["background_mb_s"] = bg.get("mb_s")
    return {**row, "value": res["rps"] * (mb or 1), "requests": res["requests"], "p50_ms": res.get("p50"),
            "p99_ms": res.get("p99"), "errors": res["errors"], "socket_errors": res.get("socket_errors"),
            "server_cpu_s": s.cpu[server.name], "client_cpu_s": s.cpu[client.name],
            "server_rss_mb": s.peak[server.name], "client_rss_mb": s.peak[client.name],
            "both_rss_mb": s.peak_total, "both_anon_mb": s.peak_anon_total}


def run_cases(cases, stacks, backend, post_lua, args) -> list[dict]:
    """Every case ``--repeat`` times: the direct figure, then each stack (rotated per repetition)."""
    runs = []
    for case in cases:
        for rep in range(args.repeat):
            runs.append(run_direct(case, rep, backend, post_lua, args.duration))
            print_run(runs[-1])
            for stack in rotated(stacks, rep):
                for target in stack.targets:
                    if stack.check_alive():
                        runs.append(run_target(case, rep, target, backend, post_lua, args))
                        print_run(runs[-1])
                        stack.check_alive()
    return runs


def idle_case(stack: Stack, ca, n, procs) -> dict:
    """``n`` idle tunnel connections to one of our reverstd: registration time, its RSS, one request each."""
    import requests
    rss0 = stack.server.rss_mb()
    start = time.monotonic()
    clients = procs.start(f"{stack.name}-idle-clients",
                          [sys.executable, "-c", IDLE_CLIENTS, stack.tunnel, str(ca), str(n), stack.name])
    row = {"case": f"{n} idle tunnels", "stack": stack.name, "client": "serve", "unit": "served"}
    try:
        clients.wait_for("all registered", timeout=max(60, n * 0.3))
        registered_s = time.monotonic() - start
        time.sleep(7)  # steady state: reverstd trims its heap a few seconds after a burst
        rss, client_rss = stack.server.rss_mb(), clients.rss_mb()
        ok = 0
        with requests.Session() as session:
            for _ in range(n):  # round-robin: one request lands on each connection
                with contextlib.suppress(requests.RequestException):
                    r = session.get(f"http://127.0.0.1:{stack.http_port}/", headers={"Host": "bench.idle"},
                                    timeout=10)
                    ok += r.status_code == 200 and r.content == b"ok"
    except RuntimeError as exc:
        return {**row, "failed": str(exc)}
    finally:
        clients.stop()
    return {**row, "value": ok, "registration_s": registered_s, "server_rss_mb": rss,
            "server_rss_growth_mb": rss - rss0, "client_rss_mb": client_rss, "both_rss_mb": rss + client_rss,
            "errors": n - ok}


# -- the report ---------------------------------------------------------------------------------------
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


MEDIAN_KEYS = ("value", "p50_ms", "p99_ms", "server_cpu_s", "client_cpu_s", "server_rss_mb", "client_rss_mb",
               "both_rss_mb", "both_anon_mb", "registration_s", "server_rss_growth_mb", "background_mb_s")


def median_rows(runs) -> list[dict]:
    """One row per (case, stack, client): each figure's median over its runs, errors summed,
    and ``ratio`` = value / the Go stack's value in the same case."""
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["case"], r["stack"], r["client"]), []).append(r)
    rows = []
    for (case, stack, client), rs in groups.items():
        ok = [r for r in rs if "failed" not in r]
        row = {"case": case, "stack": stack, "client": client, "unit": rs[0]["unit"], "runs": len(ok),
               "failed_runs": len(rs) - len(ok), "errors": sum(r.get("errors") or 0 for r in ok)}
        if any(r.get("requests") is not None for r in ok):
            row["requests"] = sum(r.get("requests") or 0 for r in ok)
        row.update({k: median(r.get(k) for r in ok) for k in MEDIAN_KEYS if any(k in r for r in ok)})
        rows.append(row)
    go = {r["case"]: r["value"] for r in rows if r["stack"] == "go" and r.get("value")}
    go_runs = {(r["case"], r["rep"]): r for r in runs
               if r["stack"] == "go" and "failed" not in r and r.get("value") and "rep" in r}
    for row in rows:
        row["ratio"] = row["value"] / go[row["case"]] if row["case"] in go and row.get("value") is not None \
            and row["stack"] != "direct" else None
        # the same ratio taken within each repetition (the stacks of one run next to each
        # other in time), then its median: less swayed by the machine's drift across runs
        runs_of_row = groups[(row["case"], row["stack"], row["client"])]
        pairs = [(r, go_runs.get((r["case"], r.get("rep")))) for r in runs_of_row
                 if row["stack"] not in ("go", "direct") and "failed" not in r and r.get("value") is not None]
        row["paired_ratio"] = median(r["value"] / g["value"] for r, g in pairs if g is not None)
        row["paired_p50_ratio"] = median(r["p50_ms"] / g["p50_ms"] for r, g in pairs
                                         if g is not None and r.get("p50_ms") and g.get("p50_ms"))
    return rows


FEW_REQUESTS = 10  # a figure from fewer completed requests (over all its runs) is flagged

COLUMNS = ("case", "stack", "client", "value", "ours/Go", "paired", "p50 ms", "p50/Go", "p99 ms", "srv cpu s",
           "cli cpu s", "srv MB", "cli MB", "both MB", "anon MB", "errors")


def cells(row) -> list[str]:
    def fmt(key, spec=".0f"):
        return "-" if row.get(key) is None else format(row[key], spec)
    if row.get("failed") or (row.get("runs") == 0):
        value = "FAILED"
    elif row["unit"] == "served":
        value = f"{fmt('value')}/{row['value'] + row['errors']} served, reg {fmt('registration_s', '.1f')} s"
    else:
        value = fmt("value") + (" MB/s" if row["unit"] == "MB/s" else " req/s")
        if row.get("requests") is not None and row["requests"] < FEW_REQUESTS:
            value += f" ({row['requests']} req!)"  # too few completed for a figure to mean much
        if row.get("background_mb_s") is not None:
            value += f" (beside {row['background_mb_s']:.0f} MB/s)"
    client = "reverst http" if row["stack"] == "go" else row["client"]
    return [row["case"], row["stack"], client, value, fmt("ratio", ".2f"), fmt("paired_ratio", ".2f"),
            fmt("p50_ms", ".2f"), fmt("paired_p50_ratio", ".2f"), fmt("p99_ms", ".2f"), fmt("server_cpu_s", ".1f"),
            fmt("client_cpu_s", ".1f"), fmt("server_rss_mb"), fmt("client_rss_mb"), fmt("both_rss_mb"),
            fmt("both_anon_mb"), fmt("errors", "d")]


def print_run(run):
    rep = f" #{run['rep'] + 1}" if "rep" in run else ""
    print(f"{run['case']}{rep} | " + " | ".join(cells(run)[1:]) + (f" | {run['failed']}" if "failed" in run else ""),
          flush=True)


def print_table(rows, info):
    order = {"direct": 0, "go": 1, **{b: 2 + i for i, b in enumerate(OUR_BACKENDS)}}
    case_order = {r["case"]: i for i, r in reversed(list(enumerate(rows)))}
    rows = sorted(rows, key=lambda r: (case_order[r["case"]], order.get(r["stack"], 9), r["client"]))
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    print(f"backend: {info['backend']}; {info['nproc']} cpus; {info['duration_s']} s per run, median of "
          f"{info['repeat']} run(s) alternated; direct = backend without a tunnel; ours/Go = value / the go "
          f"row's; paired, p50/Go = the median over repetitions of the ratio to the Go run of the same "
          f"repetition (value, p50); cpu in seconds, RSS in MB (peak during the run; both = peak of server + client; anon = the same "
          f"peak of their anonymous memory, without the pages of mapped files such as shared libraries)")
    print(f"versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; Go peer: "
          f"{info['go_peer']['path'] if info['go_peer']['present'] else 'absent'}")
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for name, why in info["skipped"].items():
        print(f"skipped stack {name}: {why.splitlines()[0]}")


def machine_info() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "loadavg_at_start": os.getloadavg(),
            "kernel": platform.release(), "python": platform.python_version()}


def make_certs(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(CA certificate, server certificate, server key) for localhost / 127.0.0.1, made per run
    by trustme (a CA and a leaf it signs: qh3's verifier rejects a self-signed leaf)."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    leaf.cert_chain_pems[0].write_to_path(str(paths[1]))
    leaf.private_key_pem.write_to_path(str(paths[2]))
    return paths


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per case and stack, stacks in rotated order; the table shows medians")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--only", default=None, help="run only the case of this name, else the cases whose name contains this")
    parser.add_argument("--idle", type=int, default=1000, help="idle tunnel connections (0: skip)")
    parser.add_argument("--backends", default=None,
                        help=f"our QUIC backends, comma-separated ({','.join(OUR_BACKENDS)} or none; "
                             f"default: every one that imports)")
    parser.add_argument("--go-peers", type=pathlib.Path, default=DEFAULT_GO_PEERS, metavar="DIR",
                        help="directory of the Go reverstd and reverst binaries (default: %(default)s)")
    parser.add_argument("--datagram-size", type=int, default=1452,
                        help="--max-datagram-size of our reverstd and clients (loopback allows up to 16000)")
    parser.add_argument("--app-threads", type=int, default=100,
                        help="app_threads of the WSGI client (0: the app runs in greenlets)")
    parser.add_argument("--profile", type=pathlib.Path, default=None, metavar="DIR",
                        help="record py-spy profiles of our reverstd and clients per case into DIR")
    parser.add_argument("--native", action="store_true",
                        help="with --profile: the native frames too (py-spy --native: C and Rust code by library)")
    parser.add_argument("--memray", type=pathlib.Path, default=None, metavar="DIR",
                        help="run our reverstd and clients under memray (pip install memray) and print what "
                             "each held at its peak of heap memory over the whole session (use with --only)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.profile and not shutil.which("py-spy"):
        sys.exit("--profile needs py-spy: pip install py-spy")
    if args.native and not args.profile:
        parser.error("--native goes with --profile DIR")
    if args.memray and importlib.util.find_spec("memray") is None:
        sys.exit("--memray needs memray: pip install memray")
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    return args


def compile_package() -> None:
    """Write the bytecode of the reverst package our processes import, as ``pip install``
    does. Where PYTHONDONTWRITEBYTECODE is set (as on this project's machines), an editable
    checkout would be compiled from source in every process: ~0.8 MB more heap per process
    than an installed package, and slower starts. Only ``__pycache__`` is written."""
    compileall.compile_dir(ROOT / "reverst", quiet=1)  # (our processes run in ROOT: its package comes first)


def main():
    args = parse_args()
    backends = our_backends(args.backends)
    go_problem = go_peer_problem(args.go_peers)
    if go_problem:
        print(f"Go column skipped: {go_problem} (--go-peers DIR to point elsewhere)", flush=True)
    info = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(), "duration_s": args.duration,
            "repeat": args.repeat, "datagram_size": args.datagram_size, "app_threads": args.app_threads,
            "versions": {k: v for k, v in quic_versions().items() if v}, "our_backends": backends,
            "go_peer": {"path": str(args.go_peers), "present": go_problem is None, "problem": go_problem},
            "skipped": {"go": f"Go peer: {go_problem}"} if go_problem else {}}
    info["nproc"] = info["machine"]["nproc"]
    # an exact case name selects that case alone ("small GET c=1" is also in "c=16")
    cases = [c for c in CASES if c[0] == args.only] or [c for c in CASES if not args.only or args.only in c[0]]
    interrupt_on_sigterm()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="reverst-bench-"))
    tmp.chmod(0o755)  # nginx workers run as another user
    runs = []
    try:
        with Procs() as procs:
            ca, cert, key = make_certs(tmp / "certs")
            backend = start_backend(tmp, procs)
            info["backend"] = backend.name
            if args.memray:
                args.memray.mkdir(parents=True, exist_ok=True)
            setup = Setup(tmp, ca, cert, key, backend, args.datagram_size, args.app_threads, args.memray)
            specs = ([] if go_problem else [go_stack_spec(args.go_peers, setup)]) + \
                [our_stack_spec(b, setup) for b in backends]
            stacks = launch_stacks(specs, procs, info["skipped"])
            if not stacks:
                sys.exit("no stack started; nothing to measure")
            post_lua = tmp / "post.lua"
            post_lua.write_text(f'wrk.method = "POST"\nwrk.body = string.rep("x", {TEN_MB})\n')
            runs += run_cases(cases, stacks, backend, str(post_lua), args)
            if args.idle and (not args.only or "idle" in args.only):
                for stack in stacks:
                    if stack.name != "go" and stack.check_alive():
                        runs.append(idle_case(stack, ca, args.idle, procs))
                        print_run(runs[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.memray:  # (written as each process exited)
        for path in sorted(args.memray.glob("*.bin")):
            print(f"memray {path.stem}: {memray_headline(path)}", flush=True)

    rows = median_rows(runs)
    info["direct"] = {r["case"]: {"value": r["value"], "unit": r["unit"]} for r in rows if r["stack"] == "direct"}
    print()
    print_table(rows, info)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "rows": rows, "runs": runs}, indent=2))
    print(f"\nwritten to {out}")
    ours_failed = [name for name in info["skipped"] if name != "go" or not go_problem]
    if ours_failed or any("failed" in r for r in runs):
        sys.exit(1)


def run_cli(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; Ctrl-C (or SIGTERM, see interrupt_on_sigterm) ends it with one line."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (every process it started is stopped)")


if __name__ == "__main__":
    run_cli(main)
