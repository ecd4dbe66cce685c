"""The tunnel client: dial ``reverstd``, register in a group, serve a WSGI app.

    from reverst.client import serve, BasicAuth
    serve(app, "tunnel.example.com:7171", tunnel_group="app.example.com",
          auth=BasicAuth("user", "pass"))
"""
from __future__ import annotations

import functools
import logging
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import gevent
import gevent.event
import gevent.socket

from .. import _malloc, protocol
from .._transport import Connection, Endpoint, parse_address
from ..logs import format_address
from ..auth import basic_authorization, bearer_authorization
from ..quic import REQUEST_STREAMS, load_backend
from ..errors import (BadRequest, ConnectionClosed, NotFound, ProtocolViolation, ReverstError,
                      ServerError, Unauthorized)
from ._handler import WSGIHandler

__all__ = ["BasicAuth", "BearerAuth", "Client", "serve", "parse_tunnel_addresses", "Unauthorized", "BadRequest", "NotFound",
           "ServerError", "CONNECTING", "CONNECTED", "RECONNECTING", "STOPPED"]

logger = logging.getLogger("reverst.client")

#: A stopping client serves what reverstd sent before it saw the first GOAWAY for this
#: long (seconds), or this many smoothed RTTs, at most GOAWAY_GRACE_MAX (see Client._go_away).
GOAWAY_GRACE = 0.1
GOAWAY_GRACE_RTTS = 4
GOAWAY_GRACE_MAX = 1.0


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: str
    scheme: str = "Basic"

    def authorization(self) -> str:
        return basic_authorization(self.username, self.password, self.scheme)

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password='***', scheme={self.scheme!r})"


@dataclass(frozen=True)
class BearerAuth:
    token: str
    scheme: str = "Bearer"

    def authorization(self) -> str:
        return bearer_authorization(self.token, self.scheme)

    def __repr__(self) -> str:
        return f"BearerAuth(token='***', scheme={self.scheme!r})"


#: :attr:`Client.state` values
CONNECTING, CONNECTED, RECONNECTING, STOPPED = "connecting", "connected", "reconnecting", "stopped"


def parse_tunnel_addresses(value) -> list[tuple[str, int]]:
    """``host:port``, ``h1:7171,h2:7171``, or a list/tuple of those (or of (host, port))
    -> [(host, port), ...]. A host may be a name with several addresses: each is a replica."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        value = [value]
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    addresses = [parse_address(v, "127.0.0.1", "tunnel address") for v in items if v]
    if not addresses:
        raise ValueError("no tunnel address given")
    return addresses


class _Slot:
    """One tunnel connection kept registered with one replica (an address of a name)."""

    def __init__(self, host: str, ip: str, port: int, index: int, count: int) -> None:
        self.host, self.ip, self.port = host, ip, port
        self.index, self.count = index, count
        self.state = CONNECTING
        self.conn: Connection | None = None       # the last registered connection
        self.endpoint: Endpoint | None = None
        self.runner: gevent.Greenlet | None = None
        self.error: str | None = None             # why the last attempt or connection failed

    @property
    def replica(self) -> str:
        return format_address((self.ip, self.port))

    @property
    def name(self) -> str:
        return f"connection {self.index + 1}/{self.count}" if self.count > 1 else "connection"

    @property
    def where(self) -> str:
        """The replica, and the name it came from when that is not an address."""
        return self.replica if self.host == self.ip else f"{self.replica} ({self.host})"

    def close_endpoint(self) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.close()


class Client:
    """Keeps ``connections`` tunnel connections registered with every replica of
    ``tunnel_address`` and serves ``app`` through them.

    ``tunnel_address`` is ``host:port``, several separated by commas, or a list of them.
    A name with several A/AAAA records gives one replica per address (a headless
    Kubernetes Service, say): the client registers with each, re-resolves every
    ``resolve_interval`` seconds and after failures, registers with new replicas and lets
    go of removed ones. A replica that is down never delays the others.

    ``dial_and_serve()`` blocks until :meth:`stop` is called or registration fails for
    good (:class:`Unauthorized`/:class:`BadRequest` at once; :class:`NotFound` and
    server errors after ``max_retries`` consecutive failures of one connection, never by
    default).  A dropped connection is re-dialled with capped exponential backoff and
    jitter; the backoff starts over once a connection has stayed up for ``healthy_after``.

    :attr:`state` is ``"connecting"`` until the first registration, ``"connected"``
    while at least one connection is registered, ``"reconnecting"`` after a failure or
    a loss while none is, and ``"stopped"`` once :meth:`stop` is done or
    ``dial_and_serve()`` gave up; :meth:`on_state_change` callbacks hear each change.
    :attr:`replicas` says how each replica is served.
    """

    def __init__(self, app, tunnel_address, *, tunnel_group: str, server_name: str | None = None,
                 auth: BasicAuth | BearerAuth | None = None, ca_file: str | None = None,
                 insecure: bool = False, on_ready: Callable[["Client"], None] | None = None,
                 max_idle_timeout: float = 60.0, keep_alive_period: float = 30.0,
                 app_threads: int = 100, connections: int = 1, max_retries: int | None = None,
                 backoff: tuple[float, float] = (0.1, 30.0), healthy_after: float = 60.0,
                 handshake_timeout: float = 10.0, dead_peer_timeout: float = 5.0,
                 max_datagram_size: int = 1452, quic_backend: str | None = None,
                 resolve_interval: float = 30.0) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.app = app
        self.addresses = parse_tunnel_addresses(tunnel_address)
        self.host, self.port = self.addresses[0]
        self.tunnel_group = tunnel_group
        self._server_name = server_name
        self.server_name = server_name or self.host
        self.auth = auth
        self.ca_file = ca_file
        self.insecure = insecure
        self.on_ready = on_ready
        self.max_idle_timeout = max_idle_timeout
        self.keep_alive_period = keep_alive_period
        self.connections_per_replica = connections
        self.max_retries = max_retries
        self.backoff = backoff
        self.healthy_after = healthy_after
        self.handshake_timeout = handshake_timeout
        self.dead_peer_timeout = dead_peer_timeout
        self.max_datagram_size = max_datagram_size
        self.resolve_interval = resolve_interval
        #: the QUIC backend module (reverst.quic): ``quic_backend`` names it (auto, aioquic, qh3)
        self.backend = load_backend(quic_backend)
        #: ``auto`` chose qh3: a certificate only qh3 refuses may send us to aioquic (see below)
        self._may_fall_back = self.backend.NAME == "qh3" and (quic_backend or os.environ.get(
            "REVERST_QUIC_BACKEND") or "auto").lower() == "auto"
        self._handler = WSGIHandler(app, threads=app_threads)
        self._stopping = gevent.event.Event()
        self._stopped = gevent.event.Event()  # set by stop() once connections are closed
        self._resolve_now = gevent.event.Event()
        self._fatal: BaseException | None = None
        self._failed = gevent.event.Event()
        self._replicas: dict[tuple[str, int], list[_Slot]] = {}  # (ip, port) -> its slots
        self._retired: list[_Slot] = []
        self._first: _Slot | None = None
        self._state = CONNECTING
        self._state_callbacks: list[Callable[["Client", str], None]] = []

    def __repr__(self) -> str:
        return (f"<Client {self.host}:{self.port} group={self.tunnel_group!r} "
                f"connected={len(self.connections)}/{len(self._slots())}>")

    def _slots(self) -> list[_Slot]:
        return [slot for slots in self._replicas.values() for slot in slots]

    @property
    def connections(self) -> list[Connection]:
        """The tunnel connections registered and open now (none while dialling).

        It agrees with :attr:`state` at every instant: ``"connected"`` exactly when this
        list is not empty (a connection joins it when its registration is answered and
        leaves it the moment it closes).
        """
        return [s.conn for s in self._slots() if s.conn is not None and s.conn.is_open]

    @property
    def replicas(self) -> list[dict]:
        """Each replica: its address, the name it came from, how many of its connections
        are registered, its state and (if any) why its last attempt failed."""
        out = []
        for (ip, port), slots in sorted(self._replicas.items()):
            registered = sum(1 for s in slots if s.conn is not None and s.conn.is_open)
            out.append({"address": format_address((ip, port)), "host": slots[0].host,
                        "connections": registered, "wanted": len(slots),
                        "state": CONNECTED if registered else slots[0].state,
                        "error": next((s.error for s in slots if s.error), None)})
        return out

    @property
    def state(self) -> str:
        """``"connecting"``, ``"connected"``, ``"reconnecting"`` or ``"stopped"``."""
        return self._state

    def on_state_change(self, callback: Callable[["Client", str], None]) -> None:
        """Call ``callback(client, new_state)`` (in the client's event loop; it must not
        block) whenever :attr:`state` changes."""
        self._state_callbacks.append(callback)

    def _set_slot_state(self, slot: _Slot, state: str) -> None:
        slot.state = state
        states = [s.state for s in self._slots()]
        overall = (CONNECTED if CONNECTED in states else
                   CONNECTING if all(s == CONNECTING for s in states) else RECONNECTING)
        self._set_state(overall)

    def _set_state(self, state: str) -> None:
        if state == self._state or self._state == STOPPED:
            return
        self._state = state
        logger.debug("client state: %s", state)
        for callback in list(self._state_callbacks):
            try:
                callback(self, state)
            except Exception:
                logger.exception("on_state_change callback failed")

    @property
    def connection(self) -> Connection | None:
        """The first connection's last registered connection (open or not), for
        single-connection use."""
        return self._first.conn if self._first is not None else None

    # -- public API -------------------------------------------------------------------
    def dial_and_serve(self) -> None:
        """Dial, register and serve until :meth:`stop`; raises when registration fails for good."""
        supervisor = gevent.spawn(self._supervise)
        try:
            gevent.wait([self._failed, self._stopped], count=1)
            if self._fatal is not None and not self._stopped.is_set():
                self._stopping.set()
                raise self._fatal
            self._stopped.wait()  # stop() finishes in-flight requests and closes connections
        finally:
            self._stopping.set()
            supervisor.kill(block=False)
            slots = self._slots() + self._retired
            gevent.killall([s.runner for s in slots if s.runner is not None], block=True, timeout=5)
            for slot in slots:
                slot.close_endpoint()
            self._set_state(STOPPED)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully: refuse new requests, let in-flight ones finish (up to
        ``timeout`` seconds), then close every tunnel connection with code 0x0.
        ``dial_and_serve()`` returns once this is done."""
        if self._stopping.is_set():
            self._stopped.wait()
            return
        self._stopping.set()
        try:
            with gevent.Timeout(timeout, False):
                self._go_away()
                while self._handler.active or self._handler.unsent:  # (the last bytes of a
                    gevent.sleep(0.05)                              # response are not sent yet)
            for conn in self.connections:
                conn.close(protocol.AppErrorCode.OK, "client closing")
            self._handler.close()
        finally:
            self._stopped.set()
            self._set_state(STOPPED)

    def _go_away(self) -> None:
        """A graceful stop in two steps (RFC 9114 §5.2), so that reverstd can move its
        requests elsewhere instead of having them refused: a GOAWAY saying "send no more"
        at once, while what is already on its way is still served (a request refused now
        could not be retried if it carries a body); after a few round trips, a GOAWAY with
        the last request id taken, and anything newer is refused (H3_REQUEST_REJECTED). A
        peer that ignores GOAWAY (the Go reverstd) gets its requests served for that long."""
        conns = self.connections
        for conn in conns:
            conn.send_goaway()
        rtts = [r for r in (conn.quic.smoothed_rtt for conn in conns) if r is not None]
        gevent.sleep(min(GOAWAY_GRACE_MAX, max([GOAWAY_GRACE] + [GOAWAY_GRACE_RTTS * r for r in rtts])) if conns else 0)
        self._handler.accepting = False
        for conn in conns:
            conn.send_goaway(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- replicas ---------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Resolve the addresses, start and retire slots; again every resolve_interval and
        soon after a failure (at most once a second)."""
        while not self._stopping.is_set():
            resolved = self._resolve()
            if resolved is not None:
                self._reconcile(resolved)
            started = time.monotonic()
            self._resolve_now.clear()
            gevent.wait([self._resolve_now, self._stopping], timeout=self.resolve_interval, count=1)
            left = 1.0 - (time.monotonic() - started)
            if left > 0 and not self._stopping.is_set():
                self._stopping.wait(left)

    def _resolve(self) -> dict[tuple[str, int], str] | None:
        """(ip, port) -> host name of every replica. None when no name resolved at all
        (the replicas known so far stay); a name that fails keeps its replicas."""
        resolved: dict[tuple[str, int], str] = {}
        ok = False
        for host, port in self.addresses:
            try:
                infos = gevent.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                logger.warning("cannot resolve %s: %s; keeping its replicas as they are", host, exc)
                for key, slots in self._replicas.items():
                    if slots[0].host == host:
                        resolved.setdefault(key, host)
                continue
            ok = True
            for family, _, _, _, addr in infos:
                if family in (socket.AF_INET, socket.AF_INET6):
                    resolved.setdefault((addr[0], addr[1]), host)
        return resolved if ok or resolved else None

    def _reconcile(self, resolved: dict[tuple[str, int], str]) -> None:
        for key, host in resolved.items():
            if key in self._replicas:
                continue
            if self._replicas:
                logger.info("replica %s (%s) appeared: registering with it", format_address(key), host)
            slots = self._replicas[key] = [_Slot(host, key[0], key[1], i, self.connections_per_replica)
                                           for i in range(self.connections_per_replica)]
            for slot in slots:
                if self._first is None:
                    self._first = slot
                slot.runner = gevent.spawn(self._run_slot, slot)
        for key in [k for k in self._replicas if k not in resolved]:
            slots = self._replicas.pop(key)
            logger.info("replica %s (%s) is no longer listed: letting go of it", format_address(key),
                        slots[0].host)
            for slot in slots:
                self._retire(slot)
        if self._slots():
            self._set_slot_state(self._slots()[0], self._slots()[0].state)  # (the overall state)

    def _retire(self, slot: _Slot) -> None:
        """A replica left the name: no more reconnecting; its connection says GOAWAY,
        finishes what it carries (up to 10 s) and closes with 0x0."""
        self._retired.append(slot)
        if slot.runner is not None:
            slot.runner.kill(block=False)
        conn = slot.conn
        if conn is not None:
            conn.send_goaway()  # reverstd sends it no new request: it gets idle soon

        def close_when_idle() -> None:
            with gevent.Timeout(10, False):
                while conn is not None and conn.is_open and conn.open_streams:
                    gevent.sleep(0.1)
            if conn is not None and conn.is_open:
                conn.close(protocol.AppErrorCode.OK, "replica no longer listed")
            slot.close_endpoint()
        gevent.spawn(close_when_idle)

    # -- one connection ---------------------------------------------------------------------
    def _run_slot(self, slot: _Slot) -> None:
        try:
            self._keep_registered(slot)
        except (Unauthorized, BadRequest, ReverstError, OSError, gevent.Timeout) as exc:
            if self._fatal is None and not self._stopping.is_set():
                self._fatal = exc
                self._failed.set()

    def _keep_registered(self, slot: _Slot) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                conn = self._dial_and_register(slot)
            except (Unauthorized, BadRequest):
                raise
            except (ReverstError, OSError, gevent.Timeout) as exc:
                slot.close_endpoint()
                if self._stopping.is_set():
                    return
                failures += 1
                slot.error = str(exc)
                if self.max_retries is not None and failures > self.max_retries:
                    raise
                delay = self._delay(failures)
                self._set_slot_state(slot, RECONNECTING)
                self._resolve_now.set()
                if isinstance(exc, NotFound):
                    logger.warning("%s: tunnel group %r is unknown to %s (%s); retrying in %.1fs",
                                   slot.name, self.tunnel_group, slot.where, exc, delay)
                else:
                    logger.info("%s: registration with %s failed (%s); retrying in %.1fs", slot.name,
                                slot.where, exc, delay)
                self._stopping.wait(delay)
                continue
            connected_at = time.monotonic()
            logger.info("%s registered with %s in group %r", slot.name, slot.where, self.tunnel_group)
            # In one step (no switch in between): the list and the state change together.
            slot.conn, slot.error = conn, None
            conn.on_close(functools.partial(self._lost, slot))
            self._set_slot_state(slot, CONNECTED)
            if self.on_ready is not None:
                self.on_ready(self)
            gevent.wait([conn.closed, self._stopping], count=1)
            if self._stopping.is_set():
                return
            slot.close_endpoint()
            if time.monotonic() - connected_at >= self.healthy_after:
                failures = 0
            failures += 1
            delay = self._delay(failures)
            slot.error = str(conn.close_reason)
            self._resolve_now.set()
            logger.info("%s lost (%s); reconnecting in %.1fs (%s)", slot.name, conn.close_reason, delay,
                        slot.where)
            self._stopping.wait(delay)

    def _fall_back(self, slot: _Slot, closed: ConnectionClosed) -> bool:
        """qh3 (webpki's rule) refuses a server certificate that is marked as a CA, which is
        what ``openssl req -x509`` makes of a self-signed one; aioquic and Go accept it.
        When ``auto`` chose qh3, such a refusal switches this client to aioquic (which
        verifies the certificate just as well) and says so once."""
        if not self._may_fall_back or "certificate" not in closed.reason.lower():
            return False
        self._may_fall_back = False
        self.backend = load_backend("aioquic")
        logger.warning("the QUIC backend qh3 refused the certificate of %s (%s); it refuses a "
                       "self-signed certificate marked as a CA (as openssl req -x509 makes them), which "
                       "aioquic accepts: using aioquic for this server (a certificate with CA:FALSE, or "
                       "one issued by a CA, lets qh3 serve it)", slot.replica, closed.reason)
        return True

    def _lost(self, slot: _Slot, conn: Connection) -> None:
        """A registered connection closed (called as it closes, in the hub)."""
        if slot.conn is conn and not self._stopping.is_set():
            self._set_slot_state(slot, RECONNECTING)

    def _delay(self, failures: int) -> float:
        low, high = self.backoff
        delay = min(high, low * 2 ** (failures - 1))
        return delay * random.uniform(0.9, 1.1)

    def _configuration(self, server_name: str):
        return self.backend.client_configuration(
            server_name=server_name, idle_timeout=self.max_idle_timeout,
            max_datagram_size=self.max_datagram_size, insecure=self.insecure, ca_file=self.ca_file)

    def _dial_and_register(self, slot: _Slot) -> Connection:
        server_name = self._server_name or slot.host
        family = socket.AF_INET6 if ":" in slot.ip else socket.AF_INET
        endpoint = slot.endpoint = Endpoint.bind("::" if family == socket.AF_INET6 else "0.0.0.0", 0,
                                                 backend=self.backend)
        endpoint.start()
        conn = endpoint.connect((slot.ip, slot.port), self._configuration(server_name),
                                keep_alive=self.keep_alive_period, dead_peer_timeout=self.dead_peer_timeout,
                                request_streams=REQUEST_STREAMS)
        try:
            with gevent.Timeout(self.handshake_timeout, ServerError("handshake timed out")):
                gevent.wait([conn.handshake_done, conn.closed], count=1)
            if conn.close_reason is not None:
                closed = conn.close_reason
                if not closed.application:  # TLS or transport: say which name was checked
                    if self._fall_back(slot, closed):
                        slot.close_endpoint()
                        return self._dial_and_register(slot)
                    raise ServerError(f"handshake with {slot.replica} as {server_name!r} failed: {closed}")
                raise self._error(closed)
            stream = conn.open_stream()
            metadata = {"Authorization": self.auth.authorization()} if self.auth else None
            stream.write(protocol.encode_request(protocol.RegisterRequest(self.tunnel_group, metadata)))
            decoder = protocol.MessageDecoder()
            with gevent.Timeout(self.handshake_timeout, ServerError("registration timed out")):
                while (obj := decoder.feed(stream.read(4096))) is None:
                    if stream.at_eof:
                        # Go's server FINs the stream and then closes the connection:
                        # wait for the close to learn why.
                        conn.closed.wait()
                        raise conn.close_reason
            response = protocol.decode_response_untrusted(obj)
            error = protocol.error_for_response_code(response.code)
            if error is not None:
                raise error
            conn.on_request = self._handler
            conn.attach_h3(http_client=False)
            stream.close()
            stream.finish()
            return conn
        except ConnectionClosed as exc:
            raise self._error(exc) from None
        except ProtocolViolation as exc:
            conn.close(protocol.AppErrorCode.CLIENT_ERROR, "bad response")
            raise ServerError(f"bad registration response: {exc}") from None
        except BaseException:
            conn.close(protocol.AppErrorCode.OK, "registration aborted")
            raise

    @staticmethod
    def _error(closed: ConnectionClosed) -> Exception:
        if closed.application and closed.error_code is not None:
            return protocol.error_for_close(closed.error_code, closed.reason)
        return ServerError(f"unexpected error: {closed}")


def serve(app, tunnel_address, *, tunnel_group: str, grace_period: float = 30.0, **options) -> None:
    """Expose the WSGI ``app`` through ``reverstd`` at ``tunnel_address``; blocks.

    Options are those of :class:`Client`. Called in the main thread, SIGINT (Ctrl-C) and
    SIGTERM stop it gracefully, as ``reverst wsgi`` does (:meth:`Client.stop`: GOAWAY, the
    requests in flight get up to ``grace_period`` seconds, the tunnels close with 0x0), and
    then it returns; the signals' previous handling comes back. Like the CLI, it fixes
    glibc's mmap threshold for the process (see ``reverst._malloc``), unless
    ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    _malloc.fix_mmap_threshold()
    client = Client(app, tunnel_address, tunnel_group=tunnel_group, **options)
    watchers = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            watchers.append((sig, previous, gevent.signal_handler(sig, lambda: gevent.spawn(client.stop, grace_period))))
    try:
        client.dial_and_serve()
    finally:
        for sig, previous, watcher in watchers:
            watcher.cancel()  # (libev leaves the signal at SIG_DFL: Python's handler goes back)
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
