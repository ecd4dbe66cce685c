"""What N reverstd processes sharing one public port (``--reuse-port``) buy on this host.

    python bench/reuseport.py [--replicas 1,2] [--duration 10] [--connections 64] [--quic-backend qh3]

For each N: N ``reverstd --reuse-port`` on distinct tunnel ports and one public port, and
N ``reverst expose`` clients in front of the same backend (nginx when installed), each
registered with every replica (``-a 127.0.0.1:P1,127.0.0.1:P2,...``). ``wrk`` drives small
GETs and a 10 MB GET through the shared port; the table shows requests/s (or MB/s), its
ratio to N=1, p50/p99, and the CPU seconds and peak RSS of all the tunnel processes. The
kernel spreads the public connections over the replicas, each replica spreads its
requests over its tunnels. Needs ``wrk``. Helpers come from bench/run.py.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import socket
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: processes, wrk, certificates, the backend)

CASES = [("small GET", "/small", None, False), ("10MB GET c=4", "/10mb", 4, True)]


def start(n: int, setup, procs, quic: str) -> tuple[int, list]:
    """N replicas on one public port, N expose clients registered with all of them."""
    groups = bench.write_groups(setup.tmp / "groups.yml", ["bench.expose"])
    http_port = bench.free_port()
    tunnels, started = [], []
    for i in range(n):
        tunnel_port = bench.free_port(socket.SOCK_DGRAM)
        server = procs.start(f"reverstd-{i + 1}", [
            sys.executable, "-m", "reverst.cli", "reverstd", "-l", "warn", "-n", "localhost",
            "-c", str(setup.cert), "-k", str(setup.key), "-g", str(groups), "--reuse-port",
            "-a", f"127.0.0.1:{tunnel_port}", "-s", f"127.0.0.1:{http_port}", "--quic-backend", quic])
        server.wait_listening(http_port)
        tunnels.append(f"127.0.0.1:{tunnel_port}")
        started.append(server)
    for i in range(n):
        client = procs.start(f"expose-{i + 1}", [
            sys.executable, "-m", "reverst.cli", "client", "expose", "-l", "info", "-a", ",".join(tunnels),
            "-n", "localhost", "-g", "bench.expose", "-c", str(setup.ca), "--username", bench.USER,
            "--password", bench.PASSWORD, "--quic-backend", quic, str(setup.backend.port)])
        client.wait_for(r"registered with", count=n)
        started.append(client)
    for _ in range(4 * n):  # every replica answers (the kernel picks one per connection)
        bench.wait_routed(http_port, "bench.expose", started)
    return http_port, started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare (default 1,2)")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for small GETs")
    parser.add_argument("--quic-backend", default="qh3")
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]
    bench.interrupt_on_sigterm()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="reverst-reuseport-"))
    tmp.chmod(0o755)  # nginx workers run as another user
    rows = []
    with bench.Procs() as base:
        ca, cert, key = bench.make_certs(tmp / "certs")
        backend = bench.start_backend(tmp, base)
        setup = bench.Setup(tmp, ca, cert, key, backend, 1452, 100)
        for n in counts:
            with bench.Procs() as procs:
                port, tunnel_procs = start(n, setup, procs, args.quic_backend)
                for name, path, connections, bulk in CASES:
                    c = connections or args.connections
                    with bench.Sampler(tunnel_procs) as sampler:
                        result = bench.wrk(f"http://127.0.0.1:{port}{path}", c, args.duration, host="bench.expose")
                    value = result["rps"] * (bench.TEN_MB / 1e6 if bulk else 1)
                    rows.append({"case": f"{name} c={c}" if not connections else name, "replicas": n,
                                 "value": value, "unit": "MB/s" if bulk else "req/s", "p50": result.get("p50"),
                                 "p99": result.get("p99"), "errors": result["errors"],
                                 "cpu": sum(sampler.cpu.values()), "rss": sampler.peak_total})
                    time.sleep(0.5)
    print(f"\n{args.quic_backend}, {backend.name} backend, {args.duration:g} s per run, "
          f"{len(os.sched_getaffinity(0))} cores")
    print(f"{'case':<18} {'N':>2} {'value':>12} {'vs N=1':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
          f"{'CPU s':>6} {'RSS MB':>7}")
    for row in rows:
        first = next(r for r in rows if r["case"] == row["case"] and r["replicas"] == counts[0])
        ratio = row["value"] / first["value"] if first["value"] else float("nan")
        print(f"{row['case']:<18} {row['replicas']:>2} {row['value']:>8.1f} {row['unit']:<5}"
              f"{ratio:>6.2f}x {row['p50'] or 0:>7.2f} {row['p99'] or 0:>7.2f} {row['errors']:>6} "
              f"{row['cpu']:>6.1f} {row['rss']:>7.0f}")


if __name__ == "__main__":
    main()
