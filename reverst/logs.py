"""Log formatting for ``reverstd`` and the ``reverst`` clients: text or one JSON object a line.

Records may carry structured fields in ``extra={"fields": {...}}`` (the access log does:
method, host, path, status, bytes, duration_ms, tunnel, client); the text format shows
the message only, the JSON format adds the fields as top-level keys.

No secret reaches a log line through this module: callers never pass credentials, and
the access log leaves query strings out (they may carry tokens).
"""
from __future__ import annotations

import datetime
import json
import logging

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The logger of the access log: one info line per public request.
ACCESS_LOGGER = "reverst.access"

_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
                logging.ERROR: "error", logging.CRITICAL: "error"}


class JSONFormatter(logging.Formatter):
    """``{"time": ..., "level": ..., "logger": ..., "message": ..., **fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                    .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JSONFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(FORMATS)}")

def format_address(addr) -> str:
    """``host:port``, ``[v6]:port``, or ``?`` when unknown."""
    if not addr:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
