"""``reverstd``: accepts tunnel registrations over QUIC and proxies public HTTP/1.1 to them.

Public request -> group (by ``X-Forwarded-Host`` else ``Host`` without port) -> one of the
group's tunnel connections (round-robin) -> an HTTP/3 request on a server-initiated
stream -> the tunnel client's response streamed back.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http
import logging
import sys
import time

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import gevent.server
import gevent.socket
import gevent.ssl as gevent_ssl
from . import _malloc, auth, http1, protocol, websocket
from ._transport import CLOSE_LINGER_UNREGISTERED, Connection, Endpoint, H3Stream
from .config import GroupsConfig
from .forwarding import TrustedProxies, visitor_address
from .forwarding import rebuild as rebuild_forwarding
from .policy import Gate
from .errors import ConnectionClosed, NotFound, ProtocolViolation, ReverstError, ServerError, StreamReset
from .http3 import H3_NO_ERROR, H3_REQUEST_CANCELLED, H3_REQUEST_REJECTED, strip_hop_by_hop
from .logs import format_address
from .metrics import ServerMetrics
from .quic import Admission, RetryMode, load_backend

logger = logging.getLogger(__name__)

#: quic-go's default; requests beyond it wait for a free stream.
MAX_REQUESTS_PER_CONNECTION = 100
#: Open WebSockets per tunnel connection (they hold a stream each for their whole life,
#: so they have a budget of their own: plain requests keep their 100). Our tunnel clients
#: grant the streams for both (reverst.quic: REQUEST_STREAMS).
MAX_WEBSOCKETS_PER_CONNECTION = 500
#: How long a WebSocket request waits for a just-registered tunnel's HTTP/3 SETTINGS
#: (they tell whether it serves WebSockets; they come one round trip after registration).
SETTINGS_WAIT = 2.0
#: After one direction of a WebSocket ended cleanly, how long the other may go on.
WEBSOCKET_HALF_CLOSED = 30.0
CHUNK = 64 * 1024


class _LimitedBody:
    """A chunked request body that may not grow past ``limit`` bytes: reading past it is
    a 413 for the visitor (and a reset request stream for the tunnel)."""
    __slots__ = ("_body", "_left", "_limit", "_exceeded")

    def __init__(self, body, limit: int, exceeded) -> None:
        self._body, self._left, self._limit, self._exceeded = body, limit, limit, exceeded

    def read(self, size: int = -1) -> bytes:
        data = self._body.read(size if 0 <= size <= self._left + 1 else self._left + 1)
        self._left -= len(data)
        if self._left < 0:
            self._exceeded()
            raise http1.BadRequest(f"request body larger than {self._limit} bytes", 413)
        return data


class _Tunnels:
    """The live connections of one group, picked round-robin.

    As Go's ``roundrobbin.Set``: the cursor is wrapped at the size of the set when a
    connection is picked, and the one after it is remembered wrapped too, so a group
    that shrank to one connection and grew again starts over at its oldest member.
    """

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self._next = 0

    def pick(self, accept=None) -> Connection | None:
        """The next open connection (for which ``accept(conn)`` is true, if given); one
        whose client said GOAWAY only if no other is left (it still answers until its grace
        ends, and then refuses, which the callers handle)."""
        conns = self.connections
        skipped = 0
        going_away = None
        while conns and skipped < len(conns):
            index = self._next if self._next < len(conns) else 0
            conn = conns[index]
            if not conn.is_open:
                del conns[index]  # found closed: drop it, try the next one
                self._next = index
                continue
            self._next = (index + 1) % len(conns)
            if accept is None or accept(conn):
                if not conn.going_away:
                    return conn
                if going_away is None:
                    going_away = conn
            skipped += 1
        return going_away


class _NoSlot:
    """The slots of a WebSocket's refused CONNECT, counted apart (see _websocket)."""

    @staticmethod
    def release() -> None:
        pass


_RETRY = object()  # _forward's answer when another tunnel of the group may take the request
#: Requests that may be sent again when their tunnel died before answering (RFC 9110
#: §9.2.1 safe methods; only without a body, which was not kept).
_RETRIABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class _UpstreamAborted(Exception):
    """The tunnel stream broke after the public response started: cut the connection."""


def _response_status(fields) -> int:
    for name, value in fields:
        if name == b":status":
            return int(value)
    return 502


@functools.lru_cache(maxsize=512)  # (statuses are 100..599: _check_response)
def _status_line(code: int) -> str:
    try:
        return f"{code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


class TunnelServer:
    """The tunnel server: a QUIC endpoint for tunnels and an HTTP/1.1 front for the public."""

    def __init__(self, groups: GroupsConfig | None, *, certificate_path: str, private_key_path: str,
                 server_name: str, tunnel_address: tuple[str, int] = ("127.0.0.1", 7171),
                 http_address: tuple[str, int] = ("0.0.0.0", 8181),
                 management_address: tuple[str, int] | None = None,
                 max_idle_timeout: float = 60.0, keep_alive_period: float = 30.0,
                 registration_timeout: float = 10.0, dead_peer_timeout: float = 5.0,
                 max_datagram_size: int = 1452, access_log: bool = True,
                 quic_backend: str | None = None,
                 max_websockets_per_tunnel: int = MAX_WEBSOCKETS_PER_CONNECTION,
                 reuse_port: bool = False, wait_for_tunnels: float = 0.0,
                 trusted_proxies: TrustedProxies | None = None,
                 https_address: tuple[str, int] | None = None,
                 https_certificate: tuple[str, str] | None = None,
                 quic_retry: str = "auto", handshake_timeout: float | None = None,
                 admission_limits: dict | None = None) -> None:
        #: set once tunnel groups are loaded; ``groups=None`` starts without any (``/readyz``
        #: answers 503 until :meth:`update_groups` is called)
        self.groups_loaded = gevent.event.Event()
        if groups is None:
            groups = GroupsConfig("", {})
        else:
            self.groups_loaded.set()
        self.groups = groups
        self.server_name = server_name
        self.registration_timeout = registration_timeout
        #: the QUIC backend module (reverst.quic): ``quic_backend`` names it (auto, aioquic, qh3)
        self.backend = load_backend(quic_backend)
        self._quic_config = self.backend.server_configuration(
            certificate_path=certificate_path, private_key_path=private_key_path,
            idle_timeout=max_idle_timeout, max_datagram_size=max_datagram_size)
        self._empty_cid_fallback = None
        if not self.backend.SERVES_EMPTY_CLIENT_CIDS:  # qh3: Go clients get aioquic's core

            def fallback():  # (at the first Go client: aioquic costs ~13 MB of RSS loaded)
                backend = load_backend("aioquic")
                return backend, backend.server_configuration(
                    certificate_path=certificate_path, private_key_path=private_key_path,
                    idle_timeout=max_idle_timeout, max_datagram_size=max_datagram_size)
            self._empty_cid_fallback = fallback
        with open(private_key_path, "rb") as fh:  # stable across restarts, never sent
            reset_key = hashlib.sha256(b"reverst stateless reset\0" + fh.read()).digest()
        self._conn_options = {"keep_alive": keep_alive_period, "dead_peer_timeout": dead_peer_timeout,
                              "reset_key": reset_key}
        #: who gets a QUIC connection (reverst.quic._admission): Retry under load (``quic_retry``:
        #: auto, always, never), caps on handshakes and unregistered connections, and the
        #: handshake timeout (well under the registration timeout); ``admission_limits``
        #: overrides its other arguments (max_handshakes, retry_threshold...)
        limits = dict(admission_limits or {})
        if handshake_timeout is not None:
            limits["handshake_timeout"] = handshake_timeout
        limits.setdefault("handshake_timeout", min(5.0, registration_timeout))
        self.admission = Admission(RetryMode(quic_retry), **limits)
        self._tunnel_bind = tunnel_address
        self._http_bind = http_address
        #: the HTTPS listener (off unless given) and its default (certificate, key) files
        self._https_bind = https_address
        self._https_certificate = https_certificate
        self._https: gevent.server.StreamServer | None = None
        #: (listener, front) of each public listener: plain HTTP, and HTTPS if configured
        self._publics: list[tuple[gevent.server.StreamServer, http1.Front]] = []
        self._management_bind = management_address
        self._tunnels: dict[str, _Tunnels] = {}
        self._slots: dict[Connection, gevent.lock.BoundedSemaphore] = {}
        self.max_websockets_per_tunnel = max_websockets_per_tunnel
        self.reuse_port = reuse_port
        #: peers whose X-Forwarded-* headers count (default: anyone, as the Go reverstd)
        self.trusted_proxies = trusted_proxies or TrustedProxies(None)
        #: each group's visitor policy at work (reverst.policy), kept across reloads
        self._gates: dict[str, Gate] = {}
        #: registrations past their checks, not yet in the group (maxTunnels counts them)
        self._joining: dict[str, int] = {}
        #: /readyz waits (at most this long after start) for a first tunnel: a replica that
        #: took public traffic before its clients found it would answer 502s
        self.wait_for_tunnels = wait_for_tunnels
        self.started_at = time.monotonic()
        #: open WebSockets per tunnel connection
        self.websockets: dict[Connection, int] = {}
        self._endpoint: Endpoint | None = None
        self._http: gevent.server.StreamServer | None = None
        self._management: gevent.pywsgi.WSGIServer | None = None
        self._stopped = gevent.event.Event()
        #: set by drain(): not ready, new registrations refused, the public side winding down
        self.draining = False
        self._registered_total = 0
        self.ready = gevent.event.Event()
        self.metrics = ServerMetrics(self)
        self.access_log = access_log

    def __repr__(self) -> str:
        return (f"<TunnelServer tunnel={self._tunnel_bind} http={self._http_bind} "
                f"groups={len(self.groups.groups)} tunnels={sum(len(t.connections) for t in self._tunnels.values())}>")

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.monotonic()
        self._endpoint = Endpoint.bind(*self._tunnel_bind, backend=self.backend, server_config=self._quic_config,
                                       empty_cid_fallback=self._empty_cid_fallback,
                                       on_connection=self._on_connection,
                                       connection_options=self._conn_options, admission=self.admission)
        self._endpoint.start()
        app = self.metrics.observe(self._proxy, access_log=self.access_log)
        front = http1.Front(app)
        self._http = gevent.server.StreamServer(self._public_listener(), front, spawn=self.metrics.public_connections)
        self._publics.append((self._http, front))
        if self._https_bind is not None:
            from .tls import Certificates
            certificates = Certificates(self._https_certificate, self._tls_files_for,
                                        context_class=gevent_ssl.SSLContext)
            https_front = http1.Front(app, ssl_context=certificates.context)
            self._https = gevent.server.StreamServer(self._public_listener(self._https_bind), https_front,
                                                     spawn=self.metrics.public_connections)
            self._publics.append((self._https, https_front))
        for listener, public in self._publics:
            gevent.spawn(self._sweep_public, public)
            listener.start()
        if self._management_bind is not None:
            from gevent.pywsgi import WSGIServer  # (here: ~1 MB of modules a server without it never loads)
            from .management import ManagementApp
            self._management = WSGIServer(self._management_bind, ManagementApp(self), log=None,
                                          error_log=logging.getLogger("reverst.management"))
            self._management.start()
            logger.info("management on tcp %s", format_address(self.management_address))
        if self.groups_loaded.is_set() and not self.groups.groups:
            logger.warning("no tunnel groups configured in %s", self.groups.source)
        for group in self.groups.groups.values():
            if group.is_open:
                logger.warning("tunnel group %r has no authentication: anyone can register", group.name)
        if self.trusted_proxies.everyone:
            logger.warning("X-Forwarded-For/-Host/-Proto are trusted from any public client (as the Go "
                           "reverstd does); --trusted-proxies names the proxies that may set them")
        else:
            logger.info("forwarding headers trusted from %s only", self.trusted_proxies)
        if self._https is not None:
            logger.info("public https on tcp %s", format_address(self.https_address))
        logger.info("listening for tunnels on udp %s, public http on tcp %s (QUIC backend %s)",
                    format_address(self.tunnel_address), format_address(self.http_address), self.backend.NAME)
        self._trimmer = gevent.spawn(self._trim_memory)
        self.ready.set()

    def serve_forever(self) -> None:
        if not self.ready.is_set():
            self.start()
        self._stopped.wait()

    def _public_listener(self, bind=None):
        """A public TCP listener; with ``reuse_port``, SO_REUSEPORT lets several reverstd
        processes on one host share the port (the kernel spreads the connections)."""
        bind = bind or self._http_bind
        if not self.reuse_port:
            return bind
        import socket
        host, port = bind
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = gevent.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        return sock

    def drain(self, delay: float = 5.0, timeout: float = 30.0) -> None:
        """Leave gracefully, as a replica behind a load balancer should: not ready at once
        (``/readyz`` 503), no new registrations, and every public response closes its
        connection; after ``delay`` seconds (the load balancer's time to notice) no new
        public connections and idle kept-alive ones closed; in-flight requests, uploads, streams and WebSockets finish;
        then the tunnels close with 0x0. At most ``timeout`` seconds in all; :meth:`stop`
        (a second signal) cuts it short."""
        if self.draining or self._stopped.is_set():
            return
        self.draining = True
        started = time.monotonic()
        logger.info("draining: not ready now; no new public connections in %gs; tunnels close once "
                    "public requests are done (%gs at most)", delay, timeout)
        for _, front in self._publics:
            front.drain()
        if self._stopped.wait(min(delay, timeout)):
            return
        for listener, front in self._publics:
            listener.close()  # the listening socket only: connections carry on
            front.close_idle()

        def open_connections() -> int:
            return sum(len(front.connections) for _, front in self._publics)
        while open_connections() and time.monotonic() - started < timeout and not self._stopped.is_set():
            gevent.sleep(0.05)
        if open_connections():
            logger.warning("drain timeout: cutting %d public connections", open_connections())
        logger.info("drained in %.1fs", time.monotonic() - started)
        self.stop(timeout=0, reason="server draining")

    def stop(self, timeout: float = 5.0, reason: str = "server closing down") -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for listener, _ in self._publics:
            listener.stop(timeout=timeout)
        if self._management is not None:
            self._management.stop(timeout=0)
        if self._endpoint is not None:
            for conn in list(self._endpoint.connections):
                conn.close(protocol.AppErrorCode.OK, reason)
            gevent.sleep(0)
            self._endpoint.close()

    def __enter__(self) -> "TunnelServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def tunnel_address(self) -> tuple:
        return self._endpoint.address

    @property
    def http_address(self) -> tuple:
        return self._http.address

    @property
    def https_address(self) -> tuple | None:
        return self._https.address if self._https is not None else None

    def _tls_files_for(self, server_name: str) -> tuple[str, str] | None:
        """The (certificate, key) files of the group serving ``server_name`` (SNI), if its own."""
        group = self.groups.group_for_host(server_name)
        return (group.tls.certificate, group.tls.private_key) if group is not None and group.tls else None

    @property
    def management_address(self) -> tuple | None:
        return self._management.address if self._management is not None else None

    def update_groups(self, groups: GroupsConfig) -> None:
        """Switch to a new groups configuration while running.

        New groups route at once; hosts re-route; changed credentials apply to new
        registrations; the tunnels of removed groups are closed (code 0x0).
        """
        old, self.groups = self.groups, groups
        if self.groups_loaded.is_set():
            self.metrics.reloaded()
        self.groups_loaded.set()
        for name in set(old.groups) - set(groups.groups):
            self._gates.pop(name, None)
            tunnels = self._tunnels.pop(name, None)
            for conn in list(tunnels.connections) if tunnels else []:
                conn.close(protocol.AppErrorCode.OK, "tunnel group removed")
        for group in groups.groups.values():
            if group.is_open and (group.name not in old.groups or not old.groups[group.name].is_open):
                logger.warning("tunnel group %r has no authentication: anyone can register", group.name)
        logger.info("tunnel groups updated from %s: %d groups", groups.source, len(groups.groups))

    def connections(self, group: str) -> list[Connection]:
        tunnels = self._tunnels.get(group)
        return [c for c in tunnels.connections if c.is_open] if tunnels else []

    def in_flight(self, conn: Connection) -> int:
        """Public requests being proxied through ``conn`` now."""
        slots = self._slots.get(conn)
        return MAX_REQUESTS_PER_CONNECTION - slots.counter if slots is not None else 0

    @property
    def dropped_datagrams(self) -> int:
        return self._endpoint.dropped_datagrams if self._endpoint is not None else 0

    # -- registration -------------------------------------------------------------------
    def _on_connection(self, conn: Connection) -> None:
        gevent.spawn(self._register, conn)

    def _register(self, conn: Connection) -> None:
        joining: list[str] = []  # the group whose maxTunnels this registration holds a place in
        try:
            self._join(conn, joining)
        finally:
            for name in joining:
                self._joining[name] -= 1

    def _check_room(self, group) -> None:
        """maxTunnels: a full group refuses with 0x1 (clients retry later, as after a timeout)."""
        if group.max_tunnels is None:
            return
        present = len(self.connections(group.name)) + self._joining.get(group.name, 0)
        if present >= group.max_tunnels:
            raise ServerError(f"{protocol.REASON_GROUP_FULL} ({group.max_tunnels} tunnels)")

    def _join(self, conn: Connection, joining: list[str]) -> None:
        peer = format_address(conn.peer)
        group_name = None
        timed_out = ServerError("registration timed out")  # 0x1: the client may retry
        try:
            with gevent.Timeout(self.registration_timeout, timed_out):
                gevent.wait([conn.handshake_done, conn.closed], count=1)  # (or dropped by the handshake timeout)
                conn._raise_if_closed()
                stream = conn.accept_stream()
                decoder = protocol.MessageDecoder()
                while (obj := decoder.feed(stream.read(4096))) is None:
                    if stream.at_eof:
                        raise ProtocolViolation("registration stream ended before a complete message")
                request = protocol.decode_request_untrusted(obj)
                group_name = request.tunnel_group
                if self.draining:  # (0x1: the client retries, here or at another replica)
                    raise ServerError("server draining")
                group = self.groups.group(group_name)
                if group is None:
                    raise NotFound(f"tunnel group {group_name!r} not found")
                strategy = auth.authenticate(group, request.metadata, external_check=self._external_check)
                self._check_room(group)
                self._joining[group_name] = self._joining.get(group_name, 0) + 1
                joining.append(group_name)
                stream.write(protocol.encode_response(), end=True)
                stream.finish(stop_reading=False)  # the client FINs when it likes
        except ConnectionClosed as exc:
            logger.debug("%s: closed during registration: %s", peer, exc)
            self.metrics.registration(group_name, "closed", known_group=group_name in self.groups.groups)
            return
        except (ReverstError, gevent.queue.Empty) as exc:
            code, reason = protocol.close_for_error(exc)
            label = "timeout" if exc is timed_out else "group full" if reason.startswith(protocol.REASON_GROUP_FULL) \
                else reason
            self.metrics.registration(group_name, label,
                                      known_group=group_name in self.groups.groups)
            log = logger.debug if isinstance(exc, NotFound) else logger.info
            log("registration from %s rejected (group %r): %s", peer, group_name, exc)
            conn.close(code, reason, linger=CLOSE_LINGER_UNREGISTERED)
            return
        except Exception:
            logger.exception("registration from %s failed", peer)
            self.metrics.registration(group_name, "internal error", known_group=False)
            conn.close(protocol.AppErrorCode.SERVER_ERROR, "internal error", linger=CLOSE_LINGER_UNREGISTERED)
            return
        if self.groups.group(group_name) is None:  # removed by a reload meanwhile
            self.metrics.registration(group_name, protocol.REASON_NOT_FOUND, known_group=False)
            conn.close(protocol.AppErrorCode.SERVER_ERROR, protocol.REASON_NOT_FOUND, linger=CLOSE_LINGER_UNREGISTERED)
            return
        try:  # HTTP/3 on an open connection only (qh3 raises on a closed one)
            conn._check_closed()
            conn._raise_if_closed()
            conn.attach_h3(http_client=True)
        except (ConnectionClosed, *conn._stream_errors) as exc:  # the client left right after its answer
            logger.debug("%s: closed right after registering: %s", peer, exc)
            self.metrics.registration(group_name, "closed", known_group=True)
            return
        self.metrics.registration(group_name, None, known_group=True)
        self.metrics.tunnel_registered(conn, group_name, peer)
        self._registered_total += 1
        self._endpoint.registered(conn)
        self._slots[conn] = gevent.lock.BoundedSemaphore(MAX_REQUESTS_PER_CONNECTION)
        tunnels = self._tunnels.setdefault(group_name, _Tunnels())
        tunnels.connections.append(conn)
        conn.on_close(self._on_tunnel_closed)
        conn.group = group_name
        logger.info("tunnel %s registered in group %r (%s)", peer, group_name, strategy)

    def _sweep_public(self, front: http1.Front, interval: float = 1.0) -> None:
        """The public connections' idle and request-head timeouts (see http1.Front)."""
        while not self._stopped.wait(interval):
            front.sweep()

    def _trim_memory(self, interval: float = 5.0) -> None:
        """After a burst of registrations (handshakes allocate and free a lot), hand the
        freed heap back to the OS: glibc keeps it otherwise, and RSS stays at the peak."""
        seen = self._registered_total
        while not self._stopped.wait(interval):
            if self._registered_total != seen:
                seen = self._registered_total
                _malloc.trim()

    def _on_tunnel_closed(self, conn: Connection) -> None:
        self._slots.pop(conn, None)
        self.websockets.pop(conn, None)
        self.metrics.tunnel_closed(conn)
        tunnels = self._tunnels.get(getattr(conn, "group", None))
        if tunnels is not None and conn in tunnels.connections:
            tunnels.connections.remove(conn)
        logger.info("tunnel %s left group %r: %s", format_address(conn.peer), getattr(conn, "group", None),
                    conn.close_reason)

    # -- public HTTP ----------------------------------------------------------------------
    def _proxy(self, environ: dict, start_response):
        headers = environ["reverst.headers"]
        scheme = environ.get("wsgi.url_scheme", "http")
        if not self.trusted_proxies.trusts(environ.get("REMOTE_ADDR", "")):
            headers = environ["reverst.headers"] = rebuild_forwarding(headers, scheme)
        elif scheme == "https" and not any(k.lower() == "x-forwarded-proto" for k, _ in headers):
            headers = environ["reverst.headers"] = [*headers, ("X-Forwarded-Proto", "https")]
        host = next((v for k, v in headers if k.lower() == "host"), "")
        route = next((v for k, v in headers if k.lower() == "x-forwarded-host"), None)
        if route is None:
            route = host.rsplit(":", 1)[0] if host.rsplit(":", 1)[-1].isdigit() else host
            route = route.strip("[]")
        environ["reverst.route"] = route
        group = self.groups.group_for_host(route)
        if group is None:
            start_response("502 Bad Gateway", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("X-Content-Type-Options", "nosniff"), ("Content-Length", "12")])
            return [b"bad gateway\n"]
        environ["reverst.group"] = group.name
        if group.tls is not None and group.tls.redirect_http and scheme == "http" and self._https is not None:
            return self._redirect_to_https(route, environ, start_response)
        refused = self._admit(group, environ, headers, start_response)
        if refused is not None:
            return refused
        if group.visitors.strategies:  # the visitor's credentials were for us, not for the app
            headers = environ["reverst.headers"] = [(k, v) for k, v in headers if k.lower() != "authorization"]
        tunnels = self._tunnels.get(group.name)
        if websocket.is_upgrade(headers):
            return self._websocket(tunnels, group.name, environ, headers, host, start_response)
        tried: set[Connection] = set()
        while True:
            # (not one tried already: other requests move the round-robin cursor meanwhile,
            # so the next pick may well be the tunnel that just refused this one)
            conn = tunnels.pick(lambda c: c not in tried) if tunnels else None
            if conn is None:
                logger.info("no tunnel connection for group %r (host %r)", group.name, route)
                return self._empty_502(start_response)
            tried.add(conn)
            environ["reverst.tunnel"] = conn
            result = self._forward(conn, environ, headers, host, start_response)
            if result is not _RETRY:
                return result
            # Refused unprocessed by a stopping tunnel client (H3_REQUEST_REJECTED), or a
            # safe request whose tunnel died before answering: the next tunnel takes it.

    def _admit(self, group, environ: dict, headers, start_response):
        """The group's visitor policy (reverst.policy): None if the request may go on
        (counted in flight until its response is done), else the refusal sent. A group
        without a policy costs nothing here (its requests are not counted: a reload that
        adds a concurrency cap counts from the next request on)."""
        if group.visitors.unrestricted:
            return None
        gate = self._gates.get(group.name)
        if gate is None:
            gate = self._gates[group.name] = Gate(group.visitors, group.name)
        elif gate.policy is not group.visitors:  # (a reload gave the group a new policy)
            gate.configure(group.visitors)
        length = environ.get("CONTENT_LENGTH")
        refusal = gate.admit(visitor_address(headers, environ.get("REMOTE_ADDR", ""), self.trusted_proxies),
                             next((v for k, v in headers if k.lower() == "authorization"), None),
                             int(length) if length is not None else None, time.monotonic(),
                             self._authenticate_visitor)
        if refusal is not None:
            self.metrics.visitor_refused(group.name, refusal.reason)
            return self._refuse(start_response, refusal.status, refusal.message, refusal.headers)
        gate.in_flight += 1
        environ["reverst.done"] = gate.release
        max_body = group.visitors.limits.max_body_size
        if max_body is not None and environ.get("HTTP_TRANSFER_ENCODING"):  # (a Content-Length was checked)
            environ["wsgi.input"] = _LimitedBody(environ["wsgi.input"], max_body,
                                                 lambda: self.metrics.visitor_refused(group.name, "body_too_large"))
        return None

    def _redirect_to_https(self, host: str, environ: dict, start_response):
        port = self._https.address[1]
        authority = host if port == 443 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):  # an IPv6 literal
            authority = f"[{host}]" if port == 443 else f"[{host}]:{port}"
        location = f"https://{authority}{environ['reverst.raw_path']}"
        start_response("308 Permanent Redirect", [("Location", location), ("Content-Length", "0")])
        return [b""]

    def _authenticate_visitor(self, policy, authorization: str | None) -> None:
        auth.authenticate(policy, {"Authorization": authorization} if authorization is not None else None,
                          external_check=self._external_check)

    @staticmethod
    def _empty_502(start_response):
        start_response("502 Bad Gateway", [("Content-Length", "0")])
        return [b""]

    def _forward(self, conn: Connection, environ: dict, headers, host: str, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ["reverst.raw_path"].split("?", 1)[0]  # for logs: a query may carry tokens
        chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        length = int(environ.get("CONTENT_LENGTH") or 0) if not chunked else None
        has_body = chunked or (length or 0) > 0
        xff = [v for k, v in headers if k.lower() == "x-forwarded-for"]
        fields = [(b":method", method.encode()), (b":scheme", b"https"),
                  (b":authority", host.encode("latin-1")),
                  (b":path", environ["reverst.raw_path"].encode("latin-1"))]
        for name, value in strip_hop_by_hop(headers):
            low = name.lower()
            if low in ("host", "expect", "x-forwarded-for"):
                continue  # expect: this front already answered 100-continue
            fields.append((low.encode("latin-1"), value.encode("latin-1")))
        fields.append((b"x-forwarded-for", ", ".join(xff + [environ.get("REMOTE_ADDR", "")]).encode("latin-1")))

        slots = self._slots.get(conn)
        if slots is None:
            return self._empty_502(start_response)
        slots.acquire()
        stream: H3Stream | None = None
        pump = None
        try:
            stream = conn.open_request(fields, end_stream=not has_body)
            if has_body:
                pump = gevent.spawn(self._pump_body, environ["wsgi.input"], stream)
            response = stream.wait_headers()
        except (ConnectionClosed, StreamReset) as exc:
            if pump is not None:
                pump.join(1)
                if isinstance(pump.value, Exception):  # the public request itself was bad:
                    self._finish(stream, pump, slots)
                    raise pump.value  # the front answers it (400), no second response from us
            self._finish(stream, pump, slots)
            if not has_body and isinstance(exc, StreamReset) and exc.error_code == H3_REQUEST_REJECTED:
                logger.debug("%s %s refused by %s (stopping): trying another tunnel", method, path,
                             format_address(conn.peer))
                return _RETRY
            if not has_body and isinstance(exc, ConnectionClosed) and method in _RETRIABLE_METHODS:
                logger.info("%s %s: tunnel %s closed before answering (%s): trying another tunnel",
                            method, path, format_address(conn.peer), exc)
                return _RETRY
            logger.info("%s %s via %s failed before the response: %s", method, path,
                        format_address(conn.peer), exc)
            return self._empty_502(start_response)
        except BaseException:
            self._finish(stream, pump, slots)
            raise
        return self._answer(stream, response, method, pump, slots, start_response)

    def _answer(self, stream: H3Stream, response, method: str, pump, slots, start_response):
        """The tunnel's response as the public one: status, fields (hop-by-hop removed,
        Canonical-Case), and the body relayed as it arrives."""
        status = _response_status(response)
        out_headers = []
        for name, value in response:
            if not name.startswith(b":") and name != websocket.DECLINED:
                out_headers.append((name.decode("latin-1"), value.decode("latin-1")))
        out_headers = strip_hop_by_hop(out_headers)
        no_body = status in (204, 304) or 100 <= status < 200
        if no_body:
            out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
        start_response(_status_line(status), [(_canonical(k), v) for k, v in out_headers])
        if method == "HEAD" or no_body:
            self._finish(stream, pump, slots)
            return [b""]
        if stream.complete:  # the whole body came with the head (a small response): no relay
            try:
                body = stream.read()
            finally:
                self._finish(stream, pump, slots)
            return [body]
        return self._relay(stream, pump, slots, start_response)

    # -- WebSockets (reverst.websocket) ------------------------------------------------------------
    def _websocket(self, tunnels, group: str, environ: dict, headers, host: str, start_response):
        """A public upgrade request: an extended CONNECT into a tunnel that serves it, a
        101 and the bytes both ways if it accepts, its answer relayed if not."""
        has_body = bool(environ.get("HTTP_TRANSFER_ENCODING")) or int(environ.get("CONTENT_LENGTH") or 0) > 0
        try:
            key = websocket.check_upgrade(environ["REQUEST_METHOD"], environ["SERVER_PROTOCOL"][5:], headers,
                                          has_body)
            switch = environ.get("reverst.upgrade")
            if switch is None:  # (llhttp saw no upgrade: Connection lacks the token)
                raise websocket.HandshakeError(400, "a WebSocket handshake needs Connection: Upgrade")
        except websocket.HandshakeError as exc:
            return self._refuse(start_response, exc.status, exc.reason, exc.headers)
        if tunnels is None or not any(c.is_open for c in tunnels.connections):
            logger.info("no tunnel connection for group %r (WebSocket)", group)
            return self._empty_502(start_response)
        for c in list(tunnels.connections):  # a tunnel just registered: its SETTINGS say if it can
            if c.is_open and c.h3 is not None and c.h3.received_settings is None:
                c.wait_settings(SETTINGS_WAIT)
        conn = tunnels.pick(lambda c: c.h3 is not None and c.h3.peer_serves_websockets
                            and self.websockets.get(c, 0) < self.max_websockets_per_tunnel)
        if conn is None:
            if any(c.h3 is not None and c.h3.peer_serves_websockets for c in tunnels.connections if c.is_open):
                return self._refuse(start_response, 503, "every tunnel of this group has as many WebSockets "
                                    "open as it may", [("Retry-After", "1")])
            return self._refuse(start_response, 501, f"the tunnels of group {group!r} cannot carry WebSockets")
        environ["reverst.tunnel"] = conn
        fields = websocket.connect_fields(host, environ["reverst.raw_path"], headers, environ.get("REMOTE_ADDR", ""))
        self.websockets[conn] = self.websockets.get(conn, 0) + 1
        stream = None
        answered = False  # the stream was handed to _answer, which finishes it
        try:
            try:
                stream = conn.open_request(fields)
                response = stream.wait_headers()
            except (ConnectionClosed, StreamReset) as exc:
                logger.info("WebSocket %s via %s failed before the answer: %s",
                            environ["reverst.raw_path"].split("?", 1)[0], format_address(conn.peer), exc)
                return self._empty_502(start_response)
            status = _response_status(response)
            if not 200 <= status < 300 or any(name == websocket.DECLINED for name, _ in response):
                with contextlib.suppress(ConnectionClosed, StreamReset):
                    stream.write(b"", end=True)  # no WebSocket: a plain answer to a plain request
                answered = True
                return self._answer(stream, response, "GET", None, _NoSlot, start_response)
            start_response("101 Switching Protocols", websocket.switching_protocols_fields(response, key))
            environ["reverst.websocket"] = self._relay_websocket(switch(), stream)
            return []
        finally:
            self.websockets[conn] = self.websockets.get(conn, 1) - 1
            if stream is not None and not answered:
                stream.finish()

    @staticmethod
    def _refuse(start_response, status: int, reason: str, headers=()):
        body = (reason + "\n").encode()
        start_response(_status_line(status), [("Content-Type", "text/plain; charset=utf-8"),
                                              ("Content-Length", str(len(body))), *headers])
        return [body]

    @staticmethod
    def _relay_websocket(sock: http1.UpgradedSocket, stream: H3Stream) -> dict:
        """The bytes of an open WebSocket, both ways, until both sides closed (a clean end
        of one side leaves the other WEBSOCKET_HALF_CLOSED seconds) or one side broke (the
        other is then cut at once). What it did, for the access log and the metrics."""
        stats = {"received": 0, "sent": 0, "close": None}

        def upstream() -> str | None:  # visitor -> tunnel
            try:
                while data := sock.recv(CHUNK):
                    stats["received"] += len(data)
                    stream.write(data)
                stream.write(b"", end=True)
                return None
            except StreamReset as exc:
                if exc.error_code == H3_NO_ERROR:  # the tunnel needs no more (its side is done)
                    return None
                sock.abort()
                return f"tunnel: {exc}"
            except ConnectionClosed as exc:
                sock.abort()
                return f"tunnel: {exc}"
            except OSError as exc:
                stream.reset(H3_REQUEST_CANCELLED)
                return f"visitor: {exc}"

        def downstream() -> str | None:  # tunnel -> visitor
            try:
                while data := stream.read(CHUNK):
                    stats["sent"] += len(data)
                    sock.send(data)
                sock.shutdown_write()
                return None
            except (ConnectionClosed, StreamReset) as exc:
                sock.abort()
                return f"tunnel: {exc}"
            except OSError as exc:
                stream.reset(H3_REQUEST_CANCELLED)
                return f"visitor: {exc}"

        directions = [gevent.spawn(upstream), gevent.spawn(downstream)]
        try:
            first = next(gevent.iwait(directions))
            other = directions[1] if first is directions[0] else directions[0]
            if first.value is not None or first.exception is not None:
                other.kill()  # one side broke: the other is cut (already, by its reset or abort)
            else:
                other.join(WEBSOCKET_HALF_CLOSED)
                if not other.dead:
                    other.kill()
                    sock.abort()
                    stream.reset(H3_REQUEST_CANCELLED)
                    stats["close"] = "half-closed for too long"
            reasons = [g.value for g in directions if g.value]
            stats["close"] = stats["close"] or (reasons[0] if reasons else "closed")
        finally:
            gevent.killall(directions)
        return stats

    def _relay(self, stream: H3Stream, pump, slots, start_response=None):
        started = False  # a body byte went out: the visitor's response is under way
        try:
            while True:
                try:
                    data = stream.read(CHUNK)
                except (ConnectionClosed, StreamReset) as exc:
                    if not started and start_response is not None:  # nothing sent yet: a 502 can replace it
                        logger.info("%r failed before the response body: %s", stream, exc)
                        start_response("502 Bad Gateway", [("Content-Length", "0")], sys.exc_info())
                        return
                    raise _UpstreamAborted(str(exc)) from exc
                if not data:
                    return
                started = True
                yield data
        finally:
            self._finish(stream, pump, slots)

    @staticmethod
    def _finish(stream, pump, slots) -> None:
        if pump is not None:
            pump.kill(block=False)
        if stream is not None:
            stream.finish()
        slots.release()

    @staticmethod
    def _pump_body(body, stream: H3Stream) -> Exception | None:
        try:
            while True:
                data = body.read(CHUNK)
                if not data:
                    break
                stream.write(data)
            stream.write(b"", end=True)
        except (ConnectionClosed, StreamReset):
            pass  # the tunnel side stopped reading: the response says why
        except (OSError, ValueError) as exc:  # the public client broke off (or botched) the upload
            logger.info("request body aborted: %s", exc)
            stream.reset(H3_REQUEST_CANCELLED)
            return exc
        return None

    # -- live groups and external authorization (PROTOCOL §5) ----------------------------------
    def groups_updater(self):
        """A function that any native thread may call with a new :class:`GroupsConfig` (the
        groups watcher of :mod:`reverst.sources` does); the config is applied in this
        server's hub by :meth:`reload_groups`. Call it in the thread that runs the server."""
        loop = gevent.get_hub().loop

        def update(groups: GroupsConfig) -> None:
            loop.run_callback_threadsafe(gevent.spawn, self.reload_groups, groups)
        return update

    def reload_groups(self, groups: GroupsConfig) -> None:
        """:meth:`update_groups`, warning about every open group on every reload (it warns
        only about the groups that became open)."""
        old = self.groups
        self.update_groups(groups)
        for group in groups.groups.values():
            before = old.groups.get(group.name)
            if group.is_open and before is not None and before.is_open:
                logger.warning("tunnel group %r has no authentication: anyone can register", group.name)

    def _external_check(self, strategy, authorization: str) -> bool:
        """``GET <endpoint>`` with ``Authorization``: 200 allows. Runs in a native thread
        (only this registration waits), at most ``strategy.timeout`` seconds."""
        import gevent.threadpool
        pool = self.__dict__.get("_external_pool")
        if pool is None:
            pool = self._external_pool = gevent.threadpool.ThreadPool(32)
        result = pool.spawn(self._external_get, strategy.endpoint, authorization, strategy.timeout)
        result.wait(strategy.timeout)
        if not result.ready():
            logger.warning("external authorization at %s: no answer within %gs", strategy.safe_endpoint,
                           strategy.timeout)
            return False
        status, error = result.get()
        if error is not None:
            logger.warning("external authorization at %s failed: %s", strategy.safe_endpoint, error)
            return False
        log = logger.debug if status == 200 else logger.info
        log("external authorization at %s answered %d", strategy.safe_endpoint, status)
        return status == 200

    @staticmethod
    def _external_get(endpoint: str, authorization: str, timeout: float) -> tuple[int | None, str | None]:
        """(status, None), or (None, the error's class name). Never raises: the hub would
        print the traceback, and a requests error can quote the endpoint's password."""
        import requests
        try:
            with requests.Session() as session:
                # auth=...: no .netrc credentials may replace our Authorization header.
                # (a little past the caller's wait: a timeout is the wait's to report, never a race)
                late = timeout + 1.0
                with session.get(endpoint, headers={"Authorization": authorization}, timeout=(late, late),
                                 allow_redirects=False, stream=True, auth=lambda request: request) as response:
                    return response.status_code, None
        except Exception as exc:
            return None, type(exc).__name__


_CANONICAL_EXCEPTIONS = {"etag": "ETag", "www-authenticate": "WWW-Authenticate"}


@functools.lru_cache(maxsize=1024)
def _canonical(name: str) -> str:
    """HTTP/3 names are lower-case; HTTP/1.1 clients expect Canonical-Case."""
    return _CANONICAL_EXCEPTIONS.get(name) or "-".join(p.capitalize() for p in name.split("-"))
