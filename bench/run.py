"""Benchmark reverst on loopback and print one table (and write it as JSON).

    python bench/run.py [--duration 10] [--json bench/results/latest.json] [--only small]

Starts a backend (nginx if installed, else a gevent WSGI backend), ``reverstd`` and a
tunnel client (``reverst expose`` in front of the backend, and separately a WSGI app
through ``reverst.client.serve``), drives load with ``wrk`` and measures, per case, the
direct (no tunnel) figure, the tunnel figure, their ratio, p50/p99 latency, and CPU
seconds and peak RSS of reverstd and of the client.  It also registers 1,000 idle
tunnel connections to one reverstd.  Every process it starts, it stops.

Needs ``wrk`` (``apt-get install wrk``; ``nginx-light`` optional).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
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
SMALL = b"hello, world\n"
TEN_MB = 10 * 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its stderr kept (and searchable) and its resources sampled."""

    def __init__(self, name, args, env=None, cwd=ROOT):
        self.name = name
        self.lines: list[str] = []
        self.popen = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})},
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.popen.stderr:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern, timeout=30.0, count=1):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for line in list(self.lines) if (m := rx.search(line))]
            if len(found) >= count:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: {pattern!r} x{count} not seen; last output:\n"
                           + "\n".join(self.lines[-20:]))

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.popen.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / TICKS
        except OSError:
            return 0.0

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.popen.pid}/statm") as fh:
                return int(fh.read().split()[1]) * PAGE / 1e6
        except OSError:
            return 0.0

    def stop(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class Profiler:
    """py-spy (``pip install py-spy``) on some processes while a case runs: raw stacks in
    ``<dir>/<case>-<proc>.txt`` and the functions with the most samples printed."""

    def __init__(self, directory, case, procs, duration):
        self.directory, self.case, self.procs, self.duration = directory, case, procs, duration
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
                 "--format", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        return self

    def __exit__(self, *exc):
        for name, out, spy in self.spies:
            try:
                spy.wait(self.duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
            if out.exists():
                print(f"  profile {name}: {summarize(out)}", flush=True)


def summarize(path, top=8) -> str:
    """The files and functions with the most self samples in a py-spy raw (collapsed) file."""
    own, files, total = {}, {}, 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        leaf = re.sub(r" \((?:.*/)?([^/]+?)(?::\d+)?\)$", r" (\1)", leaf)
        own[leaf] = own.get(leaf, 0) + int(count)
        file = leaf.rpartition(" (")[2].rstrip(")") or "?"
        files[file] = files.get(file, 0) + int(count)
        total += int(count)
    if not total:
        return "no samples"

    def share(d):
        return ", ".join(f"{100 * n / total:.0f}% {k}" for k, n in sorted(d.items(), key=lambda kv: -kv[1])[:top])
    return f"files: {share(files)}\n    functions: {share(own)}"


class Sampler:
    """Peak RSS of some processes while a case runs."""

    def __init__(self, procs):
        self.procs = procs
        self.peak = {p.name: p.rss_mb() for p in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            for p in self.procs:
                self.peak[p.name] = max(self.peak[p.name], p.rss_mb())

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
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=duration + 60).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            result[f"p{pct}"] = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    result["errors"] = (int(errors.group(1)) if errors else 0)
    if socket_errors:
        result["socket_errors"] = socket_errors.group(1)
    return result


BACKEND_APP = '''
import sys
from gevent import pywsgi, socket
SMALL = b"hello, world\\n"
BIG = b"x" * (10 * 1024 * 1024)
def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/upload":
        stream = environ["wsgi.input"]
        while stream.read(262144):
            pass
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    body = BIG if path == "/10mb" else SMALL
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
    return [body]
class Handler(pywsgi.WSGIHandler):
    def handle(self):
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()
pywsgi.WSGIServer(("127.0.0.1", int(sys.argv[1])), app, handler_class=Handler, log=None).serve_forever()
'''

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
    location = /upload {{ client_max_body_size 100m; client_body_buffer_size 1m; return 200 "ok"; }}
  }}
}}
'''

WSGI_APP = f'''
import sys
from reverst.client import serve, BasicAuth
exec({BACKEND_APP.split("class Handler")[0]!r})
serve(app, sys.argv[1], tunnel_group="bench.wsgi", server_name="localhost", ca_file=sys.argv[2],
      auth=BasicAuth("bench", "bench"), max_datagram_size=int(sys.argv[3]), app_threads=int(sys.argv[4]),
      on_ready=lambda c: print("ready", file=sys.stderr, flush=True))
'''

IDLE_CLIENTS = '''
import sys
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
       auth=BasicAuth("bench", "bench"), connections=n, app_threads=0, on_ready=ready,
       handshake_timeout=60).dial_and_serve()
'''


def make_cert(tmp: pathlib.Path):
    sys.path.insert(0, str(ROOT / "examples" / "flask_app"))
    from run import ensure_certificate  # the example's self-signed certificate maker
    return ensure_certificate(tmp / "certs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    parser.add_argument("--idle", type=int, default=1000, help="idle tunnel connections (0: skip)")
    parser.add_argument("--datagram-size", type=int, default=1452,
                        help="--max-datagram-size for reverstd and the clients (loopback allows up to 16000)")
    parser.add_argument("--app-threads", type=int, default=100,
                        help="app_threads of the WSGI client (0: the app runs in greenlets)")
    parser.add_argument("--profile", type=pathlib.Path, default=None, metavar="DIR",
                        help="record py-spy profiles of reverstd and the client per case into DIR")
    args = parser.parse_args()
    if args.profile and not shutil.which("py-spy"):
        sys.exit("--profile needs py-spy: pip install py-spy")
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="reverst-bench-"))
    tmp.chmod(0o755)  # nginx workers run as another user
    cert, key = make_cert(tmp)
    (tmp / "groups.yml").write_text(
        "groups:\n"
        "  bench.expose: {hosts: [bench.expose], authentication: {basic: {username: bench, password: bench}}}\n"
        "  bench.wsgi: {hosts: [bench.wsgi], authentication: {basic: {username: bench, password: bench}}}\n"
        "  bench.idle: {hosts: [bench.idle], authentication: {basic: {username: bench, password: bench}}}\n")
    procs: list[Proc] = []
    rows = []
    try:
        backend_port = free_port()
        if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"):
            www = tmp / "www"
            www.mkdir()
            (www / "small").write_bytes(SMALL)
            (www / "10mb").write_bytes(b"x" * TEN_MB)
            (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=backend_port))
            backend_name = "nginx"
            backend = Proc("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf")])
        else:
            backend_name = "gevent"
            backend = Proc("backend", [sys.executable, "-c", BACKEND_APP, str(backend_port)])
        procs.append(backend)
        wait_tcp(backend_port)
        # nginx answers POST /upload without reading the body the way a service does:
        # the direct POST figure always comes from the gevent backend, which reads it.
        post_port = free_port()
        procs.append(Proc("post-backend", [sys.executable, "-c", BACKEND_APP, str(post_port)]))
        wait_tcp(post_port)

        tunnel_port, http_port = free_port(socket.SOCK_DGRAM), free_port()
        server = Proc("reverstd", [sys.executable, "-m", "reverst.cli", "reverstd", "-l", "warn",
                                   "-n", "localhost", "-c", str(cert), "-k", str(key),
                                   "-g", str(tmp / "groups.yml"), "-a", f"127.0.0.1:{tunnel_port}",
                                   "-s", f"127.0.0.1:{http_port}",
                                   "--max-datagram-size", str(args.datagram_size)])
        procs.append(server)
        wait_tcp(http_port)
        tunnel = f"127.0.0.1:{tunnel_port}"
        expose = Proc("expose", [sys.executable, "-m", "reverst.cli", "client", "expose", "-l", "warn",
                                 "-a", tunnel, "-n", "localhost", "-g", "bench.expose", "-c", str(cert),
                                 "--username", "bench", "--password", "bench",
                                 "--max-datagram-size", str(args.datagram_size), str(backend_port)])
        procs.append(expose)
        expose.wait_for("reachable through")
        wsgi = Proc("wsgi", [sys.executable, "-c", WSGI_APP, tunnel, str(cert), str(args.datagram_size),
                             str(args.app_threads)])
        procs.append(wsgi)
        wsgi.wait_for("ready")

        post_lua = tmp / "post.lua"
        post_lua.write_text(f'wrk.method = "POST"\nwrk.body = string.rep("x", {TEN_MB})\n')
        direct = f"http://127.0.0.1:{backend_port}"
        public = f"http://127.0.0.1:{http_port}"
        cases = [
            ("small GET c=1", "/small", 1, None),
            ("small GET c=16", "/small", 16, None),
            ("small GET c=64", "/small", 64, None),
            ("10MB GET c=1", "/10mb", 1, None),
            ("10MB GET c=4", "/10mb", 4, None),
            ("10MB POST c=1", "/upload", 1, str(post_lua)),
        ]
        for name, path, conns, script in cases:
            if args.only and args.only not in name:
                continue
            mb = TEN_MB / 1e6 if "10MB" in name else None
            base_url = f"http://127.0.0.1:{post_port}" if script else direct
            base = wrk(base_url + path, conns, args.duration, script=script)
            if base["errors"]:
                raise RuntimeError(f"{name}: the backend itself answered {base['errors']} errors")
            for client, host in ((expose, "bench.expose"), (wsgi, "bench.wsgi")):
                with Sampler([server, client]) as s, \
                        Profiler(args.profile, f"{name} {client.name}", [server, client], args.duration):
                    res = wrk(public + path, conns, args.duration, host=host, script=script)
                row = {
                    "case": name, "client": client.name,
                    "direct": base["rps"] * mb if mb else base["rps"],
                    "tunnel": res["rps"] * mb if mb else res["rps"],
                    "unit": "MB/s" if mb else "req/s",
                    "p50_ms": res.get("p50"), "p99_ms": res.get("p99"), "errors": res["errors"],
                    "server_cpu_s": s.cpu["reverstd"], "client_cpu_s": s.cpu[client.name],
                    "server_rss_mb": s.peak["reverstd"], "client_rss_mb": s.peak[client.name],
                }
                row["ratio"] = row["tunnel"] / row["direct"] if row["direct"] else None
                rows.append(row)
                print_row(row, header=len(rows) == 1)

        if args.idle and (not args.only or "idle" in args.only):
            rows.append(idle_case(server, tunnel, cert, args.idle, public, procs))
            print_row(rows[-1], header=len(rows) == 1)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print_table(rows, backend_name)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "backend": backend_name,
                               "duration_s": args.duration, "datagram_size": args.datagram_size,
                               "rows": rows}, indent=2))
    print(f"\nwritten to {out}")


def idle_case(server, tunnel, cert, n, public, procs) -> dict:
    import requests
    rss0 = server.rss_mb()
    start = time.monotonic()
    clients = Proc("idle-clients", [sys.executable, "-c", IDLE_CLIENTS, tunnel, str(cert), str(n)])
    procs.append(clients)
    clients.wait_for("all registered", timeout=300)
    registered_s = time.monotonic() - start
    time.sleep(7)  # steady state: reverstd trims its heap a few seconds after a burst
    rss = server.rss_mb()
    ok = 0
    with requests.Session() as session:
        for _ in range(n):  # round-robin: one request lands on each connection
            r = session.get(public + "/", headers={"Host": "bench.idle"}, timeout=10)
            ok += r.status_code == 200 and r.content == b"ok"
    clients.stop()
    return {"case": f"{n} idle tunnels", "client": "serve", "direct": None, "tunnel": ok, "unit": "served",
            "ratio": ok / n, "registration_s": registered_s, "server_rss_mb": rss,
            "server_rss_growth_mb": rss - rss0, "client_rss_mb": None, "p50_ms": None, "p99_ms": None,
            "server_cpu_s": None, "client_cpu_s": None, "errors": n - ok}


def wait_tcp(port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


COLUMNS = ("case", "client", "direct", "tunnel", "ratio", "p50 ms", "p99 ms", "srv cpu s", "srv MB",
           "cli cpu s", "cli MB", "errors")


def print_row(row, header=False):
    if header:
        print(" | ".join(COLUMNS))
    print(" | ".join(cells(row)), flush=True)


def cells(row):
    if row["unit"] == "served":
        return [row["case"], row["client"], "-", f"{row['tunnel']}/{row['tunnel'] + row['errors']} served",
                "-", "-", "-", f"reg {row['registration_s']:.1f}s", fmt(row["server_rss_mb"]), "-", "-",
                str(row["errors"])]
    unit = " MB/s" if row["unit"] == "MB/s" else ""
    return [row["case"], row["client"], fmt(row["direct"]) + unit, fmt(row["tunnel"]) + unit,
            fmt(row["ratio"], ".2f"), fmt(row["p50_ms"], ".2f"), fmt(row["p99_ms"], ".2f"),
            fmt(row["server_cpu_s"], ".1f"), fmt(row["server_rss_mb"]), fmt(row["client_cpu_s"], ".1f"),
            fmt(row["client_rss_mb"]), str(row["errors"])]


def print_table(rows, backend):
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    print(f"backend: {backend}; direct = backend without tunnel; tunnel = through reverstd and the client; "
          f"rss in MB (peak during the case), cpu in seconds")
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
