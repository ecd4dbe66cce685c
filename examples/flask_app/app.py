"""A small Flask app to expose through a reverst tunnel."""
import hashlib
import time

from flask import Flask, Response, jsonify, request
from flask_sock import Sock

app = Flask(__name__)
# ping_interval keeps idle sockets alive through proxies; receive_bytes: simple-websocket's
# 4 KiB reads are slow for large messages
app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 25, "receive_bytes": 65536}
sock = Sock(app)


@app.get("/")
def index():
    return "Hello from Flask, through a reverst tunnel!\n"


@app.get("/api/time")
def api_time():
    return jsonify(time=time.time(), host=request.host, client=request.remote_addr)


@app.get("/stream")
def stream():
    """Server-sent events: each arrives as it is produced (the Go server buffers them)."""
    def events():
        for i in range(5):
            yield f"data: tick {i}\n\n"
            time.sleep(0.5)
    return Response(events(), mimetype="text/event-stream")


@app.post("/upload")
def upload():
    """Streams the body through SHA-256 without holding it in memory."""
    digest, size = hashlib.sha256(), 0
    while chunk := request.stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return jsonify(size=size, sha256=digest.hexdigest())


@sock.route("/ws")
def ws_echo(ws):
    """A WebSocket (flask-sock, unchanged): each message comes back upper-cased."""
    while (message := ws.receive()) is not None:
        ws.send(message.upper() if isinstance(message, str) else message)
