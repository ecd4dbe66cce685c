"""What the HTTPS front costs: the same requests through one reverstd's plain HTTP and HTTPS
listeners (wrk -> reverstd -> reverst expose -> nginx), req/s and reverstd CPU per request.

    python bench/https.py [--duration 8] [--quic-backend qh3]

Cases: small GETs on kept-alive connections (1, 16 and 64 of them), small GETs with
``Connection: close`` (a TCP connection, and for HTTPS a TLS handshake, per request), and
10 MB GETs on 4 connections. The certificate is an ECDSA P-256 leaf from trustme
(bench/run.py's make_certs); TLS 1.3 as wrk's OpenSSL negotiates it.
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

#: (name, path, connections, bulk, Connection: close)
CASES = [("small GET", "/small", 1, False, False), ("small GET", "/small", 16, False, False),
         ("small GET", "/small", 64, False, False), ("small GET, new conn each", "/small", 16, False, True),
         ("10MB GET", "/10mb", 4, True, False)]


def start(setup, procs, quic: str) -> tuple[int, int, list]:
    groups = bench.write_groups(setup.tmp / "groups.yml", ["bench.expose"])
    tunnel_port, http_port, https_port = bench.free_port(socket.SOCK_DGRAM), bench.free_port(), bench.free_port()
    server = procs.start("reverstd", [
        sys.executable, "-m", "reverst.cli", "reverstd", "-l", "warn", "-n", "localhost",
        "-c", str(setup.cert), "-k", str(setup.key), "-g", str(groups), "--quic-backend", quic,
        "-a", f"127.0.0.1:{tunnel_port}", "-s", f"127.0.0.1:{http_port}", "--https-address", f"127.0.0.1:{https_port}",
        "--https-certificate-path", str(setup.cert), "--https-private-key-path", str(setup.key)])
    server.wait_listening(https_port)
    client = procs.start("expose", [
        sys.executable, "-m", "reverst.cli", "client", "expose", "-l", "info", "-a", f"127.0.0.1:{tunnel_port}",
        "-n", "localhost", "-g", "bench.expose", "-c", str(setup.ca), "--username", bench.USER,
        "--password", bench.PASSWORD, "--quic-backend", quic, str(setup.backend.port)])
    client.wait_for(r"reachable through")
    bench.wait_routed(http_port, "bench.expose", [server, client])
    return http_port, https_port, [server, client]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--quic-backend", default="qh3")
    args = parser.parse_args()
    bench.interrupt_on_sigterm()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="reverst-https-"))
    tmp.chmod(0o755)  # nginx workers run as another user
    close_lua = tmp / "close.lua"
    close_lua.write_text('wrk.headers["Connection"] = "close"\n')
    rows = []
    with bench.Procs() as procs:
        ca, cert, key = bench.make_certs(tmp / "certs")
        backend = bench.start_backend(tmp, procs)
        setup = bench.Setup(tmp, ca, cert, key, backend, 1452, 100)
        http_port, https_port, (server, client) = start(setup, procs, args.quic_backend)
        for name, path, connections, bulk, close in CASES:
            for scheme, port in (("http", http_port), ("https", https_port)):
                with bench.Sampler([server, client]) as sampler:
                    result = bench.wrk(f"{scheme}://127.0.0.1:{port}{path}", connections, args.duration,
                                       host="bench.expose", script=str(close_lua) if close else None)
                done = result["requests"] or 1
                rows.append({"case": f"{name} c={connections}", "scheme": scheme, "bulk": bulk,
                             "value": result["rps"] * (bench.TEN_MB / 1e6 if bulk else 1),
                             "p50": result.get("p50") or 0, "errors": result["errors"],
                             "server_us": sampler.cpu["reverstd"] / done * 1e6, "server_cpu": sampler.cpu["reverstd"]})
                time.sleep(0.5)
    print(f"\n{args.quic_backend}, {backend.name} backend, {args.duration} s per run, "
          f"{len(os.sched_getaffinity(0))} cores; reverstd CPU per request (µs)")
    print(f"{'case':<30} {'scheme':<6} {'value':>14} {'https/http':>10} {'p50 ms':>7} {'errors':>6} "
          f"{'reverstd µs/req':>15}")
    for row in rows:
        plain = next(r for r in rows if r["case"] == row["case"] and r["scheme"] == "http")
        ratio = row["value"] / plain["value"] if plain["value"] else float("nan")
        unit = "MB/s" if row["bulk"] else "req/s"
        print(f"{row['case']:<30} {row['scheme']:<6} {row['value']:>9.1f} {unit:<5}{ratio:>9.2f}x "
              f"{row['p50']:>7.2f} {row['errors']:>6} {row['server_us']:>15.0f}")


if __name__ == "__main__":
    main()
