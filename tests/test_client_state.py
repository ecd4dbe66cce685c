"""``Client.state`` and ``Client.on_state_change`` against real reverstd processes."""
from __future__ import annotations

import logging
import signal
import time

import gevent
import pytest

from reverst.client import BasicAuth, Client, Unauthorized

from .apps import app as flask_app
from .conftest import Server


def wait_state(client, state, timeout=15.0):
    with gevent.Timeout(timeout, AssertionError(f"state {client.state!r}, not {state!r}, after {timeout}s")):
        while client.state != state:
            gevent.sleep(0.02)


def _check_agreement(client, samples: list, disagreements: list) -> None:
    """Sample (state, connections) as often as the hub lets a greenlet run: "connected"
    exactly when ``connections`` is not empty."""
    while True:
        state, count = client.state, len(client.connections)
        samples.append(state)
        if (state == "connected") != (count > 0):
            disagreements.append((state, count))
        gevent.sleep(0)


def test_state_follows_connect_loss_reconnect_and_stop(certs, groups_file, procs, caplog):
    caplog.set_level(logging.INFO, logger="reverst.client")
    server = Server(certs, groups_file)
    procs.append(server)
    client = Client(flask_app, server.tunnel_address, tunnel_group="app.test", server_name="localhost",
                    ca_file=certs["ca"], auth=BasicAuth("user", "pass"), backoff=(0.05, 0.2),
                    handshake_timeout=1.0)
    seen = []
    client.on_state_change(lambda c, state: seen.append((c is client, state)))
    # Every state-change callback also sees the list agreeing with the new state.
    client.on_state_change(lambda c, state: seen.append(("agrees", (state == "connected") == bool(c.connections))))
    assert client.state == "connecting"
    samples, disagreements = [], []
    sampler = gevent.spawn(_check_agreement, client, samples, disagreements)
    runner = gevent.spawn(client.dial_and_serve)
    try:
        wait_state(client, "connected")
        server.stop(signal.SIGTERM)  # closes the tunnel with 0x0
        wait_state(client, "reconnecting")
        again = Server(certs, groups_file, extra=["-a", server.tunnel_address])  # same port
        procs.append(again)
        wait_state(client, "connected")
    finally:
        client.stop(2)
        runner.join(5)
        sampler.kill()
    assert client.state == "stopped"
    assert [s for who, s in seen if who != "agrees"] == ["connected", "reconnecting", "connected", "stopped"]
    assert all(flag for who, flag in seen if who == "agrees") and len(seen) == 8
    assert all(same for same, _ in seen if same != "agrees")
    assert {"connecting", "connected", "reconnecting"} <= set(samples) and len(samples) > 100
    assert not disagreements, disagreements[:5]
    messages = [r.getMessage() for r in caplog.records if r.name == "reverst.client"]
    assert sum("registered with" in m for m in messages) == 2
    assert any("lost (server draining" in m and "reconnecting in" in m for m in messages)


def test_state_is_stopped_after_a_fatal_error(server, certs):
    client = Client(flask_app, server.tunnel_address, tunnel_group="app.test", server_name="localhost",
                    ca_file=certs["ca"], auth=BasicAuth("user", "wrong"))
    seen = []
    client.on_state_change(lambda c, state: seen.append(state))
    with gevent.Timeout(10), pytest.raises(Unauthorized):
        client.dial_and_serve()
    assert client.state == "stopped" and seen == ["stopped"]


def test_a_failing_callback_does_not_break_the_client(server, certs):
    client = Client(flask_app, server.tunnel_address, tunnel_group="app.test", server_name="localhost",
                    ca_file=certs["ca"], auth=BasicAuth("user", "pass"), connections=2)
    seen = []

    def boom(c, state):
        raise RuntimeError("callback bug")
    client.on_state_change(boom)
    client.on_state_change(lambda c, state: seen.append(state))
    runner = gevent.spawn(client.dial_and_serve)
    try:
        with gevent.Timeout(10):
            while len(client.connections) < 2:
                gevent.sleep(0.02)
        assert client.state == "connected"
    finally:
        client.stop(2)
        runner.join(5)
    assert seen == ["connected", "stopped"]  # two connections, one change


def test_stop_while_dialling_a_server_that_is_down_returns_at_once(certs):
    """A slot waiting for a handshake that never comes must not hold stop() up for the
    handshake timeout."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % s.getsockname()[1]  # a port that answers nothing
        client = Client(flask_app, address, tunnel_group="app.test", server_name="localhost",
                        ca_file=certs["ca"], auth=BasicAuth("user", "pass"), handshake_timeout=10.0)
        runner = gevent.spawn(client.dial_and_serve)
        gevent.sleep(0.5)  # dialling
        assert client.state == "connecting"
        start = time.monotonic()
        client.stop(2)
        runner.join(5)
        assert runner.dead and runner.exception is None
        assert time.monotonic() - start < 1.0
        assert client.state == "stopped"


SERVE_SCRIPT = """
import signal, sys
# Python's own handler, even where SIGINT came in ignored (a background job of a shell):
signal.signal(signal.SIGINT, signal.default_int_handler)
from tests.apps import app
from reverst.client import BasicAuth, serve
serve(app, sys.argv[1], tunnel_group="app.test", server_name="localhost", ca_file=sys.argv[2],
      auth=BasicAuth("user", "pass"), on_ready=lambda c: print("READY", flush=True), grace_period=5)
print("RETURNED", flush=True)
try:
    signal.raise_signal(signal.SIGINT)  # Python's own handling is back: KeyboardInterrupt
except KeyboardInterrupt:
    print("KEYBOARDINTERRUPT", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_gracefully_on_a_signal_and_gives_the_signal_back(server, certs, sig):
    """``reverst.client.serve()`` in a script: Ctrl-C or SIGTERM stops it as the CLI's stop
    does (the tunnel leaves with 0x0, serve() returns), not with a KeyboardInterrupt that
    leaves reverstd to find the tunnel dead."""
    import subprocess
    import sys
    from .conftest import ROOT
    p = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, server.tunnel_address, certs["ca"]], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "READY"
        p.send_signal(sig)
        out, err = p.communicate(timeout=15)
    finally:
        p.kill()
    assert p.returncode == 0, err[-2000:]
    assert out.split() == ["RETURNED", "KEYBOARDINTERRUPT"], (out, err[-2000:])
    server.wait_for(r"left group 'app.test': client closing \(application error 0x0\)", timeout=5)
