"""Property-based tests (hypothesis) for the parsers of what peers and operators send.

For arbitrary input, and for near-valid input (mutations of valid messages and of the
Go vectors), each parser returns a value or raises its documented error type, never
another exception, and within a deadline; where there is an encoder, decoding what it
wrote gives the value back.  Covered:

- the registration codec (reverst.protocol: MessageDecoder, decode_*_untrusted, the
  CONNECTION_CLOSE mapping): ProtocolViolation;
- the public HTTP/1.1 request parser (reverst.http1.RequestParser, fed as
  http1._Connection.fill feeds it, in whatever pieces recv() returns): http1.BadRequest;
- the tunnel groups file (reverst.config.parse_groups and helpers): ConfigError, one line
  naming source and key path;
- Authorization values (reverst.auth.authenticate): Unauthorized;
- durations (reverst.durations.parse_duration): ValueError / TypeError;
- forwarding headers, WebSocket handshakes, hop-by-hop stripping and the WSGI environ of
  an HTTP/3 request (reverst.forwarding, reverst.websocket, reverst.http3, reverst.wsgi).

Every test is reproducible (derandomized, no example database) and deadline-bound.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import http
import ipaddress
import math
import pathlib
import re
import string
import time
from decimal import Decimal

import msgpack
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from reverst import auth, forwarding, http1, http3, protocol, websocket, wsgi
from reverst.config import (
    BasicStrategy, BearerStrategy, ConfigError, ExternalStrategy, Group, SecretUnavailable,
    decode_groups_text, local_path, parse_groups, parse_k8s_ref,
)
from reverst.durations import parse_duration
from reverst.errors import (
    BadRequest, NotFound, ProtocolViolation, ReverstError, ServerError, Unauthorized,
)
from reverst.policy import Limits, VisitorPolicy
from reverst.protocol import (
    MAX_REGISTRATION_SIZE, MessageDecoder, RegisterRequest, RegisterResponse, decode_request_untrusted,
    decode_response_untrusted, encode_request, encode_response,
)

DATA = pathlib.Path(__file__).parent / "data"


def props(examples: int, **kwargs):
    """Reproducible in CI: the same examples every run, nothing remembered between runs."""
    return settings(max_examples=examples, deadline=500, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], **kwargs)


def one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message and "\r" not in message


@st.composite
def pieces(draw, data):
    """``data`` cut where recv() might cut it (each piece non-empty)."""
    if len(data) < 2:
        return [data]
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=8)))
    return [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]


@st.composite
def mutated(draw, seeds, inserts):
    """A seed with a few random edits: bit flips, byte/char replacements, inserted
    snippets (``inserts``), deletions, truncation, duplicated slices."""
    data = draw(st.sampled_from(seeds))
    is_bytes = isinstance(data, bytes)
    buf = bytearray(data) if is_bytes else list(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "insert", "insert", "delete", "truncate", "dup")))
        pos = draw(st.integers(0, len(buf)))
        at = min(pos, len(buf) - 1)
        if op == "flip" and buf:
            bit = 1 << draw(st.integers(0, 7))
            if is_bytes:
                buf[at] ^= bit
            else:
                buf[at] = chr(ord(buf[at]) ^ bit)
        elif op == "set" and buf:
            buf[at] = draw(st.integers(0, 255)) if is_bytes else draw(st.characters(exclude_categories=("Cs",)))
        elif op == "insert":
            snippet = draw(inserts)
            buf[pos:pos] = snippet if is_bytes else list(snippet)
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del buf[pos:]
        elif op == "dup":
            n = draw(st.integers(1, 16))
            buf[pos:pos] = buf[pos:pos + n]
    return bytes(buf) if is_bytes else "".join(buf)


# =====================================================================================
# 1. Registration (msgpack from the tunnel client; the answer from the server)
# =====================================================================================

REQUEST_FIELDS = ("Version", "TunnelGroup", "Metadata")
RESPONSE_FIELDS = ("Version", "Code", "Metadata", "Body")
DECODE = {"req": decode_request_untrusted, "resp": decode_response_untrusted}


def _vectors() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted(DATA.glob("*.bin"))]
    with open(DATA / "decoder-compat.tsv") as fh:
        seeds += [bytes.fromhex(row[2]) for row in csv.reader(fh, delimiter="\t")]
    seeds.append(encode_request(RegisterRequest("local.example", {"Authorization": "Basic dXNlcjpwYXNz"})))
    seeds.append(encode_response(RegisterResponse(metadata={"k": "v"}, body=b"\x00\x01")))
    return seeds


VECTORS = _vectors()
#: msgpack type bytes and headers worth splicing into a message
MSGPACK_SNIPPETS = st.sampled_from([
    b"\xc0", b"\xc1", b"\xc2", b"\xc3", b"\xcc\x01", b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80" + b"\0" * 7,
    b"\x80", b"\x81", b"\x8f", b"\x90", b"\x9f", b"\xa0", b"\xbf", b"\xc4\x05", b"\xd9\xff", b"\xdb\xff\xff\xff\xff",
    b"\xdc\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xde\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xd4\xff\x00",
    b"\xd6\xff\x00\x00\x00\x00", b"\xc7\x03\xff\x00\x00\x00", b"\xca\x7f\xc0\x00\x00", b"\xa7Version",
    b"\xabTunnelGroup", b"\xa8Metadata", b"\xa4Code", b"\xa4Body", b"\xa3\xff\xfe\xfd", b"\x91" * 40,
]) | st.binary(min_size=1, max_size=6)


def registration_outcome(chunks, kind: str, max_size: int = MAX_REGISTRATION_SIZE):
    """What a server (kind "req") or client ("resp") makes of these stream pieces:
    ("ok", value), ("incomplete",) or ("violation",); any other exception fails."""
    decoder = MessageDecoder(max_size)
    try:
        for chunk in chunks:
            obj = decoder.feed(chunk)
            if obj is not None:
                value = DECODE[kind](obj)
                assert type(obj) in (dict, list), f"decoded a {type(obj).__name__} as a message"
                return ("ok", value)
        return ("incomplete",)
    except ProtocolViolation as exc:
        assert one_line(str(exc)) and not str(exc).endswith(":"), f"not a one-line message: {str(exc)!r}"
        return ("violation",)


def _check_decoded(kind, value):
    assert isinstance(value.version, int) and value.version >= 0
    if value.metadata is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in value.metadata.items())
    if kind == "req":
        assert isinstance(value.tunnel_group, str)
    else:
        assert isinstance(value.code, int) and value.code >= 0
        assert value.body is None or isinstance(value.body, bytes)


msgpack_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
                   | st.text(max_size=16) | st.binary(max_size=16)
                   | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)))
msgpack_keys = st.sampled_from(REQUEST_FIELDS + RESPONSE_FIELDS + ("version", "Extra")) | st.text(max_size=8) \
    | st.binary(max_size=8) | st.integers(-3, 3) | st.none()
msgpack_values = st.recursive(
    msgpack_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(msgpack_keys, inner, max_size=4),
    max_leaves=12)
metadata_like = st.none() | st.dictionaries(st.text(max_size=12) | st.binary(max_size=12),
                                            st.text(max_size=20) | st.binary(max_size=20) | msgpack_values,
                                            max_size=3)
#: maps and arrays shaped like a registration message, with wrong types here and there
near_registration = (
    st.dictionaries(msgpack_keys, msgpack_values | st.integers(0, 300) | st.text(max_size=20) | metadata_like,
                    max_size=6)
    | st.lists(msgpack_values | st.integers(0, 300) | st.text(max_size=20) | metadata_like, max_size=5)
    | msgpack_values)


@props(200)
@given(st.binary(max_size=300), st.sampled_from(("req", "resp")), st.data())
@example(b"\xc1", "req", None)
@example(b"\x91" * 3000 + b"\xc0", "req", None)  # nested deeper than msgpack's stack
@example(b"\xd4\x05\x00", "req", None)           # an ext type is not an array
@example(b"\xc7\x03\xff\x00\x00\x00", "resp", None)  # a timestamp of 3 bytes
def test_registration_bytes_decode_or_violate(raw, kind, data):
    chunks = data.draw(pieces(raw)) if data is not None else [raw]
    outcome = registration_outcome(chunks, kind)
    if outcome[0] == "ok":
        _check_decoded(kind, outcome[1])


@props(200)
@given(mutated(VECTORS, MSGPACK_SNIPPETS), st.sampled_from(("req", "resp")), st.data())
def test_mutated_vectors_decode_or_violate(raw, kind, data):
    outcome = registration_outcome(data.draw(pieces(raw)), kind)
    if outcome[0] == "ok":
        _check_decoded(kind, outcome[1])


@props(200)
@given(near_registration, st.booleans(), st.sampled_from(("req", "resp")))
def test_near_valid_messages_decode_as_go_would(obj, bin_type, kind):
    """Go decodes a struct from a map keyed by its field names (others ignored) or from
    an array by position; a field of the right type is taken as is."""
    raw = msgpack.packb(obj, use_bin_type=bin_type)
    assume(len(raw) <= MAX_REGISTRATION_SIZE)
    outcome = registration_outcome([raw], kind)
    if outcome[0] != "ok":
        assert outcome[0] == "violation"
        return
    value = outcome[1]
    _check_decoded(kind, value)
    assert obj is None or isinstance(obj, (dict, list)) and not isinstance(obj, msgpack.ExtType)
    names = REQUEST_FIELDS if kind == "req" else RESPONSE_FIELDS
    if obj is None:  # a nil message is the zero value, as Go decodes it (not "incomplete")
        fields = {}
    else:
        fields = {k: obj[k] for k in names if k in obj} if isinstance(obj, dict) else dict(zip(names, obj))
    if isinstance(fields.get("Version"), int) and not isinstance(fields["Version"], bool):
        assert value.version == fields["Version"]
    if kind == "req" and isinstance(fields.get("TunnelGroup"), str):
        assert value.tunnel_group == fields["TunnelGroup"]
    if fields.get("Metadata") is None:
        assert value.metadata is None


@props(200)
@given(st.binary(max_size=200), st.data())
def test_decoding_does_not_depend_on_how_the_stream_is_cut(raw, data):
    """MessageDecoder.feed() gives what one feed of all the bytes gives (the first
    complete object, as Go reads it), however the stream is cut."""
    for kind in ("req", "resp"):
        assert registration_outcome(data.draw(pieces(raw)), kind) == registration_outcome([raw], kind)


@props(100)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=12), st.integers(1, 100))
def test_decoder_never_holds_more_than_its_limit(chunks, limit):
    decoder = MessageDecoder(max_size=limit)
    total = 0
    for chunk in chunks:
        total += len(chunk)
        try:
            obj = decoder.feed(chunk)
        except ProtocolViolation:
            return
        assert total <= limit, "fed more than max_size without a ProtocolViolation"
        if obj is not None:
            return


registration_text = st.text(max_size=40)
register_requests = st.builds(
    RegisterRequest, tunnel_group=registration_text,
    metadata=st.none() | st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4),
    version=st.integers(0, 2**64 - 1) | st.just(1))
register_responses = st.builds(
    RegisterResponse, code=st.integers(0, 2**64 - 1) | st.sampled_from(list(protocol.ResponseCode)),
    metadata=st.none() | st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4),
    body=st.none() | st.binary(max_size=64), version=st.integers(0, 2**64 - 1) | st.just(1))


@props(120)
@given(register_requests, st.binary(max_size=20), st.data())
@example(RegisterRequest("local.example", {"Authorization": "Basic dXNlcjpwYXNz"}), b"", None)
def test_request_round_trip(req, trailing, data):
    """encode → (any cutting, anything after it) → decode gives the request back."""
    raw = encode_request(req)
    if req.version == 1:
        assert raw.startswith(b"\x83\xa7Version\xcc\x01")  # Go's encoding
    chunks = data.draw(pieces(raw + trailing)) if data is not None else [raw + trailing]
    assert registration_outcome(chunks, "req") == ("ok", req)
    assert encode_request(decode_request_untrusted(msgpack.unpackb(raw))) == raw


@props(120)
@given(register_responses, st.binary(max_size=20), st.data())
def test_response_round_trip(resp, trailing, data):
    raw = encode_response(resp)
    assert registration_outcome(data.draw(pieces(raw + trailing)), "resp") == ("ok", resp)
    assert encode_response(decode_response_untrusted(msgpack.unpackb(raw))) == raw


@props(60)
@given(register_requests, st.permutations(range(3)), st.dictionaries(st.text(max_size=8), msgpack_values, max_size=3),
       st.booleans())
def test_request_decoding_ignores_key_order_unknown_keys_and_int_encoding(req, order, extra, as_array):
    """Other encoders than Go's (any key order, other int widths, unknown keys, the
    positional array form) decode to the same request."""
    values = (req.version, req.tunnel_group, dict(req.metadata) if req.metadata is not None else None)
    if as_array:
        obj = list(values)
    else:
        obj = {k: v for k, v in extra.items() if k not in REQUEST_FIELDS}
        obj.update((REQUEST_FIELDS[i], values[i]) for i in order)
    assert registration_outcome([msgpack.packb(obj)], "req") == ("ok", req)


@props(200)
@given(st.integers(-1, 2**62), st.text(max_size=300))
@example(0x2, "unauthorized")
@example(0x2, "not found")
@example(0x1, "not found")
def test_close_reasons_from_the_server_map_to_reverst_errors(code, reason):
    """The client turns any CONNECTION_CLOSE (code, reason) into one of our errors."""
    exc = protocol.error_for_close(code, reason)
    assert isinstance(exc, (Unauthorized, BadRequest, NotFound, ServerError))
    if code == protocol.AppErrorCode.CLIENT_ERROR:
        assert not isinstance(exc, ServerError)  # fatal: never retried
    elif reason != protocol.REASON_NOT_FOUND:
        assert isinstance(exc, ServerError)


@props(100)
@given(st.integers(-2**64, 2**64))
def test_deprecated_response_codes(code):
    exc = protocol.error_for_response_code(code)
    assert (exc is None) == (code not in (1, 2, 3, 4))
    assert exc is None or isinstance(exc, ReverstError)


@props(100)
@given(st.sampled_from([Unauthorized, NotFound, BadRequest, ProtocolViolation, ServerError]), st.text(max_size=300))
def test_close_for_error_round_trips_through_the_client_mapping(kind, message):
    code, reason = protocol.close_for_error(kind(message))
    assert len(reason) <= 200
    back = protocol.error_for_close(code, reason)
    expected = {ProtocolViolation: BadRequest}.get(kind, kind)
    if kind is ServerError and reason == protocol.REASON_NOT_FOUND:
        expected = NotFound  # (the words Go's client reads)
    assert type(back) is expected


# =====================================================================================
# 2. The public HTTP/1.1 side (reverst.http1.RequestParser)
# =====================================================================================

def http_outcome(chunks):
    """Feed ``chunks`` as http1._Connection does (nothing more once an upgrade stopped
    the parser): (requests, error, bytes after the upgrade head)."""
    parser = http1.RequestParser()
    error = None
    fed = 0
    try:
        for chunk in chunks:
            if parser.stopped:
                break
            fed += 1
            parser.feed(chunk)
    except http1.BadRequest as exc:
        assert exc.status in (400, 431), exc.status
        http.HTTPStatus(exc.status)  # reject() needs its phrase
        assert one_line(str(exc))
        error = (exc.status, str(exc))
        with pytest.raises(http1.BadRequest):  # once broken, always broken
            parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    requests = [(r.method, r.target, r.version, list(r.fields), b"".join(r.chunks), r.complete, r.upgrade,
                 r.keep_alive, r.chunked, r.length, r.expect_continue) for r in parser.requests]
    after = None
    if parser.stopped:
        after = parser.parsing.upgrade_data + b"".join(chunks[fed:])
    return requests, error, after


def check_requests_contract(requests):
    """What reverst.server and http1._Connection take for granted of a parsed request."""
    for (method, target, version, fields, body, complete, upgrade, keep_alive, chunked, length,
         expect_continue) in requests:
        assert method and isinstance(method, str)
        assert isinstance(target, bytes)
        assert re.fullmatch(r"[0-9]\.[0-9]", version), version
        hosts = [v for k, v in fields if k.lower() == "host"]
        assert len(hosts) <= 1
        assert hosts or version != "1.1"
        if length is not None:
            assert not chunked  # RFC 9112 §6.1: a request with both is refused
            assert int(length) >= 0  # server.py: int(environ["CONTENT_LENGTH"])
            if complete and not upgrade:
                assert len(body) == int(length)
        if not length and not chunked and not upgrade:
            assert body == b""


HTTP_SEEDS = [
    b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
    b"GET /a/b?c=d HTTP/1.1\r\nHost: app.test:8181\r\nX-Forwarded-Host: other\r\nAccept: */*\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
    b"PUT /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\x81\x05hello",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01",
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nokGET /3 HTTP/1.1\r\n"
    b"Host: a\r\nConnection: close\r\n\r\n",
]
HTTP_SNIPPETS = st.sampled_from([
    b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b"\x00", b"\x7f", b"\x80", b"\xff", b"Host: x\r\n", b"Host: y\r\n",
    b"Content-Length: 3\r\n", b"Content-Length: -1\r\n", b"Content-Length: 99999999999999999999\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n", b"ffffffffffffffff\r\n",
    b"Upgrade: websocket\r\n", b"Connection: upgrade\r\n", b"Connection: close\r\n", b"Expect: 100-continue\r\n",
    b" folded\r\n", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1", b"GET ", b"CONNECT ", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"%00", b"?", b"#", b"X-Forwarded-For: 1.2.3.4\r\n",
]) | st.binary(min_size=1, max_size=6)


@props(200)
@given(st.binary(max_size=400), st.data())
def test_http_bytes_parse_or_bad_request(raw, data):
    requests, _, _ = http_outcome(data.draw(pieces(raw)))
    check_requests_contract(requests)


@props(200)
@given(mutated(HTTP_SEEDS, HTTP_SNIPPETS), st.data())
def test_mutated_http_requests_parse_or_bad_request(raw, data):
    requests, _, _ = http_outcome(data.draw(pieces(raw)))
    check_requests_contract(requests)


@props(200)
@given(mutated(HTTP_SEEDS, HTTP_SNIPPETS) | st.sampled_from(HTTP_SEEDS), st.data())
def test_http_parsing_does_not_depend_on_how_recv_cuts_the_bytes(raw, data):
    """The same requests, bodies, error and (after an upgrade) bytes for the new
    protocol whether the client's bytes come at once or in pieces."""
    assert http_outcome(data.draw(pieces(raw))) == http_outcome([raw])


TCHAR = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
VCHAR = "".join(map(chr, range(0x21, 0x7F))) + "".join(map(chr, range(0x80, 0x100)))  # and obs-text
#: fields the parser (or the front) gives a meaning to: generated on purpose, not at random
FRAMING = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect", "keep-alive",
           "proxy-connection"}
field_names = st.text(TCHAR, min_size=1, max_size=16).filter(lambda n: n.lower() not in FRAMING)
field_values = st.lists(st.text(VCHAR, min_size=1, max_size=10), max_size=3).flatmap(
    lambda words: st.sampled_from([" ", "\t", "  "]).map(lambda sep: sep.join(words)))
PATH_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%"
targets = st.builds(lambda path, query: "/" + path + (f"?{query}" if query is not None else ""),
                    st.text(PATH_CHARS, max_size=20), st.none() | st.text(PATH_CHARS + "?", max_size=20))


@st.composite
def http_requests(draw, last: bool):
    """(bytes on the wire, what the parser must report) for one valid request."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    target = draw(targets)
    version = draw(st.sampled_from(["1.1", "1.0"])) if last else "1.1"
    fields = draw(st.lists(st.tuples(field_names, field_values), max_size=8))
    fields.insert(draw(st.integers(0, len(fields))), (draw(st.sampled_from(["Host", "host", "HOST"])),
                                                      draw(st.text(string.ascii_lowercase + ".:", min_size=1,
                                                                   max_size=20))))
    if version == "1.0":
        fields.append(("Connection", "keep-alive"))
    body = draw(st.binary(max_size=100))
    framing = draw(st.sampled_from(["length", "chunked"] + ([] if body else ["none"])))
    wire_body = body
    if framing == "length":
        fields.insert(draw(st.integers(0, len(fields))), ("Content-Length", str(len(body))))
    elif framing == "chunked":
        fields.insert(draw(st.integers(0, len(fields))), ("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=4))) if len(body) > 1 else []
        parts = [body[i:j] for i, j in zip([0] + cuts, cuts + [len(body)]) if body[i:j]]
        wire_body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    expected = (method, target.encode(), version, fields, body, True, False, True, framing == "chunked",
                str(len(body)) if framing == "length" else None, False)
    return head.encode("latin-1") + wire_body, expected


@props(100)
@given(st.lists(http_requests(last=False), max_size=3), http_requests(last=True), st.data())
def test_valid_requests_round_trip_through_the_parser(pipelined, last, data):
    """Requests written by the book come out as written: method, target, every field in
    order (names as sent), the body however it was framed; pipelined ones in order."""
    wire = b"".join(raw for raw, _ in pipelined + [last])
    requests, error, after = http_outcome(data.draw(pieces(wire)))
    assert error is None and after is None
    assert requests == [expected for _, expected in pipelined + [last]]


@props(20)
@given(st.integers(http1.MAX_HEAD + 1, 2 * http1.MAX_HEAD), st.data())
def test_oversized_heads_are_431_however_they_arrive(size, data):
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * size
    chunks = [head[i:i + 16384] for i in range(0, len(head), 16384)]
    assert http_outcome(chunks)[1][0] == 431


@props(10)
@given(st.sampled_from([b"X-Big: ", b"X", b"Y: v\r\nX-Big: "]), st.integers(1, 64))
def test_oversized_trailers_are_431(start, mib):
    """A trailer section is buffered whole by llhttp: bounded like a head, not by the
    (unbounded) body."""
    parser = http1.RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n" + start)
    with pytest.raises(http1.BadRequest) as info:
        for _ in range(mib * 16):
            parser.feed(b"v" * http1.RECV)
    assert info.value.status == 431


def test_long_chunked_bodies_are_not_mistaken_for_trailers():
    parser = http1.RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for size in (1, 7, http1.RECV - 8, http1.RECV, 3 * http1.RECV):
        data = b"%x\r\n" % size + b"b" * size + b"\r\n"
        for i in range(0, len(data), http1.RECV):
            parser.feed(data[i:i + http1.RECV])
    parser.feed(b"0\r\n\r\n")
    req = parser.requests[0]
    assert req.complete and sum(map(len, req.chunks)) == 1 + 7 + http1.RECV - 8 + http1.RECV + 3 * http1.RECV


@props(20)
@given(st.integers(http1.MAX_FIELDS + 1, http1.MAX_FIELDS + 20))
def test_too_many_fields_are_431(n):
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(n)) + b"\r\n"
    assert http_outcome([head])[1][0] == 431


# =====================================================================================
# 3. The tunnel groups file (reverst.config)
# =====================================================================================

SOURCE = "groups.yml"
BASE_DIR = "/cfg"
SECRET_FILES = {
    "/cfg/token": b"file-token\n",
    "/cfg/hash": hashlib.sha256(b"hashed-file-token").hexdigest().encode() + b"\n",
    "/cfg/empty": b"\n",
    "/cfg/big": b"x" * (64 * 1024 + 1),
    "k8s://secret/ns/name/key": b"k8s-token",
}


def read_secret(ref: str) -> bytes:
    try:
        return SECRET_FILES[ref]
    except KeyError:
        raise SecretUnavailable(f"cannot read {ref}: No such file or directory") from None


def config_outcome(text: str):
    """parse_groups(text): the GroupsConfig, or the ConfigError message (checked)."""
    try:
        return parse_groups(text, SOURCE, base_dir=BASE_DIR, read_secret=read_secret)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{SOURCE}: "), message
        assert one_line(message), message
        assert "s3cret" not in message  # no secret in errors
        return message


GROUPS_SEEDS = [
    """\
groups:
  app.test:
    hosts: ["app.test", "127.0.0.1"]
    authentication:
      basic: {username: user, password: s3cret}
  "bearer.test":
    hosts:
      - bearer.test
    authentication:
      bearer: {token: s3cret-token, scheme: JWT}
      external: {endpoint: "https://auth.internal/check", timeout: 2s}
""",
    """\
groups:
  g:
    maxTunnels: 3
    authentication:
      bearer: {tokenPath: token}
    visitors:
      allow: ["10.0.0.0/8", "2001:db8::/32"]
      deny: ["10.1.0.0/16"]
      authentication:
        basic: {username: u, password: s3cret}
      limits: {concurrentRequests: 10, requestsPerSecond: 2.5, burst: 5, groupRequestsPerSecond: 100,
               groupBurst: 200, maxBodySize: 10MiB}
  h:
    authentication:
      bearer: {hashedTokenPath: "file:///cfg/hash"}
  k: {authentication: {bearer: {hashedToken: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}}}
""",
    "groups: {}\n",
    "groups:\n  open:\n",
]
YAML_SNIPPETS = st.sampled_from([
    ":", ": ", "-", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ", "!!int ", "!!float ", "!!bool ",
    "!!timestamp ", "!!binary ", "!!set ", "!!omap ", "!!python/object:os.system ", "<<: ", "? ", "|", ">", "'", '"',
    "#", "%YAML 1.1\n", "---\n", "...\n", "\n", "\n  ", "\t", "2001-02-30", "2001-13-01 25:61:61", "0x", "0o8", "1e999",
    ".nan", "-.inf", "~", "null", "yes", "\"\\ud800\"", "\"\\0\"", "\"\\x85\"", "\"\\uffff\"", "[[[[[[", "9" * 40,
    "maxBodySize: ", "100", "1.5", "KiB", "maxTunnels: ", "timeout: ", "11m11m11m11m11m11m11m11m11m11m11m11mx",
    "allow: ", "deny: ", "10.0.0.0/8", "::/0", "tokenPath: ", "k8s://secret/", "big", "empty", "\x00", "\ufeff",
])


@props(200)
@given(st.text(max_size=300))
@example("a: 2001-02-30")
@example("groups: !!timestamp abc")
@example("groups: !!bool abc")
@example("groups: !!int abc")
@example("groups: " + "[" * 600)  # deeper than the recursion limit let PyYAML go
def test_arbitrary_text_is_a_config_or_a_config_error(text):
    config_outcome(text)


@props(250)
@given(mutated(GROUPS_SEEDS, YAML_SNIPPETS | st.text(min_size=1, max_size=4)))
def test_mutated_groups_files_are_a_config_or_a_config_error(text):
    config_outcome(text)


yaml_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
                | st.sampled_from(["2001-02-03", "10.0.0.0/8", "10MiB", "5s", "http://a/", "k8s://secret/ns/n/k",
                                   "token", "hash", "big", "empty", "file:///cfg/hash"]))
yaml_keys = st.sampled_from([
    "groups", "hosts", "authentication", "visitors", "maxTunnels", "basic", "bearer", "external", "username",
    "password", "scheme", "token", "tokenPath", "hashedToken", "hashedTokenPath", "endpoint", "timeout", "allow",
    "deny", "limits", "concurrentRequests", "requestsPerSecond", "burst", "groupRequestsPerSecond", "groupBurst",
    "maxBodySize"]) | st.text(max_size=8) | st.integers(-2, 2)
yaml_docs = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(yaml_keys, inner, max_size=4), max_leaves=25)


@props(120)
@given(st.dictionaries(st.text(max_size=10) | st.integers(), yaml_docs, max_size=3), st.booleans())
def test_groups_documents_of_any_shape_are_a_config_or_a_config_error(groups, flow):
    config_outcome(yaml.safe_dump({"groups": groups}, default_flow_style=flow))


NETS = ["10.0.0.0/8", "192.168.1.0/24", "172.16.0.0/12", "127.0.0.1/32", "100.64.0.0/10", "2001:db8::/32", "fd00::/8",
        "::1/128"]
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
texts = st.text(min_size=1, max_size=16)
schemes = st.text(TCHAR, min_size=1, max_size=10)


@st.composite
def strategy_models(draw):
    """A valid ``authentication:`` mapping and the strategies it must give."""
    raw, out = {}, []
    kinds = [k for k in ("basic", "bearer", "external") if draw(st.booleans())]
    chosen = draw(st.lists(schemes, min_size=len(kinds), max_size=len(kinds), unique_by=str.lower))
    for kind, scheme in zip(kinds, chosen):
        explicit = draw(st.booleans())
        default = {"basic": "Basic", "bearer": "Bearer", "external": "Bearer"}[kind]
        scheme = scheme if explicit else default
        entry = {"scheme": scheme} if explicit else {}
        if kind == "basic":
            user, password = draw(texts), draw(texts)
            entry.update(username=user, password=password)
            out.append(BasicStrategy(user, password, scheme))
        elif kind == "bearer":
            source = draw(st.sampled_from(["token", "hashedToken", "tokenPath", "hashedTokenPath", "k8s"]))
            if source == "token":
                token = draw(texts)
                entry["token"] = token
                out.append(BearerStrategy(hashlib.sha256(token.encode()).digest(), scheme, "token"))
            elif source == "hashedToken":
                digest = draw(st.binary(min_size=32, max_size=32))
                entry["hashedToken"] = draw(st.sampled_from([str.lower, str.upper]))(digest.hex())
                out.append(BearerStrategy(digest, scheme, "hashedToken"))
            elif source == "tokenPath":
                entry["tokenPath"] = draw(st.sampled_from(["token", "/cfg/token", "file:///cfg/token", "./token"]))
                out.append(BearerStrategy(hashlib.sha256(b"file-token").digest(), scheme, "tokenPath:/cfg/token"))
            elif source == "hashedTokenPath":
                entry["hashedTokenPath"] = draw(st.sampled_from(["hash", "/cfg/hash", "file:///cfg/hash"]))
                out.append(BearerStrategy(hashlib.sha256(b"hashed-file-token").digest(), scheme,
                                          "hashedTokenPath:/cfg/hash"))
            else:
                entry["tokenPath"] = "k8s://secret/ns/name/key"
                out.append(BearerStrategy(hashlib.sha256(b"k8s-token").digest(), scheme,
                                          "tokenPath:k8s://secret/ns/name/key"))
        else:
            endpoint = draw(st.builds("{}://{}{}/{}".format, st.sampled_from(["http", "https"]),
                                      st.text(string.ascii_lowercase, min_size=1, max_size=10),
                                      st.sampled_from(["", ":8080", ":1"]), st.text(PATH_CHARS, max_size=10)))
            entry["endpoint"] = endpoint
            timeout = draw(st.sampled_from([None, ("2s", 2.0), ("500ms", 0.5), (3, 3.0), (1.5, 1.5), ("10s", 10.0),
                                            ("1m", None), (0, None), ("-1s", None), ("x", None)]))
            if timeout is not None:
                entry["timeout"] = timeout[0]
                if timeout[1] is None:
                    raw[kind] = entry
                    return raw, ".external.timeout: must be a duration up to 10s"
            out.append(ExternalStrategy(endpoint, scheme, timeout[1] if timeout else 5.0))
        raw[kind] = entry
    if len({strategy.scheme.lower() for strategy in out}) < len(out):
        return raw, " both use scheme "
    return raw, tuple(out)


@st.composite
def group_models(draw, hosts):
    """A valid group and the Group it gives, or one with a known mistake and (a str) a
    part of the error it must give."""
    raw: dict = {}
    if hosts or draw(st.booleans()):
        raw["hosts"] = hosts + hosts[:draw(st.integers(0, len(hosts)))]  # repeats are dropped
    auth_raw, strategies = draw(strategy_models())
    if auth_raw or draw(st.booleans()):
        raw["authentication"] = auth_raw or None
    visitors: dict = {}
    nets = draw(st.lists(st.sampled_from(NETS), unique=True))
    split = draw(st.integers(0, len(nets)))
    if nets[:split]:
        visitors["allow"] = nets[:split]
    if nets[split:]:
        visitors["deny"] = nets[split:]
    v_raw, v_strategies = draw(strategy_models())
    if v_raw:
        visitors["authentication"] = v_raw
    limits: dict = {}
    expected_limits = {}
    for key, attr, values in (("concurrentRequests", "concurrent_requests", st.integers(1, 10**9)),
                              ("requestsPerSecond", "requests_per_second", st.floats(0.001, 1e8)),
                              ("groupRequestsPerSecond", "group_requests_per_second", st.integers(1, 10**8))):
        if draw(st.booleans()):
            limits[key] = draw(values)
            expected_limits[attr] = float(limits[key]) if "PerSecond" in key else limits[key]
    for key, attr, rate in (("burst", "burst", "requestsPerSecond"),
                            ("groupBurst", "group_burst", "groupRequestsPerSecond")):
        if rate in limits and draw(st.booleans()):
            limits[key] = expected_limits[attr] = draw(st.integers(1, 10**6))
    if draw(st.booleans()):
        number, unit = draw(st.integers(0, 10**6)), draw(st.sampled_from(sorted(SIZE_UNITS)))
        case = draw(st.sampled_from([str, str.lower, str.upper]))
        limits["maxBodySize"] = number if unit == "" and draw(st.booleans()) else \
            f"{number}{draw(st.sampled_from(['', ' ']))}{case(unit)}"
        expected_limits["max_body_size"] = number * SIZE_UNITS[unit]
    if limits:
        visitors["limits"] = limits
    if visitors:
        raw["visitors"] = visitors
    max_tunnels = draw(st.none() | st.integers(1, 10**6))
    if max_tunnels is not None:
        raw["maxTunnels"] = max_tunnels
    for mistake in (strategies, v_strategies):
        if isinstance(mistake, str):
            return raw, mistake
    policy = VisitorPolicy(tuple(map(ipaddress.ip_network, nets[:split])),
                           tuple(map(ipaddress.ip_network, nets[split:])), v_strategies, Limits(**expected_limits))
    return raw, (tuple(dict.fromkeys(hosts)), strategies, policy, max_tunnels)


@st.composite
def groups_files(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=12), max_size=4, unique=True))
    all_hosts = draw(st.lists(st.text(string.ascii_lowercase + string.digits + ".-:", min_size=1, max_size=16),
                              unique=True, max_size=2 * len(names)))
    doc, expected = {}, {}
    for i, name in enumerate(names):
        raw, model = draw(group_models(all_hosts[2 * i:2 * i + 2]))
        doc[name] = raw
        expected[name] = model if isinstance(model, str) else Group(name, *model)
    return {"groups": doc}, expected


@props(80)
@given(groups_files(), st.sampled_from([None, True, False]), st.booleans())
def test_valid_groups_files_round_trip(file, flow, unicode):
    """A groups file written from a model (yaml.safe_dump, any style) loads as the model."""
    doc, expected = file
    text = yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=unicode)
    assume(yaml.safe_load(text) == doc)  # (PyYAML's own round trip)
    outcome = config_outcome(text)
    mistakes = [group for group in expected.values() if isinstance(group, str)]
    if mistakes:
        assert isinstance(outcome, str), f"accepted a file with a mistake: {mistakes}"
        assert any(mistake in outcome for mistake in mistakes), outcome
        return
    assert not isinstance(outcome, str), outcome
    assert dict(outcome.groups) == expected
    for group in expected.values():
        for host in group.hosts:
            assert outcome.group_for_host(host) == group


@props(100)
@given(st.binary(max_size=200))
def test_groups_file_bytes_are_utf8_text_or_a_config_error(data):
    try:
        text = decode_groups_text(SOURCE, data)
    except ConfigError as exc:
        assert one_line(str(exc)) and str(exc).startswith(f"{SOURCE}: ")
        return
    assert text.encode("utf-8") == data


@props(200)
@given(st.text(max_size=80) | st.builds("k8s://{}/{}".format, st.sampled_from(["secret", "configmap"]),
                                          st.text(string.ascii_lowercase + string.digits + "-./_", max_size=40)),
       st.sampled_from(["secret", "configmap"]))
def test_k8s_refs_parse_or_value_error(ref, kind):
    try:
        namespace, name, key = parse_k8s_ref(ref, kind)
    except ValueError as exc:
        assert one_line(str(exc))
        return
    assert ref == f"k8s://{kind}/{namespace}/{name}/{key}"
    local_path(ref)  # never raises


@pytest.mark.parametrize("path,error", [
    ("/tmp/a\0b", r'groups\."g"\.authentication\.bearer\.tokenPath: cannot read "/tmp/a\\u0000b": not a valid path'),
    ("\0", r'groups\."g"\.authentication\.bearer\.tokenPath: cannot read "/cfg/\\u0000": not a valid path'),
    ("/tmp/\udc80", r"line 5, column 20: invalid YAML: a string with a lone surrogate"),
])
def test_unreadable_token_paths_are_config_errors_with_the_default_reader(path, error):
    text = yaml.safe_dump({"groups": {"g": {"authentication": {"bearer": {"tokenPath": path}}}}})
    with pytest.raises(ConfigError, match=f"^groups\\.yml: {error}"):
        parse_groups(text, SOURCE, base_dir=BASE_DIR)


# =====================================================================================
# 4. Authorization values (reverst.auth)
# =====================================================================================

GROUP = Group("g", (), (BasicStrategy("user", "pa:ss wörd"), BearerStrategy(hashlib.sha256(b"tok en").digest(), "JWT"),
                        ExternalStrategy("http://auth.internal/check", "Bearer")))
LATIN1 = st.text(st.characters(max_codepoint=0xFF), max_size=60)  # header values from http1 (latin-1)


def basic_payloads():
    return st.builds(lambda raw: base64.b64encode(raw).decode("ascii"), st.binary(max_size=30))


authorization_values = (
    st.text(max_size=60) | LATIN1
    | st.builds("{} {}".format, st.sampled_from(["Basic", "basic", "JWT", "jwt", "Bearer", "Other", ""]),
                basic_payloads() | st.text(max_size=30) | st.sampled_from(["tok en", "dXNlcjpwYTpzcyB3w7ZyZA==", "="]))
)


def external_checks():
    def raising(exc):
        def check(strategy, value):
            raise exc
        return check
    return st.sampled_from([None, lambda s, v: True, lambda s, v: False, lambda s, v: 0,
                            raising(OSError("down")), raising(ValueError("bad")), raising(KeyError("x"))])


@props(200)
@given(st.none() | st.dictionaries(st.sampled_from(["Authorization", "authorization", "Other"]) | st.text(max_size=10),
                                   authorization_values, max_size=3)
       | st.fixed_dictionaries({"Authorization": st.none() | st.integers() | st.binary() | authorization_values}),
       external_checks())
def test_authenticate_accepts_or_raises_unauthorized(metadata, external_check):
    try:
        name = auth.authenticate(GROUP, metadata, external_check=external_check)
    except Unauthorized as exc:
        assert one_line(str(exc))
        assert "pa:ss" not in str(exc) and "tok en" not in str(exc)
        return
    assert name in ("basic", "bearer", "external")
    value = metadata["Authorization"]
    if name == "basic":
        assert base64.b64decode(value.split(" ", 1)[1]) == "user:pa:ss wörd".encode()
    elif name == "bearer":
        assert value.split(" ", 1)[1] == "tok en"


@props(200)
@given(st.text(max_size=20).filter(lambda u: ":" not in u), st.text(max_size=20), schemes, st.text(max_size=20))
def test_basic_credentials_round_trip(username, password, scheme, other):
    group = Group("g", (), (BasicStrategy(username, password, scheme),))
    value = auth.basic_authorization(username, password, scheme)
    assert auth.authenticate(group, {"Authorization": value}) == "basic"
    assert auth.authenticate(group, {"Authorization": value.replace(scheme, scheme.swapcase(), 1)}) == "basic"
    if other != password:
        with pytest.raises(Unauthorized):
            auth.authenticate(group, {"Authorization": auth.basic_authorization(username, other, scheme)})


@props(200)
@given(st.text(max_size=30), schemes, st.text(max_size=30))
def test_bearer_credentials_round_trip(token, scheme, other):
    group = Group("g", (), (BearerStrategy(hashlib.sha256(token.encode()).digest(), scheme),))
    assert auth.authenticate(group, {"Authorization": auth.bearer_authorization(token, scheme)}) == "bearer"
    if other != token:
        with pytest.raises(Unauthorized):
            auth.authenticate(group, {"Authorization": auth.bearer_authorization(other, scheme)})


@props(200)
@given(st.binary(max_size=200) | mutated(VECTORS, MSGPACK_SNIPPETS))
def test_registration_bytes_to_authentication(raw):
    """The server's whole path for peer bytes: decode, then authenticate."""
    outcome = registration_outcome([raw], "req")
    if outcome[0] == "ok":
        try:
            auth.authenticate(GROUP, outcome[1].metadata, external_check=lambda s, v: False)
        except Unauthorized:
            pass


# =====================================================================================
# 5. Durations (reverst.durations: flags and groups-file timeouts)
# =====================================================================================

DURATION_UNITS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"), "μs": Decimal("1e-6"),
                  "ms": Decimal("1e-3"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
duration_numbers = st.one_of(
    st.integers(0, 10**7).map(str),
    st.builds("{}.{}".format, st.integers(0, 10**4), st.text(string.digits, max_size=6)),
    st.text(string.digits, min_size=1, max_size=6).map(lambda d: "." + d))


@props(200)
@given(st.text(max_size=40) | st.text("0123456789.+-nsuµμmh", max_size=40))
@example("11m" * 30 + "x")         # exponential backtracking in the old pattern
@example("1" * 30 + "m" * 2 + "!")
@example("9" * 400 + "h")
@example("-0")
def test_durations_parse_or_value_error(text):
    start = time.monotonic()
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        assert one_line(str(exc))
    else:
        assert isinstance(seconds, float) and math.isfinite(seconds)
    assert time.monotonic() - start < 0.1


@props(150)
@given(st.lists(st.tuples(duration_numbers, st.sampled_from(sorted(DURATION_UNITS))), min_size=1, max_size=6),
       st.sampled_from(["", "+", "-"]))
def test_duration_round_trip(terms, sign):
    text = sign + "".join(number + unit for number, unit in terms)
    expected = sum(Decimal(number) * DURATION_UNITS[unit] for number, unit in terms)
    if expected > (2**63 - 1) / Decimal(10**9):
        with pytest.raises(ValueError):
            parse_duration(text)
        return
    seconds = parse_duration(text)
    assert seconds == pytest.approx(float(-expected if sign == "-" else expected), rel=1e-12, abs=1e-12)


@props(50)
@given(st.integers(-2**60, 2**60) | st.floats(allow_nan=False) | st.booleans() | st.none() | st.binary())
def test_non_text_durations(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert parse_duration(value) == float(value)
    else:
        with pytest.raises(TypeError):
            parse_duration(value)


# =====================================================================================
# 6. Other parsers of peer headers (forwarding, WebSocket, hop-by-hop, WSGI environ)
# =====================================================================================

header_names = st.sampled_from(["X-Forwarded-For", "x-forwarded-for", "X-Forwarded-Host", "Forwarded", "X-Real-IP",
                                "Connection", "Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "TE",
                                "Keep-Alive", "Transfer-Encoding", "Host", "Cookie"]) | st.text(TCHAR, min_size=1,
                                                                                               max_size=10)
addresses = st.sampled_from(["10.0.0.1", "10.1.2.3", "192.168.1.7", "::1", "::ffff:10.0.0.1", "fe80::1%eth0",
                             "2001:db8::1", "", "unknown", " 10.0.0.1 "]) | LATIN1
address_lists = st.lists(addresses, max_size=4).map(", ".join)
latin1_headers = st.lists(st.tuples(header_names, address_lists | LATIN1), max_size=8)


@props(200)
@given(st.text(max_size=60) | st.lists(addresses, max_size=4).map(",".join)
       | st.sampled_from(["", "any", "None", "10.0.0.0/8,::1", "10.0.0.1/8"]))
def test_trusted_proxies_parse_or_value_error(text):
    try:
        trusted = forwarding.TrustedProxies.parse(text)
    except ValueError as exc:
        assert one_line(str(exc))
        return
    str(trusted)


@props(150)
@given(latin1_headers, addresses, st.sampled_from(["any", "none", "10.0.0.0/8", "10.0.0.0/8,::1,192.168.0.0/16"]))
def test_visitor_address_is_the_peer_or_a_forwarded_hop(headers, peer, trusted_text):
    trusted = forwarding.TrustedProxies.parse(trusted_text)
    trusted.trusts(peer)
    address = forwarding.visitor_address(headers, peer, trusted)
    hops = [hop.strip() for k, v in headers if k.lower() == "x-forwarded-for" for hop in v.split(",")]
    assert address == peer or address in hops
    if trusted.everyone or not trusted.trusts(peer):
        assert address == peer
    rebuilt = forwarding.rebuild(headers, "http")
    assert [k for k, _ in rebuilt if k.lower() in forwarding.FORWARDING_HEADERS] == ["X-Forwarded-Proto"]


@props(150)
@given(st.sampled_from(["GET", "POST", "CONNECT"]), st.sampled_from(["1.1", "1.0", "2.0"]), latin1_headers,
       st.booleans(), st.binary(min_size=16, max_size=16))
@example("GET", "1.1", [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
                        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")], False, b"\0" * 16)
def test_websocket_handshakes_give_a_key_or_a_handshake_error(method, version, headers, has_body, nonce):
    if not headers or headers[0][0] != "Upgrade":  # half the time, a handshake that is nearly right
        headers = [("Upgrade", "websocket"), ("Connection", "keep-alive, Upgrade"), ("Sec-WebSocket-Version", "13"),
                   ("Sec-WebSocket-Key", base64.b64encode(nonce).decode())] + headers
    try:
        key = websocket.check_upgrade(method, version, headers, has_body)
    except websocket.HandshakeError as exc:
        assert exc.status in (400, 426, 501) and one_line(exc.reason)
        return
    accept = websocket.accept_value(key)
    assert len(base64.b64decode(accept)) == 20
    if key == "dGhlIHNhbXBsZSBub25jZQ==":
        assert accept == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3
    websocket.connect_fields("a", "/", headers, "10.0.0.1")


@props(100)
@given(latin1_headers)
def test_strip_hop_by_hop_leaves_no_hop_by_hop_field(headers):
    out = http3.strip_hop_by_hop(headers)
    named = http3.connection_tokens(v for k, v in headers if k.lower() == "connection")
    for name, value in out:
        low = name.lower()
        assert (low not in http3.HOP_BY_HOP and low not in named) or (low == "te" and value == "trailers")
    assert [f for f in out if f[0].lower() != "te"] == [f for f in headers if f in out and f[0].lower() != "te"]


h3_names = st.sampled_from([b":method", b":path", b":authority", b":scheme", b":protocol", b"content-length",
                            b"content-type", b"cookie", b"x-forwarded-for", b"x_under"]) | st.binary(max_size=10)


@props(100)
@given(st.lists(st.tuples(h3_names, st.binary(max_size=30)), max_size=10), st.none() | st.tuples(addresses,
                                                                                                 st.integers(0, 65535)))
def test_wsgi_environ_of_any_http3_request(headers, peer):
    environ = wsgi.make_environ(headers, None, peer=peer)
    for key in ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_NAME", "SERVER_PORT", "REMOTE_ADDR"):
        assert isinstance(environ[key], str)
    environ["PATH_INFO"].encode("latin-1")  # PEP 3333: native strings, latin-1
    if any(name == b":protocol" for name, _ in headers) and websocket.is_extended_connect(headers):
        websocket.upgrade_environ_fields(headers)


@props(200)
@given(st.binary(max_size=200) | st.builds(lambda status, fields: b"HTTP/1.1 " + status + b"\r\n" + fields,
                                             st.binary(max_size=8), st.binary(max_size=80)))
@example(b"HTTP/1.1 \xb2\xb3\xb9 Switching\r\n")
def test_application_101_heads_parse_or_value_error(head):
    """(The tunnel client reads the head an application wrote on an upgraded socket.)"""
    try:
        status, fields = websocket.response_for_101(head)
    except ValueError:
        return
    assert isinstance(status, int) and all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in fields)
