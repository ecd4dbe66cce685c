"""Runs a WSGI application for each HTTP/3 request arriving on a tunnel connection.

By default the application runs in a pool of native threads, so a blocking app
(``time.sleep``, a C database driver) never stalls the QUIC loop or other requests.
Threads talk to the gevent hub only through :class:`_ThreadBridge`, which runs each
stream operation in a greenlet and waits for it with a real lock.  With
``threads=0`` the app runs in greenlets (for apps that are gevent-friendly or
monkey-patched), which is cheaper.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import socket
import sys
import time
from collections import deque
from typing import Callable

import gevent
from gevent import monkey
from gevent.hub import Waiter, get_hub

from .._transport import H3Stream
from ..errors import ConnectionClosed, ReverstError, StreamReset
from ..http3 import H3_INTERNAL_ERROR, H3_REQUEST_REJECTED
from .. import websocket
from ..wsgi import WSGIInput, make_environ, response_headers, status_has_body

logger = logging.getLogger("reverst.client")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")
_start_thread = monkey.get_original("_thread", "start_new_thread")


class _Workers:
    """Native threads that run submitted calls, started as needed up to ``size``; calls
    beyond that wait in line.

    Leaner than ``gevent.threadpool.ThreadPool``, which makes a result object and a libev
    watcher per task (its bookkeeping was ~15% of a tunnel client's CPU on small
    requests): callers report completion themselves through :class:`_ThreadBridge`.
    Idle workers are reused last-in first-out, so light traffic keeps running on one
    warm thread (its stack, cache and malloc arena) instead of cycling through them all;
    each call runs in a new, empty ``contextvars`` context, so a value one request set is
    not there for the next.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = _allocate_lock()
        self._idle: list[list] = []        # [wake lock, task] of idle workers, a stack
        self._backlog: deque = deque()     # calls waiting for a worker
        self._threads = 0
        self._closed = False

    def submit(self, fn: Callable, *args) -> None:
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
            elif self._threads < self.size:
                self._threads += 1
                worker = None
            else:
                self._backlog.append((fn, args))
                return
        if worker is None:
            _start_thread(self._work, ((fn, args),))
        else:
            worker[1] = (fn, args)
            worker[0].release()

    def close(self) -> None:
        """Idle workers exit now, busy ones after their call (the backlog still runs)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker[1] = None
            worker[0].release()

    def _work(self, task) -> None:
        me = [_allocate_lock(), None]
        me[0].acquire()
        while task is not None:
            fn, args = task
            try:
                contextvars.Context().run(fn, *args)  # (a fresh context per call, as in a new thread)
            except BaseException:  # noqa: BLE001 (a worker must survive whatever it ran)
                logger.exception("worker call %r failed", fn)
            with self._lock:
                if self._backlog:
                    task = self._backlog.popleft()
                    continue
                if self._closed:
                    self._threads -= 1
                    return
                self._idle.append(me)
            me[0].acquire()  # until submit() or close() hands over the next task
            task = me[1]
        with self._lock:
            self._threads -= 1


class _Runners:
    """Greenlets that run request handlers one after another, for handlers that run in
    greenlets.

    A greenlet per request cost an ``mmap`` and a ``munmap`` per request (CPython 3.11
    gives each new greenlet a fresh 16 KB frame-stack chunk and unmaps it at its end) and
    gevent's start-up; handing the call to an idle runner takes half the time (~10 µs
    saved per request). Each call runs in a new, empty ``contextvars`` context, as in a
    fresh greenlet. Up to ``keep`` runners wait idle (last-in first-out); beyond that a
    runner ends after its call.
    """

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._idle: list[Waiter] = []
        self._closed = False

    def spawn(self, fn: Callable, *args) -> None:
        if self._idle:
            get_hub().loop.run_callback(self._idle.pop().switch, (fn, args))  # (a Waiter wakes from the hub)
        else:
            gevent.spawn(self._run, (fn, args))

    def close(self) -> None:
        """Idle runners end now, busy ones after their call."""
        self._closed = True
        idle, self._idle = self._idle, []
        loop = get_hub().loop
        for waiter in idle:
            loop.run_callback(waiter.switch, None)

    def _run(self, task) -> None:
        while task is not None:
            fn, args = task
            contextvars.Context().run(fn, *args)  # (fn handles its own errors)
            if self._closed or len(self._idle) >= self.keep:
                return
            waiter = Waiter()
            self._idle.append(waiter)
            try:
                task = waiter.get()
            except BaseException:  # killed while idle: no call may be handed to it now
                with contextlib.suppress(ValueError):
                    self._idle.remove(waiter)
                raise


class _ThreadBridge:
    """How a worker thread drives streams owned by the gevent hub.

    ``call`` runs a (possibly blocking) function in a greenlet and waits for its result
    with a real lock.  ``post`` queues a non-blocking operation without waiting; posted
    operations run in order, before anything posted or called after them.
    """

    def __init__(self) -> None:
        self._loop = gevent.get_hub().loop

    def call(self, fn: Callable, *args):
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

    def post(self, fn: Callable, *args) -> None:
        self._loop.run_callback_threadsafe(_quietly, fn, *args)


class _DirectBridge:
    """The app runs in a greenlet: call everything directly."""

    @staticmethod
    def call(fn: Callable, *args):
        return fn(*args)

    post = call


def _respond(stream: H3Stream, fields, data: bytes, end: bool, done=None) -> None:
    """Headers, a first piece of the body and possibly the end, as one hub operation: a
    worker's separate posts can each wake the hub and leave in a packet of their own."""
    try:
        stream.send_headers(fields, end, data)
    finally:
        if done is not None:
            done.set()


def _end(stream: H3Stream, done) -> None:
    # queue(), not close(): this runs in a hub callback, which must not block, and close()
    # waits while more than the connection's send_high_water bytes are buffered (a big
    # body's last pieces). The worker already waited for room after each POST_LIMIT bytes
    # it posted.
    try:
        stream.queue(b"", True)
    finally:
        done.set()


def _unsent(stream: H3Stream) -> bool:
    conn = stream.conn
    return conn.is_open and conn.quic.send_buffered(stream.stream_id) > 0


def _quietly(fn: Callable, *args) -> None:
    # A posted write to a stream the peer reset: the worker learns it at its next call.
    try:
        fn(*args)
    except ReverstError:
        pass


class _Done:
    """Completion of a request run by a worker: ``set()`` runs in the hub, after every
    operation the request posted."""

    __slots__ = ("handler", "stream")

    def __init__(self, handler: "WSGIHandler", stream: H3Stream) -> None:
        self.handler, self.stream = handler, stream

    def set(self) -> None:
        self.handler.finished(self.stream)


#: ``WSGIHandler`` forgets finished streams whose bytes all left once it holds this many.
_PRUNE_MIN = 64
#: A worker thread waits for the hub after posting this many response bytes.
POST_LIMIT = 256 * 1024
#: Most bytes of the HTTP/1.1 response head an application writes on a WebSocket's socket
MAX_SOCKET_HEAD = 64 * 1024


class TunnelSocket:
    """``environ["werkzeug.socket"]`` of a WebSocket request (an RFC 9220 extended
    CONNECT): the socket-like object WSGI WebSocket libraries take over (simple-websocket,
    hence flask-sock; anything that reads ``werkzeug.socket`` as the Werkzeug development
    server provides it).

    The library writes its HTTP/1.1 handshake answer on it: a ``101`` becomes
    ``:status 200`` (the CONNECT succeeded; anything else keeps its status), then every
    byte written or read is the WebSocket's, carried by the stream's DATA frames.
    """

    def __init__(self, stream: H3Stream, bridge) -> None:
        self._stream = stream
        self._call = bridge.call
        self._head = bytearray()
        self.status: int | None = None  # what the application answered on the socket
        self.closed = False
        self._read_closed = self._write_closed = False
        self._doorbell: tuple[socket.socket, socket.socket] | None = None  # see fileno()
        self._rung = False

    @property
    def used(self) -> bool:
        """The application answered on the socket (its WSGI response is not sent)."""
        return self.status is not None

    def send(self, data) -> int:
        data = bytes(data)
        if self._write_closed:
            raise OSError(errno.EPIPE, "the WebSocket was closed")
        if self.status is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_SOCKET_HEAD:
                    raise OSError(errno.EMSGSIZE, "response head too large")
                return len(data)
            head, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
            self._head.clear()
            try:
                status, fields = websocket.response_for_101(head)
            except ValueError as exc:
                raise OSError(errno.EPROTO, str(exc)) from None
            self.status = status
            self._io(self._stream.send_headers, [(b":status", str(status).encode())] + fields)
            data = rest
        if data:
            self._io(self._stream.write, data)
        return len(data)

    sendall = send

    def recv(self, size: int = 65536) -> bytes:
        if self._read_closed:
            return b""
        return self._io(self._read, size)

    def _read(self, size: int) -> bytes:  # (in the hub)
        data = self._stream.read(size)
        if self._rung and not self._stream.readable:  # nothing more for now: unring the doorbell
            self._rung = False
            with contextlib.suppress(OSError):
                self._doorbell[0].recv(64)
        return data

    def fileno(self) -> int:
        """A descriptor that polls readable whenever :meth:`recv` would not block (for
        libraries that select() on the socket: simple-websocket's ``ping_interval``)."""
        if self._doorbell is None:
            pair = socket.socketpair()
            for end in pair:
                end.setblocking(False)
            self._doorbell = pair
            self._call(self._watch)
        return self._doorbell[0].fileno()

    def _watch(self) -> None:  # (in the hub)
        self._stream.on_readable = self._ring
        if self._stream.readable:
            self._ring()

    def _ring(self) -> None:  # (in the hub)
        if not self._rung and self._doorbell is not None:
            self._rung = True
            with contextlib.suppress(OSError):
                self._doorbell[1].send(b"\0")

    def _io(self, fn, *args):
        try:
            return self._call(fn, *args)
        except (StreamReset, ConnectionClosed) as exc:
            raise ConnectionResetError(errno.ECONNRESET, str(exc)) from None

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """``SHUT_WR``: end our side (FIN), reading goes on; ``SHUT_RD``: stop reading."""
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._read_closed = True
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not self._write_closed:
            self._write_closed = True
            if self.status is not None:
                try:
                    self._call(self._stream.close)
                except (StreamReset, ConnectionClosed):
                    pass

    def close(self) -> None:
        """End our side of the WebSocket (FIN) and stop reading."""
        self.closed = True
        self.shutdown(socket.SHUT_RDWR)
        if self._doorbell is not None:
            self._call(setattr, self._stream, "on_readable", None)
            for end in self._doorbell:
                end.close()


class WSGIHandler:
    """``Connection.on_request`` callback serving a WSGI app."""

    def __init__(self, app, *, threads: int = 100) -> None:
        self.app = app
        #: in greenlets, an app may serve a request stream itself (LocalProxy.serve_stream)
        self._serve_stream = getattr(app, "serve_stream", None) if threads <= 0 else None
        self._pool = _Workers(threads) if threads > 0 else None
        self._bridge = _ThreadBridge() if threads > 0 else _DirectBridge()
        self._runners = _Runners() if threads <= 0 else None
        self.active = 0
        #: False while stopping: new requests are refused (H3_REQUEST_REJECTED)
        self.accepting = True
        #: finished requests whose response the QUIC layer may still hold (see ``unsent``)
        self._sending: list[H3Stream] = []
        self._prune_at = _PRUNE_MIN  # prune _sending when it grows to this length

    def __call__(self, stream: H3Stream) -> None:
        if not self.accepting:
            stream.reset(H3_REQUEST_REJECTED)
            return
        self.active += 1
        if self._pool is not None:
            # Straight to a worker; its last posted operation calls done.set() in the hub.
            self._pool.submit(self._run_in_thread, stream, _Done(self, stream))
        else:
            self._runners.spawn(self._serve, stream)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        else:
            self._runners.close()

    def _serve(self, stream: H3Stream) -> None:
        try:
            if self._serve_stream is None or not self._serve_stream(stream):
                self._run(stream)
        except (StreamReset, ConnectionClosed) as exc:
            logger.debug("request on %r aborted: %s", stream, exc)
        except Exception:
            logger.exception("request on %r failed", stream)
        finally:
            # After this loop iteration's transmit, not before: the response leaves first
            # (the bookkeeping was on a lone request's critical path), and its bytes are
            # sent by then, so the stream is seldom kept in _sending.
            get_hub().loop.run_callback(self.finished, stream)

    def finished(self, stream: H3Stream) -> None:
        """A request is over (in the hub): its stream state goes."""
        self.active -= 1
        stream.finish()
        if _unsent(stream):
            self._sending.append(stream)
            if len(self._sending) >= self._prune_at:  # amortized: a scan per request was ~8%
                self._sending = [s for s in self._sending if _unsent(s)]  # of a busy client's CPU
                self._prune_at = max(_PRUNE_MIN, 2 * len(self._sending))

    @property
    def unsent(self) -> bool:
        """A finished response still has bytes its peer has not got: the request is over
        for the app, but closing the connection now would cut the response short."""
        self._sending = [s for s in self._sending if _unsent(s)]
        return bool(self._sending)

    def _run_in_thread(self, stream: H3Stream, done: "_Done") -> None:
        told = False
        try:
            told = self._run(stream, done)
        finally:
            if not told:  # posted, so it runs after every operation the request posted
                self._bridge.post(done.set)

    def _run(self, stream: H3Stream, done=None) -> bool:
        """Run the app for one request (in a worker thread or a greenlet).  True if its
        last posted operation also sets ``done``."""
        call, post = self._bridge.call, self._bridge.post
        fields = stream.headers
        connect = websocket.is_extended_connect(fields)
        if connect:  # a WebSocket: presented as the HTTP/1.1 upgrade request WSGI servers see
            fields = websocket.upgrade_environ_fields(fields)
        environ = make_environ(fields, WSGIInput(lambda n: call(stream.read, n)), peer=stream.conn.peer)
        sock = environ["werkzeug.socket"] = TunnelSocket(stream, self._bridge) if connect else None
        method = environ["REQUEST_METHOD"]
        state = {"status": None, "headers": None, "sent": False, "body": True, "posted": 0, "bytes": 0}
        started = time.monotonic()

        def send_headers(end: bool, data: bytes = b"", finished=None) -> bool:
            """Post the headers with the start of the body; True if that operation also
            ends the response and sets ``finished``."""
            fields = response_headers(state["status"], state["headers"])
            state["sent"] = True
            state["body"] = status_has_body(int(fields[0][1]), method)
            if connect and 200 <= int(fields[0][1]) < 300:  # not switched: tell reverstd (RFC 9220 2xx)
                fields.append((websocket.DECLINED, b"1"))
            if not state["body"]:
                data = b""
            first = data[:POST_LIMIT]
            whole = len(first) == len(data)
            post(_respond, stream, fields, first, end and whole, finished if whole else None)
            state["posted"] += len(first)
            state["bytes"] += len(first)
            if not whole:
                send(data, end, offset=POST_LIMIT)  # (no copy of the rest of a big body)
            return whole and finished is not None

        def send(data: bytes, end: bool = False, offset: int = 0) -> None:
            for start in range(offset, len(data), POST_LIMIT):  # big chunks go in bounded pieces
                piece = data[start:start + POST_LIMIT]
                post(stream.queue, piece, end and start + POST_LIMIT >= len(data))
                state["posted"] += len(piece)
                state["bytes"] += len(piece)
                if state["posted"] >= POST_LIMIT:  # back-pressure, and learn about resets
                    state["posted"] = 0
                    call(stream.wait_writable)

        def write(data: bytes) -> None:
            if not state["sent"]:
                if state["status"] is None:
                    raise AssertionError("write() before start_response()")
                send_headers(False, data)
            elif data and state["body"]:
                send(data)

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

        told = False      # the last operation posted also sets ``done``
        completed = False  # the end of the response is posted already
        try:
            result = chunks = self.app(environ, start_response)
            if sock is not None and sock.used:  # the application spoke on the socket: done
                state["status"] = f"{sock.status} (WebSocket)"
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                sock.close()
                return False
            if isinstance(result, (list, tuple)) and state["status"] is not None and not state["sent"]:
                size = sum(len(c) for c in result)
                if not any(k.lower() == "content-length" for k, _ in state["headers"]):
                    state["headers"].append(("Content-Length", str(size)))
                if len(result) == 1 or size <= POST_LIMIT:
                    # The whole response is known: headers, body and end in one operation
                    # (a join of one item is that item; of many big ones, a copy of them all).
                    chunks = ()
                    told = send_headers(True, b"".join(result), done)
                    completed = True
            try:
                for chunk in chunks:
                    if chunk:
                        write(chunk)
                if completed:
                    pass
                elif not state["sent"]:
                    if state["status"] is None:
                        raise AssertionError("the application did not call start_response()")
                    told = send_headers(True, b"", done)
                elif done is not None:
                    post(_end, stream, done)
                    told = True
                else:
                    post(stream.close)
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
                    post(stream.send_headers, [(b":status", b"500"), (b"content-type", b"text/plain"),
                                               (b"content-length", b"22")], False)
                    post(stream.queue, b"internal server error\n", True)
                else:  # the status is out: only an abort can tell the client
                    post(stream.abort, H3_INTERNAL_ERROR)
            except (StreamReset, ConnectionClosed):
                pass
        finally:
            if logger.isEnabledFor(logging.DEBUG):  # the path only: a query may carry tokens
                logger.debug("%s %s -> %s, %d bytes, %.1f ms", method,
                             environ.get("REQUEST_URI", "").split("?", 1)[0],
                             (state["status"] or "no response").split(" ", 1)[0], state["bytes"],
                             (time.monotonic() - started) * 1000)
        return told
