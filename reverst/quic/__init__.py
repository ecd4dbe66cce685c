"""QUIC backends: the sans-io cores the gevent shell (reverst._transport) drives.

Two implementations of one small interface, each in its own module that imports its
library and nothing of the other's:

* ``aioquic`` (:mod:`reverst.quic._aioquic`): the pure-Python library the design started
  from; always installed.
* ``qh3`` (:mod:`reverst.quic._qh3`): aioquic's fork with a native (Rust) QUIC core:
  packet building, recovery, crypto and streams; several times faster.
  ``pip install 'reverst[fast]'``.

:func:`load_backend` picks one: by name, else ``REVERST_QUIC_BACKEND``, else ``auto``
(qh3 when it is installed).  A backend module provides:

``NAME``; ``SEND_HIGH_WATER`` (a writer blocks while more than this is buffered on a
stream, as its ``send_backlog`` counts: ``send_buffered``, and with qh3 the connection's
data in flight beyond a floor while its path queues); ``TRANSMIT_LIMIT`` (most datagrams one
``datagrams_to_send(now, limit)`` builds, or None); ``events`` (the event classes the shell
dispatches on: StreamDataReceived, StreamReset, StopSendingReceived, HandshakeCompleted,
ConnectionIdIssued, ConnectionIdRetired, ConnectionTerminated, HeadersReceived,
DataReceived);
``STREAM_ERRORS`` (what a send on a reset stream raises); ``client_configuration()``,
``server_configuration()``; ``client_connection(cfg, **options)``,
``server_connection(cfg, original_destination_connection_id, retry_source_connection_id=None,
**options)`` (the second id: the source id of the Retry the client answered; options:
``keep_alive``, ``dead_peer_timeout``, ``reset_key``, ``request_streams``) returning a connection with
aioquic's methods (``connect``, ``receive_datagram``, ``datagrams_to_send``,
``get_timer``, ``handle_timer``, ``next_event``, ``send_stream_data``, ``reset_stream``,
``stop_stream``, ``close``, ``host_cid``) plus ours: ``receive_datagrams``, ``receive_coalesced``
(datagrams the kernel coalesced into one buffer, UDP GRO),
``open_stream``, ``can_open_stream``, ``hold``/``release``/``send_buffered``/``send_backlog``
(flow control and back-pressure), ``closed_event``, ``busy``, ``suspect``, ``keep_alive``,
``handshake_complete``, ``smoothed_rtt``, ``lost_packets``; and
``h3_connection(quic, http_client=...)`` (HTTP/3 with the roles reversed).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from ._admission import INVALID_TOKEN, Admission, InvalidToken, Mode as RetryMode, RetryTokens, Verdict, initial_token_untrusted
from ._common import (BUSY_DEAD_PEER_TIMEOUT, BUSY_PROBE_INTERVAL, CID_LENGTH, REQUEST_STREAMS, SUSPECT_GRACE, Header,
                      coalesced_count, encode_stateless_reset, encode_version_negotiation, parse_header_untrusted,
                      stateless_reset_token)

__all__ = ["INVALID_TOKEN", "Admission", "InvalidToken", "RetryMode", "RetryTokens", "Verdict", "initial_token_untrusted",
           "BACKENDS", "load_backend", "available_backends", "BUSY_DEAD_PEER_TIMEOUT", "BUSY_PROBE_INTERVAL",
           "SUSPECT_GRACE", "REQUEST_STREAMS",
           "CID_LENGTH", "Header", "coalesced_count", "encode_stateless_reset", "encode_version_negotiation",
           "parse_header_untrusted", "stateless_reset_token"]

#: The backend names, fastest first (the order ``auto`` tries them in).
BACKENDS = ("qh3", "aioquic")
ENV = "REVERST_QUIC_BACKEND"

_loaded: dict[str, ModuleType] = {}


def load_backend(name: str | None = None) -> ModuleType:
    """The backend module for ``name`` (``auto``, ``aioquic`` or ``qh3``; None reads
    ``REVERST_QUIC_BACKEND``, default ``auto``).  ValueError names what is wrong."""
    choice = (name or os.environ.get(ENV) or "auto").strip().lower()
    if choice == "auto":
        for candidate in BACKENDS:
            try:
                return load_backend(candidate)
            except ImportError:
                continue
        raise ImportError("no QUIC library: install aioquic or qh3")  # aioquic is a dependency
    if choice not in BACKENDS:
        raise ValueError(f"unknown QUIC backend {choice!r}: expected auto, {', '.join(sorted(BACKENDS))}")
    module = _loaded.get(choice)
    if module is None:
        try:
            module = importlib.import_module(f"{__name__}._{choice}")
        except ImportError as exc:
            if choice == "qh3":
                raise ImportError(f"QUIC backend 'qh3' is not installed (pip install 'reverst[fast]'): "
                                  f"{exc}") from exc
            raise
        _loaded[choice] = module
    return module


def available_backends() -> list[str]:
    """The backends that import here."""
    names = []
    for candidate in BACKENDS:
        try:
            load_backend(candidate)
        except ImportError:
            continue
        names.append(candidate)
    return names
