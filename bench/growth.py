"""Does a tunnel's memory grow with the requests it has carried? One command, one table.

    python bench/growth.py                          # every QUIC backend that imports, and Go when present
    python bench/growth.py --backends qh3 --rounds 20

A tunnel connection lives for days and carries millions of requests; state kept per
request, however small, adds up (qh3's QPACK encoder kept 16-34 bytes per stream for the
connection's life: 13 MB in each process through 316,000 requests, see README.md). Per
stack of bench/run.py (the Go pair, and per QUIC backend a ``reverstd`` with an ``expose``
client and a WSGI client), for each client in turn: ``--rounds`` runs of ``wrk`` small GETs
at ``--connections`` connections for ``--seconds`` each, all on the same tunnel connection;
after each run a second's rest and the RSS of ``reverstd`` and of the client
(/proc/PID/statm). The first round brings the processes to their high-water mark (buffers,
greenlets, the allocator's pools); the table gives each process's RSS at rest before the
load, after the first round and after the last, and the **growth per 100,000 requests**
from the first round's end to the last's (a least-squares slope over the rounds: 0 for a
process whose memory does not depend on how many requests it carried).

Processes, certificates and the backend come from run.py (wrk is required; nginx is the
backend when present); every process is stopped on exit, errors, Ctrl-C and SIGTERM; every
wait is bounded. Results go to bench/results/growth.json (``--json``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: processes, certificates, stacks, wrk)


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (requests, MB) points, in MB per 100,000 requests (0 where
    there are fewer than two points or the request counts do not vary)."""
    try:
        return statistics.linear_regression(*zip(*points)).slope * 100_000
    except (statistics.StatisticsError, TypeError):  # (TypeError: no points at all)
        return 0.0


def drive(stack, target, args, out=print) -> dict:
    """``args.rounds`` wrk runs through one client; the RSS of both processes after each."""
    def rss():
        return stack.server.rss_mb(), target.proc.rss_mb()

    rest = rss()
    total, samples = 0, []
    url = f"http://127.0.0.1:{stack.http_port}/small"
    for n in range(args.rounds):
        result = bench.wrk(url, args.connections, args.seconds, host=target.host)
        if result["errors"]:
            raise RuntimeError(f"{stack.name} {target.client}: {result['errors']} errors in round {n + 1}")
        total += result["requests"] or 0
        time.sleep(1.0)
        server, client = rss()
        samples.append({"round": n + 1, "requests": total, "rps": result["rps"], "server_mb": server,
                        "client_mb": client})
        out(f"{stack.name} {target.client} round {n + 1}: {total} requests, {result['rps']:.0f} req/s, "
            f"reverstd {server:.1f} MB, {target.client} {client:.1f} MB", flush=True)
        if not stack.check_alive():
            raise RuntimeError(stack.dead)
    return {"stack": stack.name, "client": target.client, "rest": {"server_mb": rest[0], "client_mb": rest[1]},
            "samples": samples,
            "server_per_100k": slope([(s["requests"], s["server_mb"]) for s in samples]),
            "client_per_100k": slope([(s["requests"], s["client_mb"]) for s in samples])}


def print_table(results: list[dict]) -> None:
    print("\n| stack | client | requests | reverstd MB: rest / round 1 / last | per 100k requests "
          "| client MB: rest / round 1 / last | per 100k requests |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        first, last = r["samples"][0], r["samples"][-1]
        print(f"| {r['stack']} | {r['client']} | {last['requests']:,} | "
              f"{r['rest']['server_mb']:.1f} / {first['server_mb']:.1f} / {last['server_mb']:.1f} | "
              f"{r['server_per_100k']:+.2f} MB | "
              f"{r['rest']['client_mb']:.1f} / {first['client_mb']:.1f} / {last['client_mb']:.1f} | "
              f"{r['client_per_100k']:+.2f} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=None, help="our QUIC backends, comma-separated (default: all)")
    parser.add_argument("--go-peers", type=pathlib.Path, default=bench.DEFAULT_GO_PEERS, metavar="DIR")
    parser.add_argument("--rounds", type=int, default=10, help="wrk runs per client")
    parser.add_argument("--seconds", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--json", default=str(bench.ROOT / "bench" / "results" / "growth.json"))
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the growth is taken after the first)")
    backends = bench.our_backends(args.backends)
    go_problem = bench.go_peer_problem(args.go_peers)
    if go_problem:
        print(f"Go rows skipped: {go_problem}", flush=True)
    bench.interrupt_on_sigterm()
    bench.compile_package()

    results, skipped = [], {}
    with bench.stack_specs("reverst-growth-", args.go_peers, go_problem, backends, 4) as (procs, specs):
        for spec in specs:  # one stack at a time: each has the machine to itself
            for stack in bench.launch_stacks([spec], procs, skipped):
                try:
                    for target in stack.targets:
                        time.sleep(1.0)
                        results.append(drive(stack, target, args))
                except RuntimeError as exc:
                    skipped[stack.name] = str(exc)
                    print(f"stack {stack.name}: {exc}", flush=True)
                finally:
                    stack.stop()

    print_table(results)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": bench.machine_info(), "versions": bench.quic_versions(),
                               "rounds": args.rounds, "seconds": args.seconds, "connections": args.connections,
                               "skipped": skipped, "results": results}, indent=2))
    print(f"\nwritten to {out}")
    if skipped:
        sys.exit(1)


if __name__ == "__main__":
    bench.run_cli(main)
