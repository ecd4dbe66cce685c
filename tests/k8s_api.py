"""A small local stand-in for the Kubernetes API server: list and watch of ConfigMaps and
Secrets with the API's real JSON (lists with a collection resourceVersion, watches as
chunked newline-delimited ``{"type": ..., "object": ...}`` events, ``410 Expired`` as an
``ERROR`` event), so that the official ``kubernetes`` client runs its real code path.

Only what reverstd uses is implemented: ``GET /api/v1/namespaces/<ns>/<configmaps|secrets>``
with ``fieldSelector=metadata.name=<name>``, ``watch``, ``resourceVersion``, ``timeoutSeconds``.
"""
from __future__ import annotations

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/(configmaps|secrets)")
_KINDS = {"configmaps": ("ConfigMap", "ConfigMapList"), "secrets": ("Secret", "SecretList")}


class FakeKubeAPI:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._rv = 100
        self._objects: dict[tuple[str, str, str], dict] = {}  # (plural, ns, name) -> object
        self._events: list[tuple[int, str, str, dict]] = []   # (rv, plural, type, object)
        self._oldest_rv = 0  # watches from before this get 410 Expired
        self._cut = 0        # bumped to end every open watch stream
        self._expire = 0     # bumped to end every open watch stream with 410 Expired
        self.requests: list[tuple[str, dict]] = []  # ("list"|"watch", query)
        self._listen(0)

    def _listen(self, port: int) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeKubeAPI":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (open watches end, new connections are refused); objects stay."""
        self.cut_watches()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def restart(self) -> None:
        """Serve again on the same port after :meth:`close`."""
        self._listen(self.server.server_address[1])
        self.start()

    def kubeconfig(self, path) -> str:
        """Write a kubeconfig pointing at this server (plain http, no credentials)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "default"}}],
        }))
        return str(path)

    # -- changing objects -------------------------------------------------------------------
    def put_configmap(self, ns: str, name: str, data: dict[str, str]) -> None:
        self._put("configmaps", ns, name, {"data": dict(data)})

    def put_secret(self, ns: str, name: str, data: dict[str, bytes]) -> None:
        self._put("secrets", ns, name, {"type": "Opaque", "data": {
            k: base64.b64encode(v).decode("ascii") for k, v in data.items()}})

    def delete(self, plural: str, ns: str, name: str) -> None:
        with self._lock:
            obj = self._objects.pop((plural, ns, name))
            self._rv += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._rv)}}
            self._events.append((self._rv, plural, "DELETED", obj))
            self._lock.notify_all()

    def _put(self, plural: str, ns: str, name: str, body: dict) -> None:
        kind = _KINDS[plural][0]
        with self._lock:
            self._rv += 1
            old = self._objects.get((plural, ns, name))
            meta = {"name": name, "namespace": ns, "resourceVersion": str(self._rv),
                    "uid": old["metadata"]["uid"] if old else f"uid-{self._rv}",
                    "creationTimestamp": "2024-01-01T00:00:00Z"}
            obj = {"kind": kind, "apiVersion": "v1", "metadata": meta, **body}
            self._objects[(plural, ns, name)] = obj
            self._events.append((self._rv, plural, "MODIFIED" if old else "ADDED", obj))
            self._lock.notify_all()

    # -- misbehaving ------------------------------------------------------------------------
    def cut_watches(self) -> None:
        """End every open watch stream now (as an API server restart or a load balancer does)."""
        with self._lock:
            self._cut += 1
            self._lock.notify_all()

    def expire_watches(self) -> None:
        """Forget the history and end every open watch with an ``ERROR`` 410 Expired event
        (as the API server does when a watcher fell behind its watch cache)."""
        with self._lock:
            self._oldest_rv = self._rv + 1
            self._events.clear()
            self._expire += 1
            self._lock.notify_all()

    def count(self, what: str) -> int:
        with self._lock:
            return sum(1 for kind, _ in self.requests if kind == what)

    # -- serving ----------------------------------------------------------------------------
    def _list(self, plural, ns, name):
        with self._lock:
            items = [obj for (p, n, nm), obj in sorted(self._objects.items())
                     if p == plural and n == ns and (name is None or nm == name)]
            return {"kind": _KINDS[plural][1], "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _watch(self, write, plural, ns, name, since: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        def expired():
            write({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {since} ({self._oldest_rv})",
                "reason": "Expired", "code": 410}})

        with self._lock:
            cut, expire = self._cut, self._expire
            if since < self._oldest_rv:
                return expired()
            sent = since
            while True:
                for rv, p, kind, obj in self._events:
                    if rv > sent and p == plural and obj["metadata"]["namespace"] == ns and (
                            name is None or obj["metadata"]["name"] == name):
                        write({"type": kind, "object": obj})
                sent = self._rv
                left = deadline - time.monotonic()
                if self._expire != expire:
                    return expired()
                if left <= 0 or self._cut != cut:
                    return
                self._lock.wait(min(left, 0.5))


def _handler(api: FakeKubeAPI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            m = _PATH.fullmatch(parts.path)
            if not m:
                return self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404, "message": "not found"})
            ns, plural = m.groups()
            name = None
            selector = query.get("fieldSelector", "")
            if selector:
                if not selector.startswith("metadata.name="):
                    return self._json(400, {"kind": "Status", "code": 400, "message": "bad selector"})
                name = selector[len("metadata.name="):]
            watch = query.get("watch") in ("true", "1")
            with api._lock:
                api.requests.append(("watch" if watch else "list", query))
            if not watch:
                return self._json(200, api._list(plural, ns, name))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def write(event):
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()

            try:
                api._watch(write, plural, ns, name, int(query.get("resourceVersion") or 0),
                           float(query.get("timeoutSeconds") or 1800))
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass
            self.close_connection = True

        def _json(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
