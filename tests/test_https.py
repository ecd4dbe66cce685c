"""The public HTTPS listener: certificates by SNI (the default one and each group's own,
made by trustme), rotation without a restart, unknown names, TLS versions, the redirect
of plain HTTP, and what the tunnel is told (X-Forwarded-Proto). Real reverstd, real
tunnels, real TLS clients (the ssl module and curl)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import warnings

import pytest
import trustme

from reverst.config import parse_groups
from reverst.errors import ConfigError

from .conftest import Server, TunnelClient
from .live import LiveServer, write_atomically

HTTPS_LINE = r"public https on tcp (\S+)"


class HttpsServer(Server):
    def __init__(self, certs, groups_path, default=None, extra=()):
        args = ["--https-address", "127.0.0.1:0", *extra]
        if default:
            args += ["--https-certificate-path", default[0], "--https-private-key-path", default[1]]
        super().__init__(certs, groups_path, extra=args)
        self.https_port = int(self.wait_for(HTTPS_LINE).group(1).rsplit(":", 1)[1])


class Pki:
    """A CA, and certificate files written where the groups file names them."""

    def __init__(self, directory):
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_path = str(directory / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)

    def issue(self, name, *hosts):
        """Write ``name.pem``/``name.key`` for ``hosts`` (atomically each); the certificate's serial."""
        cert = self.ca.issue_cert(*hosts)
        for suffix, blob in ((".key", cert.private_key_pem), (".pem", cert.cert_chain_pems[0])):
            tmp = self.dir / f".{name}{suffix}.tmp"
            blob.write_to_path(str(tmp))
            os.replace(tmp, self.dir / f"{name}{suffix}")
        return self.paths(name)

    def paths(self, name):
        return str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key")


GROUPS = """\
groups:
  app.test:
    hosts: [app.test]
    authentication: {basic: {username: user, password: pass}}
    tls: {certificate: app.pem, privateKey: app.key, redirectHttp: true}
  local.example:
    hosts: [local.example]
    authentication: {basic: {username: user, password: pass}}
    tls: {certificate: local.pem, privateKey: local.key}
  plain.test:
    hosts: [plain.test]
    authentication: {basic: {username: user, password: pass}}
"""


@pytest.fixture
def pki(tmp_path):
    p = Pki(tmp_path)
    p.issue("app", "app.test")
    p.issue("local", "local.example")
    p.issue("default", "default.test")
    (tmp_path / "groups.yml").write_text(GROUPS)
    return p


@pytest.fixture
def edge(pki, certs, procs):
    server = HttpsServer(certs, pki.dir / "groups.yml", default=pki.paths("default"))
    procs.append(server)
    procs.append(TunnelClient(server, certs, name="app"))
    procs.append(TunnelClient(server, certs, group="local.example", name="local"))
    procs.append(TunnelClient(server, certs, group="plain.test", name="plain"))
    return server


def client_context(pki, **kwargs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca_path)
    for k, v in kwargs.items():
        setattr(ctx, k, v)
    return ctx


class Tls:
    """One TLS connection to reverstd's HTTPS port with ``sni``; requests on it in turn."""

    def __init__(self, server, pki, sni, ctx=None, verify_name=True):
        ctx = ctx or client_context(pki)
        if not verify_name:
            ctx.check_hostname = False
        raw = socket.create_connection(("127.0.0.1", server.https_port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname=sni)

    @property
    def peer_names(self) -> list[str]:
        return [v for k, v in self.sock.getpeercert().get("subjectAltName", ()) if k == "DNS"]

    @property
    def serial(self) -> str:
        return self.sock.getpeercert()["serialNumber"]

    def get(self, path, host):
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        resp = http.client.HTTPResponse(self.sock)
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()

    def close(self):
        self.sock.close()


def test_each_group_gets_its_certificate_by_sni(edge, pki):
    for sni, name in (("app.test", b"app"), ("local.example", b"local")):
        conn = Tls(edge, pki, sni)
        try:
            assert conn.peer_names == [sni]
            assert conn.get("/name", sni)[::2] == (200, name)
            assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        finally:
            conn.close()


def test_curl_with_sni_to_two_groups(edge, pki):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    for host, name in (("app.test", "app"), ("local.example", "local")):
        done = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", pki.ca_path,
                               "--resolve", f"{host}:{edge.https_port}:127.0.0.1",
                               f"https://{host}:{edge.https_port}/name"], capture_output=True, text=True, timeout=20)
        assert (done.returncode, done.stdout) == (0, name), done.stderr


def test_the_tunnel_is_told_https(edge, pki):
    conn = Tls(edge, pki, "app.test")
    try:
        status, _, body = conn.get("/echo", "app.test")
    finally:
        conn.close()
    data = json.loads(body)
    headers = {k.lower(): v for k, v in data["headers"]}
    assert status == 200 and headers["x-forwarded-proto"] == "https" and data["scheme"] == "https"


def test_an_unknown_or_certificate_less_name_gets_the_default_certificate(edge, pki):
    for sni, host in (("nobody.test", "plain.test"), ("plain.test", "plain.test")):
        conn = Tls(edge, pki, sni, verify_name=False)
        try:
            assert conn.peer_names == ["default.test"]
            assert conn.get("/name", host)[::2] == (200, b"plain")
        finally:
            conn.close()


def test_without_a_default_an_unknown_name_is_a_handshake_alert_and_the_server_carries_on(pki, certs, procs):
    server = HttpsServer(certs, pki.dir / "groups.yml")
    procs.append(server)
    procs.append(TunnelClient(server, certs, name="app"))
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
        Tls(server, pki, "nobody.test", verify_name=False)
    conn = Tls(server, pki, "app.test")
    try:
        assert conn.get("/name", "app.test")[::2] == (200, b"app")
    finally:
        conn.close()


def test_tls_older_than_1_2_is_refused(edge, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (that is the point)
        try:
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        Tls(edge, pki, "app.test", ctx=ctx)


def test_a_rotated_certificate_serves_new_handshakes_and_open_connections_keep_theirs(edge, pki):
    before = Tls(edge, pki, "app.test")
    old_serial = before.serial
    pki.issue("app", "app.test")
    deadline = time.monotonic() + 10
    while True:
        conn = Tls(edge, pki, "app.test")
        serial = conn.serial
        conn.close()
        if serial != old_serial:
            break
        assert time.monotonic() < deadline, "the new certificate was never served"
        time.sleep(0.2)
    try:
        assert before.get("/name", "app.test")[::2] == (200, b"app")  # the open connection carries on
        assert before.serial == old_serial
    finally:
        before.close()
    assert "certificate" in edge.output() and "reloaded" in edge.output()


def test_plain_http_is_redirected_for_groups_that_ask_and_served_for_the_others(edge):
    conn = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=10)
    try:
        conn.request("GET", "/name?x=1", headers={"Host": "app.test"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 308
        assert resp.getheader("Location") == f"https://app.test:{edge.https_port}/name?x=1"
        conn.request("GET", "/name", headers={"Host": "local.example"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"local")
    finally:
        conn.close()


def test_garbage_instead_of_a_handshake_does_not_hurt(edge, pki):
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        try:
            s.recv(100)
        except ConnectionError:
            pass
    conn = Tls(edge, pki, "app.test")
    try:
        assert conn.get("/name", "app.test")[0] == 200
    finally:
        conn.close()


# -- configuration ---------------------------------------------------------------------------------
def test_bad_tls_keys_are_one_line_errors_naming_file_group_and_key(pki):
    other = pki.issue("other", "other.test")
    cases = [
        ("{certificate: missing.pem, privateKey: app.key}",
         f'groups."g".tls.certificate: cannot read "{pki.dir}/missing.pem": No such file or directory'),
        (f"{{certificate: app.pem, privateKey: {other[1]}}}",
         'groups."g".tls.privateKey: the private key does not match the certificate'),
        ("{certificate: app.pem}", 'groups."g".tls.privateKey: required'),
        ("{certificate: app.pem, privateKey: app.key, redirectHttp: yes please}",
         'groups."g".tls.redirectHttp: must be true or false'),
    ]
    for tls, message in cases:
        with pytest.raises(ConfigError) as info:
            parse_groups(f"groups:\n  g:\n    tls: {tls}\n", "groups.yml", base_dir=str(pki.dir))
        assert str(info.value) == f"groups.yml: {message}"


def test_a_reload_with_a_bad_certificate_keeps_the_last_good_version(pki, certs, procs):
    server = LiveServer(certs, pki.dir / "groups.yml",
                        extra=["-w", "--https-address", "127.0.0.1:0"])
    procs.append(server)
    server.https_port = int(server.wait_for(HTTPS_LINE).group(1).rsplit(":", 1)[1])
    procs.append(TunnelClient(server, certs, name="app"))
    mark = server.mark()
    write_atomically(pki.dir / "groups.yml", GROUPS.replace("privateKey: app.key", "privateKey: local.key"))
    line = server.wait_after(mark, r"tunnel groups not reloaded", timeout=8).string
    assert line.rstrip().endswith('groups."app.test".tls.privateKey: the private key does not match the certificate')
    conn = Tls(server, pki, "app.test")
    try:
        assert conn.peer_names == ["app.test"] and conn.get("/name", "app.test")[::2] == (200, b"app")
    finally:
        conn.close()


def test_a_bad_default_certificate_is_a_one_line_usage_error(pki, certs):
    done = subprocess.run([sys.executable, "-m", "reverst.cli", "reverstd",
                           "-n", "localhost", "-k", certs["key"], "-c", certs["cert"], "-g", str(pki.dir / "groups.yml"),
                           "--https-address", "127.0.0.1:0", "--https-certificate-path", pki.paths("app")[0],
                           "--https-private-key-path", pki.paths("local")[1]],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("Error: Invalid value for --https-private-key-path: "
                                                    "the private key does not match the certificate")
