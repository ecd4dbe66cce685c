"""bench/soak.py for a minute on this environment's QUIC backend (REVERST_QUIC_BACKEND;
the suite runs once per backend, so CI soaks two minutes in all, within its 20-minute
budget): small GETs, 5-20 MiB downloads, chunked and SSE responses and checked uploads
through reverstd to ``reverst expose`` and to a WSGI client, while a second client of each group is restarted every 15 s. No request may fail,
reverstd's RSS may not grow after the warm-up, and nothing may stay open.

``REVERST_SOAK_SECONDS`` changes the length of the load (shorter when developing).
"""
from __future__ import annotations

import os

import pytest

from .relay import load_bench

soak = load_bench("soak")

QUIC = os.environ.get("REVERST_QUIC_BACKEND", "auto")
SECONDS = float(os.environ.get("REVERST_SOAK_SECONDS", "60"))
WARMUP = min(20.0, SECONDS / 3)
RECONNECT_SECONDS = 15.0


@pytest.mark.timeout(SECONDS + 120)
def test_mixed_load_with_reconnects_leaves_nothing_behind(tmp_path):
    lines: list[str] = []

    def out(line):
        lines.append(line)
        print(line, flush=True)
    result = soak.soak(QUIC, SECONDS, warmup=WARMUP, sample_seconds=5, reconnect_seconds=RECONNECT_SECONDS,
                       workers=4, tmp=tmp_path, logs_dir=tmp_path / "logs", out=out)
    verdict, report = result["verdict"], "\n".join(lines) + f"\n(logs in {tmp_path / 'logs'})"
    assert verdict["requests"]["failed"] == 0, report
    assert all(n["ok"] for n in verdict["per_kind"].values()), f"a kind of request never ran: {report}"
    assert verdict["reconnects"] >= int(SECONDS // RECONNECT_SECONDS) - 1, report
    assert not [e for e in result["reconnect_events"] if e.get("error")], report
    assert verdict["rss"]["reverstd"]["growth_mb"] <= soak.RSS_LIMIT_MB, report
    fds = verdict["fds"]["reverstd"]
    assert abs(fds["end"] - fds["baseline"]) <= soak.FD_SLACK, report
    end = verdict["end"]
    assert end["open_streams"] == end["in_flight"] == end["in_flight_status"] == end["public_connections"] == 0, \
        report
    assert verdict["pass"], report
