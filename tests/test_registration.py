"""Registration over real QUIC against a reverstd process: Go's bytes, codes and reasons."""
import pathlib
import time

import gevent
import pytest

from reverst import protocol
from reverst._transport import Endpoint
from reverst.client import BasicAuth, BearerAuth, Client, NotFound, ServerError, Unauthorized
from reverst.errors import ConnectionClosed

from .apps import app as flask_app

DATA = pathlib.Path(__file__).parent / "data"


def address(server):
    host, port = server.tunnel_address.rsplit(":", 1)
    return host, int(port)


class RawTunnel:
    """A QUIC connection to reverstd driven by hand, to send exact registration bytes."""

    def __init__(self, server, certs):
        self.endpoint = Endpoint.bind("127.0.0.1", 0)
        self.endpoint.start()
        cfg = self.endpoint.backend.client_configuration(server_name="localhost", idle_timeout=60.0,
                                                         max_datagram_size=1452, ca_file=certs["ca"])
        self.conn = self.endpoint.connect(address(server), cfg)
        with gevent.Timeout(5):
            self.conn.handshake_done.wait()

    def register(self, payload: bytes, timeout=5.0):
        """Send ``payload`` on stream 0 (no FIN); return (response bytes, ConnectionClosed or None)."""
        stream = self.conn.open_stream()
        stream.write(payload)
        data = b""
        with gevent.Timeout(timeout):
            try:
                while chunk := stream.read():
                    data += chunk
                if not data:  # FIN without a response: the close follows
                    self.conn.closed.wait()
            except ConnectionClosed:
                pass
        return data, self.conn.close_reason

    def close(self):
        self.endpoint.close()


@pytest.fixture
def raw(server, certs):
    tunnels = []

    def connect():
        t = RawTunnel(server, certs)
        tunnels.append(t)
        return t
    yield connect
    for t in tunnels:
        t.close()


@pytest.mark.parametrize("vector", ["request_basic_user_pass.bin", "request_bearer_some-token.bin"])
def test_go_client_bytes_register_and_get_go_response_bytes(raw, vector):
    data, closed = raw().register((DATA / vector).read_bytes())
    assert data == (DATA / "response_ok.bin").read_bytes()
    assert closed is None


@pytest.mark.parametrize("payload,code,reason", [
    (b"\xc1", 0x2, "bad request"),
    (b"\x01", 0x2, "bad request"),
    ((DATA / "request_noauth.bin").read_bytes(), 0x2, "unauthorized"),
    (protocol.encode_request(protocol.RegisterRequest(
        "local.example", {"Authorization": "Basic dXNlcjp3cm9uZw=="})), 0x2, "unauthorized"),
    (protocol.encode_request(protocol.RegisterRequest(
        "local.example", {"Authorization": "JWT t"})), 0x2, "unauthorized"),
    (protocol.encode_request(protocol.RegisterRequest(
        "nosuch.example", {"Authorization": "Basic dXNlcjpwYXNz"})), 0x1, "not found"),
])
def test_failed_registration_closes_connection_with_code_and_reason(raw, payload, code, reason):
    data, closed = raw().register(payload)
    assert data == b""
    assert isinstance(closed, ConnectionClosed)
    assert (closed.error_code, closed.reason, closed.application) == (code, reason, True)


def test_silent_client_does_not_delay_other_registrations(raw, server, certs):
    silent = raw()
    stream = silent.conn.open_stream()
    stream.write(b"\x83")  # the start of a map, then nothing
    start = time.monotonic()
    data, closed = raw().register((DATA / "request_basic_user_pass.bin").read_bytes())
    assert closed is None and data == (DATA / "response_ok.bin").read_bytes()
    assert time.monotonic() - start < 1.0
    assert silent.conn.is_open  # still waiting within its registration timeout


def test_oversized_registration_is_rejected(raw):
    data, closed = raw().register(b"\xdb\x00\x10\x00\x00" + b"x" * 70000, timeout=10)
    assert (closed.error_code, closed.reason) == (0x2, "bad request")


def _client(server, certs, **kwargs):
    kwargs.setdefault("ca_file", certs["ca"])
    kwargs.setdefault("server_name", "localhost")
    kwargs.setdefault("max_retries", 0)
    return Client(flask_app, server.tunnel_address, **kwargs)


def test_client_wrong_password_fails_at_once_with_unauthorized(server, certs):
    client = _client(server, certs, tunnel_group="app.test", auth=BasicAuth("user", "wrong"),
                     max_retries=None)
    start = time.monotonic()
    with gevent.Timeout(5), pytest.raises(Unauthorized, match="unauthorized"):
        client.dial_and_serve()
    assert time.monotonic() - start < 2


def test_client_unknown_group_is_not_found_after_retries(server, certs):
    client = _client(server, certs, tunnel_group="nosuch", auth=BasicAuth("user", "pass"),
                     max_retries=2, backoff=(0.05, 0.1))
    with gevent.Timeout(10), pytest.raises(NotFound, match="not found"):
        client.dial_and_serve()


def test_client_untrusted_certificate_reports_the_tls_reason(server):
    client = Client(flask_app, server.tunnel_address, tunnel_group="app.test", server_name="localhost",
                    max_retries=0)
    with gevent.Timeout(10), pytest.raises(ServerError) as info:
        client.dial_and_serve()
    assert "certificate" in str(info.value).lower()


def test_client_wrong_server_name_is_rejected(server, certs):
    client = _client(server, certs, tunnel_group="app.test", server_name="other.example",
                     auth=BasicAuth("user", "pass"))
    with gevent.Timeout(10), pytest.raises(ServerError, match="other.example"):
        client.dial_and_serve()


def test_client_registers_with_bearer_and_stops_cleanly(server, certs):
    ready = gevent.event.Event()
    client = _client(server, certs, tunnel_group="local.example", auth=BearerAuth("some-token"),
                     on_ready=lambda c: ready.set())
    runner = gevent.spawn(client.dial_and_serve)
    with gevent.Timeout(5):
        ready.wait()
    assert client.connection.is_open
    client.stop()
    with gevent.Timeout(5):
        runner.get()
    assert not client.connection.is_open
    server.wait_for(r"left group 'local.example'")


@pytest.fixture
def self_signed_ca_server(tmp_path, groups_file, procs):
    """reverstd whose certificate is self-signed and marked as a CA (openssl req -x509)."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from .conftest import Server
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    paths = {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = Server(paths, groups_file)
    procs.append(server)
    return server, paths["cert"]


def test_auto_falls_back_to_aioquic_for_a_self_signed_ca_certificate_that_qh3_refuses(self_signed_ca_server,
                                                                                       caplog):
    pytest.importorskip("qh3")
    server, cert = self_signed_ca_server
    ready = gevent.event.Event()
    client = Client(flask_app, server.tunnel_address, tunnel_group="app.test", server_name="localhost",
                    ca_file=cert, auth=BasicAuth("user", "pass"), quic_backend="auto", on_ready=lambda c: ready.set())
    assert client.backend.NAME == "qh3"
    runner = gevent.spawn(client.dial_and_serve)
    try:
        with gevent.Timeout(10):
            ready.wait()
        assert client.backend.NAME == "aioquic"
        assert sum("refused the certificate" in r.getMessage() for r in caplog.records) == 1
    finally:
        client.stop(2)
        runner.join(5)

    explicit = Client(flask_app, server.tunnel_address, tunnel_group="app.test", server_name="localhost",
                      ca_file=cert, auth=BasicAuth("user", "pass"), quic_backend="qh3", max_retries=0)
    with gevent.Timeout(10), pytest.raises(ServerError, match="certificate"):
        explicit.dial_and_serve()


@pytest.mark.parametrize("wait", [0.0, 0.002, 0.01])
def test_a_client_that_closes_right_after_registering_leaves_no_traceback(raw, server, wait):
    """The connection may close between the registration's answer and the start of HTTP/3
    on it (a client that registers and leaves at once): no traceback, and reverstd serves on."""
    from reverst.auth import basic_authorization
    payload = protocol.encode_request(protocol.RegisterRequest(
        "app.test", {"Authorization": basic_authorization("user", "pass")}))
    for _ in range(5):
        tunnel = raw()
        stream = tunnel.conn.open_stream()
        stream.write(payload)
        gevent.sleep(wait)
        tunnel.conn.close(0, "bye")
        tunnel.conn.transmit()
        tunnel.close()
    time.sleep(0.5)
    data, closed = raw().register(payload)
    assert closed is None and data
    assert "Traceback" not in server.output(), server.output()[-3000:]
