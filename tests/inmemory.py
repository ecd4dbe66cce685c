"""Two real QUIC endpoints wired together in memory under a fake clock.

aioquic ``tests/test_connection.py`` style: datagrams go from ``datagrams_to_send(now)``
straight to the peer's ``receive_datagram()``; time moves only through ``get_timer()`` /
``handle_timer()``. No sockets, no sleeps.

The QUIC backend is the one the run selects (``REVERST_QUIC_BACKEND``, else auto), named
once here: ``BACKEND`` and its library's own classes (aioquic and qh3 share the layout).
"""
from __future__ import annotations

import importlib

from reverst.protocol import ALPN
from reverst.quic import load_backend

BACKEND = load_backend()
LIBRARY = BACKEND.NAME  # "aioquic" or "qh3": the library's package name too
events = importlib.import_module(f"{LIBRARY}.quic.events")
h3_events = importlib.import_module(f"{LIBRARY}.h3.events")
QuicConfiguration = importlib.import_module(f"{LIBRARY}.quic.configuration").QuicConfiguration
QuicConnection = importlib.import_module(f"{LIBRARY}.quic.connection").QuicConnection
H3Connection = importlib.import_module(f"{LIBRARY}.h3.connection").H3Connection
TunnelQuicConnection = BACKEND.TunnelQuicConnection
ReversedH3Connection = BACKEND.ReversedH3Connection


def unacked_packets(conn) -> int:
    """Packets ``conn`` sent that its peer has not acknowledged yet (library state)."""
    if LIBRARY == "qh3":
        return len(conn._core.outstanding_application_packets)
    return sum(len(space.sent_packets) for space in conn._loss.spaces)

CLIENT_ADDR = ("10.0.0.1", 50000)
SERVER_ADDR = ("10.0.0.2", 8443)
SERVER_NAME = "reverst.test"


# -- in-memory network ------------------------------------------------------------


class Link:
    """A client and a server connection, a fake clock and instant datagram delivery.

    ``gone`` holds endpoints that vanished: they neither send, receive nor run timers.
    Each endpoint's QUIC events go to ``on_event[conn]`` (default: ``events[conn]``).
    """

    def __init__(self, client: QuicConnection, server: QuicConnection, now: float = 1000.0):
        self.client, self.server = client, server
        self.now = now
        self.peer = {client: server, server: client}
        self.addr = {client: CLIENT_ADDR, server: SERVER_ADDR}
        self.events: dict[QuicConnection, list] = {client: [], server: []}
        self.on_event = {c: self.events[c].append for c in (client, server)}
        self.sent = {client: 0, server: 0}  # datagrams produced
        self.last_rx: dict[QuicConnection, float | None] = {client: None, server: None}
        self.gone: set[QuicConnection] = set()

    def drain(self, conn: QuicConnection) -> None:
        while (event := conn.next_event()) is not None:
            self.on_event[conn](event)

    def flush(self, conn: QuicConnection) -> int:
        if conn in self.gone:
            return 0
        datagrams = conn.datagrams_to_send(now=self.now)
        self.sent[conn] += len(datagrams)
        peer = self.peer[conn]
        if datagrams and peer not in self.gone:
            for data, _ in datagrams:
                peer.receive_datagram(data, self.addr[conn], now=self.now)
            self.last_rx[peer] = self.now
            self.drain(peer)
        return len(datagrams)

    def exchange(self) -> None:
        """Pass datagrams back and forth until both sides are quiet (no clock change)."""
        for _ in range(100_000):
            if not (self.flush(self.client) + self.flush(self.server)):
                return
        raise AssertionError("endpoints never went quiet")

    def timers(self) -> list[tuple[float, QuicConnection]]:
        return [(at, c) for c in (self.client, self.server)
                if c not in self.gone and (at := c.get_timer()) is not None]

    def run(self, until: float) -> None:
        """Advance the clock to ``until``, firing every timer due on the way."""
        self.exchange()
        for _ in range(100_000):
            due = self.timers()
            if not due or min(at for at, _ in due) > until:
                break
            self.now = max(self.now, min(at for at, _ in due))
            for at, conn in due:
                if at <= self.now:
                    conn.handle_timer(now=self.now)
                    self.drain(conn)
            self.exchange()
        else:
            raise AssertionError("timers never settled")
        self.now = max(self.now, until)

    def advance(self, seconds: float = 0.2) -> None:
        self.run(self.now + seconds)

    def handshake(self) -> None:
        self.client.connect(SERVER_ADDR, now=self.now)
        self.advance(1.0)
        for conn in (self.client, self.server):
            assert any(isinstance(e, events.HandshakeCompleted) for e in self.events[conn])
            assert conn._close_event is None


def make_link(tls, *, client_cls=TunnelQuicConnection, server_cls=TunnelQuicConnection,
              client_kwargs=None, server_kwargs=None, server_config=None, handshake=True,
              **config) -> Link:
    certfile, keyfile, ca_pem = tls
    if LIBRARY == "qh3":  # see reverst.quic._qh3._configuration
        config.setdefault("max_datagram_frame_size", 65536)
    client_config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                      server_name=SERVER_NAME, **config)
    client_config.load_verify_locations(cadata=ca_pem)
    server_config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN],
                                      **{**config, **(server_config or {})})
    server_config.load_cert_chain(certfile, keyfile)
    client = client_cls(configuration=client_config, **(client_kwargs or {}))
    server = server_cls(
        configuration=server_config,
        original_destination_connection_id=client.original_destination_connection_id,
        **(server_kwargs or {}))
    link = Link(client, server)
    if handshake:
        link.handshake()
    return link
