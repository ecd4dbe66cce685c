"""A reverstd whose tunnel groups arrive late, for the /readyz tests.

``python -m tests.unready_server CERT KEY GROUPS``: a :class:`TunnelServer` started with
``groups=None`` (its ``groups_loaded`` event unset, as while a groups source is still
unreachable) on ephemeral ports with a management listener; SIGUSR1 loads ``GROUPS`` and
applies it with ``update_groups`` (what a loader does once the source answers); SIGTERM stops.
"""
import logging
import signal
import sys

import gevent

from reverst.config import load_groups
from reverst.server import TunnelServer


def main(cert: str, key: str, groups_path: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    server = TunnelServer(None, certificate_path=cert, private_key_path=key, server_name="localhost",
                          tunnel_address=("127.0.0.1", 0), http_address=("127.0.0.1", 0),
                          management_address=("127.0.0.1", 0))
    server.start()
    gevent.signal_handler(signal.SIGUSR1, lambda: gevent.spawn(server.update_groups, load_groups(groups_path)))
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(server.stop))
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:4])
