"""WebSocket echo through reverst against the echo server reached directly: round trips/s, MB/s.

    python bench/ws_echo.py [--backends qh3,aioquic] [--duration 5] [--bulk-mb 50] [--sockets 16]
                              [--repeat 1] [--json bench/results/ws_echo.json]

Targets, each a row: ``direct``, a ``websockets`` echo server (its own process) reached
without a tunnel; then, per QUIC backend, one ``reverstd`` with two tunnel clients:
``expose``, ``reverst expose`` in front of that echo server, and ``wsgi``, a flask-sock
echo app (tests/ws_apps.py) served through ``reverst.client.serve``. The visitor is the
``websockets`` asyncio client in this process, connecting to reverstd's public port with
the group's Host (no compression, no pings). Cases:

* ``rtt 32B``: one socket sends a 32-byte message and waits for its echo, for --duration s;
* ``rtt 32B xN``: the same on --sockets sockets at once (aggregate round trips/s);
* ``bulk 1MB``: --bulk-mb messages of 1 MB (random bytes), at most 4 in flight, each
  echoed back; MB/s of payload one way (p50/p99: from sending a message to its echo).

Each case runs --repeat times, the targets in a rotated order per repetition; the table
shows medians, the ratio to ``direct``, p50/p99 round-trip time and the CPU seconds of
reverstd and of the tunnel client (for ``direct``: of the echo server). The JSON holds the
machine, the versions, the median rows and every raw run. Every process it starts is
stopped on exit, errors, Ctrl-C and SIGTERM; every wait is bounded. Helpers come from
bench/run.py; exit status 1 when a stack failed to start or a run failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: processes, certificates, stacks, the report)

from websockets.asyncio.client import connect  # noqa: E402

SMALL_MESSAGE = b"x" * 32
MB = 1024 * 1024
WINDOW = 4  # bulk messages in flight
CONNECT_TIMEOUT = 10.0

#: a websockets echo server on ws://127.0.0.1:PORT/echo; GET /small answers bench.SMALL (readiness)
ECHO_SERVER = f'''
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(ws):
    async for message in ws:
        await ws.send(message)
def small(connection, request):
    if request.path == "/small":
        return connection.respond(200, {bench.SMALL.decode()!r})
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), process_request=small, max_size=None,
                     ping_interval=None, compression=None):
        print("ready", file=sys.stderr, flush=True)
        await asyncio.Future()
asyncio.run(main())
'''

#: bench.WSGI_APP (reverst.client.serve, the same arguments) serving the flask-sock echo app of
#: tests/ws_apps.py, plus GET /small for bench.wait_routed, instead of the HTTP backend app
WSGI_ECHO = "\n".join(
    f"from tests.ws_apps import app\napp.add_url_rule('/small', 'small', lambda: {bench.SMALL!r})"
    if line.startswith("exec(") else line for line in bench.WSGI_APP.splitlines())
assert "tests.ws_apps" in WSGI_ECHO, "bench.WSGI_APP no longer defines its app with exec(...)"


def stack_spec(quic: str, setup: bench.Setup) -> bench.StackSpec:
    """run.py's stack of ``quic`` (expose in front of setup.backend, the echo server), its WSGI
    client serving the flask-sock echo app instead of the HTTP backend app."""
    spec = bench.our_stack_spec(quic, setup)
    wsgi = next(c for c in spec.clients if c.name == "wsgi")
    wsgi.args = lambda tunnel: [sys.executable, "-c", WSGI_ECHO, tunnel, wsgi.group, str(setup.ca),
                                str(setup.datagram_size), str(setup.app_threads), quic]
    return spec


# -- the cases (the visitor) -------------------------------------------------------------------
def percentiles(seconds: list[float]) -> dict:
    seconds = sorted(seconds)
    return {"p50_ms": 1000 * seconds[len(seconds) // 2], "p99_ms": 1000 * seconds[int(len(seconds) * 0.99)]}


def opener(port: int, host: str | None):
    """A function opening one echo WebSocket through ``port``, with Host ``host`` (None: direct)."""
    uri = f"ws://{host or '127.0.0.1'}:{port}/echo"
    return lambda: connect(uri, host="127.0.0.1", port=port, proxy=None, compression=None, max_size=None,
                           ping_interval=None, open_timeout=CONNECT_TIMEOUT, close_timeout=5)


async def round_trips(open_ws, sockets: int, duration: float) -> dict:
    """``sockets`` sockets, each sending SMALL_MESSAGE and awaiting its echo until ``duration`` is up."""
    rtts: list[float] = []

    async def one(ws, deadline):
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await ws.send(SMALL_MESSAGE)
            if await ws.recv() != SMALL_MESSAGE:
                raise RuntimeError("the echo differs from the message")
            rtts.append(time.perf_counter() - start)

    opened = await asyncio.gather(*(open_ws() for _ in range(sockets)), return_exceptions=True)
    wss = [ws for ws in opened if not isinstance(ws, BaseException)]
    try:
        for ws in opened:
            if isinstance(ws, BaseException):
                raise ws
        start = time.perf_counter()
        await asyncio.gather(*(one(ws, start + duration) for ws in wss))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(ws.close() for ws in wss), return_exceptions=True)
    return {"value": len(rtts) / elapsed, "messages": len(rtts), **percentiles(rtts)}


async def bulk(open_ws, total_mb: int) -> dict:
    """``total_mb`` 1 MB messages out, each echoed back, WINDOW in flight; MB/s one way."""
    payload = os.urandom(MB)
    window = asyncio.Semaphore(WINDOW)
    sent: list[float] = []

    async def send_all(ws):
        for _ in range(total_mb):
            await window.acquire()
            sent.append(time.perf_counter())
            await ws.send(payload)

    async with open_ws() as ws:
        start = time.perf_counter()
        sender = asyncio.create_task(send_all(ws))
        rtts = []
        try:
            for i in range(total_mb):
                if await ws.recv() != payload:
                    raise RuntimeError(f"echo {i + 1} differs from the message")
                rtts.append(time.perf_counter() - sent[i])
                window.release()
            await sender
        finally:
            sender.cancel()
        elapsed = time.perf_counter() - start
    return {"value": total_mb * MB / 1e6 / elapsed, "messages": total_mb, **percentiles(rtts)}


def run_case(case: str, target: dict, args) -> dict:
    row = {"case": case, "stack": target["stack"], "client": target["client"],
           "unit": "MB/s" if case.startswith("bulk") else "rt/s"}
    open_ws = opener(target["port"], target["host"])
    work = bulk(open_ws, args.bulk_mb) if case.startswith("bulk") else \
        round_trips(open_ws, args.sockets if "x" in case else 1, args.duration)
    try:
        with bench.Sampler(target["procs"]) as sampler:
            row.update(asyncio.run(asyncio.wait_for(work, args.duration + args.bulk_mb + 60)))
    except Exception as exc:  # noqa: BLE001  (a failed run is a row; the others go on)
        return {**row, "failed": f"{type(exc).__name__}: {exc}"}
    cpu = list(sampler.cpu.values())
    return {**row, "server_cpu_s": cpu[0], "client_cpu_s": cpu[1] if len(cpu) > 1 else None}


# -- the report --------------------------------------------------------------------------------
def median_rows(runs: list[dict]) -> list[dict]:
    """bench.median_rows (medians per case, stack, client), ``ratio`` to the case's direct row."""
    rows = bench.median_rows(runs)
    direct = {r["case"]: r["value"] for r in rows if r["stack"] == "direct" and r.get("value")}
    for row in rows:
        row.setdefault("value", None)  # absent when every run failed
        row["ratio"] = row["value"] / direct[row["case"]] if row["value"] and row["case"] in direct else None
    return rows


def print_table(rows: list[dict], info: dict) -> None:
    def fmt(value, spec, width):
        return f"{'-' if value is None else format(value, spec):>{width}}"
    print(f"\n{info['machine']['nproc']} cpus, load {info['machine']['loadavg_at_start'][0]:.1f} at start; "
          f"{info['duration_s']:g} s per rtt run, bulk {info['bulk_mb']} x 1 MB; median of {info['repeat']} "
          f"run(s); {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; cpu s: reverstd / tunnel "
          f"client (direct: the echo server)")
    print(f"{'case':<12} {'stack':<8} {'client':<7} {'value':>15} {'vs direct':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'srv cpu':>7} {'cli cpu':>7}")
    for r in rows:
        value = "FAILED" if r["value"] is None else f"{r['value']:.1f} {r['unit']}"
        print(f"{r['case']:<12} {r['stack']:<8} {r['client']:<7} {value:>15} {fmt(r['ratio'], '.2f', 8)}x "
              f"{fmt(r.get('p50_ms'), '.2f', 7)} {fmt(r.get('p99_ms'), '.2f', 7)} {fmt(r.get('server_cpu_s'), '.1f', 7)} "
              f"{fmt(r.get('client_cpu_s'), '.1f', 7)}")
    for name, why in info["skipped"].items():
        print(f"skipped stack {name}: {why.splitlines()[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=None, help="our QUIC backends, comma-separated (default: all)")
    parser.add_argument("--duration", type=float, default=5, help="seconds per round-trip run (default 5)")
    parser.add_argument("--bulk-mb", type=int, default=50, help="1 MB messages per bulk run (default 50)")
    parser.add_argument("--sockets", type=int, default=16, help="sockets of the concurrent case (0: skip)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case and target; medians shown")
    parser.add_argument("--json", default=str(bench.ROOT / "bench" / "results" / "ws_echo.json"))
    args = parser.parse_args()
    if args.repeat < 1 or args.bulk_mb < 1 or args.duration <= 0 or args.sockets < 0:
        parser.error("--repeat and --bulk-mb must be at least 1, --duration above 0, --sockets not negative")
    backends = bench.our_backends(args.backends)
    cases = ["rtt 32B"] + ([f"rtt 32B x{args.sockets}"] if args.sockets else []) + ["bulk 1MB"]
    info = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": bench.machine_info(),
            "duration_s": args.duration, "bulk_mb": args.bulk_mb, "sockets": args.sockets,
            "repeat": args.repeat, "versions": {k: v for k, v in bench.quic_versions().items() if v},
            "skipped": {}}
    bench.interrupt_on_sigterm()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="reverst-websocket-"))
    runs = []
    try:
        with bench.Procs() as procs:
            ca, cert, key = bench.make_certs(tmp / "certs")
            port = bench.free_port()
            echo = procs.start("echo", [sys.executable, "-c", ECHO_SERVER, str(port)])
            echo.wait_for("^ready$")
            setup = bench.Setup(tmp, ca, cert, key, bench.Backend("websockets", port, port), 1452, 100)
            stacks = bench.launch_stacks([stack_spec(b, setup) for b in backends], procs, info["skipped"])
            targets = [{"stack": "direct", "client": "-", "port": port, "host": None, "procs": [echo]}] + [
                {"stack": s.name, "client": t.client, "port": s.http_port, "host": t.host,
                 "procs": [s.server, t.proc]} for s in stacks for t in s.targets]
            for case in cases:
                for rep in range(args.repeat):
                    for target in [targets[0]] + bench.rotated(targets[1:], rep):
                        stack = next((s for s in stacks if s.name == target["stack"]), None)
                        if stack is None or stack.check_alive():
                            runs.append({**run_case(case, target, args), "rep": rep})
                            r = runs[-1]
                            print(f"{case} #{rep + 1} | {target['stack']} {target['client']} | "
                                  + (r["failed"] if "failed" in r else
                                     f"{r['value']:.1f} {r['unit']}, p50 {r['p50_ms']:.2f} ms"), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = median_rows(runs)
    print_table(rows, info)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "rows": rows, "runs": runs}, indent=2))
    print(f"\nwritten to {out}")
    if info["skipped"] or any("failed" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (every process it started is stopped)")
