"""``reverstd``'s Prometheus metrics, per-tunnel counters and the public access log.

Each :class:`ServerMetrics` has its own ``CollectorRegistry`` (never the process-global
default, so several servers in one process do not collide). Families:

Those of the Go ``reverstd`` (../shared/PROTOCOL.md §8), same names, labels and units:

* ``reverst_tunnel_group_registrations_total{tunnel_group, error}``: registrations whose
  request was decoded; ``error`` is empty on success, else ``unauthorized`` or ``not found``.
* ``reverst_tunnel_group_active_conn{tunnel_group}``: registered, open tunnel connections.
* ``reverst_tunnel_group_proxy_requests_total{host, status}``: public requests by routing
  host (``X-Forwarded-Host``, else ``Host`` without port) and status class (``2XX``...).
* ``reverst_tunnel_group_proxy_requests_latency_milliseconds{host, status}``: their
  latency histogram in ms, with the OpenTelemetry default buckets. The Go server's
  instrument is ``..._requests_latency`` with unit ``ms``; its Prometheus exporter
  appends the unit, so this is the name Go dashboards query.

Ours: bytes in and out per group, registration failures by reason, QUIC smoothed RTT and
lost packets per group, requests in flight per group, dropped datagrams, open public
connections, groups reloads by result, and the process collector.

Label values that the public chooses (hosts and group names nobody configured) are kept
for the first :data:`UNKNOWN_LABEL_LIMIT` distinct values, then counted as ``other``, so
a scanner cannot grow the registry without bound.

This module does not import gevent (:class:`OpenConnections` does, when called), nor
prometheus_client until :attr:`ServerMetrics.registry` is first read (by the management
app): a ``reverstd`` without ``--management-address`` counts in plain integers and never
loads it (~2.5 MB).
"""
from __future__ import annotations

import bisect
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from .logs import ACCESS_LOGGER

access_logger = logging.getLogger(ACCESS_LOGGER)

#: The OpenTelemetry SDK's default explicit histogram bounds (the Go server's buckets), ms.
LATENCY_BUCKETS_MS = (0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
UNKNOWN_LABEL_LIMIT = 100
OTHER = "other"
#: Registration failure reasons kept as label values; anything else is "error".
FAILURE_REASONS = ("unauthorized", "not found", "bad request", "timeout", "closed", "internal error", "group full")
#: Seconds over which the status page's request rate is averaged.
RATE_WINDOW = 10


def status_class(code: int) -> str:
    """``2XX`` for 200..299, as the Go server labels statuses (0, nothing written: ``2XX``)."""
    if code <= 0:
        return "2XX"
    return f"{str(code)[0]}XX"


class LabelLimiter:
    """Known values pass; the first ``limit`` distinct unknown ones too; then ``other``."""

    def __init__(self, limit: int = UNKNOWN_LABEL_LIMIT) -> None:
        self.limit = limit
        self._unknown: set[str] = set()

    def __call__(self, value: str, known: bool) -> str:
        value = value[:200]
        if known or value in self._unknown:
            return value
        if len(self._unknown) < self.limit:
            self._unknown.add(value)
            return value
        return OTHER


class RateWindow:
    """Events per second over the last ``span`` seconds, in one-second buckets."""

    def __init__(self, span: int = RATE_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.span = span
        self._clock = clock
        self._counts = [0] * span
        self._seconds = [-1] * span

    def add(self, n: int = 1) -> None:
        second = int(self._clock())
        i = second % self.span
        if self._seconds[i] != second:
            self._seconds[i] = second
            self._counts[i] = 0
        self._counts[i] += n

    def rate(self) -> float:
        now = int(self._clock())
        total = sum(c for c, s in zip(self._counts, self._seconds) if 0 <= now - s < self.span)
        return total / self.span


@dataclass
class TunnelStats:
    """What the status page shows about one registered tunnel connection."""
    group: str
    peer: str
    connected_at: float  # wall-clock seconds
    quic: object = None  # the backend connection (its loss detection counts lost packets)
    requests: int = 0

    @property
    def lost_packets(self) -> int:
        return self.quic.lost_packets if self.quic is not None else 0


@dataclass
class GroupStats:
    requests: int = 0
    rate: RateWindow = field(default_factory=RateWindow)
    bytes_out: int = 0  # response body bytes to public clients
    bytes_in: int = 0   # request body bytes from them


class _Requests:
    """Public requests of one (host, status class): count and latency histogram.

    Plain integers, exposed by :class:`_StateCollector`: prometheus_client's children
    take a lock per update (three per request here, ~4% of a busy reverstd's CPU), and
    reverstd updates them from one thread (the gevent hub) only.
    """

    __slots__ = ("count", "sum_ms", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.sum_ms = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)  # per bucket, not cumulative; last: +Inf

    def observe(self, elapsed_ms: float) -> None:
        self.count += 1
        self.sum_ms += elapsed_ms
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, elapsed_ms)] += 1


class _Counter:
    """A counter family with labels, as plain integers: exposed by :class:`_StateCollector`
    (prometheus_client is loaded only when something scrapes)."""

    __slots__ = ("name", "documentation", "labelnames", "values")

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.values: dict[tuple[str, ...], int] = {}

    def inc(self, *labels: str, amount: int = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def family(self):
        from prometheus_client.core import CounterMetricFamily
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(list(labels), value)
        return family


class ServerMetrics:
    """The metrics of one :class:`~reverst.server.TunnelServer` (``server``), which calls
    the hooks below; :attr:`registry` is what ``/metrics`` exposes."""

    def __init__(self, server, *, process: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.clock = clock
        self._process = process
        self._registry = None
        self.registrations = _Counter(
            "reverst_tunnel_group_registrations_total",
            "Total number of registration attempts handled by tunnel group and status code",
            ("tunnel_group", "error"))
        self.registration_failures = _Counter(
            "reverst_registration_failures_total",
            "Failed tunnel registrations by reason (unauthorized, not found, bad request, timeout, "
            "closed, internal error, group full)", ("reason",))
        self.websockets = _Counter(
            "reverst_tunnel_group_websockets_total",
            "WebSockets opened through the group's tunnels", ("tunnel_group",))
        self.websocket_bytes = _Counter(
            "reverst_tunnel_group_websocket_bytes_total",
            "WebSocket bytes carried through the group's tunnels, by direction (in: from public "
            "clients, out: to them)", ("tunnel_group", "direction"))
        self.visitor_refusals = _Counter(
            "reverst_tunnel_group_visitor_refusals_total",
            "Public requests refused by the group's visitor policy, by reason (denied, unauthorized, "
            "rate_limited, group_rate_limited, concurrency, body_too_large)", ("tunnel_group", "reason"))
        #: lost packets of the tunnels that closed, by group (live ones are read at scrape time)
        self.lost_packets_closed: dict[str, int] = {}
        self.reloads = _Counter(
            "reverst_tunnel_groups_reloads_total",
            "Tunnel groups configurations read while running, by result (success, failure)", ("result",))
        for result in ("success", "failure"):
            self.reloads.inc(result, amount=0)
        for reason in FAILURE_REASONS:  # present from the start, so rate() and alerts see 0
            self.registration_failures.inc(reason, amount=0)
        self.counters = (self.registrations, self.registration_failures, self.websockets, self.websocket_bytes,
                         self.visitor_refusals, self.reloads)
        self.tunnels: dict[object, TunnelStats] = {}
        self.groups: dict[str, GroupStats] = {}
        self.public_connections = OpenConnections()
        self.requests_total = 0
        #: one access-log line per public request (logger ``reverst.access``, info)
        self.access_log = True
        self._hosts = LabelLimiter()
        self._groups = LabelLimiter()
        #: (host, status class) -> its requests (exposed by _StateCollector)
        self.requests: dict[tuple[str, str], _Requests] = {}

    @property
    def registry(self):
        """What ``/metrics`` exposes: a ``CollectorRegistry`` of its own (never the
        process-global one), made on first use, with the process collector."""
        if self._registry is None:
            import prometheus_client  # (its families here have no *_created series: the Go server has none)
            registry = prometheus_client.CollectorRegistry()
            registry.register(_StateCollector(self))
            if self._process:
                prometheus_client.ProcessCollector(registry=registry)
            self._registry = registry
        return self._registry

    # -- hooks called by the server ------------------------------------------------------------
    def registration(self, group: str | None, error: str | None, *, known_group: bool) -> None:
        """One registration attempt. ``group`` is None when the request was never decoded
        (the Go server counts only decoded ones in its family)."""
        if error is not None and error not in FAILURE_REASONS:
            error = "error"
        if group is not None:
            self.registrations.inc(self._groups(group, known_group), error or "")
        if error is not None:
            self.registration_failures.inc(error)

    def visitor_refused(self, group: str, reason: str) -> None:
        self.visitor_refusals.inc(self._groups(group, True), reason)

    def tunnel_registered(self, conn, group: str, peer: str) -> None:
        self.tunnels[conn] = TunnelStats(group, peer, getattr(conn, "connected_at", time.time()), conn.quic)

    def tunnel_closed(self, conn) -> None:
        stats = self.tunnels.pop(conn, None)
        if stats is not None and stats.lost_packets:
            closed = self.lost_packets_closed
            closed[stats.group] = closed.get(stats.group, 0) + stats.lost_packets

    def reloaded(self, ok: bool = True) -> None:
        self.reloads.inc("success" if ok else "failure")

    def group_stats(self, name: str) -> GroupStats:
        stats = self.groups.get(name)
        if stats is None:
            stats = self.groups[name] = GroupStats(rate=RateWindow(clock=self.clock))
        return stats

    # -- public requests ---------------------------------------------------------------------
    def observe(self, app, *, access_log: bool = True):
        """WSGI middleware around the public app: request metrics and the access log."""
        self.access_log = access_log
        return PublicRequests(app, self)

    def request_done(self, environ: dict, code: int, sent: int, received: int, started: float) -> None:
        done = environ.pop("reverst.done", None)  # the server's own end-of-request hook (in-flight counts)
        if done is not None:
            done()
        elapsed_ms = (self.clock() - started) * 1000.0
        self.requests_total += 1
        group = environ.get("reverst.group")
        route = environ.get("reverst.route")
        if route is None:
            route = environ.get("HTTP_HOST", "").rsplit(":", 1)[0]
        key = (self._hosts(route, group is not None), status_class(code))
        requests = self.requests.get(key)
        if requests is None:
            requests = self.requests[key] = _Requests()
        requests.observe(elapsed_ms)
        if group is not None:
            stats = self.group_stats(group)
            stats.requests += 1
            stats.rate.add()
            stats.bytes_out += sent
            stats.bytes_in += received
        ws = environ.get("reverst.websocket")
        if ws is not None and group is not None:  # an open WebSocket that ended: its bytes
            sent, received = ws["sent"], ws["received"]
            self.websockets.inc(group)
            self.websocket_bytes.inc(group, "in", amount=received)
            self.websocket_bytes.inc(group, "out", amount=sent)
        conn = environ.get("reverst.tunnel")
        tunnel = self.tunnels.get(conn) if conn is not None else None
        if tunnel is not None:
            tunnel.requests += 1
        if self.access_log and access_logger.isEnabledFor(logging.INFO):
            method = environ.get("REQUEST_METHOD", "")
            path = (environ.get("reverst.raw_path") or environ.get("PATH_INFO", "")).split("?", 1)[0]
            peer = tunnel.peer if tunnel is not None else None  # never the query: it may carry tokens
            client = environ.get("REMOTE_ADDR", "")
            fields = {"method": method, "host": route, "path": path, "status": code, "bytes": sent,
                      "duration_ms": round(elapsed_ms, 1), "tunnel": peer, "client": client}
            if ws is None:
                access_logger.info("method=%s host=%s path=%s status=%d bytes=%d duration_ms=%.1f tunnel=%s "
                                   "client=%s", _logfmt(method), _logfmt(route), _logfmt(path), code, sent,
                                   elapsed_ms, _logfmt(peer), _logfmt(client), extra={"fields": fields})
            else:  # one line when a WebSocket ends: bytes each way, how it ended
                fields.update({"websocket": True, "bytes_in": received, "close": ws["close"]})
                access_logger.info("method=%s host=%s path=%s status=%d websocket bytes=%d bytes_in=%d "
                                   "duration_ms=%.1f close=%s tunnel=%s client=%s", _logfmt(method),
                                   _logfmt(route), _logfmt(path), code, sent, received, elapsed_ms,
                                   _logfmt(ws["close"]), _logfmt(peer), _logfmt(client), extra={"fields": fields})


class PublicRequests:
    """Times each public request, counts its body bytes both ways, and reports it to
    :meth:`ServerMetrics.request_done` once its response is finished (or failed)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    def __call__(self, environ, start_response):
        started = self.metrics.clock()
        status = [0]

        def observed_start_response(line, headers, exc_info=None):
            try:
                status[0] = int(line[:3])
            except ValueError:
                status[0] = 0
            return start_response(line, headers, exc_info)

        body = environ.get("wsgi.input")
        counting = environ["wsgi.input"] = _CountingInput(body) if body is not None else None
        try:
            result = self.app(environ, observed_start_response)
        except Exception:
            self.metrics.request_done(environ, 500, 0, counting.count if counting else 0, started)
            raise
        if isinstance(result, list):  # complete already (error pages, HEAD, 204/304)
            self.metrics.request_done(environ, status[0], sum(map(len, result)),
                                      counting.count if counting else 0, started)
            return result
        return _ObservedBody(result, lambda sent: self.metrics.request_done(
            environ, status[0], sent, counting.count if counting else 0, started))


class _ObservedBody:
    __slots__ = ("_result", "_it", "sent", "_done")

    def __init__(self, result, done: Callable[[int], None]) -> None:
        self._result = result
        self._it = iter(result)
        self.sent = 0
        self._done = done

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        data = next(self._it)
        self.sent += len(data)
        return data

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done(self.sent)


class _CountingInput:
    """``wsgi.input`` that counts the bytes read through it."""
    __slots__ = ("_input", "count")

    def __init__(self, body) -> None:
        self._input = body
        self.count = 0

    def read(self, *args) -> bytes:
        data = self._input.read(*args)
        self.count += len(data)
        return data

    def readline(self, *args) -> bytes:
        data = self._input.readline(*args)
        self.count += len(data)
        return data

    def readlines(self, *args) -> list[bytes]:
        lines = self._input.readlines(*args)
        self.count += sum(map(len, lines))
        return lines

    def __iter__(self):
        return iter(self.readline, b"")

    def __getattr__(self, name):
        return getattr(self._input, name)


class OpenConnections:
    """``spawn=`` for a gevent ``StreamServer``: spawns each connection's handler and counts
    the connections being handled (unlike a ``Pool``, it does not make ``stop()`` wait)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, handle, *args):
        import gevent
        return gevent.spawn(self._run, handle, args)

    def _run(self, handle, args) -> None:
        self.count += 1
        try:
            handle(*args)
        finally:
            self.count -= 1


def smoothed_rtt(conn) -> float | None:
    """The connection's smoothed RTT in seconds (its QUIC recovery state), None before a sample."""
    quic = getattr(conn, "quic", None)
    return quic.smoothed_rtt if quic is not None else None


class _StateCollector:
    """Families read from the server's state at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # computed at collect time; nothing to check at registration

    def collect(self):
        for counter in self.metrics.counters:
            yield counter.family()
        yield from self._request_families()
        yield from self._state_families()

    def _request_families(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString
        metrics = self.metrics
        counts = CounterMetricFamily("reverst_tunnel_group_proxy_requests_total",
                                     "Total number of requests handled by host and response code",
                                     labels=["host", "status"])
        latency = HistogramMetricFamily("reverst_tunnel_group_proxy_requests_latency_milliseconds",
                                        "Latency of requests per host and response code", labels=["host", "status"])
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"]
        for key, requests in list(metrics.requests.items()):
            counts.add_metric(list(key), requests.count)
            cumulative, total = [], 0
            for bound, n in zip(bounds, requests.buckets):
                total += n
                cumulative.append((bound, total))
            latency.add_metric(list(key), cumulative, requests.sum_ms)
        yield counts
        yield latency
        received = CounterMetricFamily("reverst_tunnel_group_received_bytes_total",
                                       "Request body bytes received from public clients and sent into the "
                                       "group's tunnels", labels=["tunnel_group"])
        sent = CounterMetricFamily("reverst_tunnel_group_sent_bytes_total",
                                   "Response body bytes received from the group's tunnels and sent to public "
                                   "clients", labels=["tunnel_group"])
        for name, stats in list(metrics.groups.items()):
            received.add_metric([name], stats.bytes_in)
            sent.add_metric([name], stats.bytes_out)
        yield received
        yield sent

    def _state_families(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        server = self.metrics.server
        active = GaugeMetricFamily("reverst_tunnel_group_active_conn",
                                   "Number of active connections in the tunnel group", labels=["tunnel_group"])
        in_flight = GaugeMetricFamily("reverst_tunnel_group_requests_in_flight",
                                      "Public requests being proxied through the group's tunnels",
                                      labels=["tunnel_group"])
        rtt = GaugeMetricFamily("reverst_tunnel_group_rtt_seconds",
                                "Mean QUIC smoothed round-trip time of the group's tunnel connections",
                                labels=["tunnel_group"])
        rtt_max = GaugeMetricFamily("reverst_tunnel_group_rtt_max_seconds",
                                    "Largest QUIC smoothed round-trip time among the group's tunnel connections",
                                    labels=["tunnel_group"])
        for name in server.groups.groups:
            conns = server.connections(name)
            active.add_metric([name], len(conns))
            in_flight.add_metric([name], sum(server.in_flight(c) for c in conns))
            samples = [r for r in map(smoothed_rtt, conns) if r is not None]
            if samples:
                rtt.add_metric([name], sum(samples) / len(samples))
                rtt_max.add_metric([name], max(samples))
        yield active
        yield in_flight
        open_ws = GaugeMetricFamily("reverst_tunnel_group_websockets_open",
                                    "WebSockets open now through the group's tunnels", labels=["tunnel_group"])
        for name in server.groups.groups:
            open_ws.add_metric([name], sum(server.websockets.get(c, 0) for c in server.connections(name)))
        yield open_ws
        yield rtt
        yield rtt_max
        lost = dict(self.metrics.lost_packets_closed)
        for stats in list(self.metrics.tunnels.values()):  # (a counter: closed + live, never less)
            lost[stats.group] = lost.get(stats.group, 0) + stats.lost_packets
        lost_family = CounterMetricFamily("reverst_tunnel_group_lost_packets",
                                          "QUIC packets to the group's tunnels that loss detection declared lost",
                                          labels=["tunnel_group"])
        for name in sorted(set(lost) | set(server.groups.groups)):
            lost_family.add_metric([name], lost.get(name, 0))
        yield lost_family
        admission = getattr(server, "admission", None)
        if admission is not None:
            yield GaugeMetricFamily("reverst_quic_handshakes_in_progress",
                                    "QUIC connections whose handshake is in progress", value=admission.handshaking)
            yield GaugeMetricFamily("reverst_quic_unregistered_connections",
                                    "QUIC connections past the handshake that have not registered (yet)",
                                    value=admission.unregistered)
            yield CounterMetricFamily("reverst_quic_retry_packets_total",
                                      "Retry packets sent to validate a client's address (--quic-retry)",
                                      value=admission.retries)
            refused = CounterMetricFamily(
                "reverst_quic_handshakes_refused_total",
                "New QUIC connections refused (their Initial dropped) or dropped before the end of their "
                "handshake, by reason", labels=["reason"])
            for reason, count in admission.refused.items():
                refused.add_metric([reason], count)
            yield refused
        yield CounterMetricFamily("reverst_quic_dropped_datagrams_total",
                                  "UDP datagrams dropped by the tunnel endpoint (unparseable, unknown "
                                  "connection, or no room to send)", value=server.dropped_datagrams)
        yield GaugeMetricFamily("reverst_public_connections_open",
                                "Public HTTP connections currently open",
                                value=self.metrics.public_connections.count)
        yield GaugeMetricFamily("reverst_tunnel_groups_loaded",
                                "1 once the tunnel groups source has been loaded",
                                value=1 if server.groups_loaded.is_set() else 0)


_PLAIN = re.compile(r'[!#-<>-\[\]-~]+')  # printable ASCII but space, '"', '=' and backslash


def _logfmt(value: str | None) -> str:
    if value is None:
        return "-"
    if _PLAIN.fullmatch(value):
        return value
    return json.dumps(value)  # quoted, control characters escaped: one line per request
