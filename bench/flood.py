"""Handshake floods against our reverstd, and what a legitimate client sees meanwhile.

    python bench/flood.py                                  # every mode, --retry never,auto, 2,000/s for 8 s
    python bench/flood.py --modes initials --retry auto --rate 2000 --duration 5
    python bench/flood.py --backend aioquic --json /tmp/flood.json

Modes (a flood worker process; every flood packet from a source in 127.0.0.0/8, which
Linux loopback accepts whole, so each fake client has an address of its own):

* ``initials``: valid client Initials (a real ClientHello, encrypted for a fresh connection
  id each time) from ``--addresses`` sockets bound to 127.10.x.y; the sockets read (and count)
  what comes back but never answer.
* ``spoof``: the same Initials, each from a fresh address whose socket is closed at once
  (the server's answers go nowhere: spoofed sources).
* ``handshake``: real QUIC clients (qh3) from 127.11.x.y that complete the handshake and
  never register (at whatever rate this process manages: reported).

While the flood runs, a real client (reverst.client.Client, from 127.0.0.1) registers
``--probes`` times. Per (retry mode, flood mode), on a fresh reverstd: the flood rate
achieved, the legitimate registrations' p50/max (and failures), reverstd's RSS before / at
its peak / after the flood has been dealt with, the peaks of handshakes in progress and of
connections not registered, Retry packets and refusals, reverstd's CPU, and, for addresses
that never validated (``initials``), bytes the server sent per byte received (QUIC's limit: 3).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (its Proc: log kept, RSS and CPU sampled)

ROOT = bench.ROOT
READY = re.compile(r"listening for tunnels on udp (\S+), public http on tcp (\S+)")
GROUPS = """groups:
  app.test:
    hosts: ["app.test"]
    authentication:
      basic: {username: user, password: pass}
"""


# -- the flood worker (a process of its own: ``flood.py --worker MODE ...``) --------------------------
class InitialForge:
    """Valid client Initials for fresh connection ids, cheaply: one real ClientHello (aioquic),
    decrypted once, encrypted again under the Initial keys of each new destination id."""

    def __init__(self, server_name: str = "localhost", size: int = 1252) -> None:
        from aioquic.buffer import Buffer
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection
        from aioquic.quic.crypto import CryptoPair
        from aioquic.quic.packet import pull_quic_header
        self._crypto_pair = CryptoPair
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["quic-h3-tunnel"], server_name=server_name,
                                max_datagram_size=1252)
        client = QuicConnection(configuration=cfg)
        client.connect(("127.0.0.1", 9), now=0.0)
        datagram = client.datagrams_to_send(now=0.0)[0][0]
        buf = Buffer(data=datagram)
        header = pull_quic_header(buf, host_cid_length=8)
        crypto = CryptoPair()
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        _, payload, _ = crypto.decrypt_packet(datagram[:header.packet_length], buf.tell(), 0)
        # (aioquic pads the datagram after the packet: pad inside it instead, with PADDING frames)
        self.payload = payload + bytes(max(0, size - 60 - len(payload)))
        self.version = header.version
        self.scid = header.source_cid  # (the ClientHello's transport parameters name it)

    def make(self, token: bytes = b"", dcid: bytes | None = None) -> bytes:
        """An Initial to ``dcid`` (default: a fresh one) carrying ``token``."""
        dcid = dcid or os.urandom(8)
        scid = self.scid
        crypto = self._crypto_pair()
        crypto.setup_initial(cid=dcid, is_client=True, version=self.version)
        payload = self.payload
        length = 2 + len(payload) + 16  # packet number, payload, AEAD tag
        header = b"".join([bytes([0xC1]), self.version.to_bytes(4, "big"), b"\x08", dcid, bytes([len(scid)]), scid,
                           _varint(len(token)), token, (0x4000 | length).to_bytes(2, "big"), b"\x00\x00"])
        return crypto.encrypt_packet(header, payload, 0)


def _varint(value: int) -> bytes:
    return bytes([value]) if value < 64 else (0x4000 | value).to_bytes(2, "big")


def aioquic_initial(server_name: str = "localhost") -> bytes:
    """The first datagram of a real aioquic client: a ~530-byte Initial, padded with zeros
    *after* the packet to 1,452 bytes."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["quic-h3-tunnel"],
                                                           server_name=server_name))
    client.connect(("127.0.0.1", 9), now=0.0)
    return client.datagrams_to_send(now=0.0)[0][0]


def _address(prefix: int, i: int) -> str:
    """The ``i``-th (from 0) of the addresses 127.prefix.x.y, y never 0 (65,280 of them)."""
    i %= 255 * 256
    return f"127.{prefix}.{i // 255}.{i % 255 + 1}"


def _paced(rate: float, duration: float):
    """Yields the index of each send, paced at ``rate`` per second for ``duration`` seconds."""
    start = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= duration:
            return
        due = int(elapsed * rate)
        if sent >= due:
            time.sleep(min(0.002, (sent + 1) / rate - elapsed))
            continue
        while sent < due:
            yield sent
            sent += 1


def flood_initials(target, rate, duration, addresses, settle) -> dict:
    forge = InitialForge()
    socks = []
    selector = selectors.DefaultSelector()
    for i in range(addresses):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((_address(10, i), 0))
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ, i)
        socks.append(s)
    sent = [0] * addresses
    received = [0] * addresses

    def drain(timeout=0.0):
        for key, _ in selector.select(timeout):
            while True:
                try:
                    received[key.data] += len(key.fileobj.recv(65536))
                except (BlockingIOError, ConnectionRefusedError):
                    break
    count = 0
    for n in _paced(rate, duration):
        i = n % addresses
        data = forge.make()
        socks[i].sendto(data, target)
        sent[i] += len(data)
        count += 1
        if n % 32 == 0:
            drain()
    deadline = time.monotonic() + settle  # the server's retransmissions
    while time.monotonic() < deadline:
        drain(0.1)
    ratios = [r / s for r, s in zip(received, sent) if s]
    return {"sent": count, "rate": count / duration, "bytes_sent": sum(sent), "bytes_received": sum(received),
            "amplification_max": max(ratios, default=0.0),
            "amplification_mean": sum(received) / max(1, sum(sent))}


def flood_spoof(target, rate, duration) -> dict:
    forge = InitialForge()
    count = 0
    for n in _paced(rate, duration):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((f"127.{20 + (n >> 16) % 200}.{(n >> 8) & 255}.{(n & 255) or 1}", 0))
            s.sendto(forge.make(), target)
        count += 1
    return {"sent": count, "rate": count / duration}


def flood_handshakes(target, rate, duration) -> dict:
    import gevent
    from reverst._transport import Endpoint
    from reverst.quic import load_backend
    backend = load_backend("qh3")
    cfg = backend.client_configuration(server_name="localhost", idle_timeout=30.0, max_datagram_size=1452,
                                       insecure=True)
    endpoints, done, failed = [], [0], [0]

    def one(i):
        endpoint = Endpoint.bind(_address(11, i), 0, backend=backend)
        endpoint.start()
        endpoints.append(endpoint)
        conn = endpoint.connect(target, cfg)
        if gevent.wait([conn.handshake_done, conn.closed], timeout=5.0, count=1) and conn.handshake_done.is_set():
            done[0] += 1  # ... and never a registration
        else:
            failed[0] += 1
            endpoint.close()
    start = time.monotonic()
    started = 0
    while (elapsed := time.monotonic() - start) < duration:
        while started < int(elapsed * rate):
            gevent.spawn(one, started)
            started += 1
        gevent.sleep(0.002)
    gevent.sleep(2.0)
    for endpoint in endpoints:
        endpoint.close()
    return {"sent": started, "rate": started / duration, "handshakes": done[0], "failed": failed[0]}


def worker(args) -> None:
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    if args.worker == "initials":
        result = flood_initials(target, args.rate, args.duration, args.addresses, args.settle)
    elif args.worker == "spoof":
        result = flood_spoof(target, args.rate, args.duration)
    else:
        result = flood_handshakes(target, args.rate, args.duration)
    print(json.dumps(result), flush=True)


# -- the bench -------------------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """reverstd's RSS and /metrics (handshakes in progress...) every ``interval`` s."""

    GAUGES = ("reverst_quic_handshakes_in_progress", "reverst_quic_unregistered_connections",
              "reverst_quic_retry_packets_total")

    def __init__(self, proc, management, interval=0.2):
        super().__init__(daemon=True)
        self.proc, self.url, self.interval = proc, f"http://{management}/metrics", interval
        self.rss_peak = 0.0
        self.peaks = dict.fromkeys(self.GAUGES, 0.0)
        self.last: dict[str, float] = {}
        self.stopped = threading.Event()

    def scrape(self) -> dict[str, float]:
        values: dict[str, float] = {}
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith("reverst_quic_"):
                        name, _, value = line.rpartition(" ")
                        values[name] = float(value)
        except OSError:
            pass
        return values

    def run(self):
        while not self.stopped.wait(self.interval):
            self.rss_peak = max(self.rss_peak, self.proc.rss_mb())
            self.last = self.scrape()
            for name in self.GAUGES:
                self.peaks[name] = max(self.peaks[name], self.last.get(name, 0.0))


def start_reverstd(procs, tmp, retry, backend, handshake_timeout) -> tuple:
    management = f"127.0.0.1:{bench.free_port()}"
    proc = procs.start("reverstd", [sys.executable, "-m", "reverst.cli", "reverstd", "-l", "info", "--no-access-log",
                                    "-n", "localhost", "-k", str(tmp / "key.pem"), "-c", str(tmp / "cert.pem"),
                                    "-g", str(tmp / "groups.yml"), "-a", "127.0.0.1:0", "-s", "127.0.0.1:0",
                                    "--management-address", management, "--quic-retry", retry,
                                    "--quic-backend", backend, "--handshake-timeout", f"{handshake_timeout}s"],
                       env={"PYTHONPATH": str(ROOT)})
    tunnel = proc.wait_for(READY.pattern)[0].group(1)
    return proc, tunnel, management


def register_once(tunnel: str, ca: str, timeout: float = 6.0) -> float | None:
    """Seconds until a real client's registration was accepted (None: not within ``timeout``)."""
    import gevent
    import gevent.event
    from reverst.client import BasicAuth, Client
    ready = gevent.event.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    client = Client(app, tunnel, tunnel_group="app.test", server_name="localhost", ca_file=ca,
                    auth=BasicAuth("user", "pass"), on_ready=lambda c: ready.set(), max_retries=10)
    started = time.monotonic()
    runner = gevent.spawn(client.dial_and_serve)
    ok = ready.wait(timeout)
    took = time.monotonic() - started
    client.stop(1)
    runner.join(2)
    runner.kill(block=False)
    return took if ok else None


def run_case(procs, tmp, retry, mode, args) -> dict:
    import gevent
    proc, tunnel, management = start_reverstd(procs, tmp, retry, args.backend, args.handshake_timeout)
    try:
        register_once(tunnel, str(tmp / "ca.pem"))  # (libraries loaded, a first tunnel: the baseline)
        gevent.sleep(0.5)
        rss_before = proc.rss_mb()
        sampler = Sampler(proc, management)
        sampler.start()
        cpu_start, wall_start = proc.cpu_seconds(), time.monotonic()
        flooder = subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, "--target", tunnel, "--rate", str(args.rate),
             "--duration", str(args.duration), "--addresses", str(args.addresses),
             "--settle", str(args.handshake_timeout + 1)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        gevent.sleep(min(1.0, args.duration / 4))  # the flood under way
        times = []
        spacing = max(0.0, (args.duration - 1.5) / max(1, args.probes))
        for _ in range(args.probes):
            t0 = time.monotonic()
            times.append(register_once(tunnel, str(tmp / "ca.pem")))
            gevent.sleep(max(0.0, spacing - (time.monotonic() - t0)))
        while flooder.poll() is None and time.monotonic() - wall_start < args.duration + 0.5:
            gevent.sleep(0.1)
        cpu = (proc.cpu_seconds() - cpu_start) / (time.monotonic() - wall_start)
        out, _ = flooder.communicate(timeout=args.handshake_timeout + 30)
        flood = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        # dealt with: nothing in progress any more (unregistered ones wait for the registration timeout)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            last = sampler.scrape()
            if not last.get("reverst_quic_handshakes_in_progress") and not last.get(
                    "reverst_quic_unregistered_connections"):
                break
            gevent.sleep(0.25)
        register_once(tunnel, str(tmp / "ca.pem"))  # (a registration lets reverstd trim its heap)
        gevent.sleep(5.5)
        rss_after = proc.rss_mb()
        sampler.stopped.set()
        sampler.join(2)
        final = sampler.scrape()
        refused = {m.group(1): v for k, v in final.items()
                   if (m := re.match(r'reverst_quic_handshakes_refused_total\{reason="([^"]+)"\}', k)) and v}
        ok = [t for t in times if t is not None]
        return {
            "retry": retry, "mode": mode, "rate": flood.get("rate", 0.0), "flood": flood,
            "reg_p50": statistics.median(ok) if ok else None, "reg_max": max(ok) if ok else None,
            "reg_failed": len(times) - len(ok), "rss_before": rss_before, "rss_peak": max(sampler.rss_peak, rss_before),
            "rss_after": rss_after, "handshakes_peak": sampler.peaks["reverst_quic_handshakes_in_progress"],
            "unregistered_peak": sampler.peaks["reverst_quic_unregistered_connections"],
            "retries": final.get("reverst_quic_retry_packets_total", 0.0), "refused": refused,
            "left_after": final.get("reverst_quic_handshakes_in_progress", 0.0)
                          + final.get("reverst_quic_unregistered_connections", 0.0),
            "cpu": cpu, "amplification": flood.get("amplification_max"),
        }
    finally:
        proc.stop()


def table(rows) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"
    head = ("retry", "mode", "sent/s", "flood hs done", "reg p50 ms", "reg max ms", "fail", "RSS MB before/peak/after",
            "hs peak", "unreg peak", "Retry pkts", "refused", "left", "CPU", "ampl. max")
    lines = [head]
    for r in rows:
        refused = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["refused"].items())) or "0"
        amp = r["amplification"]
        lines.append((r["retry"], r["mode"], f"{r['rate']:.0f}", str(r["flood"].get("handshakes", "-")), ms(r["reg_p50"]), ms(r["reg_max"]),
                      str(r["reg_failed"]), f"{r['rss_before']:.0f}/{r['rss_peak']:.0f}/{r['rss_after']:.0f}",
                      f"{r['handshakes_peak']:.0f}", f"{r['unregistered_peak']:.0f}", f"{r['retries']:.0f}", refused,
                      f"{r['left_after']:.0f}", f"{r['cpu'] * 100:.0f}%", "-" if amp is None else f"{amp:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="initials,spoof,handshake")
    p.add_argument("--retry", default="never,auto", help="reverstd --quic-retry values to compare")
    p.add_argument("--rate", type=float, default=2000.0, help="new connections per second")
    p.add_argument("--handshake-rate", type=float, default=None,
                   help="for the handshake mode (default --rate; the worker reports what it managed)")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--addresses", type=int, default=None,
                   help="source addresses of the initials mode (default: one per Initial, at most 15,000)")
    p.add_argument("--probes", type=int, default=10, help="legitimate registrations during each flood")
    p.add_argument("--backend", default="auto", help="reverstd --quic-backend")
    p.add_argument("--handshake-timeout", type=float, default=5.0)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--worker", choices=("initials", "spoof", "handshake"), help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--settle", type=float, default=6.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.addresses is None:
        args.addresses = max(1, min(15000, int(args.rate * args.duration)))
    import trustme
    bench.interrupt_on_sigterm()
    rows = []
    with tempfile.TemporaryDirectory(prefix="reverst-flood-") as d, bench.Procs() as procs:
        tmp = pathlib.Path(d)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        (tmp / "groups.yml").write_text(GROUPS)
        for retry in args.retry.split(","):
            for mode in args.modes.split(","):
                case_args = argparse.Namespace(**vars(args))
                if mode == "handshake" and args.handshake_rate:
                    case_args.rate = args.handshake_rate
                row = run_case(procs, tmp, retry, mode, case_args)
                rows.append(row)
                print(f"{retry:>6} {mode:<9} done: {row['rate']:.0f}/s, registration p50 "
                      f"{(row['reg_p50'] or 0) * 1000:.0f} ms", file=sys.stderr, flush=True)
    print(f"reverstd --quic-backend {args.backend}, {args.duration:g} s floods, {args.probes} registrations each, "
          f"{os.cpu_count()} CPUs")
    print(table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
