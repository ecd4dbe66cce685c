"""Run reverstd and expose the example Django app through it, all on loopback.

    python examples/django_app/run.py [--tunnel-address 127.0.0.1:7171] [--http-address 127.0.0.1:8181]

Reuses the self-signed certificate of the Flask example (examples/flask_app/certs/,
generated on first run), starts ``reverstd`` as a child process with this directory's
``groups.yml``, registers the Django app of ``app.py`` with ``reverst.client.serve`` in
the group ``django.localhost`` and prints the curl commands to try.  Ctrl-C (or SIGTERM)
stops both.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import pathlib
import re
import signal
import subprocess
import sys
import threading

HERE = pathlib.Path(__file__).resolve().parent
FLASK_EXAMPLE = HERE.parent / "flask_app"


def _flask_example_helpers():
    """examples/flask_app/run.py as a module (for ``ensure_certificate``), without letting
    it put examples/flask_app first on sys.path (its ``app`` module is not ours)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("_reverst_flask_example_run", FLASK_EXAMPLE / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnel-address", default="127.0.0.1:7171")
    parser.add_argument("--http-address", default="127.0.0.1:8181")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic logs every connection at info
    cert, key = _flask_example_helpers().ensure_certificate(FLASK_EXAMPLE / "certs")

    server = subprocess.Popen(
        [sys.executable, "-m", "reverst.cli", "reverstd", "-n", "localhost", "-c", str(cert), "-k", str(key),
         "-g", str(HERE / "groups.yml"), "-a", args.tunnel_address, "-s", args.http_address],
        stderr=subprocess.PIPE, text=True)
    listening = threading.Event()
    addresses = {}

    def relay():
        for line in server.stderr:
            sys.stderr.write("[reverstd] " + line)
            if m := re.search(r"listening for tunnels on udp (\S+), public http on tcp (\S+)", line):
                addresses["tunnel"], addresses["http"] = m.group(1), m.group(2)
                listening.set()
        listening.set()
    threading.Thread(target=relay, daemon=True).start()
    if not listening.wait(15) or server.poll() is not None:
        server.kill()
        sys.exit("reverstd did not start; see its output above")

    sys.path.insert(0, str(HERE))
    import gevent
    from app import application  # the Django WSGI application
    from reverst.client import BasicAuth, serve

    url = f"http://127.0.0.1:{addresses['http'].rsplit(':', 1)[1]}"

    def ready(client):
        print(f"\nThe Django app is reachable through the tunnel:\n"
              f"  curl -H 'Host: django.localhost' {url}/\n"
              f"  curl -H 'Host: django.localhost' {url}/api/time\n"
              f"  curl -H 'Host: django.localhost' --data-binary @{__file__} {url}/upload\n"
              f"  curl -H 'Host: django.localhost' -H 'Transfer-Encoding: chunked' "
              f"--data-binary @{__file__} {url}/upload\n"
              f"Ctrl-C stops it.\n", flush=True)

    main_greenlet = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.kill(main_greenlet, KeyboardInterrupt))
    try:
        serve(application, addresses["tunnel"], tunnel_group="django.localhost", server_name="localhost",
              ca_file=str(cert), auth=BasicAuth("example", "example-password"), on_ready=ready)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
