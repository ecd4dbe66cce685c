"""The impairment relay of bench/relay.py, for tests: loss, delay, jitter, duplication, a
bandwidth cap and a blackhole between a tunnel client and reverstd.

``bench/`` is not a package, so the module is loaded by path (once, as ``reverst_bench_relay``;
``load_bench(name)`` does that for any bench script).

    from .relay import Impairment, relay_factory, through  # noqa: F401 (fixture)

    def test_x(server, certs, procs, relay_factory):
        relay = relay_factory(server, up=Impairment(loss=0.01, delay=0.01), seed=1)
        procs.append(TunnelClient(through(relay), certs))
        relay.blackhole(True)  # the path dies mid-test
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
PATH = BENCH / "relay.py"


def load_bench(name: str):
    """``bench/<name>.py`` as the module ``reverst_bench_<name>`` (loaded once)."""
    module_name = f"reverst_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        # a bench script puts bench/ first on sys.path to import its siblings: never leave it
        # there, its file names would shadow packages (bench/ws_echo.py was websocket.py, and
        # hid websocket-client from the kubernetes package for the rest of the suite)
        sys.path[:] = path
    return module


relay_module = load_bench("relay")
Relay = relay_module.Relay
Impairment = relay_module.Impairment
parse_duration = relay_module.parse_duration
parse_rate = relay_module.parse_rate
parse_probability = relay_module.parse_probability
parse_address = relay_module.parse_address


class Through:
    """Stands in for a ``tests.conftest.Server`` where only ``tunnel_address`` is read (TunnelClient):
    the tunnel client dials the relay, which relays to the server."""

    def __init__(self, relay, server=None):
        self.relay = relay
        self.server = server
        self.tunnel_address = relay.address_str

    def __getattr__(self, name):  # url(), http_port... of the real server
        if self.server is None:
            raise AttributeError(name)
        return getattr(self.server, name)


def through(relay, server=None) -> Through:
    return Through(relay, server)


def target_of(obj) -> tuple[str, int]:
    """(host, port) from a server object (its ``tunnel_address``), "host:port" or a tuple."""
    if hasattr(obj, "tunnel_address"):
        obj = obj.tunnel_address
    if isinstance(obj, str):
        return parse_address(obj)
    return tuple(obj)


@pytest.fixture
def relay_factory():
    """``relay_factory(target, **Relay options)``: a started relay to ``target`` (a server object,
    "host:port" or a tuple), closed at the end of the test."""
    started = []

    def make(target, **kwargs):
        relay = Relay(target_of(target), **kwargs).start()
        started.append(relay)
        return relay
    yield make
    for relay in reversed(started):
        relay.close()
