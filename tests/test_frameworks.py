"""The client with real frameworks: Django, and Flask behind wsgiref's PEP 3333 validator."""
import subprocess
import sys

import pytest
import requests

from .conftest import ROOT

H = {"Host": "app.test"}


def test_django_app_through_the_tunnel(server, start_client):
    start_client(app="tests.django_app:application")
    r = requests.get(server.url("/hello"), headers=H, timeout=10)
    assert (r.status_code, r.text) == (200, "Hello from Django")
    r = requests.post(server.url("/echo?a=1"), headers=H, data="payload", timeout=10)
    assert r.json() == {"method": "POST", "body": "payload", "host": "app.test", "remote": "127.0.0.1",
                        "query": {"a": "1"}}
    r = requests.get(server.url("/stream"), headers=H, timeout=10)
    assert r.text == "line 0\nline 1\nline 2\n"


def test_wsgi_validator_finds_nothing_wrong(server, start_client):
    client = start_client(app="tests.apps:validated")
    for method, path, data in [("GET", "/hello", None), ("POST", "/upload", b"x" * 100000),
                               ("GET", "/sse?delay=0", None), ("GET", "/cookies", None),
                               ("HEAD", "/hello", None)]:
        r = requests.request(method, server.url(path), headers=H, data=data, timeout=10)
        assert r.status_code in (200, 204), (path, r.status_code, client.output()[-2000:])
    assert not [line for line in client.lines if "WSGIWarning" in line or "AssertionError" in line]


def test_protocol_layers_import_without_gevent():
    code = ("import sys, reverst.protocol, reverst.config, reverst.auth, reverst.wsgi, "
            "reverst.http3, reverst.quic, reverst.durations, reverst.forwarding, reverst.policy, reverst.tls; "
            "assert 'gevent' not in sys.modules, 'gevent imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


@pytest.mark.parametrize("backend", ["aioquic", "qh3"])
def test_each_quic_backend_imports_without_gevent_or_the_other_library(backend):
    """The sans-io backends: each imports its own library only (and never gevent)."""
    pytest.importorskip(backend)
    other = {"aioquic": "qh3", "qh3": "aioquic"}[backend]
    code = (f"import sys; from reverst.quic import load_backend; b = load_backend({backend!r}); "
            f"assert b.NAME == {backend!r}; "
            f"assert 'gevent' not in sys.modules, 'gevent imported'; "
            f"assert {other!r} not in sys.modules, {other!r} + ' imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)
