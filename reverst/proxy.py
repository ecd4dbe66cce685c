"""A WSGI application that forwards every request to a local HTTP service.

``reverst expose 8080`` is the tunnel client serving ``LocalProxy("http://127.0.0.1:8080")``.
It runs in the client's thread pool, so it uses urllib3's blocking connection pool
(keep-alive to the local service) and streams both ways: the request body is read from
``wsgi.input`` as it arrives, the response is passed on with ``read1`` so server-sent
events and chunked responses are flushed as the local service produces them.
"""
from __future__ import annotations

import logging
from urllib.parse import urlsplit

from .http3 import strip_hop_by_hop

logger = logging.getLogger("reverst.proxy")
CHUNK = 64 * 1024


def parse_target(addr: str) -> str:
    """``8080`` -> ``http://127.0.0.1:8080``; ``host:port`` -> ``http://host:port``;
    ``http(s)://host[:port][/prefix]`` as is (without a trailing slash)."""
    addr = addr.strip()
    if addr.isdigit():
        port = int(addr)
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {addr!r}")
        return f"http://127.0.0.1:{port}"
    if "://" not in addr:
        addr = "http://" + addr
    parts = urlsplit(addr)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid local address {addr!r}: expected a port, host:port or an http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError(f"invalid local address {addr!r}: no query or fragment allowed")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"invalid local address {addr!r}: {exc}") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _environ_headers(environ: dict) -> list[tuple[str, str]]:
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
    if environ.get("CONTENT_TYPE"):
        headers.append(("Content-Type", environ["CONTENT_TYPE"]))
    if environ.get("CONTENT_LENGTH"):
        headers.append(("Content-Length", environ["CONTENT_LENGTH"]))
    return headers


class LocalProxy:
    """WSGI app: forward to ``target`` (see :func:`parse_target`)."""

    def __init__(self, target: str, *, rewrite_host: bool = False, timeout: float = 60.0,
                 connect_timeout: float = 5.0, verify: bool = True, pool_size: int = 100) -> None:
        self.target = parse_target(target)
        parts = urlsplit(self.target)
        self._netloc = parts.netloc
        self._prefix = parts.path
        self.rewrite_host = rewrite_host
        self._pool_options = dict(maxsize=pool_size, timeout=(connect_timeout, timeout), verify=verify)
        self._pool_instance = None
        self._origin = f"{parts.scheme}://{parts.netloc}"

    @property
    def _pool(self):
        # urllib3 is imported on first use, so that `reverst expose` can make sockets
        # cooperative (gevent monkey-patching) before anything binds to them.
        if self._pool_instance is None:
            import urllib3
            o = self._pool_options
            self._pool_instance = urllib3.PoolManager(
                num_pools=4, maxsize=o["maxsize"], block=False, retries=False,
                timeout=urllib3.Timeout(connect=o["timeout"][0], read=o["timeout"][1]),
                cert_reqs="CERT_REQUIRED" if o["verify"] else "CERT_NONE")
        return self._pool_instance

    def __repr__(self) -> str:
        return f"<LocalProxy {self.target}>"

    def __call__(self, environ: dict, start_response):
        import urllib3
        from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError
        method = environ["REQUEST_METHOD"]
        target = environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
        url = self._origin + self._prefix + target
        headers = strip_hop_by_hop(_environ_headers(environ))
        names = {k.lower() for k, _ in headers}
        host = environ.get("HTTP_HOST", "")
        if self.rewrite_host:
            headers = [(k, v) for k, v in headers if k.lower() != "host"] + [("Host", self._netloc)]
        if "x-forwarded-host" not in names and host:
            headers.append(("X-Forwarded-Host", host))
        if "x-forwarded-proto" not in names:
            headers.append(("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "https")))
        if "x-forwarded-for" not in names and environ.get("REMOTE_ADDR"):
            headers.append(("X-Forwarded-For", environ["REMOTE_ADDR"]))
        length = environ.get("CONTENT_LENGTH")
        has_body = bool(length and length != "0") or (not length and method not in ("GET", "HEAD", "OPTIONS", "DELETE"))
        body = _body(environ["wsgi.input"]) if has_body else None
        try:
            response = self._pool.urlopen(
                method, url, body=body, headers=urllib3.HTTPHeaderDict(headers), redirect=False,
                preload_content=False, decode_content=False, chunked=has_body and not length,
                assert_same_host=False)
        except (ConnectTimeoutError, NewConnectionError) as exc:
            logger.warning("%s %s: local service %s unreachable: %s", method, target, self.target, exc)
            return _error(start_response, "502 Bad Gateway",
                          f"reverst: local service {self.target} refused the connection\n")
        except ReadTimeoutError:
            logger.warning("%s %s: local service %s timed out", method, target, self.target)
            return _error(start_response, "504 Gateway Timeout",
                          f"reverst: local service {self.target} timed out\n")
        except (HTTPError, OSError) as exc:
            logger.warning("%s %s: local service %s failed: %s", method, target, self.target, exc)
            return _error(start_response, "502 Bad Gateway",
                          f"reverst: local service {self.target} failed: {type(exc).__name__}\n")
        out = strip_hop_by_hop(list(response.headers.iteritems()))
        start_response(f"{response.status} {response.reason or ''}".rstrip(), out)
        return _relay(response)


def _body(stream):
    while chunk := stream.read(CHUNK):
        yield chunk


def _relay(response):
    from urllib3.exceptions import ProtocolError, ReadTimeoutError
    try:
        while True:
            try:
                data = response.read1(CHUNK)
            except ReadTimeoutError:
                logger.warning("local service timed out mid-response")
                raise
            except ProtocolError as exc:
                logger.warning("local service broke off the response: %s", exc)
                raise
            if not data:
                return
            yield data
    finally:
        response.release_conn()


def _error(start_response, status: str, text: str):
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]
