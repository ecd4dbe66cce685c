"""CPU per received datagram in a QUIC backend, without sockets: one command, one table.

    python bench/receive.py                     # every QUIC backend that imports
    python bench/receive.py --backends qh3 --mb 50 --repeat 9

A tunnel client sends ``--mb`` MB on one stream to a tunnel server, both our sans-io
connections (``TunnelQuicConnection``) wired together in memory (``tests/inmemory.py``,
a test dependency: ``pip install -e '.[test]'``), 1,452-byte datagrams. The server's
receive calls alone are timed (process CPU time). The datagrams of each flight are handed
over in runs of ``--per-read`` (what one coalesced UDP read carries), the runs taking three
ways in turn within the same transfer (so that the machine's drift, 2x over minutes here,
falls on all three alike):

* ``one by one``: ``receive_datagram`` per datagram;
* ``list``: ``receive_datagrams`` with the run as a list of datagrams, sliced out of the
  coalesced buffer first (the slicing counted): how the endpoint handed over UDP GRO
  reads until 2026-12-07;
* ``coalesced``: ``receive_coalesced`` with the buffer and its segment size (qh3 splits it
  in its native core).

The table shows the median over ``--repeat`` transfers of microseconds per datagram, its
ratio to ``list`` in the same transfer (median of the ratios) and the MB/s one core would
receive at that cost alone. Each
backend runs in its own interpreter (the backend is chosen at import,
``REVERST_QUIC_BACKEND``); the JSON (``--json``) holds every run.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = ("one by one", "list", "coalesced")
DATAGRAM = 1452


def measure(total: int, per_read: int, tls) -> dict[str, tuple[int, float]]:
    """Per mode, (datagrams received, CPU seconds in the receiver's receive calls) in one
    transfer whose reads take the modes in turn: each mode's share is timed within
    microseconds of the others', so the machine's drift does not fall on one of them."""
    from reverst.quic._common import split_coalesced
    from tests.inmemory import make_link

    link = make_link(tls, max_stream_data=4 * total, max_data=8 * total, max_datagram_size=DATAGRAM)
    sender, receiver = link.client, link.server
    from_addr, to_addr = link.addr[sender], link.addr[receiver]
    sid = sender.get_next_available_stream_id()
    sender.send_stream_data(sid, b"x" * total, end_stream=True)
    counts, spent = dict.fromkeys(MODES, 0), dict.fromkeys(MODES, 0.0)
    received, reads = 0, 0
    for _ in range(1_000_000):
        flight = [data for data, _ in sender.datagrams_to_send(now=link.now)]
        if not flight and received >= total:
            break
        for i in range(0, len(flight), per_read):
            run = flight[i:i + per_read]
            segment = len(run[0])
            if not (len(run) > 1 and all(len(d) == segment for d in run[:-1]) and len(run[-1]) <= segment):
                receiver.receive_datagrams(run, from_addr, now=link.now)  # (not a coalesced read: untimed)
                continue
            buffer = b"".join(run)  # what the kernel hands over (not timed)
            mode = MODES[reads % len(MODES)]
            reads += 1
            t = time.process_time()
            if mode == "coalesced":
                receiver.receive_coalesced(buffer, segment, from_addr, now=link.now)
            elif mode == "list":
                receiver.receive_datagrams(split_coalesced(buffer, segment), from_addr, now=link.now)
            else:
                for offset in range(0, len(buffer), segment):
                    receiver.receive_datagram(buffer[offset:offset + segment], from_addr, now=link.now)
            spent[mode] += time.process_time() - t
            counts[mode] += len(run)
        while (event := receiver.next_event()) is not None:
            if getattr(event, "stream_id", None) == sid and hasattr(event, "data"):
                received += len(event.data)
        link.now += 0.001
        for data, _ in receiver.datagrams_to_send(now=link.now):
            sender.receive_datagram(data, to_addr, now=link.now)
        while sender.next_event() is not None:
            pass
    else:
        raise RuntimeError(f"the transfer never ended ({received} of {total} bytes)")
    if received != total:
        raise RuntimeError(f"{received} of {total} bytes arrived")
    return {mode: (counts[mode], spent[mode]) for mode in MODES}


def worker(args) -> None:
    """One backend (this interpreter's): ``--repeat`` transfers; JSON out."""
    import trustme

    sys.path.insert(0, str(ROOT))
    from tests.inmemory import LIBRARY, SERVER_NAME

    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        certfile, keyfile = pathlib.Path(tmp, "cert.pem"), pathlib.Path(tmp, "key.pem")
        cert.cert_chain_pems[0].write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))
        tls = (str(certfile), str(keyfile), ca.cert_pem.bytes())
        runs = []
        for rep in range(args.repeat):
            for mode, (count, spent) in measure(args.mb * 1024 * 1024, args.per_read, tls).items():
                runs.append({"backend": LIBRARY, "mode": mode, "rep": rep, "datagrams": count, "cpu_s": spent,
                             "us_per_datagram": spent * 1e6 / count})
    print(json.dumps(runs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="qh3,aioquic", help="comma-separated (default: qh3,aioquic)")
    parser.add_argument("--mb", type=int, default=30, help="MB sent per run")
    parser.add_argument("--repeat", type=int, default=5, help="transfers (each times every mode)")
    parser.add_argument("--per-read", type=int, default=40, help="datagrams per coalesced read")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "receive.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1 or args.mb < 1 or args.per_read < 2:
        parser.error("--repeat and --mb must be at least 1, --per-read at least 2")
    if args.worker:
        return worker(args)
    runs, skipped = [], {}
    for backend in args.backends.split(","):
        done = subprocess.run([sys.executable, __file__, "--worker", "--mb", str(args.mb), "--repeat",
                               str(args.repeat), "--per-read", str(args.per_read)], cwd=ROOT,
                              env={**os.environ, "REVERST_QUIC_BACKEND": backend}, capture_output=True,
                              text=True, timeout=60 + 30 * args.repeat * args.mb)
        if done.returncode != 0:
            skipped[backend] = (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{backend}: skipped: {skipped[backend]}", flush=True)
            continue
        runs += json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for backend in dict.fromkeys(r["backend"] for r in runs):
        cost = {(r["mode"], r["rep"]): r["us_per_datagram"] for r in runs if r["backend"] == backend}
        reps = sorted({rep for _, rep in cost})
        for mode in MODES:
            us = statistics.median(cost[mode, rep] for rep in reps)
            paired = statistics.median(cost[mode, rep] / cost["list", rep] for rep in reps)
            rows.append((backend, mode, f"{us:.2f}", f"{paired:.2f}", f"{DATAGRAM / us:.0f}"))
    header = ("backend", "mode", "µs per datagram", "vs list", "MB/s per core")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"{args.mb} MB one way, {DATAGRAM}-byte datagrams, {args.per_read} per read, median of {args.repeat}")
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mb": args.mb, "per_read": args.per_read, "repeat": args.repeat,
                               "skipped": skipped, "runs": runs}, indent=2))
    print(f"\nwritten to {out}")
    if skipped:
        sys.exit(1)


if __name__ == "__main__":
    main()
