"""WebSocket applications served through the tunnel by tests/test_websocket.py."""
from flask import Flask
from flask_sock import Sock


def echo(ws):
    while True:
        message = ws.receive()
        if message is None:
            return
        ws.send(message)


app = Flask(__name__)
Sock(app).route("/echo")(echo)


@app.route("/plain")
def plain():
    return "not a websocket"


pinging = Flask("pinging")
pinging.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 0.5}  # simple-websocket selects on the socket
Sock(pinging).route("/echo")(echo)
