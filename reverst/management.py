"""The management listener of ``reverstd`` (``--management-address``; never expose it publicly).

* ``/metrics``: Prometheus exposition of the server's own registry (:mod:`reverst.metrics`).
* ``/healthz``: 200 while the process serves at all (liveness).
* ``/readyz``: 200 once the listeners are bound and the tunnel groups are loaded, else 503
  with the reason (readiness: keep traffic away until then, and while shutting down).
* ``/status``: JSON: each group with its hosts, authentication strategy names (never a
  secret), its visitor policy in words, ``maxTunnels``, connected tunnels (peer, connected since, requests served, in flight, RTT,
  lost packets) and recent request rate.
* ``/``: a self-contained HTML page (inline CSS and JS, no external asset) that polls
  ``status`` every 2 seconds.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time

from prometheus_client.exposition import choose_encoder

from .logs import format_address
from .metrics import RATE_WINDOW, ServerMetrics, smoothed_rtt

_TEXT = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


class ManagementApp:
    """WSGI app over a running :class:`~reverst.server.TunnelServer`."""

    def __init__(self, server) -> None:
        self.server = server
        self.metrics: ServerMetrics = server.metrics
        self.started = time.time()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        route = _ROUTES.get(path)
        if route is None:
            return _plain(start_response, "404 Not Found", "not found\n")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", _TEXT + [("Allow", "GET, HEAD")])
            return [b"method not allowed\n"]
        status, headers, body = getattr(self, route)(environ)
        headers = headers + [("Content-Length", str(len(body))), ("X-Content-Type-Options", "nosniff")]
        start_response(status, headers)
        return [b"" if method == "HEAD" else body]

    # -- endpoints ---------------------------------------------------------------------------
    def healthz(self, environ):
        return "200 OK", list(_TEXT), b"ok\n"

    def readyz(self, environ):
        reason = self.not_ready_reason()
        if reason is None:
            return "200 OK", list(_TEXT), b"ready\n"
        return "503 Service Unavailable", list(_TEXT), f"not ready: {reason}\n".encode()

    def prometheus(self, environ):
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        return "200 OK", [("Content-Type", content_type), ("Cache-Control", "no-store")], \
            encoder(self.metrics.registry)

    def status_json(self, environ):
        body = json.dumps(self.status(), indent=1).encode()
        return "200 OK", [("Content-Type", "application/json"), ("Cache-Control", "no-store")], body

    def page(self, environ):
        return "200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store"),
                          ("Content-Security-Policy", _CSP), ("Referrer-Policy", "no-referrer"),
                          ("X-Frame-Options", "DENY")], _PAGE

    # -- state ---------------------------------------------------------------------------------
    def not_ready_reason(self) -> str | None:
        server = self.server
        if server._stopped.is_set():
            return "shutting down"
        if server.draining:
            return "draining"
        if not server.ready.is_set():
            return "listeners not bound yet"
        if not server.groups_loaded.is_set():
            return f"tunnel groups not loaded yet from {server.groups.source or 'their source'}"
        if (server.wait_for_tunnels and not server._registered_total
                and time.monotonic() - server.started_at < server.wait_for_tunnels):
            return "no tunnel registered yet"
        return None

    def status(self) -> dict:
        """What ``/status`` answers. Strategy names and schemes only: no credential, token
        hash, token path or endpoint ever appears here."""
        server, metrics = self.server, self.metrics
        now = time.time()
        reason = self.not_ready_reason()
        groups = []
        for name, group in server.groups.groups.items():
            stats = metrics.groups.get(name)
            tunnels = []
            for conn in server.connections(name):
                tunnel = metrics.tunnels.get(conn)
                rtt = smoothed_rtt(conn)
                connected_at = tunnel.connected_at if tunnel else getattr(conn, "connected_at", now)
                tunnels.append({
                    "peer": tunnel.peer if tunnel else format_address(conn.peer),
                    "connected_since": _iso(connected_at),
                    "connected_seconds": round(max(0.0, now - connected_at), 1),
                    "requests_served": tunnel.requests if tunnel else 0,
                    "in_flight": server.in_flight(conn),
                    "websockets": server.websockets.get(conn, 0),
                    "open_streams": conn.open_streams,
                    "quic_backend": conn.backend.NAME,
                    "rtt_ms": round(rtt * 1000, 2) if rtt is not None else None,
                    "lost_packets": tunnel.lost_packets if tunnel else 0,
                })
            groups.append({
                "name": name,
                "hosts": list(group.hosts),
                "authentication": [{"strategy": s.name, "scheme": s.scheme} for s in group.strategies],
                "open": group.is_open,
                "visitors": group.visitors.describe(),
                "max_tunnels": group.max_tunnels,
                "requests_total": stats.requests if stats else 0,
                "request_rate": round(stats.rate.rate(), 2) if stats else 0.0,
                "tunnels": tunnels,
            })
        return {
            "ready": reason is None,
            "not_ready_reason": reason,
            "started_at": _iso(self.started),
            "uptime_seconds": round(now - self.started, 1),
            "groups_source": server.groups.source,
            "listeners": {
                "tunnel_udp": format_address(server.tunnel_address) if server.ready.is_set() else None,
                "public_http": format_address(server.http_address) if server.ready.is_set() else None,
                "management_http": format_address(server.management_address) if server.management_address else None,
            },
            "rate_window_seconds": RATE_WINDOW,
            "requests_total": metrics.requests_total,
            "public_connections_open": metrics.public_connections.count,
            "dropped_datagrams": server.dropped_datagrams,
            "groups": groups,
        }


_ROUTES = {"/healthz": "healthz", "/readyz": "readyz", "/metrics": "prometheus", "/status": "status_json",
           "/": "page"}


def _plain(start_response, status: str, text: str):
    body = text.encode()
    start_response(status, _TEXT + [("Content-Length", str(len(body)))])
    return [body]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}
#summary{color:#555;margin-bottom:1em}
.badge{display:inline-block;padding:0 .5em;border-radius:.8em;font-size:.85em;color:#fff}
.ok{background:#2a7d2a}.bad{background:#b03030}.warn{background:#b07a10}
section.group{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.7em 1em;margin:0 0 1em}
section.group h2{font-size:1.1em;margin:0 0 .3em}
.meta{color:#555;font-size:.9em;margin:.1em 0}
table{border-collapse:collapse;margin-top:.5em;width:100%}
th,td{text-align:left;padding:.2em .6em;border-bottom:1px solid #eee;font-variant-numeric:tabular-nums}
th{font-weight:600;color:#444}
.none{color:#888;font-style:italic}
#error{color:#b03030}
"""

_SCRIPT = """
"use strict";
function el(tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells, tag) {
  var tr = el("tr");
  cells.forEach(function (c) { tr.appendChild(el(tag || "td", c)); });
  return tr;
}
function duration(s) {
  s = Math.floor(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}
function render(st) {
  var summary = document.getElementById("summary");
  summary.textContent = "";
  summary.appendChild(el("span", st.ready ? "ready" : "not ready: " + st.not_ready_reason,
                         "badge " + (st.ready ? "ok" : "bad")));
  summary.appendChild(document.createTextNode(
    " groups from " + st.groups_source + " \\u00b7 up " + duration(st.uptime_seconds) +
    " \\u00b7 " + st.requests_total + " requests \\u00b7 " + st.public_connections_open +
    " public connections open \\u00b7 " + st.dropped_datagrams + " datagrams dropped"));
  var root = document.getElementById("groups");
  root.textContent = "";
  if (!st.groups.length) root.appendChild(el("p", "No tunnel groups configured.", "none"));
  st.groups.forEach(function (g) {
    var s = el("section", undefined, "group");
    s.setAttribute("data-group", g.name);
    var h = el("h2", g.name + " ");
    h.appendChild(el("span", g.tunnels.length + (g.tunnels.length === 1 ? " tunnel" : " tunnels"),
                     "badge " + (g.tunnels.length ? "ok" : "warn")));
    s.appendChild(h);
    s.appendChild(el("div", "hosts: " + (g.hosts.length ? g.hosts.join(", ") : "(none)"), "meta"));
    s.appendChild(el("div", "authentication: " + (g.open ? "none (anyone may register)" :
      g.authentication.map(function (a) { return a.strategy + " (" + a.scheme + ")"; }).join(", ")) +
      (g.max_tunnels ? " \u00b7 at most " + g.max_tunnels + " tunnels" : ""), "meta"));
    s.appendChild(el("div", "visitors: " + g.visitors, "meta"));
    s.appendChild(el("div", g.requests_total + " requests, " + g.request_rate.toFixed(2) +
                     " req/s over the last " + st.rate_window_seconds + " s", "meta"));
    if (g.tunnels.length) {
      var t = el("table");
      t.appendChild(row(["peer", "connected since", "requests served", "in flight", "RTT", "lost packets"], "th"));
      g.tunnels.forEach(function (c) {
        var tr = row([c.peer, c.connected_since + " (" + duration(c.connected_seconds) + ")", c.requests_served,
                      c.in_flight, c.rtt_ms === null ? "\\u2013" : c.rtt_ms.toFixed(2) + " ms", c.lost_packets]);
        tr.className = "tunnel";
        t.appendChild(tr);
      });
      s.appendChild(t);
    } else {
      s.appendChild(el("p", "No tunnel connected.", "none"));
    }
    root.appendChild(s);
  });
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
function poll() {
  fetch("status", {cache: "no-store"}).then(function (r) {
    if (!r.ok) throw new Error("HTTP " + r.status);
    return r.json();
  }).then(function (st) {
    document.getElementById("error").textContent = "";
    render(st);
  }).catch(function (e) {
    document.getElementById("error").textContent = "cannot load status: " + e.message;
  }).finally(function () { setTimeout(poll, 2000); });
}
poll();
"""

_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>reverstd status</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head><body>
<h1>reverstd</h1>
<div id="summary">loading\u2026</div>
<div id="error"></div>
<div id="groups"></div>
<p class="meta" id="updated"></p>
<script>{_SCRIPT}</script>
</body></html>
""".encode()


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: Only this page's own inline script and style may run; it may fetch from this origin only.
_CSP = (f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
