"""Where tunnel groups come from, and keeping a running server in step with them (§5).

Sources: a local file (a path or ``file:///path``) or one key of a Kubernetes ConfigMap
(``k8s://configmap/<namespace>/<name>/<key>``). Bearer ``tokenPath``/``hashedTokenPath``
may name a local file or a Kubernetes Secret key (``k8s://secret/<namespace>/<name>/<key>``).

:class:`GroupsWatcher` reads them once (:meth:`~GroupsWatcher.load`) and, if asked
(``reverstd -w``), follows them from native threads (:meth:`~GroupsWatcher.start`): files are
polled (``stat`` then content, so in-place writes, atomic renames and delete-and-recreate
all count), Kubernetes objects are listed and watched. Every change re-parses the whole
configuration; a valid one is handed to ``on_change`` (from a native thread: the caller
moves it to its event loop), an invalid one is logged on one line and ignored, so the last
good configuration keeps serving.

This module uses threads and blocking I/O only; it never imports gevent.
"""
from __future__ import annotations

import base64
import logging
import os
import sys
import random
import threading
import time
from typing import Any, Callable

from .config import (
    ConfigError, GroupsConfig, SecretUnavailable, decode_groups_text, local_path, parse_groups,
    parse_k8s_ref, read_secret_file,
)

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5     # seconds between two looks at the watched files
SETTLE = 0.1            # a changed file must stay unchanged this long before it is read
KUBE_REQUEST_TIMEOUT = (5.0, 15.0)  # connect, read (list requests)
KUBE_WATCH_TIMEOUT = 300            # seconds the API server keeps one watch open
KUBE_BACKOFF = (0.5, 30.0)          # first and longest wait before re-listing after an error


def load_groups(source: str) -> GroupsConfig:
    """Read and validate the groups from ``source`` once (files, ConfigMaps, Secrets)."""
    watcher = GroupsWatcher(source)
    try:
        return watcher.load()
    finally:
        watcher.stop()


class SourceUnavailable(ConfigError):
    """The groups source could not be reached (e.g. the Kubernetes API is down): unlike an
    invalid source, worth waiting for."""


class GroupsWatcher:
    """Loads the tunnel groups from ``source`` and, once started, reloads them on change."""

    def __init__(self, source: str, *, poll_interval: float = POLL_INTERVAL,
                 kube: "KubeClient | None" = None) -> None:
        self.source = source
        self.poll_interval = poll_interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._own_kube = kube is None
        self._kube = kube or KubeClient()
        self._secrets = _Secrets(self._kube, wake=self._wake.set)
        self._groups = _open_source(source, self._kube, wake=self._wake.set)
        self._current: GroupsConfig | None = None
        self._on_change: Callable[[GroupsConfig], None] | None = None
        #: called from the watcher thread with the error of each version not applied (metrics)
        self.on_error: Callable[[ConfigError], None] | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() else "watching" if self._thread else "idle"
        return f"<GroupsWatcher source={self.source!r} {state}>"

    @property
    def current(self) -> GroupsConfig | None:
        """The last good configuration."""
        return self._current

    def load(self) -> GroupsConfig:
        """Read and validate the source now; :class:`ConfigError` if it is invalid."""
        self._current = self._parse()
        return self._current

    def start(self, on_change: Callable[[GroupsConfig], None]) -> None:
        """Follow the source from a native thread; ``on_change(config)`` is called from it
        with every new valid configuration that differs from the last one."""
        if self._current is None:
            self.load()
        self._on_change = on_change
        self._groups.follow()
        self._secrets.follow()
        self._thread = threading.Thread(target=self._run, name="reverst-groups-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s for changes", self.source)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop following; wait up to ``timeout`` seconds for the threads to end."""
        self._stopped.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        self._groups.close(deadline)
        self._secrets.close(deadline)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._own_kube:
            self._kube.close()

    # -- the watcher thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.poll_interval)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                # Both always run: each remembers what it has seen.
                changed = self._groups.changed() | self._secrets.changed()
                if changed:
                    self._reload()
            except Exception:  # never let the watcher die: the next change retries
                log.exception("reloading tunnel groups from %s failed", self.source)

    def _reload(self) -> None:
        try:
            config = self._parse()
        except ConfigError as exc:
            log.error("tunnel groups not reloaded, the last good version stays: %s", exc)
            if self.on_error is not None:
                self.on_error(exc)
            return
        if config == self._current:
            log.debug("tunnel groups from %s changed, but the configuration they make is the same", self.source)
            return
        self._current = config
        log.debug("tunnel groups reloaded from %s", self.source)
        if self._on_change is not None:
            self._on_change(config)

    def _parse(self) -> GroupsConfig:
        used: list[str] = []

        def read_secret(ref: str) -> bytes:
            used.append(ref)
            return self._secrets.read(ref)

        try:
            text = self._groups.read()
            return parse_groups(text, self.source, base_dir=self._groups.base_dir, read_secret=read_secret)
        finally:
            # Keep watching what the last good version and this attempt use, nothing else.
            self._secrets.retain(set(used) | set(self._current.secret_refs if self._current else ()))


def _open_source(source: str, kube: "KubeClient", *, wake: Callable[[], None]):
    if source.startswith("k8s://"):
        try:
            namespace, name, key = parse_k8s_ref(source, "configmap")
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return _ConfigMapSource(source, kube, namespace, name, key, wake=wake)
    path = local_path(source)
    if path is None:
        raise ConfigError(f"{source}: unsupported source (use a path, file:///path or "
                          f"k8s://configmap/<namespace>/<name>/<key>)")
    return _FileSource(source, path)


# -- files ---------------------------------------------------------------------------------

def _signature(path: str):
    """What changes when a file is written, replaced or removed (None: it is missing)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class _WatchedFile:
    """One polled file: :meth:`changed` is true once per change of its content."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature = _signature(path)
        self._content = _read_bytes(path)

    def seen(self, content: bytes | None) -> None:
        self._content = content

    def changed(self) -> bool:
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        time.sleep(SETTLE)  # a writer may be half-way: look again once it is quiet
        if _signature(self.path) != signature:
            return False  # still moving; the next poll looks again
        self._signature = signature
        content = _read_bytes(self.path)
        if content == self._content:
            return False  # touched, or replaced by the same bytes
        self._content = content
        return True


class _FileSource:
    def __init__(self, source: str, path: str) -> None:
        self.source = source
        self.path = path
        self.base_dir = os.path.dirname(path)
        self._file = _WatchedFile(path)

    def read(self) -> str:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self._file.seen(None)
            raise ConfigError(f"{self.source}: cannot read {self.path}: {exc.strerror or exc}") from exc
        self._file.seen(data)
        return decode_groups_text(self.source, data)

    def changed(self) -> bool:
        return self._file.changed()

    def follow(self) -> None:
        pass  # polled by the watcher thread

    def close(self, deadline: float = 0.0) -> None:
        pass


# -- Kubernetes ----------------------------------------------------------------------------

class KubeUnavailable(Exception):
    """No usable Kubernetes client (not installed, no configuration); str() says why."""


class KubeClient:
    """The official ``kubernetes`` client, configured on first use: in-cluster when
    ``KUBERNETES_SERVICE_HOST`` is set, else from ``KUBECONFIG`` (or ``~/.kube/config``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._core = None

    def core(self):
        """A ``CoreV1Api``, or :class:`KubeUnavailable`."""
        with self._lock:
            if self._core is None:
                try:
                    from kubernetes import client, config
                except ImportError as exc:
                    if exc.name in ("kubernetes", None) and "kubernetes" not in sys.modules:
                        raise KubeUnavailable("the kubernetes package is not installed "
                                              "(pip install 'reverst[k8s]')") from None
                    raise KubeUnavailable(f"the kubernetes package does not import: {exc}") from None
                configuration = client.Configuration()
                try:
                    if os.environ.get("KUBERNETES_SERVICE_HOST"):
                        config.load_incluster_config(client_configuration=configuration)
                    else:
                        # The client reads KUBECONFIG once, at import: read it now.
                        config.load_kube_config(config_file=os.environ.get("KUBECONFIG", "~/.kube/config"),
                                                client_configuration=configuration)
                except Exception as exc:  # ConfigException, missing or malformed files
                    raise KubeUnavailable(f"no Kubernetes configuration (in-cluster or KUBECONFIG): "
                                          f"{_one_line(exc)}") from None
                configuration.retries = 1  # urllib3's default is 3, each logged: the watcher backs off itself
                self._core = client.CoreV1Api(client.ApiClient(configuration))
            return self._core

    def close(self) -> None:
        with self._lock:
            core, self._core = self._core, None
        if core is not None:
            core.api_client.close()


def _one_line(exc: Any) -> str:
    return " ".join(str(exc).split())[:300]


def _api_reason(exc: Exception) -> str:
    """A short reason for a failed API call: never the response body (it may hold data)."""
    if isinstance(exc, KubeUnavailable):
        return str(exc)
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status:
        reason = f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip()
        if status in (401, 403):
            reason += " (check the service account's RBAC: get, list and watch)"
        return reason
    inner = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the real cause
    if isinstance(inner, Exception):
        exc = inner
    return f"{type(exc).__name__}: {_one_line(exc)}"


class _ObjectWatcher:
    """One ConfigMap or Secret, listed then watched from a native thread.

    ``data`` is the object's data (Secrets' and ``binaryData`` values base64-decoded, as
    bytes) or None when it does not exist; ``version`` grows by one whenever ``data``
    changes. Each watch starts from the resourceVersion of a fresh list; when it ends
    (timeout, closed by the server, 410 Expired) the object is listed again, after an
    exponential backoff with jitter when something failed."""

    def __init__(self, kube: KubeClient, kind: str, namespace: str, name: str, *,
                 wake: Callable[[], None]) -> None:
        self.kube = kube
        self.kind = kind  # "configmap" or "secret"
        self.namespace = namespace
        self.name = name
        self.data: dict[str, bytes | str] | None = None
        self.version = 0       # grows whenever ``data`` changes
        self.listed = False    # a list has succeeded at least once
        self.error: str | None = None  # why the last fetch failed, if it did
        self._wake = wake
        self._resource_version: str | None = None
        self._stopped = threading.Event()
        self._watch = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.namespace}/{self.name} version={self.version}>"

    @property
    def label(self) -> str:
        return f"{'ConfigMap' if self.kind == 'configmap' else 'Secret'} {self.namespace}/{self.name}"

    def _list_func(self, core):
        return core.list_namespaced_config_map if self.kind == "configmap" else core.list_namespaced_secret

    def fetch(self) -> None:
        """List the object now (blocking). Raises :class:`KubeUnavailable` or the client's
        exceptions as they come (:func:`_api_reason` makes them short)."""
        core = self.kube.core()
        result = self._list_func(core)(self.namespace, field_selector=f"metadata.name={self.name}",
                                       _request_timeout=KUBE_REQUEST_TIMEOUT)
        self._set(result.items[0] if result.items else None)
        self._resource_version = result.metadata.resource_version
        self.listed = True
        self.error = None

    def _set(self, obj) -> None:
        if obj is None:
            data = None
        elif self.kind == "secret":
            data = {k: base64.b64decode(v) for k, v in (obj.data or {}).items()}
        else:
            data = dict(obj.data or {})
            for k, v in (obj.binary_data or {}).items():
                data.setdefault(k, base64.b64decode(v))
        if data != self.data or not self.listed:
            self.data = data
            self.version += 1
            self._wake()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"reverst-k8s-{self.kind}-{self.namespace}-{self.name}")
        self._thread.start()

    def stop(self, deadline: float = 0.0) -> None:
        self._stopped.set()
        watch = self._watch
        if watch is not None:
            watch.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        delay = KUBE_BACKOFF[0]
        while not self._stopped.is_set():
            try:
                if self._resource_version is None:
                    self.fetch()
                core = self.kube.core()
                self._watch = watch.Watch()
                started = time.monotonic()
                for event in self._watch.stream(
                        self._list_func(core), self.namespace, field_selector=f"metadata.name={self.name}",
                        resource_version=self._resource_version, timeout_seconds=KUBE_WATCH_TIMEOUT,
                        _request_timeout=(KUBE_REQUEST_TIMEOUT[0], KUBE_WATCH_TIMEOUT + 30)):
                    if self._stopped.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        obj = event["object"]
                        self._set(None if event["type"] == "DELETED" else obj)
                        self._resource_version = obj.metadata.resource_version or self._resource_version
                # The watch ended quietly: its timeout, or the server or a proxy closed it.
                # List again rather than resume (older clients end quietly on 410 too), and
                # never in a busy loop.
                lasted = time.monotonic() - started
                log.debug("watch of %s ended after %.1fs; listing again", self.label, lasted)
                self._resource_version = None
                delay = KUBE_BACKOFF[0]
                if lasted < 1.0:
                    self._stopped.wait(delay)
            except ApiException as exc:
                if self._stopped.is_set():
                    return
                self._resource_version = None  # list again
                if exc.status == 410:
                    log.info("watch of %s expired (410 Gone); listing again", self.label)
                    continue
                delay = self._backoff(delay, exc)
            except Exception as exc:  # connection refused, reset, read timeout, bad JSON ...
                if self._stopped.is_set():
                    return
                self._resource_version = None
                delay = self._backoff(delay, exc)
            finally:
                self._watch = None

    def _backoff(self, delay: float, exc: Exception) -> float:
        self.error = _api_reason(exc)
        log.warning("watching %s failed: %s; retrying in %.1fs", self.label, self.error, delay)
        self._stopped.wait(delay * random.uniform(0.8, 1.2))
        return min(delay * 2, KUBE_BACKOFF[1])


class _ConfigMapSource:
    def __init__(self, source: str, kube: KubeClient, namespace: str, name: str, key: str, *,
                 wake: Callable[[], None]) -> None:
        self.source = source
        self.key = key
        self.base_dir = os.getcwd()  # relative token paths in a ConfigMap: the working directory
        self._object = _ObjectWatcher(kube, "configmap", namespace, name, wake=wake)
        self._seen = None

    def read(self) -> str:
        obj = self._object
        if not obj.listed:  # start-up: list now, blocking
            try:
                obj.fetch()
            except KubeUnavailable as exc:
                raise ConfigError(f"{self.source}: {exc}") from None
            except Exception as exc:
                status = getattr(exc, "status", None)  # an API answer (4xx: our mistake) or none
                error = SourceUnavailable if status is None or status >= 500 else ConfigError
                raise error(f"{self.source}: cannot read {obj.label}: {_api_reason(exc)}") from None
        self._seen = obj.version
        data = obj.data
        if data is None:
            raise ConfigError(f"{self.source}: {obj.label} not found")
        if self.key not in data:
            raise ConfigError(f"{self.source}: key {self.key!r} not found in {obj.label}")
        value = data[self.key]
        return decode_groups_text(self.source, value) if isinstance(value, bytes) else value

    def changed(self) -> bool:
        return self._object.version != self._seen

    def follow(self) -> None:
        self._object.start()

    def close(self, deadline: float = 0.0) -> None:
        self._object.stop(deadline)


# -- bearer token files and secrets --------------------------------------------------------

class _Secrets:
    """``read_secret`` for the parser: local files and Kubernetes Secret keys, remembering
    what was read so that :meth:`changed` can tell when any of it changes."""

    def __init__(self, kube: KubeClient, *, wake: Callable[[], None]) -> None:
        self._kube = kube
        self._following = False
        self._wake = wake
        self._lock = threading.Lock()
        self._files: dict[str, _WatchedFile] = {}
        self._objects: dict[tuple[str, str], _ObjectWatcher] = {}
        self._seen: dict[tuple[str, str], int] = {}

    def read(self, ref: str) -> bytes:
        if not ref.startswith("k8s://"):
            with self._lock:
                watched = self._files.get(ref)
                if watched is None:
                    watched = self._files[ref] = _WatchedFile(ref)
            try:
                data = read_secret_file(ref)
            except SecretUnavailable:
                watched.seen(None)
                raise
            watched.seen(data)
            return data
        namespace, name, key = parse_k8s_ref(ref, "secret")  # validated by the parser already
        with self._lock:
            obj = self._objects.get((namespace, name))
            new = obj is None
            if new:
                obj = self._objects[(namespace, name)] = _ObjectWatcher(
                    self._kube, "secret", namespace, name, wake=self._wake)
        if not obj.listed:
            try:
                obj.fetch()
            except Exception as exc:
                with self._lock:  # try again from scratch next time
                    self._objects.pop((namespace, name), None)
                if isinstance(exc, KubeUnavailable):
                    raise SecretUnavailable(str(exc)) from None
                raise SecretUnavailable(f"cannot read {obj.label}: {_api_reason(exc)}") from None
            if self._following:
                obj.start()
        self._seen[(namespace, name)] = obj.version
        if obj.data is None:
            raise SecretUnavailable(f"{obj.label} not found")
        if key not in obj.data:
            raise SecretUnavailable(f"key {key!r} not found in {obj.label}")
        return obj.data[key]

    def changed(self) -> bool:
        with self._lock:
            files = list(self._files.values())
            objects = list(self._objects.items())
        changed = False
        for watched in files:
            changed |= watched.changed()
        for ident, obj in objects:
            if self._seen.get(ident) != obj.version:
                self._seen[ident] = obj.version
                changed = True
        return changed

    def follow(self) -> None:
        """Watch the Secrets read so far and from now on."""
        with self._lock:
            self._following = True
            objects = list(self._objects.values())
        for obj in objects:
            obj.start()

    def retain(self, refs: set[str], deadline: float = 0.0) -> None:
        """Forget (and stop watching) everything not in ``refs``."""
        keep = set()
        for ref in refs:
            if ref.startswith("k8s://"):
                try:
                    keep.add(parse_k8s_ref(ref, "secret")[:2])
                except ValueError:
                    pass
        with self._lock:
            for path in set(self._files) - refs:
                del self._files[path]
            gone = [self._objects.pop(ident) for ident in set(self._objects) - keep]
        for obj in gone:
            obj.stop(deadline)
            self._seen.pop((obj.namespace, obj.name), None)

    def close(self, deadline: float = 0.0) -> None:
        self.retain(set(), deadline)
