"""The registration codec against the bytes the Go implementation writes and accepts."""
import csv
import pathlib

import msgpack
import pytest

from reverst import protocol
from reverst.errors import BadRequest, NotFound, ProtocolViolation, ServerError, Unauthorized
from reverst.protocol import (
    MessageDecoder, RegisterRequest, RegisterResponse, decode_request_untrusted,
    decode_response_untrusted, encode_request, encode_response,
)

DATA = pathlib.Path(__file__).parent / "data"


def vector(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.mark.parametrize("name,auth", [
    ("request_noauth.bin", None),
    ("request_basic_user_pass.bin", "Basic dXNlcjpwYXNz"),
    ("request_bearer_some-token.bin", "Bearer some-token"),
    ("request_bearer_t_scheme_JWT.bin", "JWT t"),
])
def test_request_vectors_round_trip(name, auth):
    raw = vector(name)
    req = decode_request_untrusted(msgpack.unpackb(raw))
    assert req.version == 1
    assert req.tunnel_group == "local.example"
    assert req.metadata == (None if auth is None else {"Authorization": auth})
    assert encode_request(req) == raw  # byte for byte, including Go's 0xcc 0x01


def test_response_ok_is_byte_identical_to_go():
    assert encode_response(RegisterResponse()) == vector("response_ok.bin")
    assert encode_response(RegisterResponse()) == vector("response_ok_wire_captured.bin")


@pytest.mark.parametrize("name", [
    "response_ok.bin", "response_ok_wire_captured.bin", "response_ok_empty_body_and_metadata.bin",
])
def test_response_vectors_decode(name):
    resp = decode_response_untrusted(msgpack.unpackb(vector(name)))
    assert (resp.version, resp.code) == (1, 0)
    assert not resp.metadata and not resp.body


def test_decoder_is_incremental_without_fin():
    raw = vector("request_basic_user_pass.bin")
    dec = MessageDecoder()
    for i in range(len(raw) - 1):
        assert dec.feed(raw[i:i + 1]) is None
    obj = dec.feed(raw[-1:])
    assert decode_request_untrusted(obj).metadata == {"Authorization": "Basic dXNlcjpwYXNz"}


def _compat_rows():
    with open(DATA / "decoder-compat.tsv") as fh:
        return [row for row in csv.reader(fh, delimiter="\t")]


@pytest.mark.parametrize("kind,name,hexdata,go", _compat_rows())
def test_decoder_accepts_what_go_accepts(kind, name, hexdata, go):
    """decoder-compat.tsv: what the Go decoder made of alternative encodings."""
    raw = bytes.fromhex(hexdata)
    go_error = "err=<nil>" not in go
    try:
        obj = MessageDecoder().feed(raw)
        if obj is None:
            raise ProtocolViolation("incomplete")
        decoded = (decode_request_untrusted if kind == "req" else decode_response_untrusted)(obj)
    except ProtocolViolation:
        assert go_error, f"{name}: Go accepts this, we rejected it"
        return
    assert not go_error, f"{name}: Go rejects this, we accepted it"
    if kind == "req":
        assert f"Version:0x{decoded.version:x}" in go
        assert f'TunnelGroup:"{decoded.tunnel_group}"' in go
        if decoded.metadata:
            assert '"Authorization":"Basic dXNlcjpwYXNz"' in go
    else:
        assert f"Version:0x{decoded.version:x}" in go and f"Code:0x{decoded.code:x}" in go
        if decoded.body:
            assert "0x68, 0x69" in go


@pytest.mark.parametrize("garbage", [b"\xc1", b"\x01", b"\xa3abc", b"\x93\xc3\xc3\xc3"])
def test_garbage_is_a_protocol_violation(garbage):
    with pytest.raises(ProtocolViolation):
        obj = MessageDecoder().feed(garbage)
        if obj is not None:
            decode_request_untrusted(obj)


def test_oversized_message_is_rejected_before_buffering_it_all():
    dec = MessageDecoder(max_size=1024)
    with pytest.raises(ProtocolViolation, match="larger than 1024"):
        dec.feed(b"\xdb\x00\x01\x00\x00" + b"x" * 2000)


def test_request_repr_hides_credentials():
    req = RegisterRequest("g", {"Authorization": "Bearer secret-token"})
    assert "secret-token" not in repr(req)


@pytest.mark.parametrize("exc,code,reason", [
    (Unauthorized("x"), 0x2, "unauthorized"),
    (ProtocolViolation("x"), 0x2, "bad request"),
    (NotFound("x"), 0x1, "not found"),
])
def test_close_codes_match_protocol_table(exc, code, reason):
    assert protocol.close_for_error(exc) == (code, reason)


@pytest.mark.parametrize("code,reason,exc_type,text", [
    (0x2, "unauthorized", Unauthorized, "client error: unauthorized"),
    (0x2, "bad request", BadRequest, "client error: bad request"),
    (0x1, "not found", NotFound, "not found: server error"),
    (0x1, "msgpack: unexpected code=c1 decoding map length", ServerError,
     "msgpack: unexpected code=c1 decoding map length: server error"),
])
def test_client_error_mapping_matches_go_words(code, reason, exc_type, text):
    exc = protocol.error_for_close(code, reason)
    assert isinstance(exc, exc_type) and str(exc) == text
