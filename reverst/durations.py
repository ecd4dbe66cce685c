"""Go ``time.ParseDuration`` syntax ("500ms", "30s", "1h30m") as float seconds."""
from __future__ import annotations

import json
import re
from decimal import Decimal

_UNITS = {unit: Decimal(value) for unit, value in
          {"ns": "1e-9", "us": "1e-6", "µs": "1e-6", "μs": "1e-6", "ms": "1e-3", "s": 1, "m": 60, "h": 3600}.items()}
# Longer units first so "ms" is not read as "m" followed by a stray "s".  A number can
# be split only one way ("12" is never "1" then "2"): backtracking stays linear.
_TERM = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)"
_DURATION = re.compile(rf"[-+]?(?:{_TERM})+")
_MAX_SECONDS = (2**63 - 1) / 1e9


def parse_duration(text: str | int | float) -> float:
    """Return the duration in seconds; numbers are taken as seconds already.

    Like Go, a sign is allowed and a bare number needs a unit unless it is ``0``.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        raise TypeError(f"duration must be a string or a number, not {type(text).__name__}")
    if (text[1:] if text[:1] in ("+", "-") else text) == "0":
        return 0.0
    if not _DURATION.fullmatch(text):
        raise ValueError(f"invalid duration {json.dumps(text, ensure_ascii=False)}")
    seconds = float(sum(Decimal(number) * _UNITS[unit] for number, unit in re.findall(_TERM, text)))
    if seconds > _MAX_SECONDS:  # Go's int64 nanoseconds overflow
        raise ValueError(f"invalid duration {json.dumps(text, ensure_ascii=False)}")
    return -seconds if text.startswith("-") else seconds
