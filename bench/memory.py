"""Where the tunnel processes' memory is at rest: one command, two tables.

    python bench/memory.py                       # every QUIC backend that imports, and Go when present
    python bench/memory.py --backends qh3 --requests 500

1. **Per process**, for each stack of bench/run.py (the Go pair, and per QUIC backend a
   ``reverstd`` with an ``expose`` client and a WSGI client): after ``--requests`` small GETs
   through each client and a second's rest, from ``/proc/PID/smaps_rollup``: RSS, PSS (shared
   pages divided among the processes that map them), the file-backed shared part (libraries
   such as libpython, libcrypto, qh3's native core: counted in each process's RSS, present
   once in memory) and the private part (the Python heap and native allocations).
2. **An import ladder** per QUIC backend: the RSS of a fresh interpreter after each group of
   imports that a tunnel process makes, in the order it makes them, so the share of the
   interpreter, each library and our own modules can be read off.

Processes, certificates and the backend come from run.py; every process is stopped on exit,
errors, Ctrl-C and SIGTERM; every wait is bounded (20 s to start, 10 s per request).
"""
from __future__ import annotations

import argparse
import http.client
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: processes, certificates, stacks)

#: The imports of a tunnel process, in groups, in the order it makes them.
LADDER = """
import importlib, json, sys
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * {page} / 1e6
steps = [("interpreter (with site)", [])] + json.loads(sys.argv[1])
for label, modules in steps:
    for m in modules:
        importlib.import_module(m)
    print(json.dumps([label, rss(), len(sys.modules)]), flush=True)
"""


def ladder_steps(backend: str) -> list:
    quic = {"qh3": ["qh3", "qh3.quic.connection", "qh3.h3.connection"],
            "aioquic": ["aioquic.quic.connection", "aioquic.h3.connection"]}[backend]
    return [
        ("gevent", ["gevent", "gevent.socket", "gevent.event", "gevent.queue", "gevent.server"]),
        ("ssl", ["ssl"]),
        (f"{backend} (QUIC + HTTP/3)", quic),
        ("click", ["click"]),
        ("httptools, msgpack", ["httptools", "msgpack"]),
        ("reverst: transport, HTTP/3, CLI", ["reverst.cli", f"reverst.quic._{backend}", "reverst._transport",
                                              "reverst.http3"]),
        ("reverst: expose + client", ["reverst.proxy", "reverst.client"]),
        ("PyYAML (reverstd)", ["yaml"]),
        ("prometheus_client (reverstd --management-address)", ["prometheus_client"]),
        ("reverst: server", ["reverst.server", "reverst.sources"]),
    ]


def smaps(pid: int) -> dict:
    """MB figures of /proc/PID/smaps_rollup (0 where the process is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[name] = int(parts[0]) / 1024
        with open(f"/proc/{pid}/status") as fh:
            threads = next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))
    except OSError:
        return {"rss": 0.0, "pss": 0.0, "shared": 0.0, "private": 0.0, "threads": 0}
    return {"rss": fields.get("Rss", 0.0), "pss": fields.get("Pss", 0.0),
            "shared": fields.get("Shared_Clean", 0.0) + fields.get("Shared_Dirty", 0.0),
            "private": fields.get("Private_Clean", 0.0) + fields.get("Private_Dirty", 0.0), "threads": threads}


def small_gets(http_port: int, host: str, count: int) -> None:
    """``count`` small GETs on one kept-alive connection; each must answer 200."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    try:
        for _ in range(count):
            conn.request("GET", "/small", headers={"Host": host})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET /small through {host}: {response.status}")
    finally:
        conn.close()


def ladder(backend: str) -> list:
    out = subprocess.run([sys.executable, "-c", LADDER.format(page=bench.PAGE), json.dumps(ladder_steps(backend))],
                         capture_output=True, text=True, timeout=120, cwd=bench.ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"import ladder ({backend}): {out.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in out.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=None, help="our QUIC backends, comma-separated (default: all)")
    parser.add_argument("--go-peers", type=pathlib.Path, default=bench.DEFAULT_GO_PEERS, metavar="DIR")
    parser.add_argument("--requests", type=int, default=200, help="small GETs through each client first")
    parser.add_argument("--json", default=str(bench.ROOT / "bench" / "results" / "memory.json"))
    args = parser.parse_args()
    backends = bench.our_backends(args.backends)
    go_problem = bench.go_peer_problem(args.go_peers)
    if go_problem:
        print(f"Go rows skipped: {go_problem}", flush=True)
    bench.interrupt_on_sigterm()

    rows = []
    skipped: dict = {}
    with bench.stack_specs("reverst-memory-", args.go_peers, go_problem, backends, 100) as (procs, specs):
        for stack in bench.launch_stacks(specs, procs, skipped):
            for target in stack.targets:
                small_gets(stack.http_port, target.host, args.requests)
            time.sleep(1.0)
            server = smaps(stack.server.popen.pid)
            rows.append({"stack": stack.name, "process": "reverstd", **server})
            for target in stack.targets:
                client = smaps(target.proc.popen.pid)
                rows.append({"stack": stack.name, "process": target.client, **client})
                rows.append({"stack": stack.name, "process": f"reverstd + {target.client}",
                             **{k: server[k] + client[k] for k in server}})
            stack.stop()
        if skipped:
            print(f"stacks that did not start: {skipped}", flush=True)

    print(f"\nAt rest after {args.requests} small GETs through each client (MB, /proc/PID/smaps_rollup):\n")
    print("| stack | process | RSS | PSS | shared (file-backed) | private | threads |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stack']} | {r['process']} | {r['rss']:.1f} | {r['pss']:.1f} | {r['shared']:.1f} | "
              f"{r['private']:.1f} | {r['threads']} |")
    ladders = {b: ladder(b) for b in backends}
    for b, steps in ladders.items():
        print(f"\nImport ladder, {b} (RSS of a fresh `{pathlib.Path(sys.executable).name}` after each step):\n")
        print("| step | + MB | RSS MB | modules |")
        print("|---|---|---|---|")
        last = 0.0
        for label, rss, modules in steps:
            print(f"| {label} | {rss - last:+.1f} | {rss:.1f} | {modules} |")
            last = rss
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": bench.machine_info(), "versions": bench.quic_versions(),
                               "requests": args.requests, "rows": rows, "ladders": ladders}, indent=2))
    print(f"\nwritten to {out}")
    if skipped:
        sys.exit(1)


if __name__ == "__main__":
    bench.run_cli(main)
