"""PEP 3333 for HTTP/3 requests (sans-io): environ building and response headers."""
from __future__ import annotations

import sys
from typing import Callable
from urllib.parse import unquote_to_bytes

from .http3 import CONNECTION_SPECIFIC, connection_tokens

Headers = list[tuple[bytes, bytes]]


class WSGIInput:
    """``wsgi.input`` over a ``read(n) -> bytes`` callable (b"" at end of body)."""

    def __init__(self, read: Callable[[int], bytes], chunk: int = 65536) -> None:
        self._read = read
        self._chunk = chunk
        self._buf = bytearray()
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._read(self._chunk)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._take(len(self._buf))]
            while not self._eof:
                data = self._read(self._chunk)
                if not data:
                    self._eof = True
                parts.append(data)
            return b"".join(parts)
        if not self._buf:
            if self._eof or size == 0:
                return b""
            data = self._read(size)  # common case: no copy through the buffer
            if not data:
                self._eof = True
            return data
        while len(self._buf) < size and self._fill():
            pass
        return self._take(size)

    def readline(self, size: int | None = -1) -> bytes:
        limit = size if size is not None and size >= 0 else None
        scanned = 0
        while True:
            end = self._buf.find(b"\n", scanned)
            if end >= 0:
                cut = end + 1
                break
            scanned = len(self._buf)
            if (limit is not None and scanned >= limit) or not self._fill():
                cut = len(self._buf)
                break
        if limit is not None:
            cut = min(cut, limit)
        return self._take(cut)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return list(self)

    def __iter__(self):
        while line := self.readline():
            yield line


def make_environ(headers: Headers, wsgi_input, *, peer: tuple | None = None,
                 errors=None) -> dict:
    """The WSGI environ of one HTTP/3 request (werkzeug/gevent conventions)."""
    pseudo: dict[bytes, bytes] = {}
    env: dict = {}
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
            continue
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        if "_" in key:
            continue  # CGI cannot tell "a_b" from "a-b": drop, as gevent and werkzeug do
        key = key.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            env.setdefault(key, text)
            continue
        key = "HTTP_" + key
        if key in env:
            env[key] += ("; " if key == "HTTP_COOKIE" else ", ") + text
        else:
            env[key] = text
    target = pseudo.get(b":path", b"/").decode("latin-1")
    path, _, query = target.partition("?")
    authority = pseudo.get(b":authority", b"").decode("latin-1")
    if authority:
        env["HTTP_HOST"] = authority
    host, _, port = authority.rpartition(":") if authority.rpartition(":")[2].isdigit() else (authority, "", "")
    scheme = pseudo.get(b":scheme", b"https").decode("latin-1")
    forwarded = env.get("HTTP_X_FORWARDED_FOR", "")
    remote = forwarded.rsplit(",", 1)[-1].strip() if forwarded else (peer[0] if peer else "")
    env.update({
        "REQUEST_METHOD": pseudo.get(b":method", b"GET").decode("latin-1"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query,
        "REQUEST_URI": target,
        "RAW_URI": target,
        "SERVER_NAME": (host or "localhost").strip("[]"),
        "SERVER_PORT": port or ("443" if scheme == "https" else "80"),
        "SERVER_PROTOCOL": "HTTP/3",
        "REMOTE_ADDR": remote,
        "REMOTE_PORT": "0" if forwarded else str(peer[1] if peer else 0),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": wsgi_input,
        "wsgi.errors": errors if errors is not None else sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    })
    return env


def response_headers(status: str, headers: list[tuple[str, str]]) -> Headers:
    """HTTP/3 response fields for a WSGI status and header list.

    Names are lower-cased and connection-specific fields (and those ``Connection``
    names) are dropped: the Go server kills the whole tunnel when it receives one.
    """
    code = status.split(" ", 1)[0]
    if len(code) != 3 or not code.isdigit():
        raise ValueError(f"invalid WSGI status {status!r}")
    named = connection_tokens(v for k, v in headers if k.lower() == "connection")
    out: Headers = [(b":status", code.encode())]
    for name, value in headers:
        low = name.lower()
        if low in CONNECTION_SPECIFIC or low in named:
            continue
        if low == "te" and value.strip().lower() != "trailers":
            continue
        out.append((low.encode("latin-1"), value.encode("latin-1")))
    return out


def status_has_body(code: int, method: str) -> bool:
    return method != "HEAD" and code not in (204, 304) and not 100 <= code < 200
