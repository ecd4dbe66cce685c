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
import socket
import time
from dataclasses import dataclass
from typing import Callable

import gevent
import gevent.event

from .. import protocol
from .._transport import Connection, Endpoint, parse_address
from ..auth import basic_authorization, bearer_authorization
from ..quic import REQUEST_STREAMS, load_backend
from ..errors import (BadRequest, ConnectionClosed, NotFound, ProtocolViolation, ReverstError,
                      ServerError, Unauthorized)
from ._handler import WSGIHandler

__all__ = ["BasicAuth", "BearerAuth", "Client", "serve", "Unauthorized", "BadRequest", "NotFound",
           "ServerError", "CONNECTING", "CONNECTED", "RECONNECTING", "STOPPED"]

logger = logging.getLogger("reverst.client")


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


class Client:
    """Keeps ``connections`` tunnel connections registered and serves ``app`` through them.

    ``dial_and_serve()`` blocks until :meth:`stop` is called or registration fails for
    good (:class:`Unauthorized`/:class:`BadRequest` at once; :class:`NotFound` and
    server errors after ``max_retries`` consecutive failures, never by default).  A
    dropped connection is re-dialled with capped exponential backoff and jitter; the
    backoff starts over once a connection has stayed up for ``healthy_after`` seconds.

    :attr:`state` is ``"connecting"`` until the first registration, ``"connected"``
    while at least one connection is registered, ``"reconnecting"`` after a failure or
    a loss while none is, and ``"stopped"`` once :meth:`stop` is done or
    ``dial_and_serve()`` gave up; :meth:`on_state_change` callbacks hear each change.
    """

    def __init__(self, app, tunnel_address, *, tunnel_group: str, server_name: str | None = None,
                 auth: BasicAuth | BearerAuth | None = None, ca_file: str | None = None,
                 insecure: bool = False, on_ready: Callable[["Client"], None] | None = None,
                 max_idle_timeout: float = 60.0, keep_alive_period: float = 30.0,
                 app_threads: int = 100, connections: int = 1, max_retries: int | None = None,
                 backoff: tuple[float, float] = (0.1, 30.0), healthy_after: float = 60.0,
                 handshake_timeout: float = 10.0, dead_peer_timeout: float = 5.0,
                 max_datagram_size: int = 1452, quic_backend: str | None = None) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.app = app
        self.host, self.port = parse_address(tunnel_address, "127.0.0.1", "tunnel address")
        self.tunnel_group = tunnel_group
        self.server_name = server_name or self.host
        self.auth = auth
        self.ca_file = ca_file
        self.insecure = insecure
        self.on_ready = on_ready
        self.max_idle_timeout = max_idle_timeout
        self.keep_alive_period = keep_alive_period
        self.max_retries = max_retries
        self.backoff = backoff
        self.healthy_after = healthy_after
        self.handshake_timeout = handshake_timeout
        self.dead_peer_timeout = dead_peer_timeout
        self.max_datagram_size = max_datagram_size
        #: the QUIC backend module (reverst.quic): ``quic_backend`` names it (auto, aioquic, qh3)
        self.backend = load_backend(quic_backend)
        #: ``auto`` chose qh3: a certificate only qh3 refuses may send us to aioquic (see below)
        self._may_fall_back = self.backend.NAME == "qh3" and (quic_backend or os.environ.get(
            "REVERST_QUIC_BACKEND") or "auto").lower() == "auto"
        self._handler = WSGIHandler(app, threads=app_threads)
        self._stopping = gevent.event.Event()
        self._stopped = gevent.event.Event()  # set by stop() once connections are closed
        self._slots: list[Connection | None] = [None] * connections
        self._endpoints: list[Endpoint | None] = [None] * connections
        self._slot_states: list[str] = [CONNECTING] * connections
        self._state = CONNECTING
        self._state_callbacks: list[Callable[["Client", str], None]] = []

    def __repr__(self) -> str:
        return (f"<Client {self.host}:{self.port} group={self.tunnel_group!r} "
                f"connected={len(self.connections)}/{len(self._slots)}>")

    @property
    def connections(self) -> list[Connection]:
        """The tunnel connections registered and open now (none while dialling).

        It agrees with :attr:`state` at every instant: ``"connected"`` exactly when this
        list is not empty (a connection joins it when its registration is answered and
        leaves it the moment it closes).
        """
        return [c for c in self._slots if c is not None and c.is_open]

    @property
    def state(self) -> str:
        """``"connecting"``, ``"connected"``, ``"reconnecting"`` or ``"stopped"``."""
        return self._state

    def on_state_change(self, callback: Callable[["Client", str], None]) -> None:
        """Call ``callback(client, new_state)`` (in the client's event loop; it must not
        block) whenever :attr:`state` changes."""
        self._state_callbacks.append(callback)

    def _set_slot_state(self, slot: int, state: str) -> None:
        self._slot_states[slot] = state
        states = self._slot_states
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
        """The first slot's last registered connection (open or not), for
        single-connection use."""
        return self._slots[0]

    # -- public API -------------------------------------------------------------------
    def dial_and_serve(self) -> None:
        """Dial, register and serve until :meth:`stop`; raises when registration fails for good."""
        runners = [gevent.spawn(self._run_slot, i) for i in range(len(self._slots))]
        try:
            for done in gevent.iwait(runners + [self._stopped]):
                if done is self._stopped:  # stop() is done: a slot still dialling is killed below
                    break
                if done.exception is not None:  # a fatal error ends every slot
                    self._stopping.set()
                    for runner in runners:
                        runner.kill(block=False)
                    raise done.exception
            # stop() was called: let it finish in-flight requests and close the connections
            self._stopped.wait()
        finally:
            self._stopping.set()
            gevent.killall(runners, block=True, timeout=5)
            for i in range(len(self._slots)):
                self._close_endpoint(i)
            self._set_state(STOPPED)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully: refuse new requests, let in-flight ones finish (up to
        ``timeout`` seconds), then close every tunnel connection with code 0x0.
        ``dial_and_serve()`` returns once this is done."""
        if self._stopping.is_set():
            self._stopped.wait()
            return
        self._stopping.set()
        self._handler.accepting = False
        try:
            with gevent.Timeout(timeout, False):
                while self._handler.active:
                    gevent.sleep(0.05)
            for conn in self._slots:
                if conn is not None and conn.is_open:
                    conn.close(protocol.AppErrorCode.OK, "client closing")
            self._handler.close()
        finally:
            self._stopped.set()
            self._set_state(STOPPED)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- internals ------------------------------------------------------------------------
    def _run_slot(self, slot: int) -> None:
        failures = 0
        name = f"connection {slot + 1}/{len(self._slots)}" if len(self._slots) > 1 else "connection"
        while not self._stopping.is_set():
            try:
                conn = self._dial_and_register(slot)
            except (Unauthorized, BadRequest):
                raise
            except (ReverstError, OSError, gevent.Timeout) as exc:
                self._close_endpoint(slot)
                if self._stopping.is_set():
                    return
                failures += 1
                if self.max_retries is not None and failures > self.max_retries:
                    raise
                delay = self._delay(failures)
                self._set_slot_state(slot, RECONNECTING)
                if isinstance(exc, NotFound):
                    logger.warning("%s: tunnel group %r is unknown to %s:%d (%s); retrying in %.1fs",
                                   name, self.tunnel_group, self.host, self.port, exc, delay)
                else:
                    logger.info("%s: registration with %s:%d failed (%s); retrying in %.1fs",
                                name, self.host, self.port, exc, delay)
                self._stopping.wait(delay)
                continue
            connected_at = time.monotonic()
            logger.info("%s registered with %s:%d in group %r", name, self.host, self.port,
                        self.tunnel_group)
            # In one step (no switch in between): the list and the state change together.
            self._slots[slot] = conn
            conn.on_close(functools.partial(self._lost, slot))
            self._set_slot_state(slot, CONNECTED)
            if self.on_ready is not None:
                self.on_ready(self)
            gevent.wait([conn.closed, self._stopping], count=1)
            if self._stopping.is_set():
                return
            self._close_endpoint(slot)
            if time.monotonic() - connected_at >= self.healthy_after:
                failures = 0
            failures += 1
            delay = self._delay(failures)
            self._set_slot_state(slot, RECONNECTING)
            logger.info("%s lost (%s); reconnecting in %.1fs", name, conn.close_reason, delay)
            self._stopping.wait(delay)

    def _fall_back(self, closed: ConnectionClosed) -> bool:
        """qh3 (webpki's rule) refuses a server certificate that is marked as a CA, which is
        what ``openssl req -x509`` makes of a self-signed one; aioquic and Go accept it.
        When ``auto`` chose qh3, such a refusal switches this client to aioquic (which
        verifies the certificate just as well) and says so once."""
        if not self._may_fall_back or "certificate" not in closed.reason.lower():
            return False
        self._may_fall_back = False
        self.backend = load_backend("aioquic")
        logger.warning("the QUIC backend qh3 refused the certificate of %s:%d (%s); it refuses a "
                       "self-signed certificate marked as a CA (as openssl req -x509 makes them), which "
                       "aioquic accepts: using aioquic for this server (a certificate with CA:FALSE, or "
                       "one issued by a CA, lets qh3 serve it)", self.host, self.port, closed.reason)
        return True

    def _lost(self, slot: int, conn: Connection) -> None:
        """A registered connection closed (called as it closes, in the hub)."""
        if self._slots[slot] is conn and not self._stopping.is_set():
            self._set_slot_state(slot, RECONNECTING)

    def _delay(self, failures: int) -> float:
        low, high = self.backoff
        delay = min(high, low * 2 ** (failures - 1))
        return delay * random.uniform(0.9, 1.1)

    def _configuration(self):
        return self.backend.client_configuration(
            server_name=self.server_name, idle_timeout=self.max_idle_timeout,
            max_datagram_size=self.max_datagram_size, insecure=self.insecure, ca_file=self.ca_file)

    def _close_endpoint(self, slot: int) -> None:
        endpoint, self._endpoints[slot] = self._endpoints[slot], None
        if endpoint is not None:
            endpoint.close()

    def _dial_and_register(self, slot: int) -> Connection:
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        endpoint = self._endpoints[slot] = Endpoint.bind("::" if family == socket.AF_INET6 else "0.0.0.0", 0,
                                                         backend=self.backend)
        endpoint.start()
        conn = endpoint.connect(addr, self._configuration(), keep_alive=self.keep_alive_period,
                                dead_peer_timeout=self.dead_peer_timeout, request_streams=REQUEST_STREAMS)
        try:
            with gevent.Timeout(self.handshake_timeout, ServerError("handshake timed out")):
                gevent.wait([conn.handshake_done, conn.closed], count=1)
            if conn.close_reason is not None:
                closed = conn.close_reason
                if not closed.application:  # TLS or transport: say which name was checked
                    if self._fall_back(closed):
                        self._close_endpoint(slot)
                        return self._dial_and_register(slot)
                    raise ServerError(f"handshake with {self.host}:{self.port} as {self.server_name!r} "
                                      f"failed: {closed}")
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


def serve(app, tunnel_address, *, tunnel_group: str, **options) -> None:
    """Expose the WSGI ``app`` through ``reverstd`` at ``tunnel_address``; blocks.

    Options are those of :class:`Client`.
    """
    Client(app, tunnel_address, tunnel_group=tunnel_group, **options).dial_and_serve()
