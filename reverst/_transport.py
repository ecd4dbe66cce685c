"""The gevent shell around a QUIC backend: UDP endpoints, connections and blocking streams.

* :class:`Endpoint` owns one UDP socket and one reader greenlet.  It drains a batch of
  datagrams, routes each by destination connection id, feeds each connection its share
  in one call (a coalesced read in one call of its own), then lets every touched
  connection process its events and transmit once.
* :class:`Connection` drives one backend connection (:mod:`reverst.quic`: aioquic or
  qh3, the same interface): a single libev timer, transmits coalesced per loop
  iteration, and event dispatch that only buffers data and wakes greenlets (it never
  runs application code).
* :class:`Stream` (raw bytes, used for registration) and :class:`H3Stream` (one HTTP/3
  request) give greenlets ``read()``/``write()``/``close()``/``reset()`` with
  back-pressure both ways.  A closed connection wakes every waiter with its reason.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import socket as _stdsocket
import struct
import sys
import time
from typing import Callable

import gevent
import gevent.event
import gevent.queue
import gevent.socket

from .errors import ConnectionClosed, StreamReset
from .http3 import H3_ERROR_NAMES, H3_MESSAGE_ERROR, H3_NO_ERROR, H3_REQUEST_CANCELLED
from .logs import format_address
from .protocol import AppErrorCode
from .quic import (CID_LENGTH, INVALID_TOKEN, Admission, coalesced_count, encode_stateless_reset,
                   encode_version_negotiation, initial_token_untrusted, load_backend, parse_header_untrusted,
                   stateless_reset_token)

logger = logging.getLogger(__name__)

#: Most bytes of received stream data joined into one piece per stream (Connection._process_events)
RUN_LIMIT = 256 * 1024
RECV_BATCH = 64
#: ... and at most about this many datagrams (a coalesced read holds up to 64): the loop
#: serves its other sockets between two such batches (see LOOP_TURN_LIMIT). Up to 4,096 in
#: one batch, a busy reverstd took 5-25 ms over one. At 512, beside 10 MB GETs: a small
#: GET's p99 and both processes' peak RSS fell by a third and ~10 MB, for ~15% of one
#: stream's 10 MB GET throughput (256 cost 10 MB POSTs too; docs/performance.md).
RECV_BATCH_DATAGRAMS = 512
#: A transmit scheduled once the gevent loop has spent this long (seconds) in one iteration
#: waits for the loop's next poll instead of running as a callback. A bulk sender's
#: transmits wake its writers, whose writes schedule the next transmit: a chain of callbacks
#: gevent runs without polling for at least 50 at a time, ~20 ms in a tunnel client sending
#: 10 MB GETs, while the datagrams and sockets of every other request waited (a small GET
#: beside them: p50 34 ms, Go 2.6 ms; with this and TRANSMIT_LIMIT, 3.5 ms).
LOOP_TURN_LIMIT = 0.0005
MAX_DATAGRAM = 65536
#: At most one log line about refused handshakes and Retry packets per this many seconds.
ADMISSION_LOG_INTERVAL = 10.0
#: The longest closing period (seconds) of a connection the server closes before it
#: registered (a registration refused or timed out, the unregistered cap): Connection.close(linger=).
CLOSE_LINGER_UNREGISTERED = 1.0
#: Longest an aborted stream's RESET_STREAM waits for what was queued before it (its
#: response head) to leave: the reset discards unsent data, and qh3's pacer may hold a
#: datagram back for a few ms (Stream.abort).
RESET_AFTER_SEND_LIMIT = 0.2

# ICMP errors on unconnected UDP sockets (Linux IP_RECVERR / IPV6_RECVERR, not in Python's
# socket module before 3.12): a datagram to a peer whose port is closed (a tunnel client
# killed, or exiting before its CONNECTION_CLOSE left) draws a port unreachable, queued
# with the peer's address, at once instead of after a dead-peer probe times out.
_IP_RECVERR, _IPV6_RECVERR = 11, 25
_ORIGIN_ICMP, _ORIGIN_ICMP6 = 2, 3
_UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})

# Linux UDP segmentation offload: one sendmsg() carries many equal-size datagrams
# (UDP_SEGMENT, "GSO"), one recvmsg() returns several coalesced ones (UDP_GRO).
# REVERST_UDP_OFFLOAD=off turns both off (to measure them, or where a kernel misbehaves).
_SOL_UDP, _UDP_SEGMENT, _UDP_GRO = 17, 103, 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000  # under the 64 KiB an IP packet may carry
_GSO_REFUSED = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE})
_GRO_CMSG_SPACE = _stdsocket.CMSG_SPACE(4)


def _offload_enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("REVERST_UDP_OFFLOAD", "on").lower() not in (
        "off", "0", "no", "false")

now = time.monotonic


def parse_address(value, default_host: str = "0.0.0.0", what: str = "address") -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``:port`` or a (host, port) tuple -> (host, port)."""
    if isinstance(value, tuple):
        return value[0], int(value[1])
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid {what} {value!r}: expected host:port")
    return host.strip("[]") or default_host, int(port)


class Endpoint:
    """One UDP socket; many connections (server) or one (client)."""

    def __init__(self, sock: gevent.socket.socket, *, backend=None, server_config=None,
                 empty_cid_fallback: Callable[[], tuple] | None = None,
                 on_connection: Callable[["Connection"], None] | None = None,
                 connection_options: dict | None = None, admission: Admission | None = None) -> None:
        self.sock = sock
        self._raw = sock._sock  # the non-blocking stdlib socket under gevent's
        #: the QUIC backend module (reverst.quic); its configurations must be used with it
        self.backend = backend if backend is not None else load_backend()
        self._server_config = server_config
        #: a function returning (backend, server configuration) for clients whose source
        #: connection id is empty, when ``backend`` cannot serve them (SERVES_EMPTY_CLIENT_CIDS
        #: in reverst.quic); called at the first such client (it imports another library)
        self._empty_cid_fallback = empty_cid_fallback
        self._fallback: tuple | None = None
        self._on_connection = on_connection
        self._connection_options = connection_options or {}
        self._by_cid: dict[bytes, Connection] = {}
        self.connections: set[Connection] = set()
        self._by_peer: dict[tuple, set[Connection]] = {}  # (ICMP errors name the peer)
        #: who gets a connection (servers; reverst.quic._admission): Retry, caps, handshake timeout
        self.admission = admission
        self._admission_logged: tuple[float, int, int] = (0.0, 0, 0)  # (when, refusals, retries)
        self._sweeper: gevent.Greenlet | None = None
        self.dropped_datagrams = 0
        self._gso = _offload_enabled()
        self._gro = _offload_enabled() and _enable_gro(sock)
        self._reader: gevent.Greenlet | None = None
        loop = gevent.get_hub().loop
        self._counted_loop = loop if hasattr(loop, "iteration") else None  # (libev counts; libuv does not)
        self._turn = -1
        self._turn_since = 0.0

    @classmethod
    def bind(cls, host: str, port: int, **kwargs) -> "Endpoint":
        infos = _stdsocket.getaddrinfo(host, port, type=_stdsocket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        sock = gevent.socket.socket(family, _stdsocket.SOCK_DGRAM)
        try:
            if family == _stdsocket.AF_INET6:
                sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 0)
            sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_SNDBUF, 4 * 1024 * 1024)
            _enable_icmp_errors(sock, family)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        return cls(sock, **kwargs)

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()

    def loop_turn_age(self) -> float:
        """How long (seconds) the gevent loop has been in its current iteration, from the
        first time this endpoint asked in it (0.0 then, and always where the loop does not
        count its iterations)."""
        loop = self._counted_loop
        if loop is None:
            return 0.0
        turn = loop.iteration
        if turn != self._turn:
            self._turn, self._turn_since = turn, now()
            return 0.0
        return now() - self._turn_since

    def start(self) -> None:
        self._reader = gevent.spawn(self._read_loop)
        if self.admission is not None:
            self._sweeper = gevent.spawn(self._sweep_handshakes)

    def close(self) -> None:
        for conn in list(self.connections):
            conn._terminated()
        for greenlet in (self._reader, self._sweeper):
            if greenlet is not None:
                greenlet.kill(block=False)
        self.sock.close()

    # -- connections --------------------------------------------------------------
    def connect(self, addr: tuple, configuration, **options) -> "Connection":
        quic = self.backend.client_connection(configuration, **options)
        conn = Connection(self, quic, addr)
        quic.connect(addr, now=now())
        conn.transmit()
        return conn

    def _add(self, conn: "Connection") -> None:
        self.connections.add(conn)
        self._by_peer.setdefault(conn.peer[:2], set()).add(conn)
        for cid in conn.cids:
            self._by_cid[cid] = conn

    def _remove(self, conn: "Connection") -> None:
        self.connections.discard(conn)
        peers = self._by_peer.get(conn.peer[:2])
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self._by_peer[conn.peer[:2]]
        for cid in conn.cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn.cids.clear()
        if self.admission is not None:
            self.admission.ended(conn)

    def registered(self, conn: "Connection") -> None:
        """The server took ``conn`` as a tunnel: it no longer counts as unregistered."""
        if self.admission is not None:
            self.admission.registered(conn)

    def _route(self, data: bytes, addr: tuple) -> "Connection | None":
        if self._server_config is None:  # client: one connection per socket
            return next(iter(self.connections), None)
        if data and not data[0] & 0x80:  # short header, the usual case: the id is all we need
            conn = self._by_cid.get(data[1:1 + CID_LENGTH])
            if conn is not None:
                return conn
        header = parse_header_untrusted(data, CID_LENGTH)
        if header is None:
            self.dropped_datagrams += 1
            return None
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            if not header.long:
                self._send_stateless_reset(header.destination_cid, len(data), addr)
                return None
            conn = self._accept(header, data, addr)
        return conn

    def _send_stateless_reset(self, cid: bytes, size: int, addr: tuple) -> None:
        """Tell a peer of a connection we do not know (e.g. from before a restart) that it is gone."""
        self.dropped_datagrams += 1
        key = self._connection_options.get("reset_key")
        if key is not None:
            reset = encode_stateless_reset(stateless_reset_token(key, cid), size)
            if reset is not None:
                self._sendto(reset, addr)

    def _accept(self, header, data: bytes, addr: tuple) -> "Connection | None":
        backend, cfg = self.backend, self._server_config
        if not header.source_cid and self._empty_cid_fallback is not None:
            if self._fallback is None:
                self._fallback = self._empty_cid_fallback()
            backend, cfg = self._fallback
        if len(data) < 1200:
            self.dropped_datagrams += 1
            return None
        if header.version not in cfg.supported_versions:
            if header.version:  # (never answer a version negotiation packet)
                self._sendto(encode_version_negotiation(header, cfg.supported_versions), addr)
            return None
        if not header.initial:
            self.dropped_datagrams += 1
            return None
        original, retry_cid = header.destination_cid, None
        admission = self.admission
        if admission is not None:
            token = initial_token_untrusted(data, header)
            if token is None:
                self.dropped_datagrams += 1
                return None
            t = now()
            verdict = admission.admit_untrusted(header, token, addr, t, os.urandom(CID_LENGTH))
            if verdict.action != "accept":
                if verdict.action == "retry":
                    self._sendto(admission.retry_packet(header, addr, verdict.retry_cid, t), addr)
                elif verdict.action == "close":
                    self._close_initial(backend, cfg, verdict, data, addr, t)
                self._log_admission(t)
                return None
            original, retry_cid = verdict.original_cid, verdict.retry_cid
        quic = backend.server_connection(cfg, original, retry_cid, **self._connection_options)
        conn = Connection(self, quic, addr, backend)
        conn.cids.add(header.destination_cid)
        self._add(conn)
        if admission is not None:
            admission.started(conn, addr, now())
        if self._on_connection is not None:
            self._on_connection(conn)
        return conn

    def _close_initial(self, backend, cfg, verdict, data: bytes, addr, t: float) -> None:
        """Answer an Initial with a CONNECTION_CLOSE of INVALID_TOKEN and keep nothing: the
        library reads it (for the Initial keys and the client's id) and writes the close."""
        quic = backend.server_connection(cfg, verdict.original_cid, verdict.retry_cid, **self._connection_options)
        try:
            quic.receive_datagram(data, addr, t)
            quic.close(error_code=INVALID_TOKEN, frame_type=0, reason_phrase="invalid token")
            self.send_datagrams(quic.datagrams_to_send(now=t))
        except Exception:  # noqa: BLE001 (an Initial the library rejects: nothing to answer)
            logger.debug("no INVALID_TOKEN close for an Initial from %s", format_address(addr), exc_info=True)

    def _log_admission(self, t: float) -> None:
        """One line at most every ADMISSION_LOG_INTERVAL seconds while handshakes are refused
        or answered with a Retry (a flood must not flood the log too)."""
        when, refused_before, retries_before = self._admission_logged
        if t - when < ADMISSION_LOG_INTERVAL:
            return
        admission = self.admission
        refused = sum(admission.refused.values())
        self._admission_logged = (t, refused, admission.retries)
        reasons = ", ".join(f"{k} {v}" for k, v in admission.refused.items() if v)
        log = logger.debug if refused == refused_before and admission.mode.value == "always" else logger.info
        log("new QUIC connections: %d answered with a Retry, %d refused since the last report (refusals so far: %s); "
            "%d handshakes in progress, %d connections not registered yet", admission.retries - retries_before,
            refused - refused_before, reasons or "none", admission.handshaking, admission.unregistered)

    def _sweep_handshakes(self) -> None:
        """Drop the connections whose handshake is overdue (the admission's timeout), silently:
        the peer never proved it can answer, nothing more is sent to it."""
        admission = self.admission
        while True:
            deadline = admission.next_deadline()
            gevent.sleep(1.0 if deadline is None else min(1.0, max(0.05, deadline - now())))
            for conn in admission.expired(now()):
                logger.debug("%r: handshake not finished in %gs: dropped", conn, admission.handshake_timeout)
                conn._terminated(conn._ev.ConnectionTerminated(
                    error_code=AppErrorCode.SERVER_ERROR, frame_type=None, reason_phrase="handshake timeout"))

    def _read_loop(self) -> None:
        hub = gevent.get_hub()
        readable = hub.loop.io(self._raw.fileno(), 1)
        recvfrom = self._recv_coalesced if self._gro else self._raw.recvfrom
        while True:
            hub.wait(readable)  # a datagram, or a queued ICMP error (which must be drained)
            batch = []
            budget = RECV_BATCH_DATAGRAMS
            while len(batch) < RECV_BATCH and budget > 0:
                try:
                    got = recvfrom(MAX_DATAGRAM)
                    batch.append(got)
                    data = got[0]
                    budget -= 1 if data.__class__ is not tuple else coalesced_count(*data)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if self.sock.closed:
                        return
                    if exc.errno not in _UNREACHABLE:  # (those are told by _drain_errors)
                        logger.debug("recvfrom failed: %s", exc)
                    break
            if not batch:
                self._drain_errors()
                continue
            t = now()
            # Each connection gets its datagrams in one call (one native call with qh3),
            # in arrival order; a change of peer address starts a new call, and a coalesced
            # read goes whole in a call of its own (split in qh3's native core).
            touched: dict[Connection, list] = {}
            for data, addr in batch:
                coalesced = None
                if data.__class__ is tuple:  # datagrams GRO coalesced: one peer, routed once
                    coalesced, data = data, data[0][:data[1]]
                try:
                    conn = self._route(data, addr)
                except Exception:  # a datagram must never take the endpoint down
                    self.dropped_datagrams += 1 if coalesced is None else coalesced_count(*coalesced)
                    logger.exception("dropping a datagram from %s", addr)
                    continue
                if conn is None:
                    continue
                pending = touched.get(conn)
                if pending is None:
                    pending = touched[conn] = [addr]
                elif pending[0] != addr:
                    self._feed(conn, pending, t)
                    pending[:] = [addr]
                if coalesced is None:
                    pending.append(data)
                else:  # in arrival order: what came before it first
                    self._feed(conn, pending, t)
                    del pending[1:]
                    self._feed_coalesced(conn, coalesced, addr, t)
            for conn, pending in touched.items():
                self._feed(conn, pending, t)
                conn.process()

    def _feed(self, conn: "Connection", pending: list, t: float) -> None:
        addr, datagrams = pending[0], pending[1:]
        if not datagrams:
            return
        try:
            if len(datagrams) == 1:
                conn.quic.receive_datagram(datagrams[0], addr, t)
            else:
                conn.quic.receive_datagrams(datagrams, addr, t)
        except Exception:  # a datagram must never take the endpoint down
            self.dropped_datagrams += len(datagrams)
            logger.exception("%r: dropping %d datagrams from %s", conn, len(datagrams), addr)

    def _feed_coalesced(self, conn: "Connection", coalesced: tuple, addr, t: float) -> None:
        buffer, segment = coalesced
        try:
            conn.quic.receive_coalesced(buffer, segment, addr, t)
        except Exception:  # a datagram must never take the endpoint down
            self.dropped_datagrams += coalesced_count(buffer, segment)
            logger.exception("%r: dropping %d coalesced bytes from %s", conn, len(buffer), addr)

    def _recv_coalesced(self, size: int):
        """recvfrom() with UDP_GRO: (data, addr), data being (buffer, segment size) when the
        kernel coalesced several datagrams (from one peer): each is ``segment size`` bytes
        of the buffer, the last one shorter or equal."""
        data, ancillary, _, addr = self._raw.recvmsg(size, _GRO_CMSG_SPACE)
        for level, kind, value in ancillary:
            if level == _SOL_UDP and kind == _UDP_GRO and len(value) >= 4:
                segment = int.from_bytes(value[:4], sys.byteorder)
                if 0 < segment < len(data):
                    return (data, segment), addr
        return data, addr

    def send_datagrams(self, datagrams: list) -> None:
        """Send ``[(data, addr), ...]``: runs of equal-size datagrams to one peer (and a
        shorter last one) go out in one sendmsg() with UDP_SEGMENT when the kernel allows."""
        n = len(datagrams)
        if n < 2 or not self._gso:
            for data, addr in datagrams:
                self._sendto(data, addr)
            return
        i = 0
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            limit = i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
            j = i + 1
            while j < n and j < limit and datagrams[j][1] == addr and len(datagrams[j][0]) == size:
                j += 1
            if j < n and j < limit and datagrams[j][1] == addr and len(datagrams[j][0]) < size:
                j += 1  # a shorter datagram may end a segmented send
            if j - i == 1:
                self._sendto(data, addr)
            else:
                self._send_segmented([d for d, _ in datagrams[i:j]], size, addr)
            i = j

    def _send_segmented(self, segments: list, size: int, addr: tuple) -> None:
        control = [(_SOL_UDP, _UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
        for _ in range(2):
            try:
                self._raw.sendmsg(segments, control, 0, addr)
                return
            except (BlockingIOError, InterruptedError):
                self.dropped_datagrams += len(segments)  # it is UDP: QUIC retransmits
                return
            except OSError as exc:
                if exc.errno in _UNREACHABLE:
                    continue  # a queued ICMP error (see _sendto): send again
                if exc.errno in _GSO_REFUSED:
                    logger.info("UDP segmentation offload refused (%s): sending datagrams one by one", exc)
                    self._gso = False
                    for data in segments:
                        self._sendto(data, addr)
                    return
                logger.debug("sendmsg %s failed: %s", addr, exc)
                return

    def _sendto(self, data: bytes, addr: tuple) -> None:
        for _ in range(2):
            try:
                self._raw.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self.dropped_datagrams += 1  # it is UDP: QUIC retransmits
                return
            except OSError as exc:
                # An ICMP error queued for some earlier datagram (maybe to another peer)
                # fails the next send, unsent: report it (_drain_errors) and send again.
                if exc.errno not in _UNREACHABLE:
                    logger.debug("sendto %s failed: %s", addr, exc)
                    return
        logger.debug("sendto %s failed twice: the peer is unreachable", addr)

    def _drain_errors(self) -> None:
        """Read the socket's ICMP error queue; suspect the connections of unreachable peers."""
        while True:
            try:
                _, ancillary, _, addr = self._raw.recvmsg(1, 256, _stdsocket.MSG_ERRQUEUE)
            except OSError:  # BlockingIOError when empty; anything else: nothing to read
                return
            for _level, _type, data in ancillary:
                if len(data) < 8:
                    continue
                err, origin = struct.unpack_from("=IB", data)
                if origin in (_ORIGIN_ICMP, _ORIGIN_ICMP6) and err in _UNREACHABLE and addr:
                    self._unreachable(addr[:2], err)

    def _unreachable(self, addr: tuple, err: int) -> None:
        for conn in list(self._by_peer.get(addr, ())):
            logger.debug("%r: ICMP says %s", conn, errno.errorcode.get(err, err))
            conn.suspect("peer unreachable")


def _enable_gro(sock) -> bool:
    """Ask for coalesced receives (UDP_GRO); False where the kernel refuses."""
    try:
        sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
    except OSError:
        return False
    return True


def _enable_icmp_errors(sock, family: int) -> None:
    """Queue ICMP errors with the peer's address (see _IP_RECVERR); Linux only."""
    if not sys.platform.startswith("linux"):
        return
    if family == _stdsocket.AF_INET6:
        sock.setsockopt(_stdsocket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
    try:
        sock.setsockopt(_stdsocket.IPPROTO_IP, _IP_RECVERR, 1)  # (v4-mapped peers of a v6 socket too)
    except OSError:
        if family != _stdsocket.AF_INET6:
            raise


class Connection:
    """One QUIC connection driven from the gevent loop."""

    def __init__(self, endpoint: Endpoint, quic, addr: tuple, backend=None) -> None:
        self.endpoint = endpoint
        #: the QUIC backend module of ``quic`` (the endpoint's, unless it fell back)
        self.backend = backend if backend is not None else endpoint.backend
        self.quic = quic
        self.peer = addr
        self.cids: set[bytes] = {quic.host_cid}
        self.h3 = None  # the backend's HTTP/3 layer, once attach_h3() ran
        self._ev = self.backend.events
        self._stream_errors = self.backend.STREAM_ERRORS
        #: a writer blocks above the high water mark (the backend's; see its send_backlog)
        #: and is woken at half of it
        self.send_high_water = self.backend.SEND_HIGH_WATER
        self._transmit_limit = self.backend.TRANSMIT_LIMIT
        self._is_server = endpoint._server_config is not None
        self.handshake_done = gevent.event.Event()
        self.closed = gevent.event.Event()
        self.close_reason: ConnectionClosed | None = None
        self.connected_at = time.time()
        #: called (in the loop, must not block) with each new H3 request stream (HTTP server role)
        self.on_request: Callable[["H3Stream"], None] | None = None
        #: the stream id of the latest request the peer opened (HTTP server role), -1 before
        self.last_request_id = -1
        self._close_callbacks: list[Callable[["Connection"], None]] = []
        self._raw: dict[int, Stream] = {}
        self._h3streams: dict[int, H3Stream] = {}
        self._pending: list = []  # backend events that came before HTTP/3 was attached
        self._incoming_raw: gevent.queue.Queue = gevent.queue.Queue()
        self._blocked_writers: set[Stream] = set()
        self._stream_credit: gevent.event.Event | None = None  # request openers wait on it
        self._settings: gevent.event.Event | None = None  # set once the peer's H3 SETTINGS came
        self._loop = gevent.get_hub().loop
        self._timer = None
        self._timer_at: float | None = None
        self._transmit_scheduled = False
        self._transmit_timer = None  # (schedule_transmit, once the loop has not polled for a while)
        #: stream id -> (error code, deadline) of aborts whose reset waits for the data before it
        self._resets_after_send: dict[int, tuple[int, float]] = {}
        self._process_scheduled = False
        self._close_by: float | None = None  # (see close(linger=))
        self._ended = False  # _terminated() ran: removed from the endpoint
        endpoint._add(self)

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed.is_set() else ("OPEN" if self.handshake_done.is_set() else "HANDSHAKE")
        return (f"<Connection peer={format_address(self.peer)} {state} "
                f"streams={len(self._h3streams) + len(self._raw)}>")

    @property
    def open_streams(self) -> int:
        """Request (and registration) streams this side still tracks: 0 when idle."""
        return len(self._h3streams) + len(self._raw)

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    def on_close(self, callback: Callable[["Connection"], None]) -> None:
        if self.closed.is_set():
            callback(self)
        else:
            self._close_callbacks.append(callback)

    # -- driving the backend ------------------------------------------------------------
    def process(self) -> None:
        """Handle everything the backend queued, wake blocked writers and transmit."""
        self._process_scheduled = False
        try:
            self._process_events()
        except Exception:
            logger.exception("%r: internal error", self)
            self.quic.close(error_code=AppErrorCode.SERVER_ERROR, reason_phrase="internal error")
        self._wake_writers()
        credit = self._stream_credit
        if credit is not None and (self.quic.can_open_stream() or self.close_reason is not None):
            credit.set()
        # Not at once: greenlets woken above get to answer first, in the same transmit.
        self.schedule_transmit()

    def schedule_process(self) -> None:
        """Process events soon (flow control let held-back events through)."""
        if not self._process_scheduled:
            self._process_scheduled = True
            self._loop.run_callback(self.process)

    def _wake_writers(self) -> None:
        if self._blocked_writers:
            for stream in list(self._blocked_writers):
                if (stream._error is not None
                        or self.quic.send_backlog(stream.stream_id) <= self.send_high_water // 2):
                    self._blocked_writers.discard(stream)
                    stream._writable.set()

    def schedule_transmit(self) -> None:
        """Coalesce the sends of one loop iteration into one transmit."""
        if not self._transmit_scheduled:
            self._transmit_scheduled = True
            if self.endpoint.loop_turn_age() < LOOP_TURN_LIMIT:
                self._loop.run_callback(self._scheduled_transmit)
                return
            # The loop has run callbacks for a while without polling (see LOOP_TURN_LIMIT):
            # a zero timer fires after the next poll, below the default priority so that
            # the sockets found ready then go first (libev runs a turn's ready watchers by
            # priority, and the latest queued first).
            if self._transmit_timer is None:
                self._transmit_timer = self._loop.timer(0.0, 0.0, True, -1)
            self._transmit_timer.start(self._scheduled_transmit)

    def _scheduled_transmit(self) -> None:
        if self._transmit_scheduled:
            self.transmit(limited=True)

    def transmit(self, limited: bool = False) -> None:
        """Send what the backend has to send; ``limited``: at most the backend's
        TRANSMIT_LIMIT datagrams now, the rest in a transmit scheduled after them (the
        loop's scheduled transmits; a direct call, as before a close or a reset, sends all)."""
        self._transmit_scheduled = False
        if self._ended:
            return
        limit = self._transmit_limit if limited else None
        datagrams = self.quic.datagrams_to_send(now(), limit)
        if datagrams:
            self.endpoint.send_datagrams(datagrams)
            if len(datagrams) == limit:
                self.schedule_transmit()  # the rest after the others' turn (TRANSMIT_LIMIT)
        if self._resets_after_send:
            self._send_resets()
        self._check_closed()
        self._arm_timer()
        self._wake_writers()  # (with qh3, what is sent no longer counts as buffered)

    def _reset_after_send(self, stream_id: int, error_code: int) -> None:
        """Reset the stream once what is queued on it has left (see Stream.abort), at the
        latest after RESET_AFTER_SEND_LIMIT."""
        self._resets_after_send[stream_id] = (error_code, now() + RESET_AFTER_SEND_LIMIT)
        timer = self._loop.timer(RESET_AFTER_SEND_LIMIT, 0.0, False)
        timer.start(self._reset_timer_fired, timer)

    def _reset_timer_fired(self, timer) -> None:
        timer.close()
        if not self._ended and self._resets_after_send:
            self._send_resets(slack=0.01)  # (schedules the transmit of what it resets)

    def _send_resets(self, slack: float = 0.0) -> None:
        t = now() + slack
        for stream_id, (error_code, deadline) in list(self._resets_after_send.items()):
            if t >= deadline or not self.quic.send_buffered(stream_id):
                del self._resets_after_send[stream_id]
                try:
                    self.quic.reset_stream(stream_id, error_code)
                except self._stream_errors:  # gone meanwhile: nothing to reset
                    continue
                self.schedule_transmit()

    def _arm_timer(self) -> None:
        if self._ended:
            return
        at = self.quic.get_timer()
        if self._close_by is not None and (at is None or self._close_by < at):
            at = self._close_by
        if at is None:
            self._stop_timer()
            return
        if self._timer is not None and self._timer_at <= at:
            return  # the armed timer fires first and re-arms
        self._stop_timer()
        self._timer = self._loop.timer(max(0.0, at - now()))
        self._timer_at = at
        self._timer.start(self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _on_timer(self) -> None:
        self._stop_timer()
        t = now()
        if self._close_by is not None and t >= self._close_by:
            self._terminated(self.quic.closed_event)  # the closing period is over (close(linger=))
            return
        self.quic.handle_timer(now=t)
        self.process()

    # -- events ---------------------------------------------------------------------
    def _process_events(self) -> None:
        quic, ev = self.quic, self._ev
        stream_events = (ev.StreamDataReceived, ev.StreamReset, ev.StopSendingReceived)
        data_event = ev.StreamDataReceived
        run: dict | None = None  # a run of request-stream data events: stream id -> its events
        run_bytes = 0
        while True:
            event = quic.next_event()
            if event is not None and event.__class__ is data_event and not event.stream_id & 2:
                # Consecutive pieces of a stream are parsed as one (streams sharing packets
                # interleave them): the HTTP/3 layer's cost is per piece, ~45% of a busy
                # reverstd's CPU on parallel downloads. Each stream keeps its order; no
                # other kind of event is passed over.
                if run is None:
                    run, run_bytes = {event.stream_id: [event]}, len(event.data)
                else:
                    run.setdefault(event.stream_id, []).append(event)
                    run_bytes += len(event.data)
                if run_bytes >= RUN_LIMIT:  # (the gate on held bytes sees them once passed on)
                    self._pass_run(run)
                    run = None
                continue
            if run is not None:
                self._pass_run(run)
                run = None
            if event is None:
                break
            if isinstance(event, stream_events):
                self._stream_event(event)
            elif isinstance(event, ev.HandshakeCompleted):
                admission = self.endpoint.admission
                if admission is not None and not admission.handshake_done(self):
                    # over the unregistered caps (checked at its Initial, passed meanwhile):
                    # 0x1, the client retries later
                    self._begin_close(AppErrorCode.SERVER_ERROR, "server busy", CLOSE_LINGER_UNREGISTERED)
                self.handshake_done.set()
            elif isinstance(event, ev.ConnectionIdIssued):
                self.cids.add(event.connection_id)
                self.endpoint._by_cid[event.connection_id] = self
            elif isinstance(event, ev.ConnectionIdRetired):
                self.cids.discard(event.connection_id)
                if self.endpoint._by_cid.get(event.connection_id) is self:
                    del self.endpoint._by_cid[event.connection_id]
            elif isinstance(event, ev.ConnectionTerminated):
                self._terminated(event)
        self._check_closed()

    def _pass_run(self, run: dict) -> None:
        for pieces in run.values():
            self._stream_event(pieces[0] if len(pieces) == 1 else _joined(pieces))

    def _stream_event(self, event) -> None:
        sid = event.stream_id
        raw = self._raw.get(sid)
        if raw is not None:
            raw._on_quic_event(event)
        elif self.h3 is not None:
            self._h3_event(event)
        elif isinstance(event, self._ev.StreamDataReceived) and sid % 4 == 0 and self._is_server:
            raw = self._raw[sid] = Stream(self, sid)
            raw._on_quic_event(event)
            self._incoming_raw.put(raw)
        else:  # H3 traffic racing ahead of registration: replay when H3 is attached
            self._pending.append(event)

    def _h3_event(self, event) -> None:
        h3, ev = self.h3, self._ev
        sid = event.stream_id
        known = self._h3streams.get(sid)
        if known is None and not sid & 2 and not h3.is_request_stream(sid):
            return  # e.g. a second registration attempt: never parsed as HTTP/3
        kind = event.__class__
        if known is not None and known._discarding and kind is not ev.StopSendingReceived:
            if kind is ev.StreamReset or event.end_stream:
                self._forget(known)
            return
        data_received, headers_received = ev.DataReceived, ev.HeadersReceived
        for h3_event in h3.handle_event(event):
            h3_kind = h3_event.__class__
            event_sid = h3_event.stream_id if h3_kind is data_received or h3_kind is headers_received else None
            stream = known if event_sid == sid else self._h3streams.get(event_sid)
            if h3_kind is data_received:
                if stream is not None:
                    stream._on_data(h3_event.data, h3_event.stream_ended)
            elif h3_kind is headers_received:
                if stream is None:
                    if self.on_request is None or not h3.is_request_stream(event_sid):
                        continue
                    stream = self._h3streams[event_sid] = H3Stream(self, event_sid)
                    if event_sid == sid:
                        known = stream
                    stream._on_headers(h3_event.headers, h3_event.stream_ended)
                    self.quic.busy += 1
                    if event_sid > self.last_request_id:
                        self.last_request_id = event_sid
                    self.on_request(stream)
                else:
                    stream._on_headers(h3_event.headers, h3_event.stream_ended)
        if h3.malformed:
            self._abort_malformed(h3)
        if self._settings is not None and h3.received_settings is not None:
            self._settings.set()
        if kind is ev.StreamReset or kind is ev.StopSendingReceived:
            stream = self._h3streams.get(sid)
            if stream is not None:
                stream._on_quic_event(event)
            if kind is ev.StreamReset:
                h3.forget_stream(sid)

    def _abort_malformed(self, h3) -> None:
        """Fail just the streams whose message was malformed (not the connection)."""
        for bad_id, reason in list(h3.malformed.items()):
            if reason is None:
                continue  # handled; further frames are dropped until the stream is forgotten
            h3.malformed[bad_id] = None
            logger.info("%r: malformed HTTP/3 message on stream %d: %s", self, bad_id, reason)
            stream = self._h3streams.get(bad_id)
            if stream is not None:
                stream._eof = False
                stream.reset(H3_MESSAGE_ERROR)
            else:
                self.quic.reset_stream(bad_id, H3_MESSAGE_ERROR)
                self.quic.stop_stream(bad_id, H3_MESSAGE_ERROR)
        if len(h3.malformed) > 1000:
            self.quic.close(error_code=H3_MESSAGE_ERROR, reason_phrase="too many malformed messages")

    def attach_h3(self, *, http_client: bool):
        """Start HTTP/3 on this connection (after registration) and replay early events."""
        self.h3 = self.backend.h3_connection(self.quic, http_client=http_client)
        pending, self._pending = self._pending, []
        for event in pending:
            self._h3_event(event)
        self.schedule_transmit()
        return self.h3

    def wait_settings(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) for the peer's HTTP/3 SETTINGS; True once they came."""
        if self.h3 is not None and self.h3.received_settings is not None:
            return True
        if self._settings is None:
            self._settings = gevent.event.Event()
        self._settings.wait(timeout)
        return self.h3 is not None and self.h3.received_settings is not None

    # -- streams ----------------------------------------------------------------------
    def open_stream(self) -> "Stream":
        """Open a raw client-initiated bidirectional stream (registration)."""
        self._raise_if_closed()
        sid = self.quic.open_stream()
        stream = self._raw[sid] = Stream(self, sid)
        return stream

    def accept_stream(self, timeout: float | None = None) -> "Stream":
        """Wait for the peer's next raw bidirectional stream."""
        self._raise_if_closed()
        item = self._incoming_raw.get(timeout=timeout)
        if item is None:
            raise self.close_reason
        return item

    def open_request(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> "H3Stream":
        """Send request HEADERS on a new stream (HTTP client role); waits while the peer's
        stream limit allows no more."""
        self._raise_if_closed()
        while not self.quic.can_open_stream():
            if self._stream_credit is None:
                self._stream_credit = gevent.event.Event()
            self._stream_credit.clear()
            self._stream_credit.wait()
            self._raise_if_closed()
        sid = self.quic.open_stream()
        stream = self._h3streams[sid] = H3Stream(self, sid)
        self.quic.busy += 1
        self.h3.send_headers(sid, headers, end_stream=end_stream)
        stream._send_ended = end_stream
        self.schedule_transmit()
        return stream

    def _forget(self, stream: "Stream") -> None:
        if self._h3streams.get(stream.stream_id) is stream:
            del self._h3streams[stream.stream_id]
            self.quic.busy -= 1
            if self.h3 is not None:
                self.h3.forget_stream(stream.stream_id)
        elif self._raw.get(stream.stream_id) is stream:
            del self._raw[stream.stream_id]
        self._blocked_writers.discard(stream)
        if self.quic.release(stream.stream_id):
            self.schedule_process()

    def suspect(self, reason: str) -> None:
        """The network says the peer may be gone: probe it now (see reverst.quic._common.Liveness.suspect)."""
        if self.is_open:
            self.quic.suspect(now(), reason)
            self.schedule_transmit()

    # -- closing ----------------------------------------------------------------------
    @property
    def going_away(self) -> bool:
        """The peer sent an HTTP/3 GOAWAY: it is stopping and takes no new request."""
        return self.h3 is not None and self.h3.goaway_received

    def send_goaway(self, final: bool = False) -> None:
        """HTTP/3 GOAWAY (HTTP server role), one of the two steps of a graceful stop (RFC 9114
        §5.2): first the largest id there is, "send no more"; ``final``: the id after the
        latest request the peer opened, from which nothing will be processed."""
        if self.is_open and self.h3 is not None:
            first = 0 if self._is_server else 1  # the peer's first bidirectional stream
            if not final:
                stream_id = (1 << 62) - 4 + first  # (the largest stream id of the peer's)
            elif self.last_request_id >= 0:
                stream_id = self.last_request_id + 4
            else:
                stream_id = first
            self.h3.send_goaway(stream_id)
            self.schedule_transmit()

    def close(self, error_code: int = AppErrorCode.OK, reason: str = "", linger: float | None = None) -> None:
        """Send CONNECTION_CLOSE. The library then keeps the connection in its closing state
        (answering late packets with the close again) for 3 PTO (RFC 9000 §10.2) before it
        reports the end; ``linger`` bounds that (seconds): for connections that are nothing
        to us yet, whose PTO can be inflated (RTT samples taken while the process is starved
        of CPU during a flood made it 8-20 s). A peer that writes after it gets a stateless reset."""
        if not self.closed.is_set():
            self._begin_close(error_code, reason, linger)
            self.transmit()

    def _begin_close(self, error_code: int, reason: str, linger: float | None) -> None:
        if linger is not None:
            self._close_by = now() + linger
        self.quic.close(error_code=error_code, reason_phrase=reason)

    def _raise_if_closed(self) -> None:
        if self.close_reason is not None:
            raise self.close_reason

    def _check_closed(self) -> None:
        if self.close_reason is None:
            event = self.quic.closed_event
            if event is not None:
                self._mark_closed(event)

    def _mark_closed(self, event) -> None:
        if self.close_reason is not None:
            return
        application = event.frame_type is None
        # (the HTTP/3 layers close for QPACK and frame errors without a reason phrase)
        reason = event.reason_phrase or (H3_ERROR_NAMES.get(event.error_code) if application else None)
        self.close_reason = ConnectionClosed(reason or "connection closed", event.error_code, application=application)
        self.closed.set()
        for stream in list(self._raw.values()) + list(self._h3streams.values()):
            stream._fail(self.close_reason)
        self._incoming_raw.put(None)
        if self._stream_credit is not None:
            self._stream_credit.set()
        if self._settings is not None:
            self._settings.set()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("close callback failed")

    def _terminated(self, event=None) -> None:
        if self._ended:
            return
        self._ended = True
        self._mark_closed(event or self._ev.ConnectionTerminated(
            error_code=AppErrorCode.OK, frame_type=None, reason_phrase="endpoint closed"))
        self._stop_timer()
        if self._transmit_timer is not None:
            self._transmit_timer.close()
            self._transmit_timer = None
        self._raw.clear()
        self._h3streams.clear()
        self._blocked_writers.clear()
        self.endpoint._remove(self)


def _joined(pieces: list):
    """One data event for consecutive data events of a stream (the first, extended)."""
    first = pieces[0]
    first.data = b"".join([piece.data for piece in pieces])
    first.end_stream = pieces[-1].end_stream
    return first


class Stream:
    """A blocking-style view of one bidirectional QUIC stream."""

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._error: Exception | None = None  # fails reads (and writes)
        self._send_error: Exception | None = None  # fails writes only
        self._send_ended = False
        self._discarding = False
        self._readable = gevent.event.Event()
        self._writable = gevent.event.Event()
        #: called (in the hub) whenever there is something new to read: data, end or error
        self.on_readable: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.stream_id} peer={format_address(self.conn.peer)}>"

    # called from the connection's event processing (never blocks)
    def _on_quic_event(self, event) -> None:
        ev = self.conn._ev
        if isinstance(event, ev.StreamDataReceived):
            self._on_data(event.data, event.end_stream)
        elif isinstance(event, ev.StreamReset):
            self._fail(StreamReset(self.stream_id, event.error_code))
        elif isinstance(event, ev.StopSendingReceived):
            self._send_error = StreamReset(self.stream_id, event.error_code)
            self._writable.set()

    def _on_data(self, data: bytes, end: bool) -> None:
        if data:
            if self._discarding:
                return
            self._chunks.append(data)
            self.conn.quic.hold(self.stream_id, len(data))
        if end:
            self._eof = True
        self._readable.set()
        if self.on_readable is not None:
            self.on_readable()

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._readable.set()
        self._writable.set()
        if self.on_readable is not None:
            self.on_readable()

    # -- reading ------------------------------------------------------------------------
    def read(self, n: int = -1, timeout: float | None = None) -> bytes:
        """Up to ``n`` bytes (all buffered if n < 0); b"" at end of stream.

        Raises :class:`StreamReset` or :class:`ConnectionClosed`, and
        ``gevent.Timeout`` after ``timeout`` seconds without data.
        """
        chunks = self._chunks
        while not chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._readable.clear()
            if not self._readable.wait(timeout):
                raise gevent.Timeout(timeout)
        if n < 0:
            data = b"".join(chunks)
            chunks.clear()
        else:  # gather what is buffered, up to n bytes, without waiting for more
            data = chunks.popleft()
            if len(data) < n and chunks:
                parts = [data]
                size = len(data)
                while chunks and size < n:
                    part = chunks.popleft()
                    parts.append(part)
                    size += len(part)
                data = b"".join(parts)
            if len(data) > n:
                chunks.appendleft(data[n:])
                data = data[:n]
        if self.conn.quic.release(self.stream_id, len(data)):
            self.conn.schedule_process()
        return data

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def complete(self) -> bool:
        """Everything the peer will send has arrived: ``read()`` returns it without waiting."""
        return self._eof and self._error is None

    @property
    def readable(self) -> bool:
        """A read would not block: data buffered, or the end, or an error."""
        return bool(self._chunks) or self._eof or self._error is not None

    # -- writing ------------------------------------------------------------------------
    def _send(self, data: bytes, end: bool) -> None:
        self.conn.quic.send_stream_data(self.stream_id, data, end)

    def _send_failed(self, exc: Exception) -> StreamReset:
        """The library refused a send: the peer reset or stopped the stream meanwhile."""
        if self._send_error is None:
            self._send_error = StreamReset(self.stream_id, H3_REQUEST_CANCELLED)
        return self._send_error

    def write(self, data: bytes, end: bool = False) -> None:
        """Queue ``data``; blocks while the peer has not acknowledged enough."""
        self.queue(data, end)
        self.wait_writable()

    def queue(self, data: bytes, end: bool = False) -> None:
        """Queue ``data`` without waiting (callers bound what they queue; see write())."""
        self._check_writable()
        try:
            self._send(data, end)
        except self.conn._stream_errors as exc:
            raise self._send_failed(exc) from exc
        self._send_ended = end
        self.conn.schedule_transmit()

    def wait_writable(self) -> None:
        """Block while more than the connection's ``send_high_water`` bytes are buffered."""
        conn = self.conn
        while conn.quic.send_backlog(self.stream_id) > conn.send_high_water:
            self._check_writable()
            conn._blocked_writers.add(self)
            self._writable.clear()
            self._writable.wait()
        self._check_writable()

    def _check_writable(self) -> None:
        if self._send_error is not None:
            raise self._send_error
        if self._error is not None:
            raise self._error

    @property
    def _send_open(self) -> bool:
        """Our sending side has neither ended nor failed."""
        return not self._send_ended and self._send_error is None and self._error is None

    def close(self) -> None:
        """End our sending side (FIN)."""
        if self._send_open:
            self.write(b"", end=True)

    def reset(self, error_code: int = H3_REQUEST_CANCELLED) -> None:
        """Abort both directions of the stream."""
        self._shut(error_code, error_code)
        self._fail(StreamReset(self.stream_id, error_code))

    def abort(self, error_code: int) -> None:
        """Cut a response that has begun: what is queued (its head, say) goes out first,
        then the reset. (RESET_STREAM discards unsent data: a head queued in the same step
        as the reset never left, and the peer saw a reset before any response.) What this
        transmit could not send keeps the reset back until it has left, at most
        RESET_AFTER_SEND_LIMIT."""
        conn = self.conn
        if conn.is_open:
            conn.transmit()
            if self._send_open and conn.quic.send_buffered(self.stream_id):
                # Some of it is still held (qh3's pacer, say; aioquic: not yet acknowledged):
                # the RESET_STREAM waits for it; reset() and finish() leave it to the connection.
                conn._reset_after_send(self.stream_id, error_code)
                self._send_ended = True
        self.reset(error_code)

    def finish(self, stop_reading: bool = True) -> None:
        """Done with the stream: reset an unfinished send side and, unless told
        otherwise, ask the peer to stop an unfinished receive side."""
        if not stop_reading:
            self._eof = True
        # An HTTP server may stop reading a request body it does not need (H3_NO_ERROR);
        # a client abandoning a response cancels the request.
        h3 = self.conn.h3
        self._shut(H3_REQUEST_CANCELLED,
                   H3_REQUEST_CANCELLED if h3 is not None and h3._http_client else H3_NO_ERROR)

    def _shut(self, reset_code: int, stop_code: int) -> None:
        conn = self.conn
        if not conn.is_open:
            conn._forget(self)
            return
        quic = conn.quic
        if self._send_open:
            quic.reset_stream(self.stream_id, reset_code)
        self._send_ended = True
        if self._eof or self._error is not None:
            conn._forget(self)
        elif not self._discarding:
            # Ask the peer to stop; drop what still arrives until its FIN or reset,
            # so late frames never reach the HTTP/3 parser as a "new" stream.
            quic.stop_stream(self.stream_id, stop_code)
            self._discarding = True
            self._chunks.clear()
            quic.release(self.stream_id)
            self._fail(StreamReset(self.stream_id, stop_code))  # a reader still waiting learns it
        conn.schedule_transmit()


class H3Stream(Stream):
    """One HTTP/3 request/response exchange."""

    def __init__(self, conn: Connection, stream_id: int) -> None:
        super().__init__(conn, stream_id)
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self._headers_ready = gevent.event.Event()

    def _on_headers(self, headers, end: bool) -> None:
        if self.headers is None:
            if headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
                return  # an interim (1xx) response: wait for the final one
            self.headers = headers
            self._headers_ready.set()
        else:
            self.trailers = headers
        if end:
            self._on_data(b"", True)

    def _on_quic_event(self, event) -> None:
        super()._on_quic_event(event)
        if isinstance(event, self.conn._ev.StreamReset):
            self._headers_ready.set()

    def _fail(self, exc: Exception) -> None:
        super()._fail(exc)
        self._headers_ready.set()

    def wait_headers(self, timeout: float | None = None) -> list[tuple[bytes, bytes]]:
        if not self._headers_ready.wait(timeout):
            raise gevent.Timeout(timeout)
        if self.headers is None:
            raise self._error or ConnectionClosed("no response headers")
        return self.headers

    def _send(self, data: bytes, end: bool) -> None:
        self.conn.h3.send_data(self.stream_id, data, end)

    def send_headers(self, headers: list[tuple[bytes, bytes]], end: bool = False, data: bytes = b"") -> None:
        """The head; with ``data``, the first piece of the body too, in the same write
        (queued without waiting, as :meth:`queue`)."""
        self._check_writable()
        try:
            if data:
                self.conn.h3.send_head(self.stream_id, headers, data, end)
            else:
                self.conn.h3.send_headers(self.stream_id, headers, end_stream=end)
        except self.conn._stream_errors as exc:
            raise self._send_failed(exc) from exc
        self._send_ended = end
        self.conn.schedule_transmit()
