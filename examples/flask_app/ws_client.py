"""Talk to the example's WebSocket route (/ws) through the tunnel: each line you type
comes back upper-cased.  python examples/flask_app/ws_client.py [PUBLIC_PORT]"""
import socket
import sys

from websockets.sync.client import connect

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8181
# The tunnel routes by Host (flask.localhost); connect to the public port on loopback.
with connect("ws://flask.localhost/ws", sock=socket.create_connection(("127.0.0.1", port))) as ws:
    print("connected; type a line (Ctrl-D ends)")
    for line in sys.stdin:
        ws.send(line.rstrip("\n"))
        print(ws.recv(timeout=10))
