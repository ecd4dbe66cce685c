"""The tunnel groups file (PROTOCOL §5): YAML → frozen dataclasses, strictly validated.

Every error is a one-line :class:`~reverst.errors.ConfigError` naming the source and the
key path, e.g. ``groups.yml: groups."app".authentication.basic.password: required``.
Secrets never appear in errors or reprs; bearer tokens are kept only as SHA-256 sums.

Reading the groups source and the bearer token files/secrets is the caller's business
(:mod:`reverst.sources` watches them); this module only validates, and reads local files
when it is given no ``read_secret`` callback.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Union
from urllib.parse import urlsplit

from .durations import parse_duration
from .errors import ConfigError
from .policy import Limits, VisitorPolicy

BEARER_SOURCES = ("token", "tokenPath", "hashedToken", "hashedTokenPath")
_SCHEME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_SECRET_FILE = 64 * 1024
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
#: Kubernetes object names (DNS subdomains, RFC 1123) and data keys.
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_K8S_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
DEFAULT_EXTERNAL_TIMEOUT = 5.0


class SecretUnavailable(Exception):
    """Raised by a ``read_secret`` callback; str() is a short, secret-free reason such as
    ``cannot read /run/token: No such file or directory``."""


#: ``read_secret(ref) -> bytes`` where ``ref`` is an absolute path or ``k8s://secret/ns/name/key``.
ReadSecret = Callable[[str], bytes]


def parse_k8s_ref(ref: str, kind: str) -> tuple[str, str, str]:
    """``k8s://<kind>/<namespace>/<name>/<key>`` -> (namespace, name, key); ValueError otherwise."""
    prefix = f"k8s://{kind}/"
    parts = ref[len(prefix):].split("/") if ref.startswith(prefix) else []
    if len(parts) != 3:
        raise ValueError(f"must be k8s://{kind}/<namespace>/<name>/<key>")
    namespace, name, key = parts
    if not _K8S_NAME.fullmatch(namespace) or len(namespace) > 63 or "." in namespace:
        raise ValueError(f"invalid Kubernetes namespace {_q(namespace)}")
    if not _K8S_NAME.fullmatch(name):
        raise ValueError(f"invalid Kubernetes {kind} name {_q(name)}")
    if not _K8S_KEY.fullmatch(key):
        raise ValueError(f"invalid Kubernetes {kind} key {_q(key)}")
    return namespace, name, key


def read_secret_file(path: str) -> bytes:
    """The default ``read_secret``: a local file, at most 64 KiB."""
    if path.startswith("k8s://"):
        raise SecretUnavailable("Kubernetes secrets need a Kubernetes source reader (reverst.sources)")
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise SecretUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL byte or a lone surrogate in the path
        raise SecretUnavailable(f"cannot read {_q(path)}: not a valid path") from exc
    if len(data) > _MAX_SECRET_FILE:
        raise SecretUnavailable(f"file {path} is larger than {_MAX_SECRET_FILE} bytes")
    return data


@dataclass(frozen=True, repr=False)
class BasicStrategy:
    name: ClassVar[str] = "basic"
    username: str
    password: str
    scheme: str = "Basic"

    def __repr__(self) -> str:
        return f"BasicStrategy(username={self.username!r}, password='***', scheme={self.scheme!r})"


@dataclass(frozen=True, repr=False)
class BearerStrategy:
    name: ClassVar[str] = "bearer"
    token_sha256: bytes
    scheme: str = "Bearer"
    source: str = "token"  # the key it came from, with the file for *Path keys

    def __repr__(self) -> str:
        return f"BearerStrategy(token_sha256='***', scheme={self.scheme!r}, source={self.source!r})"


@dataclass(frozen=True, repr=False)
class ExternalStrategy:
    name: ClassVar[str] = "external"
    endpoint: str
    scheme: str = "Bearer"
    timeout: float = DEFAULT_EXTERNAL_TIMEOUT  # seconds for the whole GET; then: unauthorized

    @property
    def safe_endpoint(self) -> str:
        """The endpoint with any password in it masked, for logs."""
        parts = urlsplit(self.endpoint)
        if parts.password is None:
            return self.endpoint
        return parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}").geturl()

    def __repr__(self) -> str:
        return f"ExternalStrategy(endpoint={self.safe_endpoint!r}, scheme={self.scheme!r}, timeout={self.timeout!r})"


Strategy = Union[BasicStrategy, BearerStrategy, ExternalStrategy]


@dataclass(frozen=True)
class GroupTLS:
    certificate: str   # absolute paths, checked to load together when the config was read
    private_key: str
    #: plain HTTP requests for the group's hosts are redirected (308) to HTTPS
    redirect_http: bool = False


@dataclass(frozen=True)
class Group:
    name: str
    hosts: tuple[str, ...] = ()
    strategies: tuple[Strategy, ...] = ()
    #: who may use the group's public side and how much (``visitors:``)
    visitors: VisitorPolicy = field(default_factory=VisitorPolicy)
    #: tunnel connections the group takes at most (``maxTunnels:``; None: no limit)
    max_tunnels: int | None = None
    #: the HTTPS listener's certificate for the group's hosts (``tls:``), if its own
    tls: GroupTLS | None = None

    @property
    def is_open(self) -> bool:
        """True when the group has no authentication strategy at all."""
        return not self.strategies


@dataclass(frozen=True)
class GroupsConfig:
    source: str
    groups: Mapping[str, Group]
    _by_host: Mapping[str, Group] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_host: dict[str, Group] = {}
        for group in self.groups.values():
            for host in group.hosts:
                other = by_host.setdefault(host, group)
                if other is not group:
                    raise ConfigError(f"{self.source}: groups.{_q(group.name)}.hosts: host {_q(host)} "
                                      f"is already in group {_q(other.name)}")
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))
        object.__setattr__(self, "_by_host", MappingProxyType(by_host))

    def group_for_host(self, host: str) -> Group | None:
        """The group whose ``hosts`` contains exactly ``host`` (no port), if any."""
        return self._by_host.get(host)

    def group(self, name: str) -> Group | None:
        return self.groups.get(name)

    @property
    def secret_refs(self) -> tuple[str, ...]:
        """The token files (absolute paths) and ``k8s://secret/...`` refs this config read."""
        refs = []
        for group in self.groups.values():
            for strategy in group.strategies + group.visitors.strategies:
                if isinstance(strategy, BearerStrategy):
                    key, sep, ref = strategy.source.partition(":")
                    if sep and key.endswith("Path"):
                        refs.append(ref)
        return tuple(dict.fromkeys(refs))


def load_groups(source: str, *, read_secret: ReadSecret | None = None) -> GroupsConfig:
    """Read and validate the groups file at ``source`` (a path or ``file:///path``).

    ``k8s://configmap/...`` sources are read by :func:`reverst.sources.load_groups`."""
    if source.startswith("k8s://"):
        raise ConfigError(f"{source}: Kubernetes sources are read by reverst.sources.load_groups")
    path = local_path(source)
    if path is None:
        raise ConfigError(f"{source}: unsupported source (use a path, file:///path or "
                          f"k8s://configmap/<namespace>/<name>/<key>)")
    return parse_groups(_read_groups_file(source, path), source, read_secret=read_secret)


def _read_groups_file(source: str, path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read {path}: {exc.strerror or exc}") from exc
    return decode_groups_text(source, data)


def decode_groups_text(source: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte offset {exc.start})") from exc


def parse_groups(text: str, source: str, *, base_dir: str | None = None,
                 read_secret: ReadSecret | None = None) -> GroupsConfig:
    """Validate groups YAML; relative secret paths resolve against ``base_dir``,
    by default the directory of ``source`` (the working directory for non-file sources).
    Token files and secrets are read with ``read_secret`` (default: local files only)."""
    if base_dir is None:
        base_dir = os.path.dirname(local_path(source) or "")
    import yaml  # (here, not at import: a tunnel client imports this module and reads no YAML)

    from ._yaml import StrictLoader
    try:
        doc = yaml.load(text, Loader=StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {_one_line(exc.problem or exc.context)}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {_one_line(str(exc).splitlines()[0])}") from exc
    return _Parser(source, base_dir, read_secret or read_secret_file).groups_config(doc)


def _q(value: Any) -> str:
    """Quote a name for a message: always one line, always ASCII."""
    return json.dumps(str(value))


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def local_path(source: str) -> str | None:
    """The file path of a path or ``file://`` source; None for other URL schemes."""
    if source.startswith("file://"):
        return source[len("file://"):]
    return None if _URL_SCHEME.match(source) else source


class _Parser:
    def __init__(self, source: str, base_dir: str, read_secret: ReadSecret) -> None:
        self.source = source
        self.base_dir = base_dir
        self.read_secret_cb = read_secret

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")

    def mapping(self, value: Any, path: str, keys: tuple[str, ...] | None = None) -> dict:
        """``value`` as a dict (null = empty) whose keys are all in ``keys``."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, "must be a mapping")
        for key in value if keys is not None else ():
            if key not in keys:
                name = key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else _q(key)
                raise self.error(f"{path}.{name}" if path else name, "unknown key")
        return value

    def string(self, raw: dict, key: str, path: str, default: str | None = None) -> str:
        value = raw.get(key)
        if value is None:
            if default is None:
                raise self.error(f"{path}.{key}", "required")
            return default
        if not isinstance(value, str):
            raise self.error(f"{path}.{key}", "must be a string (quote it)")
        if not value:
            raise self.error(f"{path}.{key}", "must not be empty")
        return value

    def scheme(self, raw: dict, path: str, default: str) -> str:
        scheme = self.string(raw, "scheme", path, default)
        if not _SCHEME.fullmatch(scheme):
            raise self.error(f"{path}.scheme", "must be a single word such as Basic or Bearer")
        return scheme

    def groups_config(self, doc: Any) -> GroupsConfig:
        if doc is None:
            raise self.error("groups", "required")
        if not isinstance(doc, dict):
            raise self.error("(top level)", "must be a mapping with a groups key")
        self.mapping(doc, "", ("groups",))  # unknown top-level keys
        if "groups" not in doc:
            raise self.error("groups", "required")
        raw_groups = doc["groups"]
        if not isinstance(raw_groups, dict):
            raise self.error("groups", "must be a mapping of group names to groups")
        groups = {}
        for name, raw in raw_groups.items():
            if not isinstance(name, str) or not name:
                raise self.error(f"groups.{_q(name)}", "group name must be a non-empty string (quote it)")
            groups[name] = self.group(name, raw)
        return GroupsConfig(self.source, groups)

    def group(self, name: str, raw: Any) -> Group:
        path = f"groups.{_q(name)}"
        raw = self.mapping(raw, path, ("hosts", "authentication", "visitors", "maxTunnels", "tls"))
        hosts = self.hosts(raw.get("hosts"), f"{path}.hosts")
        strategies = self.strategies(raw.get("authentication"), f"{path}.authentication")
        visitors = self.visitors(raw.get("visitors"), f"{path}.visitors")
        max_tunnels = self.integer(raw, "maxTunnels", path, minimum=1)
        tls = self.tls(raw["tls"], f"{path}.tls") if raw.get("tls") is not None else None
        return Group(name, hosts, strategies, visitors, max_tunnels, tls)

    def tls(self, raw: Any, path: str) -> GroupTLS:
        from .tls import describe_error, server_context
        raw = self.mapping(raw, path, ("certificate", "privateKey", "redirectHttp"))
        paths = []
        for key in ("certificate", "privateKey"):
            value = self.string(raw, key, path)
            if value.startswith("file://"):
                value = value[len("file://"):]
            elif _URL_SCHEME.match(value):
                raise self.error(f"{path}.{key}", "must be a local path or file:///path")
            paths.append(os.path.abspath(os.path.join(self.base_dir, value)))
        redirect = raw.get("redirectHttp", False)
        if not isinstance(redirect, bool):
            raise self.error(f"{path}.redirectHttp", "must be true or false")
        for key, file in zip(("certificate", "privateKey"), paths):
            try:
                with open(file, "rb"):
                    pass
            except (OSError, ValueError) as exc:  # (ValueError: a NUL in the path)
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a valid path"
                raise self.error(f"{path}.{key}", f"cannot read {_q(file)}: {reason}") from None
        try:
            server_context(*paths)
        except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
            mismatch = "KEY_VALUES_MISMATCH" in str(exc)
            raise self.error(f"{path}.privateKey" if mismatch else path, describe_error(exc)) from None
        return GroupTLS(paths[0], paths[1], redirect)

    def strategies(self, raw: Any, path: str) -> tuple[Strategy, ...]:
        auth = self.mapping(raw, path, ("basic", "bearer", "external"))
        strategies: list[Strategy] = []
        for key, build in (("basic", self.basic), ("bearer", self.bearer), ("external", self.external)):
            if key in auth:
                strategies.append(build(auth[key], f"{path}.{key}"))
        by_scheme: dict[str, Strategy] = {}
        for strategy in strategies:
            other = by_scheme.setdefault(strategy.scheme.lower(), strategy)
            if other is not strategy:
                raise self.error(path, f"{other.name} and {strategy.name} both use scheme {_q(strategy.scheme)}")
        return tuple(strategies)

    def visitors(self, raw: Any, path: str) -> VisitorPolicy:
        raw = self.mapping(raw, path, ("allow", "deny", "authentication", "limits"))
        allow = self.networks(raw.get("allow"), f"{path}.allow")
        deny = self.networks(raw.get("deny"), f"{path}.deny")
        for i, net in enumerate(deny):
            if net in allow:
                raise self.error(f"{path}.deny[{i}]", f"{net} is also in allow")
        strategies = self.strategies(raw.get("authentication"), f"{path}.authentication")
        path += ".limits"
        lim = self.mapping(raw.get("limits"), path, ("concurrentRequests", "requestsPerSecond", "burst",
                                                     "groupRequestsPerSecond", "groupBurst", "maxBodySize"))
        for burst, rate in (("burst", "requestsPerSecond"), ("groupBurst", "groupRequestsPerSecond")):
            if lim.get(burst) is not None and lim.get(rate) is None:
                raise self.error(f"{path}.{burst}", f"needs {rate}")
        limits = Limits(self.integer(lim, "concurrentRequests", path, minimum=1),
                        self.rate(lim, "requestsPerSecond", path), self.integer(lim, "burst", path, minimum=1),
                        self.rate(lim, "groupRequestsPerSecond", path), self.integer(lim, "groupBurst", path, minimum=1),
                        self.size(lim, "maxBodySize", path))
        return VisitorPolicy(allow, deny, strategies, limits)

    def networks(self, value: Any, path: str) -> tuple:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(entry, str) for entry in value):
            raise self.error(path, "must be a list of addresses or CIDR networks (strings)")
        nets: list = []
        for i, entry in enumerate(value):
            try:
                net = ipaddress.ip_network(entry.strip())
            except ValueError as exc:
                reason = "has host bits set" if "host bits" in str(exc) else "is not an IP address or CIDR network"
                raise self.error(f"{path}[{i}]", f"{_q(entry)} {reason}") from None
            for other in nets:
                if net.version == other.version and net.overlaps(other):
                    raise self.error(f"{path}[{i}]", f"{net} overlaps {other}")
            nets.append(net)
        return tuple(nets)

    def integer(self, raw: dict, key: str, path: str, minimum: int) -> int | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(f"{path}.{key}", f"must be a whole number of at least {minimum}")
        return value

    def rate(self, raw: dict, key: str, path: str) -> float | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
            raise self.error(f"{path}.{key}", "must be a number of requests per second above 0")
        return float(value)

    def size(self, raw: dict, key: str, path: str) -> int | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        m = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        size = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()] if m else math.nan
        if not 0 <= size < 2**63:
            raise self.error(f"{path}.{key}", "must be a size in bytes, such as 1048576, 512KiB, 10MB or 1GiB")
        return int(size)

    def hosts(self, value: Any, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(host, str) for host in value):
            raise self.error(path, "must be a list of strings")
        for i, host in enumerate(value):
            if not host or host != host.strip():
                raise self.error(f"{path}[{i}]", "must be a non-empty host name without spaces")
        return tuple(dict.fromkeys(value))  # drop repeats, keep order

    def basic(self, raw: Any, path: str) -> BasicStrategy:
        raw = self.mapping(raw, path, ("username", "password", "scheme"))
        return BasicStrategy(self.string(raw, "username", path), self.string(raw, "password", path),
                             self.scheme(raw, path, "Basic"))

    def bearer(self, raw: Any, path: str) -> BearerStrategy:
        raw = self.mapping(raw, path, BEARER_SOURCES + ("scheme",))
        given = [key for key in BEARER_SOURCES if key in raw]
        if len(given) != 1:
            found = f" (found {', '.join(given)})" if given else ""
            raise self.error(path, f"{'only ' if given else ''}one of {', '.join(BEARER_SOURCES)} "
                                   f"is {'allowed' if given else 'required'}{found}")
        key = given[0]
        value = self.string(raw, key, path)
        scheme = self.scheme(raw, path, "Bearer")
        if key == "token":
            return BearerStrategy(hashlib.sha256(value.encode()).digest(), scheme, key)
        if key == "hashedToken":
            return BearerStrategy(self.hex_sha256(value, f"{path}.{key}", "must be"), scheme, key)
        file = self.secret_path(value, f"{path}.{key}")
        data = self.read_secret(file, f"{path}.{key}")
        what = f"secret {file}" if file.startswith("k8s://") else f"file {file}"
        if key == "tokenPath":
            if not data.rstrip():
                raise self.error(f"{path}.{key}", f"{what} is empty")
            return BearerStrategy(hashlib.sha256(data.rstrip()).digest(), scheme, f"{key}:{file}")
        text = data.decode("ascii", "replace")
        return BearerStrategy(self.hex_sha256(text, f"{path}.{key}", f"{what} must hold"), scheme,
                              f"{key}:{file}")

    def external(self, raw: Any, path: str) -> ExternalStrategy:
        raw = self.mapping(raw, path, ("endpoint", "scheme", "timeout"))
        endpoint = self.string(raw, "endpoint", path)
        try:
            parts = urlsplit(endpoint)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError:
            valid = False
        if not valid:
            raise self.error(f"{path}.endpoint", "must be an http:// or https:// URL")
        timeout = DEFAULT_EXTERNAL_TIMEOUT
        if raw.get("timeout") is not None:
            try:
                timeout = parse_duration(raw["timeout"])
            except (TypeError, ValueError):
                timeout = -1.0
            if not 0 < timeout <= 10:  # a registration has 10 s in all
                raise self.error(f"{path}.timeout", "must be a duration up to 10s, such as 5s")
        return ExternalStrategy(endpoint, self.scheme(raw, path, "Bearer"), timeout)

    def hex_sha256(self, text: str, path: str, what: str) -> bytes:
        text = text.strip()
        if not _HEX_SHA256.fullmatch(text):
            raise self.error(path, f"{what} 64 hex digits (a SHA-256 sum)")
        return bytes.fromhex(text)

    def secret_path(self, value: str, path: str) -> str:
        if value.startswith("k8s://"):
            try:
                parse_k8s_ref(value, "secret")
            except ValueError as exc:
                raise self.error(path, str(exc)) from None
            return value
        if _URL_SCHEME.match(value) and not value.startswith("file://"):
            raise self.error(path, "must be a path, file:///path or k8s://secret/<namespace>/<name>/<key>")
        if value.startswith("file://"):
            value = value[len("file://"):]
        return os.path.abspath(os.path.join(self.base_dir, value))

    def read_secret(self, ref: str, path: str) -> bytes:
        try:
            data = self.read_secret_cb(ref)
        except SecretUnavailable as exc:
            raise self.error(path, _one_line(exc)) from None
        if len(data) > _MAX_SECRET_FILE:
            what = "secret" if ref.startswith("k8s://") else "file"
            raise self.error(path, f"{what} {ref} is larger than {_MAX_SECRET_FILE} bytes")
        return data
