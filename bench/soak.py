"""Soak: an hour of mixed load through reverstd on each QUIC backend; is anything left behind?

    python bench/soak.py [--minutes 60] [--backends qh3,aioquic] [--sample-seconds 10]
                         [--reconnect-seconds 30] [--workers 4] [--hold-uploads-during-stop]
                         [--debug-objects [--tracemalloc]] [--logs DIR]

Per QUIC backend, one after the other: our ``reverstd`` (with ``--management-address``)
and four tunnel clients, two per group: in group ``bench.expose``, ``reverst expose`` in
front of a local HTTP server (gevent's pywsgi serving tests/apps.py:app); in group
``bench.wsgi``, that same app through ``reverst wsgi`` (``reverst.client.serve``). One
client of each group runs for the whole soak (``expose``, ``wsgi``); the other
(``expose-cycled``, ``wsgi-cycled``) is stopped with SIGTERM and started again every
``--reconnect-seconds``, the two in turn, so tunnels keep leaving and registering while
requests flow. A stopping client refuses what still reaches it and reverstd can send only
uploads go on to the group whose client is being cycled: a stopping client says GOAWAY
first, so reverstd sends them to the group's other tunnel (``--hold-uploads-during-stop``
sends that group none from just before the SIGTERM until the client is back; see Cycler).

``--workers`` threads of this process send, back to back on kept-alive connections to
reverstd's public port (half of them to each group), a mix of: small GETs (/hello), large
downloads (/download/N, 5-20 MiB, every byte checked against the app's pattern),
streamed responses of unknown length (/stream/N, 256 KiB-4 MiB, chunked), server-sent
events (/sse), and uploads (POST /upload of 1-10 MiB random bytes, half of them chunked,
the SHA-256 the app computed checked against ours). Each starts with the largest download
and upload of the mix (FIRST_KINDS), so that the processes reach their high-water mark
within the warm-up.

Every ``--sample-seconds`` it prints a row: RSS and open fds (/proc/PID) of each process,
what reverstd's /status says of its tunnels (open streams, requests in flight), its
/metrics (requests in flight, public connections open, tunnels registered), and the
requests so far (ok, failed) and the reconnects. After the load it waits (at most 30 s)
for everything to close and takes a last sample. The verdict of a backend is PASS when
no request failed, every reconnect came back, the RSS of reverstd and of the two
long-lived clients grew by at most ``--rss-limit`` MB (10) from the end of warm-up
(``--warmup-seconds``, default 10% of the run, at least 30 s) to the end of the load
(each the median of 3 samples), reverstd's open fds are back to their count before the
load (+-2), and it has no open stream, no request in flight and no public connection left.

``--debug-objects`` runs reverstd and the long-lived clients under a hook that writes, at
every sample, the number of gc-tracked objects per type (and with ``--tracemalloc`` the
allocation sites that grew since warm-up); the report names the types that grew most.

The warnings, errors and tracebacks the processes logged are printed after the table
(``--logs DIR`` keeps every log). Results (every sample, the verdicts, the failures, the
reconnects, those log excerpts) go to bench/results/soak.json (``--json``). Every process
it starts is stopped on exit, errors, Ctrl-C and SIGTERM; every wait is bounded. Helpers
come from bench/run.py; exit status 1 when a backend failed.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import json
import os
import pathlib
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: processes, certificates, stacks)

sys.path.insert(0, str(bench.ROOT))
from tests.apps import BLOCK  # noqa: E402  (the byte pattern of /download and /stream)

MiB = 1024 * 1024
REQUEST_TIMEOUT = 60.0   # seconds any socket operation of a request may take
GRACE = 20               # --grace-period of the cycled clients (seconds)
SETTLE_TIMEOUT = 30.0    # after the load, how long everything may take to close
RSS_LIMIT_MB = 10.0
FD_SLACK = 2
GROUPS = ("bench.expose", "bench.wsgi")
LOGGED_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|failed|Traceback|no tunnel connection")  # reported
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:")  # how a log line (or gevent's report) starts
STEADY = ("expose", "wsgi")            # clients judged on their RSS (they run the whole soak)
CYCLED = ("expose-cycled", "wsgi-cycled")

#: tests/apps.py's app, plus GET /small (bench.SMALL), which run.py's readiness check asks for
APP = ("import sys\nsys.path.insert(0, '.')\nfrom tests.apps import app\n"
       f"app.add_url_rule('/small', 'small', lambda: {bench.SMALL!r})\n")

#: the local HTTP service behind ``reverst expose``: that app in gevent's pywsgi (HTTP/1.1,
#: keep-alive, chunked responses), monkey-patched for the app's time.sleep
LOCAL_SERVER = ("from gevent import monkey\nmonkey.patch_all()\n" + APP +
                "from gevent import pywsgi\n"
                "pywsgi.WSGIServer(('127.0.0.1', int(sys.argv[1])), app, log=None).serve_forever()\n")

#: the reverst command line, started by ``python -c`` (after the debug hook and the app, if any)
ENTRY = "from reverst.cli import _entry\n_entry()\n"

#: --debug-objects: a native thread writing one JSON line per interval: gc-tracked objects
#: per type, reverst Connection objects and their open streams, and (with tracemalloc) the
#: allocation sites grown since the first record after warm-up. Started before reverst
#: monkey-patches anything; it keeps the real time.sleep.
DEBUG_HOOK = '''
import collections as _c, gc as _gc, json as _json, threading as _threading, time as _time
def _soak_debug(out, interval, warmup, trace):
    if trace:
        import tracemalloc
        tracemalloc.start(1)
    sleep, started, base = _time.sleep, _time.monotonic(), [None]
    def dump():
        while True:
            sleep(interval)
            objects = _gc.get_objects()
            types = _c.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
            conns = [o for o in objects if type(o).__name__ == "Connection"
                     and type(o).__module__.startswith("reverst") and hasattr(o, "open_streams")]
            record = {"t": round(_time.monotonic() - started, 1), "objects": len(objects),
                      "connections": len(conns), "open_connections": sum(1 for c in conns if c.is_open),
                      "open_streams": sum(c.open_streams for c in conns if c.is_open),
                      "types": {k: n for k, n in types.items() if n >= 20}}
            del objects, conns
            if trace:
                snapshot = tracemalloc.take_snapshot()
                if base[0] is None and record["t"] >= warmup:
                    base[0] = snapshot
                if base[0] is not None:
                    record["grown_sites"] = [[str(s.traceback), s.size_diff, s.count_diff]
                                             for s in snapshot.compare_to(base[0], "lineno")[:15]]
                del snapshot
            with open(out, "a") as fh:
                fh.write(_json.dumps(record) + "\\n")
    _threading.Thread(target=dump, name="soak-debug", daemon=True).start()
'''


def launcher(args: list, code: str) -> list:
    """``python -m reverst.cli ARGS`` as ``python -c CODE+ENTRY ARGS`` (unchanged without code)."""
    assert args[1:3] == ["-m", "reverst.cli"], args
    return args if not code else [args[0], "-c", code + ENTRY, *args[3:]]


def stack_spec(quic: str, setup: bench.Setup, management_port: int, hook) -> bench.StackSpec:
    """run.py's stack of ``quic`` with a management address, and the four clients of the soak.
    ``hook(name)`` is the debug code for that process ("" for none)."""
    base = bench.our_stack_spec(quic, setup)
    expose = next(c for c in base.clients if c.name == "expose")

    def server(tunnel_port, http_port):
        return launcher(base.server_args(tunnel_port, http_port), hook("reverstd")) + [
            "-l", "info", "--no-access-log", "--management-address", f"127.0.0.1:{management_port}",
            "--drain-delay", "0s", "--trusted-proxies", "127.0.0.1"]

    def exposed(name):
        def args(tunnel):
            cmd = launcher(expose.args(tunnel), hook(name))
            return cmd[:-1] + ["--grace-period", f"{GRACE}s", cmd[-1]]
        return bench.ClientSpec(name, "bench.expose", args, expose.ready)

    def wsgi(name):
        def args(tunnel):  # expose's flags (tunnel, CA, auth, datagram size, backend) for `reverst wsgi`
            cmd = expose.args(tunnel)
            at = cmd.index("expose")
            flags = ["bench.wsgi" if a == "bench.expose" else a for a in cmd[at + 1:-1]]
            return launcher(cmd[:at] + ["wsgi", *flags, "--grace-period", f"{GRACE}s", "__main__:app"],
                            APP + hook(name))
        return bench.ClientSpec(name, "bench.wsgi", args, expose.ready)
    return bench.StackSpec(quic, server, [exposed("expose"), wsgi("wsgi"), exposed("expose-cycled"),
                                          wsgi("wsgi-cycled")], python=True)


# -- the load ----------------------------------------------------------------------------------
PATTERN = BLOCK * 2  # any slice of up to len(BLOCK) bytes at any offset of the pattern
UPLOAD_POOL = os.urandom(11 * MiB)


def read_pattern(response, size: int | None) -> int:
    """Read the body, every byte checked against the app's pattern; its length."""
    got = 0
    while chunk := response.read(len(BLOCK)):
        at = got % len(BLOCK)
        if chunk != PATTERN[at:at + len(chunk)]:
            raise ValueError(f"body differs from the pattern within bytes {got}-{got + len(chunk)}")
        got += len(chunk)
    if size is not None and got != size:
        raise ValueError(f"body of {got} bytes, expected {size}")
    return got


def get(conn, host: str, path: str):
    conn.request("GET", path, headers={"Host": host})
    response = conn.getresponse()
    if response.status != 200:
        raise ValueError(f"status {response.status}: {response.read(200)!r}")
    return response


def small(conn, host, rng) -> int:
    body = get(conn, host, "/hello").read()
    if body != b"Hello, World!":
        raise ValueError(f"body {body[:100]!r}")
    return len(body)


def patterned(path: str, low: int, high: int, chunked: bool):
    """A GET of ``path/N`` for N in [low, high]: N bytes of the app's pattern, with a
    Content-Length or (``chunked``) of unknown length, every byte checked."""
    def request(conn, host, rng) -> int:
        size = rng.randint(low, high)
        response = get(conn, host, f"{path}/{size}")
        framing = "chunked" if response.chunked else f"Content-Length {response.getheader('Content-Length')}"
        if framing != ("chunked" if chunked else f"Content-Length {size}"):
            raise ValueError(f"{path}/{size} arrived {framing}")
        return read_pattern(response, size)
    return request


def sse(conn, host, rng) -> int:
    response = get(conn, host, "/sse?delay=0.2")
    body = response.read()
    if not response.getheader("Content-Type", "").startswith("text/event-stream") or \
            body != b"data: first\n\ndata: second\n\n":
        raise ValueError(f"events {body[:100]!r} ({response.getheader('Content-Type')})")
    return len(body)


def upload(conn, host, rng) -> int:
    size = rng.randint(1 * MiB, 10 * MiB)
    at = rng.randrange(len(UPLOAD_POOL) - size)
    body = memoryview(UPLOAD_POOL)[at:at + size]
    chunked = rng.random() < 0.5
    if chunked:  # http.client sends an iterable of unknown length with Transfer-Encoding: chunked
        content = (body[i:i + 256 * 1024] for i in range(0, size, 256 * 1024))
    else:
        content = body
    conn.request("POST", "/upload", body=content, headers={"Host": host, "Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    answer = response.read()
    if response.status != 200:
        raise ValueError(f"status {response.status}: {answer[:200]!r}")
    got = json.loads(answer)
    if got != {"size": size, "sha256": hashlib.sha256(body).hexdigest()}:
        raise ValueError(f"{'chunked ' if chunked else ''}upload of {size} bytes: the app got {got}")
    return size


#: (kind, request, weight): what a worker sends, drawn at random for each request
KINDS = [("small", small, 40), ("download", patterned("/download", 5 * MiB, 20 * MiB, chunked=False), 8),
         ("stream", patterned("/stream", 256 * 1024, 4 * MiB, chunked=True), 10), ("sse", sse, 10),
         ("upload", upload, 8)]


#: What each worker sends first: the largest download and the largest upload of the mix, so
#: that the processes reach their high-water mark of buffered bytes (all workers on large
#: transfers at once) within the warm-up; RSS growth is judged from its end.
FIRST_KINDS = ("download", "upload")


class _Largest(random.Random):
    """The randomness of a first request: every size the largest of its range."""

    def randint(self, a: int, b: int) -> int:
        return b


def wall_clock() -> str:
    """Now as the processes' logs write it (local time, milliseconds)."""
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f",{int(now * 1000) % 1000:03d}"


class Load:
    """``workers`` threads sending the mix back to back, each on one kept-alive connection to
    reverstd's public port (a new one after a failure), alternating between the groups."""

    def __init__(self, port: int, workers: int, seed: int = 1):
        self.port = port
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.ok: collections.Counter = collections.Counter()
        self.failed: collections.Counter = collections.Counter()
        self.bytes = 0
        self.failures: list[dict] = []  # the first 100
        self.held: set[str] = set()  # hosts that get no new upload now (see hold_uploads)
        self.uploading: collections.Counter = collections.Counter()  # host -> uploads under way
        self.threads = [threading.Thread(target=self._work, args=(GROUPS[i % len(GROUPS)], random.Random(seed + i)),
                                         name=f"soak-worker-{i}", daemon=True) for i in range(workers)]

    def start(self) -> "Load":
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 2 * REQUEST_TIMEOUT) -> None:
        """No new request; the ones under way finish (each socket operation bounded)."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def hold_uploads(self, host: str, timeout: float = 2 * REQUEST_TIMEOUT) -> None:
        """No new upload to ``host``, and those under way finished (or ``timeout`` passed)."""
        with self.lock:
            self.held.add(host)
        deadline = time.monotonic() + timeout
        while self.uploading[host] and time.monotonic() < deadline:
            time.sleep(0.02)

    def release_uploads(self, host: str) -> None:
        with self.lock:
            self.held.discard(host)

    @property
    def counts(self) -> tuple[int, int]:
        return sum(self.ok.values()), sum(self.failed.values())

    def _work(self, host: str, rng: random.Random) -> None:
        names, requests, weights = zip(*KINDS)
        first = [names.index(name) for name in FIRST_KINDS]
        largest = _Largest(rng.random())
        conn = None
        while not self.stopping.is_set():
            if first:
                i, request_rng = first.pop(0), largest
            else:
                i, request_rng = rng.choices(range(len(KINDS)), weights)[0], rng
            with self.lock:
                while names[i] == "upload" and host in self.held:
                    i = rng.choices(range(len(KINDS)), weights)[0]
                self.uploading[host] += names[i] == "upload"
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
                moved = requests[i](conn, host, request_rng)
            except Exception as exc:  # noqa: BLE001 (every failure is counted and kept)
                if conn is not None:
                    conn.close()
                conn = None
                with self.lock:
                    self.failed[names[i]] += 1
                    if len(self.failures) < 100:
                        self.failures.append({"t": round(time.monotonic() - self.started, 1), "at": wall_clock(),
                                              "kind": names[i], "host": host, "error": f"{type(exc).__name__}: {exc}"})
            else:
                with self.lock:
                    self.ok[names[i]] += 1
                    self.bytes += moved
            finally:
                with self.lock:
                    self.uploading[host] -= names[i] == "upload"
        if conn is not None:
            conn.close()


class Cycler:
    """Every ``every`` seconds, one cycled client (in turn) is stopped with SIGTERM (it finishes
    its requests and closes its tunnel) and started again, until stopped.

    A stopping client says GOAWAY, serves what reverstd sent before it saw it, and then
    refuses what still reaches it (H3_REQUEST_REJECTED), which reverstd can send to another
    tunnel only without a body (it keeps no copy of one). A reverstd that honours GOAWAY
    sends nothing new to it, so no upload fails; ``uploads_during_stop=False`` (a peer that
    ignores GOAWAY, as the Go reverstd) sends the group no upload from just before the
    SIGTERM until the client is back."""

    def __init__(self, stack: bench.Stack, spec: bench.StackSpec, procs: bench.Procs, every: float, load: Load,
                 uploads_during_stop: bool = True):
        self.stack, self.procs, self.every, self.load = stack, procs, every, load
        self.started = load.started
        self.uploads_during_stop = uploads_during_stop
        self.specs = {c.name: c for c in spec.clients if c.name in CYCLED}
        self.events: list[dict] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-cycler", daemon=True)

    def start(self) -> "Cycler":
        if self.every > 0:
            self.thread.start()
        return self

    def stop(self) -> None:
        """After the cycle under way (stop and registration are bounded)."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(GRACE + 10 + bench.START_TIMEOUT + 10)

    @property
    def errors(self) -> list[dict]:
        return [e for e in self.events if e.get("error")]

    def _run(self) -> None:
        n = 0
        while not self.stopping.wait(self.every):
            self._cycle(CYCLED[n % len(CYCLED)])
            n += 1

    def _cycle(self, name: str) -> None:
        target = next(t for t in self.stack.targets if t.client == name)
        event = {"t": round(time.monotonic() - self.started, 1), "at": wall_clock(), "client": name}
        if not self.uploads_during_stop:
            self.load.hold_uploads(target.host)
        try:
            self._restart(target, event)
        finally:
            self.load.release_uploads(target.host)
        self.events.append(event)

    def _restart(self, target: bench.Target, event: dict) -> None:
        name = target.client
        old, began = target.proc, time.monotonic()
        old.popen.send_signal(signal.SIGTERM)
        try:
            event["exit_status"] = old.popen.wait(GRACE + 10)
        except subprocess.TimeoutExpired:
            event["error"] = f"still running {GRACE + 10} s after SIGTERM: killed"
        old.stop()  # (kills it if it still runs; closes its pipe)
        event["stop_s"] = round(time.monotonic() - began, 2)
        if event.get("exit_status"):
            event["error"] = f"exited with status {event['exit_status']} on SIGTERM"
        began = time.monotonic()
        target.proc = self.procs.start(old.name, self.specs[name].args(self.stack.tunnel))
        try:
            target.proc.wait_for(self.specs[name].ready)
            event["register_s"] = round(time.monotonic() - began, 2)
        except RuntimeError as exc:
            event["error"] = f"did not register again: {str(exc).splitlines()[0]}"


# -- sampling ----------------------------------------------------------------------------------
def fd_count(proc: bench.Proc) -> int | None:
    try:
        return len(os.listdir(f"/proc/{proc.popen.pid}/fd"))
    except OSError:
        return None


def management(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def reverstd_state(port: int) -> dict:
    """What reverstd's /metrics and /status say is open now."""
    totals = collections.Counter()
    for family in text_string_to_metric_families(management(port, "/metrics")):
        for s in family.samples:
            totals[s.name] += s.value
    tunnels = [t for g in json.loads(management(port, "/status"))["groups"] for t in g["tunnels"]]
    return {"open_streams": sum(t["open_streams"] for t in tunnels),
            "in_flight_status": sum(t["in_flight"] for t in tunnels),
            "in_flight": int(totals["reverst_tunnel_group_requests_in_flight"]),
            "public_connections": int(totals["reverst_public_connections_open"]),
            "tunnels": int(totals["reverst_tunnel_group_active_conn"])}


def sample(t: float, procs: dict, management_port: int, load: Load | None, cycler: Cycler | None) -> dict:
    row = {"t": round(t, 1), "rss_mb": {n: round(p.rss_mb(), 1) for n, p in procs.items()},
           "fds": {n: fd_count(p) for n, p in procs.items()}}
    try:
        row.update(reverstd_state(management_port))
    except (OSError, ValueError, KeyError) as exc:
        row["management_error"] = f"{type(exc).__name__}: {exc}"
    row["ok"], row["failed"] = load.counts if load else (0, 0)
    row["mb_moved"] = round(load.bytes / 1e6) if load else 0
    row["reconnects"] = len(cycler.events) if cycler else 0
    return row


def quiet(row: dict, baseline: dict) -> bool:
    """Nothing open in reverstd beyond what it had before the load."""
    fds = row["fds"]["reverstd"]
    return "management_error" not in row and row["open_streams"] == row["in_flight"] == \
        row["in_flight_status"] == row["public_connections"] == 0 and row["tunnels"] == baseline["tunnels"] and \
        fds is not None and abs(fds - baseline["fds"]["reverstd"]) <= FD_SLACK


#: the printed table: (heading, sample -> cell)
def _cell(value, spec="") -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = [("t s", lambda r: f"{r['t']:.0f}")] + \
    [(f"{n} MB", lambda r, n=n: _cell(r["rss_mb"].get(n), ".1f"))
     for n in ("reverstd", *STEADY, *CYCLED, "local")] + \
    [(f"{n} fds", lambda r, n=n: _cell(r["fds"].get(n))) for n in ("reverstd", *STEADY)] + \
    [(h, lambda r, k=k: _cell(r.get(k))) for h, k in (
        ("streams", "open_streams"), ("in flight", "in_flight"), ("public conns", "public_connections"),
        ("tunnels", "tunnels"), ("ok", "ok"), ("failed", "failed"), ("MB moved", "mb_moved"),
        ("reconnects", "reconnects"))]


def table_line(cells) -> str:
    return " ".join(str(c).rjust(max(len(h), 6)) for c, (h, _) in zip(cells, COLUMNS))


def logged_problems(lines: list[str], most: int = 50) -> list[str]:
    """The warnings, errors and tracebacks in a log, each with its continuation lines."""
    blocks: list[str] = []
    keep = False
    for line in lines:
        if TIMESTAMP.match(line) or line.startswith("Traceback"):
            keep = bool(LOGGED_PROBLEM.search(line))
            if keep:
                if len(blocks) == most:
                    break
                blocks.append(line)
        elif keep:
            blocks[-1] += "\n" + line
    return blocks


# -- the verdict ---------------------------------------------------------------------------------
def growth(samples: list[dict], name: str, warmup: float) -> dict:
    """RSS of ``name`` at the end of warm-up and at the end of the load (medians of 3 samples)."""
    loaded = [s for s in samples if s["t"] > 0]
    after = [s for s in loaded if s["t"] >= warmup] or loaded[-1:]
    start = statistics.median(s["rss_mb"][name] for s in after[:3])
    end = statistics.median(s["rss_mb"][name] for s in loaded[-3:])
    return {"start_mb": samples[0]["rss_mb"][name], "warm_mb": round(start, 1), "end_mb": round(end, 1),
            "growth_mb": round(end - start, 1), "peak_mb": max(s["rss_mb"][name] for s in samples)}


def judge(samples: list[dict], baseline: dict, final: dict, load: Load, cycler: Cycler, warmup: float,
          rss_limit: float) -> dict:
    ok, failed = load.counts
    rss = {n: growth(samples, n, warmup) for n in ("reverstd", *STEADY, "local")}
    problems = []
    if failed:
        problems.append(f"{failed} requests failed")
    if cycler.errors:
        problems.append(f"{len(cycler.errors)} reconnects went wrong")
    for name in ("reverstd", *STEADY):
        if rss[name]["growth_mb"] > rss_limit:
            problems.append(f"{name} RSS grew by {rss[name]['growth_mb']} MB after warm-up")
    if not quiet(final, baseline):
        problems.append("left open at the end: " + ", ".join(
            f"{k} {final.get(k)}" for k in ("open_streams", "in_flight", "in_flight_status", "public_connections",
                                            "tunnels", "management_error") if final.get(k)) +
            f" fds {baseline['fds']['reverstd']} -> {final['fds']['reverstd']}")
    return {"pass": not problems, "problems": problems, "rss": rss, "requests": {"ok": ok, "failed": failed},
            "per_kind": {k: {"ok": load.ok[k], "failed": load.failed[k]} for k, _, _ in KINDS},
            "mb_moved": round(load.bytes / 1e6), "reconnects": len(cycler.events),
            "fds": {n: {"baseline": baseline["fds"][n], "end": final["fds"][n]} for n in baseline["fds"]},
            "end": {k: final.get(k) for k in ("open_streams", "in_flight", "in_flight_status", "public_connections",
                                               "tunnels")}}


def verdict_line(quic: str, v: dict) -> str:
    r, fds = v["rss"]["reverstd"], v["fds"]["reverstd"]
    clients = ", ".join(f"{n} {v['rss'][n]['warm_mb']}->{v['rss'][n]['end_mb']}" for n in STEADY)
    return (f"{quic}: {'PASS' if v['pass'] else 'FAIL'}: reverstd RSS {r['start_mb']} MB at start, "
            f"{r['warm_mb']} after warm-up, {r['end_mb']} at the end ({r['growth_mb']:+} MB, peak {r['peak_mb']}); "
            f"clients {clients} MB; reverstd fds {fds['baseline']} -> {fds['end']}; open streams "
            f"{v['end']['open_streams']}, in flight {v['end']['in_flight']}; requests {v['requests']['ok']} ok, "
            f"{v['requests']['failed']} failed, {v['mb_moved']} MB moved; {v['reconnects']} reconnects"
            + ("" if v["pass"] else "; " + "; ".join(v["problems"])))


def debug_summary(path: pathlib.Path, warmup: float, top: int = 12) -> dict | None:
    """The hook's records: object counts at warm-up and at the end, the types that grew most."""
    if not path.exists():
        return None
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # (the line being written)
            pass
    if not records:
        return None
    first = next((r for r in records if r["t"] >= warmup), records[0])
    last = records[-1]
    grown = sorted(((n - first["types"].get(k, 0), k) for k, n in last["types"].items()), reverse=True)
    return {"objects": [first["objects"], last["objects"]], "at_s": [first["t"], last["t"]],
            "connections": [first["connections"], last["connections"]],
            "open_connections": last["open_connections"], "open_streams": last["open_streams"],
            "grown_types": [[k, d] for d, k in grown[:top] if d > 0], "grown_sites": last.get("grown_sites")}


def run_load(quic: str, seconds: float, tmp: pathlib.Path, procs: bench.Procs, hook, *, warmup: float,
             sample_seconds: float, reconnect_seconds: float, workers: int, uploads_during_stop: bool,
             out) -> tuple:
    """Start the stack, sample it at rest, under load for ``seconds``, and once it settled:
    (samples, final sample, the load, the cycler)."""
    ca, cert, key = bench.make_certs(tmp / "certs")
    local_port = bench.free_port()
    local = procs.start("local", [sys.executable, "-c", LOCAL_SERVER, str(local_port)])
    local.wait_listening(local_port)
    setup = bench.Setup(tmp, ca, cert, key, bench.Backend("tests.apps", local_port, local_port), 1452, 100)
    management_port = bench.free_port()
    spec = stack_spec(quic, setup, management_port, hook)
    stack = bench.launch_stack(spec, procs)

    def watched():
        return {"reverstd": stack.server, **{t.client: t.proc for t in stack.targets}, "local": local}
    out(f"{quic}: reverstd and {len(stack.targets)} tunnel clients up; {seconds:.0f} s of load by {workers} "
        f"workers, warm-up {warmup:.0f} s, a reconnect every {reconnect_seconds:.0f} s")
    baseline = sample(0, watched(), management_port, None, None)
    deadline = time.monotonic() + SETTLE_TIMEOUT  # the readiness checks' connections close
    while baseline.get("public_connections") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        baseline = sample(0, watched(), management_port, None, None)
    out(table_line([h for h, _ in COLUMNS]))
    out(table_line([f(baseline) for _, f in COLUMNS]))
    samples = [baseline]
    load = Load(stack.http_port, workers).start()
    cycler = Cycler(stack, spec, procs, reconnect_seconds, load, uploads_during_stop).start()
    try:
        k = 1
        while k * sample_seconds <= seconds + 1e-6:
            time.sleep(max(0.0, load.started + k * sample_seconds - time.monotonic()))
            samples.append(sample(time.monotonic() - load.started, watched(), management_port, load, cycler))
            out(table_line([f(samples[-1]) for _, f in COLUMNS]))
            for name in ("reverstd", *STEADY, "local"):
                if not watched()[name].alive():
                    raise watched()[name].failure("exited during the soak")
            k += 1
    finally:
        load.stop()
        cycler.stop()
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        final = sample(time.monotonic() - load.started, watched(), management_port, load, cycler)
        if quiet(final, baseline) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    final["settled_s"] = round(final["t"] - samples[-1]["t"], 1)
    out(table_line([f(final) for _, f in COLUMNS]) + f"   (after the load, {final['settled_s']} s later)")
    return samples, final, load, cycler


# -- one backend ---------------------------------------------------------------------------------
def soak(quic: str, seconds: float, *, warmup: float = 30.0, sample_seconds: float = 10.0,
         reconnect_seconds: float = 30.0, workers: int = 4, uploads_during_stop: bool = True,
         rss_limit: float = RSS_LIMIT_MB,
         debug_objects: bool = False, tracemalloc: bool = False, tmp: pathlib.Path | None = None,
         logs_dir: pathlib.Path | None = None, out=print) -> dict:
    """Soak one QUIC backend for ``seconds`` of load; the samples and the verdict (every
    process's log written to ``logs_dir`` when given)."""
    made_tmp = tmp is None  # (then removed at the end)
    tmp = pathlib.Path(tmp or tempfile.mkdtemp(prefix="reverst-soak-"))
    tmp.mkdir(parents=True, exist_ok=True)

    def hook(name):
        if not debug_objects or name in CYCLED:
            return ""
        return DEBUG_HOOK + f"_soak_debug({str(tmp / f'debug-{name}.jsonl')!r}, {sample_seconds}, {warmup}, " \
                            f"{tracemalloc})\n"

    with bench.Procs() as procs:
        try:
            samples, final, load, cycler = run_load(quic, seconds, tmp, procs, hook, warmup=warmup,
                                                    sample_seconds=sample_seconds,
                                                    reconnect_seconds=reconnect_seconds, workers=workers,
                                                    uploads_during_stop=uploads_during_stop, out=out)
        finally:
            logs = {}  # each process's log: the cycled clients' generations as name#2, name#3...
            for proc in procs:
                key = proc.name.split("-", 1)[1] if proc.name.startswith(f"{quic}-") else proc.name
                n = sum(1 for k in logs if k.split("#")[0] == key)
                logs[f"{key}#{n + 1}" if n else key] = proc.lines
            if logs_dir is not None:
                logs_dir.mkdir(parents=True, exist_ok=True)
                for name, lines in logs.items():
                    (logs_dir / f"{quic}-{name}.log").write_text("\n".join(lines) + "\n")
            debug = {n: debug_summary(tmp / f"debug-{n}.jsonl", warmup) for n in ("reverstd", *STEADY)} \
                if debug_objects else None
    if made_tmp:  # (its processes are stopped)
        shutil.rmtree(tmp, ignore_errors=True)
    baseline = samples[0]
    verdict = judge(samples, baseline, final, load, cycler, warmup, rss_limit)
    result = {"backend": quic, "seconds": seconds, "warmup_s": warmup, "sample_s": sample_seconds,
              "reconnect_s": reconnect_seconds, "workers": workers, "uploads_during_stop": uploads_during_stop,
              "verdict": verdict, "samples": samples,
              "final": final, "failures": load.failures, "reconnect_events": cycler.events}
    if debug_objects:
        result["debug"] = debug
        for name, summary in result["debug"].items():
            if summary:
                out(f"{quic} {name}: gc objects {summary['objects'][0]} at {summary['at_s'][0]} s -> "
                    f"{summary['objects'][1]} at {summary['at_s'][1]} s; reverst Connection objects "
                    f"{summary['connections'][0]} -> {summary['connections'][1]} ({summary['open_connections']} "
                    f"open, {summary['open_streams']} open streams); grown most: "
                    + ", ".join(f"{k} +{d}" for k, d in summary["grown_types"][:8]))
                for site, size, count in (summary["grown_sites"] or [])[:5]:
                    out(f"    {site}: {size / 1e6:+.2f} MB, {count:+} blocks")
    result["logged_problems"] = {n: found for n, lines in logs.items() if (found := logged_problems(lines))}
    for f in load.failures[:10]:
        out(f"  failed at {f['t']} s ({f['at']}): {f['kind']} via {f['host']}: {f['error']}")
    for name, lines in result["logged_problems"].items():
        for block in lines[:5]:
            out(f"  {name} logged: " + "\n    ".join(block.splitlines()[-12:]))
    for e in cycler.errors:
        out(f"  reconnect of {e['client']} at {e['t']} s: {e['error']}")
    out(verdict_line(quic, verdict))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60, help="minutes of load per backend (default 60)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated, one after the other ({','.join(bench.OUR_BACKENDS)}; "
                             f"default: every one that imports)")
    parser.add_argument("--sample-seconds", type=float, default=10)
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help="RSS growth is judged from then on (default: 10%% of the run, at least 30)")
    parser.add_argument("--reconnect-seconds", type=float, default=30,
                        help="a cycled client restarts this often (0: never)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent requests (half per group)")
    parser.add_argument("--hold-uploads-during-stop", dest="uploads_during_stop", action="store_false",
                        help="send no upload to a group while its cycled client stops (see Cycler)")
    parser.add_argument("--rss-limit", type=float, default=RSS_LIMIT_MB, help="MB of growth allowed after warm-up")
    parser.add_argument("--debug-objects", action="store_true",
                        help="gc object counts per type from reverstd and the long-lived clients")
    parser.add_argument("--tracemalloc", action="store_true", help="with --debug-objects: allocation sites too")
    parser.add_argument("--logs", type=pathlib.Path, default=None, metavar="DIR",
                        help="write every process's log to DIR/<backend>-<process>.log")
    parser.add_argument("--json", default=str(bench.ROOT / "bench" / "results" / "soak.json"))
    args = parser.parse_args()
    seconds = args.minutes * 60
    warmup = args.warmup_seconds if args.warmup_seconds is not None else max(30.0, seconds / 10)
    backends = bench.our_backends(args.backends)
    if not backends:
        sys.exit("no QUIC backend to soak")
    bench.interrupt_on_sigterm()
    info = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": bench.machine_info(),
            "versions": {k: v for k, v in bench.quic_versions().items() if v}, "args": vars(args), "results": {}}
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    verdicts = []
    for quic in backends:
        try:
            result = soak(quic, seconds, warmup=warmup, sample_seconds=args.sample_seconds,
                          reconnect_seconds=args.reconnect_seconds, workers=args.workers,
                          uploads_during_stop=args.uploads_during_stop, rss_limit=args.rss_limit,
                          debug_objects=args.debug_objects, tracemalloc=args.tracemalloc, logs_dir=args.logs,
                          out=lambda line: print(line, flush=True))
            verdicts.append(verdict_line(quic, result["verdict"]))
        except RuntimeError as exc:
            result = {"backend": quic, "verdict": {"pass": False, "problems": [str(exc)]}}
            verdicts.append(f"{quic}: FAIL: {str(exc).splitlines()[0]}")
            print(f"{quic}: {exc}", flush=True)
        info["results"][quic] = result
        out.write_text(json.dumps(info, indent=2, default=str))  # after each backend (an interrupted run keeps it)
    print()
    for line in verdicts:
        print(line)
    print(f"\nwritten to {out}")
    if not all(r["verdict"]["pass"] for r in info["results"].values()):
        sys.exit(1)


if __name__ == "__main__":
    bench.run_cli(main)
