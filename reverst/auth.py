"""Registration credential checks (PROTOCOL §3.3, §5): pure, constant-time comparisons.

The server calls :func:`authenticate`; clients build the ``Authorization`` metadata
value with :func:`basic_authorization` or :func:`bearer_authorization`.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from typing import Callable, Mapping

from .config import BasicStrategy, BearerStrategy, ExternalStrategy, Group, Strategy
from .errors import Unauthorized

log = logging.getLogger(__name__)

#: ``external_check(strategy, authorization_value) -> bool``; the caller does the HTTP GET.
ExternalCheck = Callable[[ExternalStrategy, str], bool]


def authenticate(group: Group, metadata: Mapping[str, str] | None, *,
                 external_check: ExternalCheck | None = None) -> str:
    """Return the name of the accepting strategy ("basic", "bearer", "external" or
    "open"); raise :class:`Unauthorized` with a short, secret-free reason otherwise."""
    if group.is_open:
        return "open"
    value = (metadata or {}).get("Authorization")
    if value is None:
        raise Unauthorized("missing authorization")
    if not isinstance(value, str):
        raise Unauthorized("malformed authorization")
    scheme, space, payload = value.partition(" ")
    if not space:
        raise Unauthorized("malformed authorization")
    strategy = _strategy_for(group, scheme)
    if isinstance(strategy, BasicStrategy):
        ok = _check_basic(strategy, payload)
    elif isinstance(strategy, BearerStrategy):
        ok = hmac.compare_digest(_sha256(payload), strategy.token_sha256)
    else:
        ok = _check_external(strategy, value, external_check)
    if not ok:
        raise Unauthorized("invalid credentials")
    return strategy.name


def basic_authorization(username: str, password: str, scheme: str = "Basic") -> str:
    """``"Basic dXNlcjpwYXNz"`` for ``("user", "pass")``."""
    return f"{scheme} {base64.b64encode(f'{username}:{password}'.encode()).decode('ascii')}"


def bearer_authorization(token: str, scheme: str = "Bearer") -> str:
    """``"Bearer some-token"``: the token is sent as is."""
    return f"{scheme} {token}"


def _strategy_for(group: Group, scheme: str) -> Strategy:
    scheme = scheme.lower()
    for strategy in group.strategies:
        if strategy.scheme.lower() == scheme:
            return strategy
    raise Unauthorized("unknown scheme")


def _sha256(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    return hashlib.sha256(text).digest()


def _check_basic(strategy: BasicStrategy, payload: str) -> bool:
    try:  # as strict as Go's base64.StdEncoding: padded, nothing after the padding
        if len(payload) % 4:
            raise ValueError("unpadded")
        decoded = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        raise Unauthorized("malformed basic credentials") from None
    username, colon, password = decoded.partition(b":")
    if not colon:
        raise Unauthorized("malformed basic credentials")
    # Both comparisons always run (no short circuit) on fixed-size digests.
    user_ok = hmac.compare_digest(_sha256(username), _sha256(strategy.username))
    password_ok = hmac.compare_digest(_sha256(password), _sha256(strategy.password))
    return user_ok & password_ok


def _check_external(strategy: ExternalStrategy, authorization: str,
                    external_check: ExternalCheck | None) -> bool:
    if external_check is None:
        raise Unauthorized("external authorization unavailable")
    try:
        return bool(external_check(strategy, authorization))
    except Exception as exc:  # any failure of the auth service means "no"
        log.warning("external authorization failed (%r): %s", strategy, type(exc).__name__)
        raise Unauthorized("external authorization failed") from exc
