"""TLS for the public HTTPS listener: a default certificate, one per group chosen by SNI,
and rotation without a restart (a certificate or key file that changed is loaded again
for the next handshake; open connections keep theirs).

Only reads files and builds :class:`ssl.SSLContext` objects (the stdlib's defaults: TLS
1.2 or newer, its cipher choice); the HTTP front wraps sockets with :attr:`context`.
"""
from __future__ import annotations

import logging
import os
import ssl
import time
from typing import Callable

logger = logging.getLogger(__name__)

#: A certificate's files are looked at (stat) at most this often.
CHECK_INTERVAL = 1.0


def server_context(certificate: str | None = None, private_key: str | None = None, *,
                   context_class: type = ssl.SSLContext) -> ssl.SSLContext:
    """A server context with the stdlib's defaults (ciphers, no compression, no client
    certificates) and TLS 1.2 at least; raises OSError or ssl.SSLError (``KEY_VALUES_MISMATCH``
    for a key that is not the certificate's). ``context_class``: gevent.ssl.SSLContext for
    cooperative sockets."""
    ctx = context_class(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if certificate is not None:
        ctx.load_cert_chain(certificate, private_key)
    return ctx


def describe_error(exc: Exception) -> str:
    """One line for a certificate pair that does not load."""
    if isinstance(exc, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(exc):
        return "the private key does not match the certificate"
    if isinstance(exc, ssl.SSLError):
        return f"not a PEM certificate and its key ({exc.reason or 'unreadable'})"
    if isinstance(exc, OSError):
        return f"cannot read {exc.filename or 'the files'}: {exc.strerror or exc}"
    return str(exc)


class _Pair:
    """A certificate and key file, loaded again when either changes."""

    def __init__(self, certificate: str, private_key: str, context_class: type) -> None:
        self.paths = (certificate, private_key)
        self.context_class = context_class
        self.context: ssl.SSLContext | None = None
        self._stamp: tuple | None = None
        self._checked = 0.0

    def _files_stamp(self) -> tuple:
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in map(os.stat, self.paths))

    def current(self, now: float) -> ssl.SSLContext | None:
        if self.context is not None and now - self._checked < CHECK_INTERVAL:
            return self.context
        self._checked = now
        try:
            stamp = self._files_stamp()
            if stamp != self._stamp:
                self.context = server_context(*self.paths, context_class=self.context_class)
                if self._stamp is not None:
                    logger.info("certificate %s reloaded", self.paths[0])
                self._stamp = stamp
        except (OSError, ssl.SSLError) as exc:  # (mid-rotation, say): the last good one stays
            if self._stamp != "bad":
                logger.warning("certificate %s not (re)loaded, %s: %s", self.paths[0],
                               "the previous one stays" if self.context else "its hosts get the default",
                               describe_error(exc))
            self._stamp = "bad" if self.context is None else self._stamp
        return self.context


class Certificates:
    """:attr:`context` for the HTTPS listener: the default pair (if any) for an unknown
    or absent SNI name, else a handshake alert; ``pairs_for(name)`` gives the (certificate,
    key) paths of the group serving ``name`` (from the live groups config)."""

    def __init__(self, default: tuple[str, str] | None, pairs_for: Callable[[str], tuple[str, str] | None],
                 *, context_class: type = ssl.SSLContext, clock: Callable[[], float] = time.monotonic) -> None:
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._pairs_for = pairs_for
        self._clock = clock
        self._context_class = context_class
        self._default = self._pair(default) if default else None
        # the listener's own context (never replaced: a rotated default is switched to by SNI)
        self.context = server_context(*default, context_class=context_class) if default else \
            server_context(context_class=context_class)
        self.context.sni_callback = self._select

    def _pair(self, paths: tuple[str, str]) -> _Pair:
        pair = self._pairs.get(paths)
        if pair is None:
            pair = self._pairs[paths] = _Pair(*paths, self._context_class)
        return pair

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        now = self._clock()
        paths = self._pairs_for(server_name.lower()) if server_name else None
        if paths is not None:
            ctx = self._pair(paths).current(now)
            if ctx is not None:
                return ctx
        return self._default.current(now) if self._default else None

    def _select(self, sock: ssl.SSLObject, server_name: str | None, _ctx) -> int | None:
        ctx = self.context_for(server_name)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        if ctx is not sock.context:
            sock.context = ctx
        return None
