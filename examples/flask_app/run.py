"""Run reverstd and expose the example Flask app through it, all on loopback.

    python examples/flask_app/run.py

Generates a self-signed certificate under examples/flask_app/certs/ on first run,
starts ``reverstd`` as a child process, registers the app with
``reverst.client.serve`` and prints the curl commands to try.  Ctrl-C stops both.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import pathlib
import re
import subprocess
import sys
import threading

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def ensure_certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (made once, never committed); not
    marked as a CA: the qh3 QUIC backend refuses a CA certificate as a server's own."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnel-address", default="127.0.0.1:7171")
    parser.add_argument("--http-address", default="127.0.0.1:8181")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic logs every connection at info
    cert, key = ensure_certificate(HERE / "certs")

    server = subprocess.Popen(
        [sys.executable, "-m", "reverst.cli", "reverstd", "-n", "localhost", "-c", str(cert), "-k", str(key),
         "-g", str(HERE / "groups.yml"), "-a", args.tunnel_address, "-s", args.http_address],
        stderr=subprocess.PIPE, text=True)
    listening = threading.Event()
    addresses = {}

    def relay():
        for line in server.stderr:
            sys.stderr.write("[reverstd] " + line)
            if m := re.search(r"public http on tcp (\S+)", line):
                addresses["http"] = m.group(1)
                listening.set()
        listening.set()
    threading.Thread(target=relay, daemon=True).start()
    if not listening.wait(15) or server.poll() is not None:
        sys.exit("reverstd did not start; see its output above")

    from app import app
    from reverst.client import BasicAuth, serve

    port = addresses["http"].rsplit(":", 1)[1]

    def ready(client):
        print(f"\nThe Flask app is reachable through the tunnel:\n"
              f"  curl -H 'Host: flask.localhost' http://127.0.0.1:{port}/\n"
              f"  curl -H 'Host: flask.localhost' http://127.0.0.1:{port}/api/time\n"
              f"  curl -N -H 'Host: flask.localhost' http://127.0.0.1:{port}/stream\n"
              f"  curl -H 'Host: flask.localhost' --data-binary @{__file__} http://127.0.0.1:{port}/upload\n"
              f"  echo hello | python {pathlib.Path(__file__).with_name('ws_client.py')} {port}   # a WebSocket\n"
              f"Ctrl-C stops it.\n", flush=True)

    try:  # (Ctrl-C stops serve() gracefully: the tunnel leaves with 0x0)
        serve(app, args.tunnel_address, tunnel_group="flask.localhost", server_name="localhost",
              ca_file=str(cert), auth=BasicAuth("example", "example-password"), on_ready=ready)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
