"""WSGI/Flask applications served through the tunnel by the end-to-end tests."""
import contextvars
import hashlib
import os
import random
import time

from flask import Flask, Response, request, stream_with_context

app = Flask(__name__)
NAME = os.environ.get("APP_NAME", "app")
BLOCK = bytes(range(256)) * 256  # 64 KiB of a known pattern


def pattern(size: int):
    """``size`` bytes of BLOCK repeated, streamed."""
    while size > 0:
        chunk = BLOCK[:min(size, len(BLOCK))]
        size -= len(chunk)
        yield chunk


@app.route("/hello")
def hello():
    return "Hello, World!"


#: set by /context: a request that finds it set saw a value from an earlier request
LEFT_OVER = contextvars.ContextVar("left_over", default="unset")


@app.route("/context")
def context():
    """This request's view of LEFT_OVER (then set) and the greenlet it runs in."""
    import gevent
    seen = LEFT_OVER.get()
    LEFT_OVER.set("set by an earlier request")
    return {"seen": seen, "greenlet": id(gevent.getcurrent())}


@app.route("/name")
def name():
    return NAME


@app.route("/status/<int:code>")
def status(code):
    if code in (204, 304):
        return Response(status=code, headers={"ETag": '"abc"'} if code == 304 else {})
    return Response(f"status {code}", status=code)


@app.route("/echo", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def echo():
    body = request.get_data()
    return {
        "method": request.method,
        "path": request.environ["PATH_INFO"],
        "raw_uri": request.environ["REQUEST_URI"],
        "query": request.environ["QUERY_STRING"],
        "args": request.args.to_dict(flat=False),
        "headers": [[k, v] for k, v in request.headers.items()],
        "remote_addr": request.remote_addr,
        "scheme": request.environ["wsgi.url_scheme"],
        "host": request.host,
        "body_len": len(body),
    }


@app.route("/cookies")
def cookies():
    resp = Response("cookies")
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("Set-Cookie", "b=2; HttpOnly")
    resp.headers.add("X-Multi", "m1")
    resp.headers.add("X-Multi", "m2")
    return resp


@app.route("/sleep")
def sleep():
    ms = int(request.args.get("ms", random.randint(0, 900)))
    time.sleep(ms / 1000)
    return f"slept {request.args.get('id', '')}"


@app.route("/upload", methods=["POST", "PUT"])
def upload():
    digest = hashlib.sha256()
    size = 0
    stream = request.environ["wsgi.input"]
    while chunk := stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


@app.route("/download/<int:size>")
def download(size):
    return Response(pattern(size), mimetype="application/octet-stream",
                    headers={"Content-Length": str(size)})


@app.route("/stream/<int:size>")
def stream_unknown_length(size):
    return Response(pattern(size), mimetype="application/octet-stream")


@app.route("/sse")
def sse():
    delay = float(request.args.get("delay", "1.0"))

    def events():
        yield "data: first\n\n"
        time.sleep(delay)
        yield "data: second\n\n"
    return Response(stream_with_context(events()), mimetype="text/event-stream")


@app.route("/hop")
def hop():
    # Connection-specific headers: the tunnel client must drop them (Go's reverstd
    # would kill the whole tunnel connection on receiving one).
    return Response("hop", headers={"Connection": "X-Resp-Hop", "X-Resp-Hop": "1",
                                    "Keep-Alive": "timeout=5", "X-Kept": "yes"})


@app.route("/boom")
def boom():
    raise RuntimeError("boom")


@app.route("/slow-body")
def slow_body():
    def gen():
        for _ in range(100):
            yield BLOCK
            time.sleep(0.1)
    return Response(gen(), mimetype="application/octet-stream")


def validated(environ, start_response):
    """The Flask app behind wsgiref's PEP 3333 validator (checks our environ and calls)."""
    from wsgiref.validate import validator
    return validator(app)(environ, start_response)


@app.route("/boom-midway")
def boom_midway():
    def gen():
        yield b"partial "
        raise RuntimeError("boom after the status was sent")
    return Response(gen(), mimetype="text/plain")


def pieces(count: int) -> list[bytes]:
    """``count`` distinct 64 KiB pieces (a lost or reordered one changes the body)."""
    return [bytes([i % 251]) * 65536 for i in range(count)]


def pieces_app(environ, start_response):
    """A plain WSGI app answering ``/N`` with a body that is a list of N pieces and no
    Content-Length (the tunnel client adds it)."""
    body = pieces(int(environ["PATH_INFO"].strip("/") or 0))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return body
