"""End to end: public HTTP/1.1 -> reverstd -> QUIC/HTTP/3 -> Python client -> Flask."""
import concurrent.futures
import json
import signal
import socket
import time

import pytest
import requests


H = {"Host": "app.test"}


def raw_request(server, request: bytes) -> bytes:
    """Send raw bytes to the public port; everything read until the server closes."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def get(server, path, **kw):
    kw.setdefault("timeout", 10)
    headers = {**H, **kw.pop("headers", {})}
    return requests.get(server.url(path), headers=headers, **kw)


def test_hello_world_passes_through(tunnel):
    r = get(tunnel, "/hello")
    assert r.status_code == 200
    assert r.text == "Hello, World!"
    assert r.headers["Content-Length"] == "13"


def test_handler_status_and_body_pass_through(tunnel):
    r = get(tunnel, "/status/400")
    assert (r.status_code, r.text) == (400, "status 400")
    assert r.reason == "Bad Request"


def test_routing_by_host_without_port_and_by_x_forwarded_host(tunnel):
    assert get(tunnel, "/hello", headers={"Host": "app.test:8181"}).text == "Hello, World!"
    r = get(tunnel, "/echo", headers={"Host": "unknown.invalid", "X-Forwarded-Host": "app.test"})
    assert r.status_code == 200
    assert r.json()["host"] == "unknown.invalid"  # routing used XFH; Host is not rewritten


def test_unknown_host_is_502_bad_gateway(server):
    r = requests.get(server.url("/"), headers={"Host": "nosuch.example"}, timeout=5)
    assert r.status_code == 502
    assert r.text == "bad gateway\n"
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_group_without_connection_is_empty_502(server):
    r = requests.get(server.url("/"), headers={"Host": "empty.test"}, timeout=5)
    assert r.status_code == 502
    assert r.content == b""


def test_two_clients_alternate_round_robin(server, start_client):
    start_client(name="a")
    start_client(name="b")
    names = [get(server, "/name").text for _ in range(10)]
    assert names == ["a", "b"] * 5  # as Go: the first registered first


def test_round_robin_after_the_group_shrinks_and_grows_starts_on_the_oldest(server, start_client):
    """Go's cursor wraps at the size of the set when it picks: after a lone tunnel served a
    request and left, the two that register next are served in their order (one server
    across both phases: the cursor is what the bug was about)."""
    lone = start_client(name="lone")
    assert get(server, "/name").text == "lone"
    lone.stop(signal.SIGTERM)
    server.wait_for(r"left group 'app.test'")
    start_client(name="a")
    start_client(name="b")
    names = [get(server, "/name").text for _ in range(10)]
    assert names == ["a", "b"] * 5


@pytest.mark.parametrize("threads", ["0", "4"])
def test_requests_do_not_see_each_others_context(server, start_client, threads):
    """In greenlets a request runs on a reused greenlet (one after another here), each
    time in a fresh contextvars context, as in a new greenlet or thread."""
    start_client(extra=("--threads", threads))
    answers = [get(server, "/context").json() for _ in range(6)]
    assert [a["seen"] for a in answers] == ["unset"] * 6
    if threads == "0":
        assert len({a["greenlet"] for a in answers}) < 6  # a greenlet served more than one


def test_headers_forwarded_like_go(tunnel):
    r = get(tunnel, "/echo?x=1", headers={
        "Connection": "keep-alive, X-Custom", "X-Custom": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Connection": "keep-alive", "X-Forwarded-For": "10.1.2.3"})
    body = r.json()
    names = {k.lower(): v for k, v in body["headers"]}
    for gone in ("x-custom", "keep-alive", "proxy-connection"):
        assert gone not in names
    assert names["te"] == "trailers"
    assert names["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert body["remote_addr"] == "127.0.0.1"
    assert body["scheme"] == "https"


def test_repeated_request_headers_and_cookies(tunnel):
    data = raw_request(tunnel, b"GET /echo HTTP/1.1\r\nHost: app.test\r\nCookie: a=1\r\nCookie: b=2\r\n"
                               b"X-Multi: one\r\nX-Multi: two\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[:int(size, 16)]
    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert headers["cookie"] == "a=1; b=2"
    assert headers["x-multi"] == "one, two"


def test_repeated_response_headers_stay_separate(tunnel):
    r = get(tunnel, "/cookies")
    raw = r.raw._original_response.msg
    assert raw.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    assert raw.get_all("X-Multi") == ["m1", "m2"]


@pytest.mark.parametrize("query", ["q=a+b&e=%2F", "x=1&y=%20z", "p=a%2Bb%26c%3D"])
def test_query_strings_are_untouched(tunnel, query):
    body = get(tunnel, f"/echo?{query}").json()
    assert body["query"] == query
    assert body["raw_uri"] == f"/echo?{query}"


def test_encoded_slash_in_path_is_untouched(tunnel):
    data = raw_request(tunnel, b"GET /p%2Fq/%7Euser HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 404")  # reached Flask, which has no such route


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_methods(tunnel, method):
    r = requests.request(method, tunnel.url("/echo"), headers=H, data=b"abc" if method in ("POST", "PUT", "PATCH") else None,
                         timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["method"] == method
    assert body["body_len"] == (3 if method in ("POST", "PUT", "PATCH") else 0)


def test_head_has_no_body(tunnel):
    r = requests.head(tunnel.url("/hello"), headers=H, timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == "13"
    assert r.content == b""


@pytest.mark.parametrize("code", [204, 304])
def test_no_body_statuses(tunnel, code):
    r = get(tunnel, f"/status/{code}")
    assert r.status_code == code
    assert r.content == b""
    assert "Content-Length" not in r.headers or r.headers["Content-Length"] == "0"


def test_sse_first_event_arrives_before_handler_finishes(tunnel):
    start = time.monotonic()
    with get(tunnel, "/sse?delay=2", stream=True) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        chunks = r.iter_content(None)
        first = next(chunks)
        first_at = time.monotonic() - start
        rest = b"".join(chunks)
    assert first == b"data: first\n\n"
    assert first_at < 1.5, f"first event took {first_at:.2f}s: buffered"
    assert b"data: second" in rest


def test_connection_specific_response_headers_are_dropped_and_tunnel_survives(tunnel):
    r = get(tunnel, "/hop")
    assert r.status_code == 200 and r.text == "hop"
    assert r.headers["X-Kept"] == "yes"
    assert "X-Resp-Hop" not in r.headers and "Keep-Alive" not in r.headers
    assert get(tunnel, "/hello").status_code == 200


def test_app_exception_is_500_and_tunnel_survives(tunnel):
    r = get(tunnel, "/boom")
    assert r.status_code == 500
    assert get(tunnel, "/hello").text == "Hello, World!"


def test_concurrent_requests_with_slow_handlers_and_client_timeouts(tunnel):
    """Go's integration suite: random 0-900 ms handlers, 500 ms client timeouts."""
    def one(i):
        try:
            r = requests.get(tunnel.url(f"/sleep?id={i}"), headers=H, timeout=0.5)
        except requests.exceptions.Timeout:
            return "timeout"
        except requests.exceptions.ConnectionError as exc:
            if "timed out" in str(exc):
                return "timeout"
            return f"error: {exc}"
        return "ok" if (r.status_code, r.text) == (200, f"slept {i}") else f"bad: {r.status_code} {r.text!r}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=1000) as pool:
        results = list(pool.map(one, range(1000)))
    print(f"\n1000 concurrent: {results.count('ok')} ok, {results.count('timeout')} timed out")
    bad = [r for r in results if r not in ("ok", "timeout")]
    assert not bad, bad[:5]
    assert results.count("ok") > 0
    assert get(tunnel, "/hello", timeout=10).status_code == 200


def test_tunnel_client_killed_mid_response_fails_fast_and_server_survives(server, start_client):
    client = start_client()
    start = time.monotonic()
    with pytest.raises(requests.exceptions.RequestException):
        with get(server, "/slow-body", stream=True, timeout=30) as r:
            it = r.iter_content(65536)
            next(it)
            client.stop(sig=9)
            for _ in it:
                pass
    assert time.monotonic() - start < 10
    assert requests.get(server.url("/"), headers={"Host": "nosuch"}, timeout=5).status_code == 502
    start_client()
    assert get(server, "/hello").text == "Hello, World!"


def test_a_killed_tunnel_is_dropped_at_once_and_safe_requests_go_to_another_one(server, start_client):
    """A tunnel client gone without a CONNECTION_CLOSE (SIGKILL; a Go client exiting on
    SIGTERM before quic-go flushed its close): the first datagram to its closed port draws
    an ICMP unreachable, the connection is probed and dropped within a fraction of a
    second, and a safe bodiless request that was waiting on it goes to the next tunnel."""
    a = start_client(name="a")
    start_client(name="b")
    a.stop(signal.SIGKILL)  # the cursor is on a: the next request goes there
    start = time.monotonic()
    names = [get(server, "/name", timeout=3).text for _ in range(6)]
    assert names == ["b"] * 6
    assert time.monotonic() - start < 2.0  # (the dead-peer probe alone takes 6 s)
    server.wait_for(r"left group 'app.test': peer unreachable", timeout=1)
    server.wait_for(r"GET /name: tunnel \S+ closed before answering \(peer unreachable[^)]*\)\): trying another")


def test_a_request_with_a_body_is_not_sent_again_when_its_tunnel_dies(server, start_client):
    a = start_client(name="a")
    start_client(name="b")
    a.stop(signal.SIGKILL)
    start = time.monotonic()
    r = requests.post(server.url("/echo"), headers=H, data=b"x" * 1000, timeout=3)
    assert r.status_code == 502 and r.content == b""  # it may have been processed: not replayed
    assert time.monotonic() - start < 2.0
    assert get(server, "/name").text == "b"


def test_requests_refused_by_a_stopping_client_go_to_another_one(server, start_client):
    """A client finishing in-flight requests after SIGTERM refuses new ones unprocessed
    (H3_REQUEST_REJECTED); reverstd hands them to another tunnel of the group."""
    a = start_client(name="a")
    start_client(name="b")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(get, server, f"/sleep?ms=3000&id={i}", timeout=15) for i in range(2)]
        time.sleep(0.5)  # one slow request in each client (round-robin)
        a.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # a is now refusing new requests, its slow one still running
        names = [get(server, "/name").text for _ in range(6)]
        assert names == ["b"] * 6
        assert sorted(f.result().text for f in slow) == ["slept 0", "slept 1"]
    assert a.popen.wait(10) == 0


def test_garbage_datagrams_and_requests_do_not_hurt_the_server(tunnel):
    """Random UDP datagrams (short headers, fake Initials of every size) and malformed
    HTTP/1.1 never take reverstd down: the registered tunnel keeps serving."""
    import os
    import random as rnd

    host, port = tunnel.tunnel_address.rsplit(":", 1)
    rng = rnd.Random(1234)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(2000):
            size = rng.choice([1, 20, 50, 1199, 1200, 1350, 1500])
            data = bytearray(os.urandom(size))
            if i % 3 == 0 and size >= 6:  # a long header claiming QUIC v1 Initial
                data[0] = 0xC0 | (data[0] & 0x0F)
                data[1:5] = b"\x00\x00\x00\x01"
            s.sendto(bytes(data), (host, int(port)))
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: app.test\r\nContent-Length: x\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n",
                b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        reply = raw_request(tunnel, raw)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:100]
    assert get(tunnel, "/hello").text == "Hello, World!"
    assert tunnel.popen.poll() is None


@pytest.mark.parametrize("threads", ["100", "0"])
def test_app_exception_midway_cuts_the_public_response_and_tunnel_survives(server, start_client, threads):
    """Once the status is out, only an abort can signal the failure: the public client must
    see a broken response, never a clean short one; and it must see the status (in greenlets
    the head, the first piece and the reset come in one step: the head goes out first)."""
    start_client(extra=("--threads", threads))
    for _ in range(3):
        with pytest.raises(requests.exceptions.RequestException):
            with get(server, "/boom-midway", stream=True) as r:
                assert r.status_code == 200
                b"".join(r.iter_content(None))
    assert get(server, "/hello").text == "Hello, World!"


@pytest.mark.parametrize("threads", ["4", "0"])
def test_a_body_returned_as_a_list_of_pieces_arrives_whole_with_its_length(server, start_client, threads):
    """Up to 256 KB the pieces leave joined, with the head; a bigger list goes piece by
    piece (no copy of the whole body), still with the Content-Length the client adds."""
    from .apps import pieces
    start_client(app="tests.apps:pieces_app", extra=("--threads", threads))
    for count in (1, 3, 4, 40):
        r = get(server, f"/{count}")
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(count * 65536)
        assert r.content == b"".join(pieces(count))


def test_a_blocking_handler_does_not_stall_other_requests(tunnel):
    """/sleep blocks its thread with plain time.sleep (no gevent, no monkey-patching)."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(get, tunnel, "/sleep?ms=2000&id=s", timeout=10) for _ in range(3)]
        time.sleep(0.3)
        start = time.monotonic()
        assert get(tunnel, "/hello").text == "Hello, World!"
        assert time.monotonic() - start < 0.5
        assert all(f.result().text == "slept s" for f in slow)


def test_an_http11_request_without_host_is_400_and_an_http10_one_is_routed_as_before(tunnel):
    reply = raw_request(tunnel, b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    reply = raw_request(tunnel, b"GET /hello HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 502 "), reply[:200]  # no Host, no group: as before


@pytest.mark.parametrize("lines,status", [
    (b"X-Plain: one two\r\n", b"200"),
    (b"X-Folded: one\r\n two\r\n", b"400"),   # obsolete folding: rejected (RFC 9112 5.2)
    (b"No colon here\r\n", b"400"),
    (b"Host : app.test\r\n", b"400"),         # whitespace before the colon (RFC 9112 5.1)
    (b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n", b"400"),  # smuggling (RFC 9112 6.1)
    (b"Content-Length: 1\r\nContent-Length: 2\r\n", b"400"),
    (b"X-A: 1\r\n" * 101, b"431"),            # too many fields
    (b"X-B: " + b"b" * 70000 + b"\r\n", b"431"),  # head too large
    (b"Host: other.test\r\n", b"400"),       # two Hosts (RFC 9112 3.2): never route by one of them
])
def test_public_header_block_parsing(tunnel, lines, status):
    reply = raw_request(tunnel, b"GET /echo HTTP/1.1\r\nHost: app.test\r\n" + lines + b"Connection: close\r\n\r\n")
    assert reply.split(b" ", 2)[1] == status, reply[:200]
    if status == b"200":
        assert b'"X-Plain", "one two"' in reply or b'["X-Plain","one two"]' in reply
    else:
        assert b"\r\nConnection: close\r\n" in reply.split(b"\r\n\r\n")[0] + b"\r\n"
