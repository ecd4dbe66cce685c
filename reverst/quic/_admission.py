"""Who gets a QUIC connection (sans-io: no socket, no clock, no gevent).

A server that builds a full connection (TLS state, a registration greenlet) for every
Initial can be flooded: thousands of Initials a second that never finish the handshake,
or handshakes that never register, from real or spoofed source addresses. Here:

* :class:`RetryTokens` and :func:`encode_retry`: stateless Retry (RFC 9000 §8.1.2,
  §17.2.5): a token-less Initial is answered with a small Retry packet carrying an
  HMAC-authenticated, time-limited token bound to the client's address and port, its
  original destination connection id and the Retry's source connection id. A client that
  comes back with it has shown it receives at its address: no spoofed source gets a
  connection, and a Retry is much smaller than the Initial that drew it (no amplification).
* :class:`Admission`: the counts (connections whose handshake is in progress, and
  connections past the handshake that have not registered yet, in all and per source
  address) and the verdict for each new Initial: accept, answer with a Retry, or drop;
  refusals counted by reason; the deadline of every unfinished handshake.
"""
from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import ipaddress
import math
import os
from typing import Hashable, NamedTuple

from ..policy import TokenBucket
from ._common import QUIC_V1, QUIC_V2, Header

#: How long a Retry token is good for (seconds). Clients answer a Retry at once (one round
#: trip); RFC 9000 §8.1.4 asks for a short lifetime.
TOKEN_LIFETIME = 10.0
#: The Retry integrity key and nonce (RFC 9001 §5.8, RFC 9369 §3.3.3).
_RETRY_INTEGRITY = {
    QUIC_V1: (bytes.fromhex("be0c690b9f66575a1d766b54e368c84e"), bytes.fromhex("461599d35d632bf2239825bb")),
    QUIC_V2: (bytes.fromhex("8fb4b01b56ac48e260fbcbcead7ccc92"), bytes.fromhex("d86969bc2d7c6d9990efb04a")),
}
_RETRY_TYPE = {QUIC_V1: 0x3, QUIC_V2: 0x0}  # the long-header type bits of a Retry
_TOKEN_MAGIC = b"rR\x01"  # ours, format 1 (a token that does not start so is not ours)
_MAC_SIZE = 16


class Mode(str, enum.Enum):
    """``--quic-retry``: when a token-less Initial is answered with a Retry."""
    AUTO = "auto"      # while more handshakes are in progress than the threshold
    ALWAYS = "always"  # every one (each new connection costs one more round trip)
    NEVER = "never"    # none (beyond the caps, Initials are dropped)


# -- Initial tokens ------------------------------------------------------------------------------
def _varint_untrusted(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, next position) of the QUIC variable-length integer at ``pos``, or None."""
    if pos >= len(data):
        return None
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > len(data):
        return None
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | data[pos + i]
    return value, pos + size


def initial_token_untrusted(data: bytes, header: Header) -> bytes | None:
    """The token field of the Initial that ``header`` was parsed from (b"" when there is
    none), or None when the field is malformed."""
    pos = 7 + len(header.destination_cid) + len(header.source_cid)
    field = _varint_untrusted(data, pos)
    if field is None:
        return None
    length, pos = field
    if length > len(data) - pos:
        return None
    return data[pos:pos + length]


def _address_bytes(addr: tuple) -> bytes:
    try:
        ip = ipaddress.ip_address(addr[0]).packed
    except ValueError:
        ip = str(addr[0]).encode()
    return ip + int(addr[1]).to_bytes(2, "big")


class InvalidToken(Exception):
    """A token of ours that fails: forged, altered, expired, or for another address."""

    def __init__(self, reason: str, original_cid: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: the original destination id of a token that is ours and for this address and
        #: id, but expired (then the client is real: RFC 9000 §8.1.3 closes with INVALID_TOKEN)
        self.original_cid = original_cid


class RetryTokens:
    """Issues and checks Retry tokens with ``key`` (random per process by default: tokens
    live seconds, and never survive a restart). The token is in clear but authenticated:
    ``magic | issued (ms, 8 bytes) | len(odcid) | odcid | HMAC-SHA256(key, all that |
    client address and port | Retry source connection id)[:16]``."""

    def __init__(self, key: bytes | None = None, lifetime: float = TOKEN_LIFETIME) -> None:
        self._key = key if key is not None else os.urandom(32)
        self.lifetime = lifetime

    def __repr__(self) -> str:  # (never the key)
        return f"<RetryTokens lifetime={self.lifetime:g}s>"

    def _mac(self, body: bytes, addr: tuple, retry_cid: bytes) -> bytes:
        message = body + _address_bytes(addr) + bytes([len(retry_cid)]) + retry_cid
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_SIZE]

    def issue(self, addr: tuple, original_cid: bytes, retry_cid: bytes, now: float) -> bytes:
        body = _TOKEN_MAGIC + int(now * 1000).to_bytes(8, "big") + bytes([len(original_cid)]) + original_cid
        return body + self._mac(body, addr, retry_cid)

    @staticmethod
    def is_ours(token: bytes) -> bool:
        return token.startswith(_TOKEN_MAGIC)

    def check_untrusted(self, token: bytes, addr: tuple, destination_cid: bytes, now: float) -> bytes:
        """The original destination connection id a valid token carries, for an Initial
        from ``addr`` to ``destination_cid`` (the Retry's source id); InvalidToken if not."""
        n = len(_TOKEN_MAGIC)
        if len(token) < n + 9 + _MAC_SIZE or not self.is_ours(token):
            raise InvalidToken("malformed")
        odcid_length = token[n + 8]
        body_end = n + 9 + odcid_length
        if odcid_length > 20 or len(token) != body_end + _MAC_SIZE:
            raise InvalidToken("malformed")
        body, mac = token[:body_end], token[body_end:]
        if not hmac.compare_digest(mac, self._mac(body, addr, destination_cid)):
            raise InvalidToken("forged or for another address")
        age = now - int.from_bytes(token[n:n + 8], "big") / 1000
        if not -1.0 <= age <= self.lifetime:
            raise InvalidToken("expired", token[n + 9:body_end])
        return token[n + 9:body_end]


def retry_integrity_tag(packet_without_tag: bytes, original_cid: bytes, version: int) -> bytes:
    """RFC 9001 §5.8: AES-128-GCM over the Retry pseudo-packet, with the version's fixed key."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # (a dependency of aioquic)
    key, nonce = _RETRY_INTEGRITY[version]
    return AESGCM(key).encrypt(nonce, b"", bytes([len(original_cid)]) + original_cid + packet_without_tag)


def encode_retry(header: Header, retry_cid: bytes, token: bytes) -> bytes:
    """The Retry answering the Initial of ``header`` (a version of QUIC_V1/QUIC_V2)."""
    version = header.version
    first = 0xC0 | (_RETRY_TYPE[version] << 4) | (os.urandom(1)[0] & 0x0F)
    packet = b"".join([
        bytes([first]), version.to_bytes(4, "big"),
        bytes([len(header.source_cid)]), header.source_cid,  # to the client's id
        bytes([len(retry_cid)]), retry_cid,
        token,
    ])
    return packet + retry_integrity_tag(packet, header.destination_cid, version)


# -- admission -------------------------------------------------------------------------------------
#: Defaults of :class:`Admission` (reverstd: TunnelServer arguments).
RETRY_THRESHOLD = 64         # handshakes in progress above which --quic-retry auto sends Retry
MAX_HANDSHAKES = 256         # handshakes in progress, in all
MAX_HANDSHAKES_PER_ADDRESS = 16
MAX_UNREGISTERED = 512       # past the handshake, not registered (yet), in all
MAX_UNREGISTERED_PER_ADDRESS = 32
#: The per-address caps hold once a stage holds this share of its total cap. Below it one
#: address may use the free room: many tunnel clients behind one NAT address, or one client
#: with many connections, register at once instead of 16 at a time (the rest of their
#: Initials dropped, their handshakes waiting out doubling PTOs: 1,000 connections of one
#: client took 183 s to register).
PER_ADDRESS_FROM = 0.5
HANDSHAKE_TIMEOUT = 5.0      # an unfinished handshake is dropped after this long (seconds)
#: Addresses that registered a tunnel before (the last KNOWN_ADDRESSES of them) have this
#: many more handshakes, and unregistered connections, beyond the caps: a flood of real
#: handshakes from fresh addresses (which a Retry does not stop) does not lock out the
#: tunnel clients that reconnect. (A spoofed known address gets a Retry first, when enabled.)
KNOWN_RESERVE = 32
KNOWN_ADDRESSES = 10000

#: RFC 9000 §20.1 transport error code
INVALID_TOKEN = 0x0B
#: INVALID_TOKEN closes a second at most, once CLOSE_BURST are spent (beyond that a late
#: Initial is dropped): each costs the library's reading of a ClientHello and its first
#: flight, and a replayed late Initial must not buy that without bound.
MAX_CLOSES_PER_SECOND = 64
#: INVALID_TOKEN closes at once: a client's connections whose tokens expired together (their
#: retransmissions align: 1,000 idle tunnels of one client sent 424 within one second; at 64
#: a second the rest waited out doubling PTOs, and all registered in 61 s instead of 14 s).
CLOSE_BURST = 1024

#: Refusal reasons (the ``reason`` label of reverst_quic_handshakes_refused_total).
REFUSAL_REASONS = ("handshakes", "handshakes_per_address", "unregistered", "unregistered_per_address",
                   "invalid_token", "handshake_timeout")


class Verdict(NamedTuple):
    """What to do with a new Initial: ``action`` is "accept" (with the connection ids the
    server's transport parameters must carry), "retry", "drop" (with ``reason``), or
    "close": answer it with a CONNECTION_CLOSE of INVALID_TOKEN (its token is ours and
    for this client, but expired; RFC 9000 §8.1.3), with the ids a connection would carry."""
    action: str
    original_cid: bytes = b""
    retry_cid: bytes | None = None
    reason: str = ""


_HANDSHAKING, _UNREGISTERED = 1, 2


class Admission:
    """The counts and verdicts of :mod:`reverst.quic._admission` for one server endpoint.

    The shell calls :meth:`admit_untrusted` for an Initial that would start a connection,
    then :meth:`started` (key: the connection object), :meth:`handshake_done`,
    :meth:`registered` and :meth:`ended` as it goes; :meth:`expired` names the
    connections whose handshake is overdue. ``now`` is always a parameter.
    """

    def __init__(self, mode: Mode | str = Mode.AUTO, *, tokens: RetryTokens | None = None,
                 retry_threshold: int = RETRY_THRESHOLD, max_handshakes: int = MAX_HANDSHAKES,
                 max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS,
                 max_unregistered: int = MAX_UNREGISTERED,
                 max_unregistered_per_address: int = MAX_UNREGISTERED_PER_ADDRESS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, known_reserve: int = KNOWN_RESERVE) -> None:
        self.mode = Mode(mode)
        self.tokens = tokens or RetryTokens()
        self.retry_threshold = retry_threshold
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_address = max_handshakes_per_address
        self.max_unregistered = max_unregistered
        self.max_unregistered_per_address = max_unregistered_per_address
        self.handshake_timeout = handshake_timeout
        self.known_reserve = known_reserve
        #: source addresses that registered a tunnel, oldest first
        self._known: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: key -> (source ip, stage); handshaking keys also in _deadlines, in deadline order
        self._state: dict[Hashable, tuple[str, int]] = {}
        self._deadlines: collections.OrderedDict[Hashable, float] = collections.OrderedDict()
        self._handshaking_by_ip: dict[str, int] = {}
        self._unregistered_by_ip: dict[str, int] = {}
        self.unregistered = 0
        #: what was refused, by reason (REFUSAL_REASONS), and Retry packets sent
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.retries = 0
        #: INVALID_TOKEN closes (stamped at -inf: full at the first one)
        self._closes = TokenBucket(MAX_CLOSES_PER_SECOND, CLOSE_BURST, now=-math.inf)

    def __repr__(self) -> str:
        return (f"<Admission retry={self.mode.value} handshaking={self.handshaking} "
                f"unregistered={self.unregistered}>")

    @property
    def handshaking(self) -> int:
        """Connections whose handshake is in progress."""
        return len(self._deadlines)

    def _refuse(self, reason: str) -> Verdict:
        self.refused[reason] += 1
        return Verdict("drop", reason=reason)

    def admit_untrusted(self, header: Header, token: bytes, addr: tuple, now: float,
                        retry_cid: bytes) -> Verdict:
        """The verdict for an Initial (``header``, its ``token``) from ``addr`` to an unknown
        connection id. ``retry_cid`` is the source id a Retry would carry (random)."""
        ip = addr[0]
        original, rscid = header.destination_cid, None
        if token and self.tokens.is_ours(token):
            try:
                original = self.tokens.check_untrusted(token, addr, header.destination_cid, now)
            except InvalidToken as exc:
                # A real client whose token expired will not take another Retry: tell it.
                if exc.original_cid is not None and self._may_close(now):
                    self.refused["invalid_token"] += 1
                    return Verdict("close", exc.original_cid, header.destination_cid, "invalid_token")
                return self._refuse("invalid_token")  # (its Retry parameters could not match)
            rscid = header.destination_cid
        # (another token, e.g. from a NEW_TOKEN of some other server: as if none, RFC 9000 §8.1.3)
        reserve = self.known_reserve if ip in self._known else 0
        if self.unregistered >= self.max_unregistered + reserve:
            return self._refuse("unregistered")
        if self._over_unregistered_per_address(ip):
            return self._refuse("unregistered_per_address")
        over_total = self.handshaking >= self.max_handshakes + reserve
        over_address = (self._handshaking_by_ip.get(ip, 0) >= self.max_handshakes_per_address
                        and self.handshaking >= PER_ADDRESS_FROM * self.max_handshakes)
        if rscid is None and self.mode is not Mode.NEVER and (
                self.mode is Mode.ALWAYS or over_total or over_address or self.handshaking >= self.retry_threshold):
            self.retries += 1
            return Verdict("retry", retry_cid=retry_cid)
        if over_total:
            return self._refuse("handshakes")
        if over_address:
            return self._refuse("handshakes_per_address")
        return Verdict("accept", original, rscid)

    def _may_close(self, now: float) -> bool:
        """An INVALID_TOKEN close allowed now: CLOSE_BURST at once, MAX_CLOSES_PER_SECOND a
        second on average."""
        return self._closes.take(now) == 0.0

    def retry_packet(self, header: Header, addr: tuple, retry_cid: bytes, now: float) -> bytes:
        """The Retry (with a fresh token) for an Initial that :meth:`admit_untrusted` said to retry."""
        return encode_retry(header, retry_cid, self.tokens.issue(addr, header.destination_cid, retry_cid, now))

    # -- the life of an admitted connection ------------------------------------------------------
    def started(self, key: Hashable, addr: tuple, now: float) -> None:
        ip = addr[0]
        self._state[key] = (ip, _HANDSHAKING)
        self._deadlines[key] = now + self.handshake_timeout
        self._handshaking_by_ip[ip] = self._handshaking_by_ip.get(ip, 0) + 1

    def _leave_stage(self, key: Hashable) -> str | None:
        state = self._state.pop(key, None)
        if state is None:
            return None
        ip, stage = state
        counts = self._handshaking_by_ip if stage == _HANDSHAKING else self._unregistered_by_ip
        if stage == _HANDSHAKING:
            del self._deadlines[key]
        else:
            self.unregistered -= 1
        left = counts[ip] - 1
        if left:
            counts[ip] = left
        else:
            del counts[ip]
        return ip

    def handshake_done(self, key: Hashable) -> bool:
        """The handshake finished: the connection counts as unregistered now; or, when that
        would pass the unregistered caps (checked at its Initial, but handshakes admitted
        meanwhile finish too), False: no longer counted (refused as "unregistered..."), the
        caller closes it."""
        state = self._state.get(key)
        if state is None or state[1] != _HANDSHAKING:
            return True
        ip = self._leave_stage(key)
        reserve = self.known_reserve if ip in self._known else 0
        if self.unregistered >= self.max_unregistered + reserve:
            self.refused["unregistered"] += 1
            return False
        if self._over_unregistered_per_address(ip):
            self.refused["unregistered_per_address"] += 1
            return False
        self._state[key] = (ip, _UNREGISTERED)
        self._unregistered_by_ip[ip] = self._unregistered_by_ip.get(ip, 0) + 1
        self.unregistered += 1
        return True

    def _over_unregistered_per_address(self, ip: str) -> bool:
        return (self._unregistered_by_ip.get(ip, 0) >= self.max_unregistered_per_address
                and self.unregistered >= PER_ADDRESS_FROM * self.max_unregistered)

    def registered(self, key: Hashable) -> None:
        """The connection is a tunnel now: no longer counted, and its address known."""
        ip = self._leave_stage(key)
        if ip is not None:
            known = self._known
            known[ip] = None
            known.move_to_end(ip)
            if len(known) > KNOWN_ADDRESSES:
                known.popitem(last=False)

    def ended(self, key: Hashable) -> None:
        """The connection closed (at whatever stage)."""
        self._leave_stage(key)

    def expired(self, now: float) -> list[Hashable]:
        """The connections whose handshake is overdue, no longer counted (as refused
        instead): the caller drops them."""
        overdue = []
        for key, deadline in self._deadlines.items():  # (in deadline order)
            if deadline > now:
                break
            overdue.append(key)
        for key in overdue:
            self._leave_stage(key)
        self.refused["handshake_timeout"] += len(overdue)
        return overdue

    def next_deadline(self) -> float | None:
        return next(iter(self._deadlines.values()), None)
