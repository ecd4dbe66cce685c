"""Who may use a tunnel group's public side, and how much (sans-io: the caller passes the
clock). The ``visitors:`` key of a group (docs/groups.md) becomes a :class:`VisitorPolicy`;
:class:`Gate` holds the running state of one group (token buckets, requests in flight),
kept across reloads; :meth:`Gate.admit` decides one request.
"""
from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Union

from .errors import Unauthorized
from .forwarding import parse_ip

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Per-visitor buckets a group keeps at most (the least recently used go first: a full
#: bucket forgotten is the same as a full bucket kept).
MAX_VISITOR_BUCKETS = 50_000


@dataclass(frozen=True)
class Limits:
    concurrent_requests: int | None = None   # per group, public requests in flight
    requests_per_second: float | None = None  # per visitor IP
    burst: int | None = None                  # per visitor IP (default: max(1, the rate))
    group_requests_per_second: float | None = None
    group_burst: int | None = None
    max_body_size: int | None = None          # bytes


@dataclass(frozen=True)
class VisitorPolicy:
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    #: basic/bearer/external strategies of reverst.config (the same checks as registrations)
    strategies: tuple = ()
    limits: Limits = field(default_factory=Limits)

    @property
    def is_open(self) -> bool:  # (reverst.auth.authenticate reads it)
        return not self.strategies

    @functools.cached_property
    def unrestricted(self) -> bool:
        """Nothing to check (a group without ``visitors:``): every request goes on."""
        return self == VisitorPolicy()

    def admits_address(self, address: str) -> bool:
        if not self.allow and not self.deny:
            return True
        ip = parse_ip(address)
        if ip is None:
            return not self.allow
        if any(ip in net for net in self.deny):
            return False
        return not self.allow or any(ip in net for net in self.allow)

    def describe(self) -> str:
        """The policy in words, for the status page."""
        parts = []
        if self.allow:
            parts.append("visitors from " + ", ".join(map(str, self.allow)) + " only")
        if self.deny:
            parts.append("none from " + ", ".join(map(str, self.deny)))
        if self.strategies:
            parts.append("visitors authenticate with " + " or ".join(s.scheme for s in self.strategies))
        lim = self.limits
        if lim.requests_per_second:
            parts.append(f"{lim.requests_per_second:g} requests/s per visitor (burst {per_ip_burst(lim)})")
        if lim.group_requests_per_second:
            parts.append(f"{lim.group_requests_per_second:g} requests/s in all (burst {group_burst(lim)})")
        if lim.concurrent_requests:
            parts.append(f"at most {lim.concurrent_requests} requests at once")
        if lim.max_body_size is not None:
            parts.append(f"request bodies up to {lim.max_body_size} bytes")
        return "; ".join(parts) or "anyone, without limits"


def per_ip_burst(limits: Limits) -> int:
    return limits.burst or max(1, math.ceil(limits.requests_per_second or 1))


def group_burst(limits: Limits) -> int:
    return limits.group_burst or max(1, math.ceil(limits.group_requests_per_second or 1))


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one will be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str    # the metrics label: denied, unauthorized, rate_limited, ...
    message: str   # one line for the visitor (never a credential)
    headers: tuple[tuple[str, str], ...] = ()


class Gate:
    """The running limits of one group. :meth:`configure` applies a (re)loaded policy and
    keeps the buckets of a rate that did not change."""

    def __init__(self, policy: VisitorPolicy, group: str):
        self.group = group
        self.in_flight = 0
        self._visitors: OrderedDict[str, TokenBucket] = OrderedDict()
        self._bucket: TokenBucket | None = None
        self.policy = VisitorPolicy()
        self.configure(policy)

    def configure(self, policy: VisitorPolicy) -> None:
        old, self.policy = self.policy.limits, policy
        new = policy.limits
        if (new.requests_per_second, per_ip_burst(new)) != (old.requests_per_second, per_ip_burst(old)):
            self._visitors.clear()
        if (new.group_requests_per_second, group_burst(new)) != (old.group_requests_per_second, group_burst(old)):
            self._bucket = None

    def admit(self, address: str, authorization: str | None, content_length: int | None, now: float,
              authenticate: Callable[[VisitorPolicy, str | None], None]) -> Refusal | None:
        """None if the request may go on (then the caller counts it in :attr:`in_flight`);
        else why not. ``authenticate(policy, authorization)`` raises Unauthorized."""
        policy, limits = self.policy, self.policy.limits
        if not policy.admits_address(address):
            return Refusal(403, "denied", "forbidden: this address may not use this host")
        if limits.requests_per_second:  # before the credentials: it slows down guessing them
            wait = self._visitor_bucket(address, now).take(now)
            if wait:
                return Refusal(429, "rate_limited", "too many requests from this address",
                               (("Retry-After", str(math.ceil(wait))),))
        if policy.strategies:
            try:
                authenticate(policy, authorization)
            except Unauthorized as exc:
                challenge = ", ".join(f'{s.scheme} realm="{self.group}"' for s in policy.strategies)
                return Refusal(401, "unauthorized", f"unauthorized: {exc}", (("WWW-Authenticate", challenge),))
        if limits.max_body_size is not None and content_length is not None and content_length > limits.max_body_size:
            return Refusal(413, "body_too_large", f"request body larger than {limits.max_body_size} bytes")
        if limits.concurrent_requests and self.in_flight >= limits.concurrent_requests:
            return Refusal(503, "concurrency", "too many requests in progress for this host", (("Retry-After", "1"),))
        if limits.group_requests_per_second:
            if self._bucket is None:
                self._bucket = TokenBucket(limits.group_requests_per_second, group_burst(limits), now)
            wait = self._bucket.take(now)
            if wait:
                return Refusal(429, "group_rate_limited", "too many requests for this host",
                               (("Retry-After", str(math.ceil(wait))),))
        return None

    def release(self) -> None:
        """A request admitted by :meth:`admit` is done."""
        self.in_flight -= 1

    def _visitor_bucket(self, address: str, now: float) -> TokenBucket:
        bucket = self._visitors.get(address)
        if bucket is None:
            limits = self.policy.limits
            bucket = self._visitors[address] = TokenBucket(limits.requests_per_second, per_ip_burst(limits), now)
            while len(self._visitors) > MAX_VISITOR_BUCKETS:
                self._visitors.popitem(last=False)
        else:
            self._visitors.move_to_end(address)
        return bucket
