"""Runs a WSGI application for each HTTP/3 request arriving on a tunnel connection.

By default the application runs in a pool of native threads, so a blocking app
(``time.sleep``, a C database driver) never stalls the QUIC loop or other requests.
Threads talk to the gevent hub only through :class:`_ThreadBridge`, which runs each
stream operation in a greenlet and waits for it with a real lock.  With
``threads=0`` the app runs in greenlets (for apps that are gevent-friendly or
monkey-patched), which is cheaper.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

import gevent
import gevent.threadpool
from gevent import monkey

from .._transport import H3Stream
from ..errors import ConnectionClosed, StreamReset
from ..http3 import H3_INTERNAL_ERROR, H3_REQUEST_REJECTED
from ..wsgi import WSGIInput, make_environ, response_headers, status_has_body

logger = logging.getLogger("reverst.client")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")


class _ThreadBridge:
    """Call a (possibly blocking) gevent function from a native thread."""

    def __init__(self) -> None:
        self._loop = gevent.get_hub().loop

    def __call__(self, fn: Callable, *args):
        lock = _allocate_lock()
        lock.acquire()
        box: list = []

        def run():
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # handed back to the calling thread
                box.append((False, exc))
            finally:
                lock.release()

        self._loop.run_callback_threadsafe(gevent.spawn, run)
        lock.acquire()
        ok, value = box[0]
        if ok:
            return value
        raise value


def _direct(fn: Callable, *args):
    return fn(*args)


class WSGIHandler:
    """``Connection.on_request`` callback serving a WSGI app."""

    def __init__(self, app, *, threads: int = 100) -> None:
        self.app = app
        self._pool = gevent.threadpool.ThreadPool(threads) if threads > 0 else None
        self._call = _ThreadBridge() if threads > 0 else _direct
        self.active = 0
        #: False while stopping: new requests are refused (H3_REQUEST_REJECTED)
        self.accepting = True

    def __call__(self, stream: H3Stream) -> None:
        if not self.accepting:
            stream.reset(H3_REQUEST_REJECTED)
            return
        gevent.spawn(self._serve, stream)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.kill()

    def _serve(self, stream: H3Stream) -> None:
        self.active += 1
        try:
            if self._pool is not None:
                self._pool.spawn(self._run, stream).get()
            else:
                self._run(stream)
        except Exception:
            logger.exception("request on %r failed", stream)
        finally:
            self.active -= 1
            stream.finish()

    def _run(self, stream: H3Stream) -> None:
        """Run the app for one request (in a worker thread or a greenlet)."""
        call = self._call
        environ = make_environ(stream.headers, WSGIInput(lambda n: call(stream.read, n)),
                               peer=stream.conn.peer)
        method = environ["REQUEST_METHOD"]
        state = {"status": None, "headers": None, "sent": False, "body": True}

        def send_headers(end: bool, data: bytes = b"") -> None:
            fields = response_headers(state["status"], state["headers"])
            state["sent"] = True
            state["body"] = status_has_body(int(fields[0][1]), method)
            if data and state["body"]:
                call(_send_headers_and_data, stream, fields, data, end)
            else:
                call(stream.send_headers, fields, end)

        def write(data: bytes) -> None:
            if not state["sent"]:
                if state["status"] is None:
                    raise AssertionError("write() before start_response()")
                send_headers(False, data)
            elif data and state["body"]:
                call(stream.write, data)

        def start_response(status, headers, exc_info=None):
            if exc_info is not None:
                try:
                    if state["sent"]:
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif state["status"] is not None:
                raise AssertionError("start_response() called twice without exc_info")
            response_headers(status, headers)  # validate now, while the app can still react
            state["status"], state["headers"] = status, list(headers)
            return write

        try:
            result = self.app(environ, start_response)
            if isinstance(result, (list, tuple)) and state["status"] is not None and not any(
                    k.lower() == "content-length" for k, _ in state["headers"]):
                state["headers"].append(("Content-Length", str(sum(len(c) for c in result))))
            try:
                for chunk in result:
                    if chunk:
                        write(chunk)
                if not state["sent"]:
                    if state["status"] is None:
                        raise AssertionError("the application did not call start_response()")
                    send_headers(True)
                else:
                    call(stream.close)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except (StreamReset, ConnectionClosed) as exc:
            logger.debug("%s %s aborted: %s", method, environ.get("REQUEST_URI"), exc)
        except Exception:
            logger.error("%s %s: application error", method, environ.get("REQUEST_URI"),
                         exc_info=sys.exc_info())
            try:
                if not state["sent"]:
                    call(stream.send_headers, [(b":status", b"500"), (b"content-type", b"text/plain"),
                                               (b"content-length", b"22")], False)
                    call(stream.write, b"internal server error\n", True)
                else:  # the status is out: only an abort can tell the client
                    call(stream.reset, H3_INTERNAL_ERROR)
            except (StreamReset, ConnectionClosed):
                pass


def _send_headers_and_data(stream: H3Stream, fields, data: bytes, end: bool) -> None:
    stream.send_headers(fields)
    stream.write(data, end)
