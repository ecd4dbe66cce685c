"""An impairment relay: a UDP relay that makes loopback behave like a bad network.

    python bench/relay.py --listen 127.0.0.1:9000 --target 127.0.0.1:7171 \\
        --loss 1% --delay 20ms --jitter 5ms --dup 0.1% --rate 10mbit --seed 1

It sits between a tunnel client and ``reverstd`` (point the client's tunnel address at
``--listen``).  For each client source address it opens its own upstream UDP socket to
the target, like a NAT, so several clients work at once and replies go back to the
right one; a flow idle for ``--idle-timeout`` (120 s) is forgotten.

Each direction -- ``up`` (client to target) and ``down`` (target to client) -- has its own
:class:`Impairment`, applied to each datagram in this order:

1. ``blackhole``: drop everything (a dead path);
2. ``loss``: drop with this probability;
3. ``dup``: send a second copy with this probability (each copy gets its own jitter);
4. ``rate``: a link of this many bytes/s in front of a drop-tail queue; a copy that would
   wait more than ``queue_time`` (100 ms) or push the queue over ``queue_bytes`` is dropped;
5. ``delay`` + uniform ``0..jitter``: propagation delay.  Each datagram draws its own jitter,
   so a later one may overtake an earlier one (as netem does) -- with a jitter much larger
   than the spacing of datagrams that is heavy reordering; ``reorder=False`` holds a
   datagram back until the one before it left (delay variation without reordering).

Decisions come from one ``random.Random`` per direction, seeded from ``(seed, direction)``,
which draws the same four numbers for every datagram whatever the settings are: the same
seed and the same datagram sequence give the same decisions (a failure replays).
Settings can change at any time from any thread (:meth:`Relay.set`, :meth:`Relay.blackhole`);
they apply to datagrams the relay reads afterwards (one already delayed or queued still
arrives; one still in the listening socket's buffer gets the new settings).

Pure standard library and independent of gevent: the relay runs one epoll loop
with a time-ordered heap in its own native thread (even in a gevent-patched process),
or as this separate process.  Its capacity on loopback: ``--measure-capacity``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import heapq
import json
import math
import random
import re
import select
import signal
import socket
import sys
import threading
import time

__all__ = ["Impairment", "Relay", "parse_duration", "parse_rate", "parse_probability", "parse_address"]

DIRECTIONS = ("up", "down")
MAX_DATAGRAM = 65535
SOCKET_BUFFER = 4 * 1024 * 1024  # asked for; the kernel caps it at net.core.[rw]mem_max
BATCH = 256                      # datagrams read from one socket before timers get a look


def _native(module: str, name: str):
    """``module.name`` as the standard library defines it, even after gevent monkey-patching."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched(module):
        return monkey.get_original(module, name)
    return getattr(__import__(module), name)


_socket = _native("socket", "socket")
_socketpair = _native("socket", "socketpair")
_start_new_thread = _native("_thread", "start_new_thread")
_allocate_lock = _native("_thread", "allocate_lock")


class _Poller:
    """epoll (poll elsewhere), the originals even in a gevent-patched process: fd -> data."""

    def __init__(self):
        try:
            self._ep, self._in, self._scale = _native("select", "epoll")(), select.EPOLLIN, 1.0
        except AttributeError:  # not Linux
            self._ep, self._in, self._scale = _native("select", "poll")(), select.POLLIN, 1000.0
        self._data: dict = {}

    def register(self, sock, data):
        self._data[sock.fileno()] = data
        self._ep.register(sock.fileno(), self._in)

    def unregister(self, sock):
        fd = sock.fileno()
        self._ep.unregister(fd)
        del self._data[fd]

    def poll(self, timeout: float):
        events = self._ep.poll(timeout * self._scale)  # rounded up to a millisecond
        data = self._data
        return [data[fd] for fd, _ in events if fd in data]

    def close(self):
        if hasattr(self._ep, "close"):
            self._ep.close()


# -- parameters ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Impairment:
    """What one direction does to datagrams.  Durations in seconds, ``rate`` in bytes/s."""
    loss: float = 0.0          # drop probability, 0..1
    delay: float = 0.0         # fixed one-way delay, s
    jitter: float = 0.0        # extra delay, uniform in 0..jitter, s (reorders)
    dup: float = 0.0           # duplication probability, 0..1
    rate: float | None = None  # bandwidth cap, bytes/s (None: unlimited)
    queue_time: float = 0.1    # drop-tail: the most a datagram may wait for the link, s
    queue_bytes: int | None = None  # drop-tail: the most bytes waiting for the link (None: no limit)
    blackhole: bool = False    # drop everything
    reorder: bool = True       # False: jitter never lets a datagram overtake an earlier one

    def __post_init__(self):
        for name in ("loss", "dup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in 0..1, not {getattr(self, name)!r}")
        for name in ("delay", "jitter", "queue_time"):
            if not getattr(self, name) >= 0.0 or math.isinf(getattr(self, name)):
                raise ValueError(f"{name} must be a finite duration >= 0 s, not {getattr(self, name)!r}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 bytes/s or None, not {self.rate!r}")
        if self.queue_bytes is not None and self.queue_bytes < 0:
            raise ValueError(f"queue_bytes must be >= 0 or None, not {self.queue_bytes!r}")

    def replace(self, **changes) -> "Impairment":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        if self.blackhole:
            return "blackhole"
        parts = []
        if self.loss:
            parts.append(f"loss {self.loss * 100:g}%")
        if self.delay or self.jitter:
            parts.append(f"delay {self.delay * 1000:g}ms" + (f"+0..{self.jitter * 1000:g}ms" if self.jitter else "")
                         + (" in order" if self.jitter and not self.reorder else ""))
        if self.dup:
            parts.append(f"dup {self.dup * 100:g}%")
        if self.rate:
            parts.append(f"rate {self.rate * 8 / 1e6:g}mbit (queue {self.queue_time * 1000:g}ms"
                         + (f"/{self.queue_bytes}B" if self.queue_bytes is not None else "") + ")")
        return ", ".join(parts) or "clean"


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text) -> float:
    """Seconds from a Go duration ("20ms", "1m30s", "1.5s", "0"); a bare number is seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION.match(body, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 20ms, 1.5s, 1m30s)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)(?:/s|ps)?\s*$")
_RATE_UNITS = {  # to bytes/s; "bit" forms are bits (tc style), "B" forms bytes
    "": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3,
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
}


def parse_rate(text) -> float | None:
    """Bytes/s from "10mbit", "500kbit", "2MB", "64KiB", "1000" (bytes/s); "0"/"none"/"" is None."""
    if text is None or isinstance(text, (int, float)):
        return float(text) if text else None
    if text.strip().lower() in ("", "0", "none", "off", "unlimited"):
        return None
    m = _RATE.match(text)
    unit = m and m.group(2).lower()
    if not m or unit not in _RATE_UNITS:
        raise ValueError(f"invalid rate {text!r} (expected e.g. 10mbit, 500kbit, 2MB, 64KiB)")
    value = float(m.group(1)) * _RATE_UNITS[unit]
    return value or None


def parse_probability(text) -> float:
    """0..1 from "1%", "0.5%", "0.01"."""
    if isinstance(text, (int, float)):
        p = float(text)
    else:
        s = text.strip()
        p = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"invalid probability {text!r} (expected 0..1 or 0%..100%)")
    return p


def parse_size(text) -> int | None:
    """Bytes from "64KiB", "1MB", "150000"; "0"/"none" is None."""
    if isinstance(text, str) and re.search(r"bit\s*$", text, re.I):
        raise ValueError(f"invalid size {text!r}: give bytes (64KiB, 1MB, 150000)")
    r = parse_rate(text)
    return None if r is None else int(r)


def parse_address(text: str, default_host="127.0.0.1") -> tuple[str, int]:
    """("host", port) from "host:port", "[::1]:port" or ":port"/"port"."""
    s = text.strip()
    if s.startswith("["):
        host, _, port = s[1:].partition("]:")
    elif ":" in s:
        host, _, port = s.rpartition(":")
    else:
        host, port = "", s
    return host or default_host, int(port)


# -- the relay -------------------------------------------------------------------------------------
class _Direction:
    """One direction's generator, impairment, link (rate queue) and counters."""

    def __init__(self, name: str, seed, impairment: Impairment):
        self.name = name
        self.rng = random.Random(f"{seed}/{name}") if seed is not None else random.Random()
        self.imp = impairment
        self.link: collections.deque = collections.deque()  # (finish time, size) still on the link
        self.link_free = 0.0     # when the link finishes what it holds
        self.last_due = 0.0      # the latest departure scheduled (reorder=False keeps to it)
        self.queue_bytes = 0
        self.pending = 0         # copies in the heap (delayed or on the link)
        self.received = self.forwarded = self.duplicated = 0
        self.bytes_received = self.bytes_forwarded = 0
        self.dropped = {"loss": 0, "queue": 0, "blackhole": 0, "error": 0}
        self.last_error: OSError | None = None  # an unexpected send error (not a full buffer)

    def drain_link(self, now):
        link = self.link
        while link and link[0][0] <= now:
            self.queue_bytes -= link.popleft()[1]

    def snapshot(self, now) -> dict:
        self.drain_link(now)
        return {"received": self.received, "forwarded": self.forwarded, "duplicated": self.duplicated,
                "dropped": dict(self.dropped), "dropped_total": sum(self.dropped.values()),
                "bytes_received": self.bytes_received, "bytes_forwarded": self.bytes_forwarded,
                "queue_packets": len(self.link), "queue_bytes": self.queue_bytes, "in_flight": self.pending,
                "impairment": dataclasses.asdict(self.imp),
                "last_error": repr(self.last_error) if self.last_error else None}


class _Flow:
    __slots__ = ("client", "sock", "last", "closed")

    def __init__(self, client, sock, now):
        self.client, self.sock, self.last, self.closed = client, sock, now, False


class Relay:
    """A UDP relay from ``listen`` to ``target`` with an :class:`Impairment` per direction.

    ``with Relay(("127.0.0.1", port), up=Impairment(loss=0.01), seed=1) as relay:``
    starts it; ``relay.address`` is where clients send; ``relay.close()`` stops it."""

    def __init__(self, target, listen=("127.0.0.1", 0), up: Impairment | None = None,
                 down: Impairment | None = None, seed=None, idle_timeout: float = 120.0,
                 max_flows: int = 4096, socket_buffer: int = SOCKET_BUFFER):
        self.target = tuple(target) if not isinstance(target, str) else parse_address(target)
        self.listen = tuple(listen) if not isinstance(listen, str) else parse_address(listen)
        self.seed = seed
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.socket_buffer = socket_buffer
        self._dirs = {"up": _Direction("up", seed, up or Impairment()),
                      "down": _Direction("down", seed, down or Impairment())}
        self._up, self._down = self._dirs["up"], self._dirs["down"]
        self._lock = _allocate_lock()
        self._sock = None
        self._flows: dict = {}
        self._heap: list = []
        self._seq = 0
        self._requests: collections.deque = collections.deque()  # callables run in the loop
        self._closing = False
        self._running = False
        self._error: BaseException | None = None
        self.flows_opened = 0
        self.flows_expired = 0
        self.flows_refused = 0

    # -- lifecycle
    def start(self) -> "Relay":
        if self._sock is not None:
            return self
        family = socket.getaddrinfo(self.listen[0], self.listen[1], type=socket.SOCK_DGRAM)[0][0]
        tinfo = socket.getaddrinfo(self.target[0], self.target[1], type=socket.SOCK_DGRAM)[0]
        self._target_family, self._target_addr = tinfo[0], tinfo[4]
        self._sock = self._udp(family)
        self._sock.bind(self.listen)
        self._wake_r, self._wake_w = _socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = _Poller()
        self._sel.register(self._sock, None)
        self._sel.register(self._wake_r, "wake")
        self._finished = _allocate_lock()
        self._finished.acquire()
        self._running = True
        _start_new_thread(self._run, ())  # a native thread, even in a gevent-patched process
        return self

    def close(self, timeout: float = 5.0):
        """Stop the loop and close every socket (idempotent)."""
        if self._sock is None:
            return
        if self._running:
            self._closing = True
            self._wake()
            self._finished.acquire(timeout=timeout)
        for flow in list(self._flows.values()):
            flow.closed = True
            flow.sock.close()
        self._flows.clear()
        self._sel.close()
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()
        self._sock = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("the relay is not started")
        return self._sock.getsockname()[:2]

    @property
    def address_str(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- control (any thread)
    def set(self, up: Impairment | None = None, down: Impairment | None = None, **changes):
        """Replace a direction's impairment (``up=``, ``down=``) and/or change fields of both
        (``relay.set(loss=0.05)``, ``relay.set(up=Impairment(delay=0.02), jitter=0.005)``)."""
        with self._lock:
            for name, new in (("up", up), ("down", down)):
                d = self._dirs[name]
                imp = new if new is not None else d.imp
                d.imp = imp.replace(**changes) if changes else imp

    def impairment(self, direction: str) -> Impairment:
        return self._dirs[direction].imp

    def blackhole(self, on: bool = True, direction: str = "both"):
        """Drop everything arriving (in ``up``, ``down`` or ``both`` directions) while on."""
        with self._lock:
            for name in DIRECTIONS if direction == "both" else (direction,):
                d = self._dirs[name]
                d.imp = d.imp.replace(blackhole=bool(on))

    def stats(self, timeout: float = 2.0) -> dict:
        """Counters per direction (a consistent snapshot taken between two datagrams)."""
        if not self._running:
            return self._snapshot()
        box, done = [], _allocate_lock()
        done.acquire()

        def take():
            box.append(self._snapshot())
            done.release()
        self._requests.append(take)
        self._wake()
        if done.acquire(timeout=timeout) and box:
            return box[0]
        return self._snapshot()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Until nothing is delayed or queued in either direction (True), or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if not (s["up"]["in_flight"] or s["down"]["in_flight"]):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def _snapshot(self) -> dict:
        now = time.monotonic()
        return {"up": self._up.snapshot(now), "down": self._down.snapshot(now), "flows": len(self._flows),
                "flows_opened": self.flows_opened, "flows_expired": self.flows_expired,
                "flows_refused": self.flows_refused, "error": repr(self._error) if self._error else None}

    # -- the loop (its own thread)
    def _udp(self, family):
        s = _socket(family, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, self.socket_buffer)
            except OSError:
                pass
        s.setblocking(False)
        return s

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    def _run(self):
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - kept for stats() and re-raised on the CLI
            self._error = exc
            print(f"relay: loop failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            self._running = False
            self._finished.release()

    def _loop(self):
        heap, sel, listen = self._heap, self._sel, self._sock
        up, down = self._up, self._down
        monotonic, heappop = time.monotonic, heapq.heappop
        next_expiry = monotonic() + min(1.0, self.idle_timeout / 4)
        while not self._closing:
            if heap:
                timeout = max(0.0, heap[0][0] - monotonic())
            else:
                timeout = max(0.0, next_expiry - monotonic())
            for data in sel.poll(timeout):
                if data is None:
                    self._read_listen(listen)
                elif data == "wake":
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                else:
                    self._read_upstream(data)
            while self._requests:
                self._requests.popleft()()
            if heap:
                now = monotonic()
                while heap and heap[0][0] <= now:
                    _, _, d, flow, payload = heappop(heap)
                    d.pending -= 1
                    self._send(d, flow, payload)
            now = monotonic()
            if now >= next_expiry:
                next_expiry = now + min(1.0, self.idle_timeout / 4)
                self._expire(now)

    def _read_listen(self, listen):
        recvfrom, flows, up = listen.recvfrom, self._flows, self._up
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                payload, client = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP errors reported on the socket: nothing to read
                continue
            flow = flows.get(client)
            if flow is None:
                flow = self._open_flow(client, now)
                if flow is None:
                    up.received += 1
                    up.bytes_received += len(payload)
                    up.dropped["error"] += 1
                    continue
            flow.last = now
            self._ingress(up, flow, payload, now)

    def _read_upstream(self, flow):
        recv, down = flow.sock.recv, self._down
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                payload = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNREFUSED: the target is not listening (ICMP port unreachable)
                continue
            flow.last = now
            self._ingress(down, flow, payload, now)

    def _open_flow(self, client, now):
        if len(self._flows) >= self.max_flows:
            self.flows_refused += 1
            return None
        sock = self._udp(self._target_family)
        try:
            sock.connect(self._target_addr)
        except OSError:
            sock.close()
            self.flows_refused += 1
            return None
        flow = _Flow(client, sock, now)
        self._flows[client] = flow
        self._sel.register(sock, flow)
        self.flows_opened += 1
        return flow

    def _expire(self, now):
        horizon = now - self.idle_timeout
        for client, flow in list(self._flows.items()):
            if flow.last < horizon:
                del self._flows[client]
                self._sel.unregister(flow.sock)
                flow.sock.close()
                flow.closed = True
                self.flows_expired += 1

    def _ingress(self, d: _Direction, flow: _Flow, payload: bytes, now: float):
        d.received += 1
        d.bytes_received += len(payload)
        imp = d.imp
        rnd = d.rng.random
        # always four draws a datagram: decisions depend only on (seed, direction, index)
        r_loss, r_dup, j1, j2 = rnd(), rnd(), rnd(), rnd()
        if imp.blackhole:
            d.dropped["blackhole"] += 1
            return
        if r_loss < imp.loss:
            d.dropped["loss"] += 1
            return
        if r_dup < imp.dup:
            d.duplicated += 1
            self._enqueue(d, flow, payload, now, imp, j1)
            self._enqueue(d, flow, payload, now, imp, j2)
        else:
            self._enqueue(d, flow, payload, now, imp, j1)

    def _enqueue(self, d: _Direction, flow, payload, now, imp: Impairment, r_jitter):
        due = now
        if imp.rate:
            size = len(payload)
            d.drain_link(now)
            start = d.link_free if d.link_free > now else now
            if start - now > imp.queue_time or (imp.queue_bytes is not None
                                                and d.queue_bytes + size > imp.queue_bytes and d.link):
                d.dropped["queue"] += 1
                return
            due = d.link_free = start + size / imp.rate
            d.link.append((due, size))
            d.queue_bytes += size
        due += imp.delay + r_jitter * imp.jitter
        if due < d.last_due and not imp.reorder:
            due = d.last_due
        elif due > d.last_due:
            d.last_due = due
        if due <= now and not d.pending:
            self._send(d, flow, payload)  # the fast path: nothing ahead of it in this direction
            return
        self._seq += 1
        d.pending += 1
        heapq.heappush(self._heap, (due, self._seq, d, flow, payload))

    def _send(self, d: _Direction, flow: _Flow, payload: bytes):
        if flow.closed:
            d.dropped["error"] += 1
            return
        try:
            if d is self._up:
                flow.sock.send(payload)
            else:
                self._sock.sendto(payload, flow.client)
        except OSError as exc:  # a full socket buffer (EAGAIN, ENOBUFS), ECONNREFUSED...
            d.dropped["error"] += 1
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED, errno.EWOULDBLOCK):
                d.last_error = exc
            return
        d.forwarded += 1
        d.bytes_forwarded += len(payload)


# -- capacity ----------------------------------------------------------------------------------------
_SINK = r'''
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
s.settimeout(float(sys.argv[1]))
n = nbytes = 0
first = last = None
try:
    while True:
        data = s.recv(65535)
        if data == b"END":
            break
        now = time.monotonic()
        if first is None:
            first = now
        last = now
        n += 1
        nbytes += len(data)
except socket.timeout:
    pass
print(n, nbytes, (last - first) if n > 1 else 0.0, flush=True)
'''


def measure_capacity(seconds: float = 3.0, size: int = 1452, in_process: bool = False,
                     impairment: Impairment | None = None) -> dict:
    """Blast ``size``-byte datagrams through a relay (clean, or with ``impairment`` upstream) for
    ``seconds`` and count what a sink (another process) receives.  The relay runs as a separate
    process (``in_process``: a thread of this one, sharing its GIL with the sender).  On 2 cores
    the sender, the relay and the sink compete for the CPU: a lower bound of what it can do."""
    imp = impairment or Impairment()
    import subprocess
    sink = subprocess.Popen([sys.executable, "-c", _SINK, str(seconds + 5)], stdout=subprocess.PIPE, text=True)
    relay_proc = relay = None
    try:
        sink_port = int(sink.stdout.readline())
        if in_process:
            relay = Relay(("127.0.0.1", sink_port), up=imp, seed=1).start()
            address = relay.address
        else:
            relay_proc = subprocess.Popen(
                [sys.executable, __file__, "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{sink_port}",
                 "--stats-interval", "0", "--final-stats", "--seed", "1", *impairment_flags(imp, "up")],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            m = re.search(r"listening on (\S+):(\d+)", relay_proc.stdout.readline())
            address = (m.group(1), int(m.group(2)))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.connect(address)
        payload = b"x" * size
        sent = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(64):
                try:
                    s.send(payload)
                    sent += 1
                except OSError:
                    pass
        time.sleep(0.3)
        for _ in range(3):
            s.send(b"END")
            time.sleep(0.05)
        s.close()
        n, nbytes, span = sink.stdout.readline().split()
        n, nbytes, span = int(n), int(nbytes), float(span)
        if relay is not None:
            stats = relay.stats()
        else:
            relay_proc.send_signal(signal.SIGTERM)
            out, _ = relay_proc.communicate(timeout=10)
            stats = json.loads(out.strip().splitlines()[-1])
        span = span or seconds
        return {"datagram": size, "sent": sent, "relay_received": stats["up"]["received"],
                "relay_forwarded": stats["up"]["forwarded"], "sink_received": n,
                "seconds": span, "datagrams_per_s": n / span, "MB_per_s": nbytes / span / 1e6,
                "mode": "thread" if in_process else "process", "impairment": imp.describe()}
    finally:
        if relay is not None:
            relay.close()
        for p in (relay_proc, sink):
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.wait(5)


# -- command line ------------------------------------------------------------------------------------
FIELDS = (("loss", parse_probability, "drop probability (1%%, 0.01)"),
          ("delay", parse_duration, "fixed one-way delay (20ms)"),
          ("jitter", parse_duration, "extra uniform delay 0..JITTER, reorders (5ms)"),
          ("dup", parse_probability, "duplication probability (0.1%%)"),
          ("rate", parse_rate, "bandwidth cap (10mbit, 2MB = bytes/s; none)"),
          ("queue-time", parse_duration, "drop-tail: longest wait for the link (default 100ms)"),
          ("queue-bytes", parse_size, "drop-tail: most bytes waiting for the link (64KiB; none)"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Each impairment option sets both directions; --up-X / --down-X "
                                       "set one (and win over --X).")
    p.add_argument("--listen", default="127.0.0.1:0", help="UDP address to listen on (default 127.0.0.1:0)")
    p.add_argument("--target", help="UDP address to relay to (reverstd's tunnel address)")
    p.add_argument("--seed", default=None, help="seed of the decisions (default: random)")
    p.add_argument("--idle-timeout", type=parse_duration, default=120.0, help="forget idle flows (default 2m)")
    p.add_argument("--stats-interval", type=parse_duration, default=5.0,
                   help="print stats this often on stderr (default 5s; 0: never)")
    p.add_argument("--final-stats", action="store_true", help="print the final stats as JSON on stdout at exit")
    p.add_argument("--duration", type=parse_duration, default=None, help="exit after this long")
    p.add_argument("--blackhole", action="store_true", help="start with both directions blackholed")
    p.add_argument("--no-reorder", action="store_true", help="jitter never reorders (both directions)")
    p.add_argument("--measure-capacity", action="store_true",
                   help="measure the relay's clean throughput on loopback and exit")
    p.add_argument("--size", type=int, default=1452, help="datagram size for --measure-capacity")
    p.add_argument("--seconds", type=float, default=3.0, help="length of --measure-capacity")
    for name, parse, help_ in FIELDS:
        p.add_argument(f"--{name}", type=parse, default=None, help=help_)
        for d in DIRECTIONS:
            p.add_argument(f"--{d}-{name}", type=parse, default=None, help=argparse.SUPPRESS)
    return p


def impairment_flags(imp: Impairment, direction: str | None = None) -> list[str]:
    """Command-line flags of this script that give a direction (or both) ``imp`` (but not its
    ``blackhole``; ``reorder=False`` applies to both directions)."""
    pre = f"--{direction}-" if direction else "--"
    flags = [f"{pre}loss", repr(imp.loss), f"{pre}delay", repr(imp.delay), f"{pre}jitter", repr(imp.jitter),
             f"{pre}dup", repr(imp.dup), f"{pre}queue-time", repr(imp.queue_time)]
    if imp.rate:
        flags += [f"{pre}rate", repr(imp.rate)]
    if imp.queue_bytes is not None:
        flags += [f"{pre}queue-bytes", str(imp.queue_bytes)]
    if not imp.reorder:
        flags.append("--no-reorder")  # both directions: there is no per-direction flag for it
    return flags


def impairments_from(args) -> dict:
    out = {}
    for d in DIRECTIONS:
        kw = {}
        for name, _, _ in FIELDS:
            attr = name.replace("-", "_")
            v = getattr(args, f"{d}_{attr}")
            if v is None:
                v = getattr(args, attr)
            if v is not None:
                kw[attr] = v
        out[d] = Impairment(blackhole=args.blackhole, reorder=not args.no_reorder, **kw)
    return out


def format_stats(s: dict) -> str:
    parts = []
    for d in DIRECTIONS:
        x = s[d]
        drops = " ".join(f"{k}={v}" for k, v in x["dropped"].items() if v)
        parts.append(f"{d}: rx={x['received']} tx={x['forwarded']} dup={x['duplicated']} "
                     f"drop={x['dropped_total']}{' (' + drops + ')' if drops else ''} "
                     f"queue={x['queue_packets']}/{x['queue_bytes']}B inflight={x['in_flight']}")
    return f"flows={s['flows']} | " + " | ".join(parts)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.measure_capacity:
        imp = impairments_from(args)["up"]
        for mode in (False, True):
            r = measure_capacity(args.seconds, args.size, in_process=mode, impairment=imp)
            print(f"relay as a {r['mode']} ({r['impairment']}): {r['MB_per_s']:.1f} MB/s, {r['datagrams_per_s']:.0f} datagrams/s "
                  f"of {r['datagram']} bytes (sent {r['sent']}, relay got {r['relay_received']}, "
                  f"forwarded {r['relay_forwarded']}, sink got {r['sink_received']})", flush=True)
        return 0
    if not args.target:
        build_parser().error("--target is required")
    imps = impairments_from(args)
    relay = Relay(parse_address(args.target), parse_address(args.listen), up=imps["up"], down=imps["down"],
                  seed=args.seed, idle_timeout=args.idle_timeout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with relay:
        print(f"relay listening on {relay.address_str} -> {args.target} (seed {args.seed}); "
              f"up: {imps['up'].describe()}; down: {imps['down'].describe()}", flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        interval = args.stats_interval or None
        while not stop.is_set():
            wait = interval or 3600.0
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            stop.wait(wait)
            if relay._error is not None:
                break
            if interval and not stop.is_set():
                print(format_stats(relay.stats()), file=sys.stderr, flush=True)
            if deadline is not None and time.monotonic() >= deadline:
                break
        final = relay.stats()
    print(format_stats(final), file=sys.stderr, flush=True)
    if args.final_stats:
        print(json.dumps(final), flush=True)
    return 1 if relay._error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
