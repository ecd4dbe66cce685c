"""Credential checks with the Authorization values the Go client really sends."""
import base64
import hashlib

import pytest

from reverst.auth import authenticate, basic_authorization, bearer_authorization
from reverst.config import BasicStrategy, BearerStrategy, ExternalStrategy, Group, parse_groups
from reverst.errors import ReverstError, Unauthorized

# From /work/shared/vectors/registration/README.md (captured from the Go client).
GO_BASIC_USER_PASS = "Basic dXNlcjpwYXNz"
GO_BEARER_SOME_TOKEN = "Bearer some-token"
GO_JWT_T = "JWT t"

SECRETS = ("pass", "some-token")


def md(value):
    return {"Authorization": value}


def sha(text):
    return hashlib.sha256(text.encode()).digest()


BASIC = Group("app", ("app.dev",), (BasicStrategy("user", "pass", "Basic"),))
BEARER = Group("app", (), (BearerStrategy(sha("some-token"), "Bearer", "token"),))
MIXED = Group("app", (), (BasicStrategy("user", "pass", "Basic"), BearerStrategy(sha("t"), "JWT", "token")))


def reject(group, metadata, reason=None, **kwargs):
    with pytest.raises(Unauthorized) as info:
        authenticate(group, metadata, **kwargs)
    assert isinstance(info.value, ReverstError)
    message = str(info.value)
    assert not any(secret in message for secret in SECRETS + ("dXNlcjpwYXNz",))
    if reason is not None:
        assert message == reason
    return message


def test_client_helpers_match_go():
    assert basic_authorization("user", "pass") == GO_BASIC_USER_PASS
    assert bearer_authorization("some-token") == GO_BEARER_SOME_TOKEN
    assert bearer_authorization("t", scheme="JWT") == GO_JWT_T
    assert basic_authorization("user", "pass", scheme="X") == "X dXNlcjpwYXNz"


def test_open_group_accepts_anything():
    open_group = Group("open")
    assert open_group.is_open
    assert authenticate(open_group, None) == "open"
    assert authenticate(open_group, {}) == "open"
    assert authenticate(open_group, md("garbage")) == "open"


def test_basic_right():
    assert authenticate(BASIC, md(GO_BASIC_USER_PASS)) == "basic"


@pytest.mark.parametrize("user,password", [("user", "wrong"), ("wrong", "pass"), ("", ""), ("user", "pass ")])
def test_basic_wrong(user, password):
    reject(BASIC, md(basic_authorization(user, password)), "invalid credentials")


def test_basic_password_may_contain_colons():
    group = Group("g", (), (BasicStrategy("u", "a:b:c", "Basic"),))
    assert authenticate(group, md(basic_authorization("u", "a:b:c"))) == "basic"


@pytest.mark.parametrize("payload", ["not base64!", "dXNlcjpwYXNz=", "dXNlcjpwYXN", "dX==bmxj", "dXNl cjpw", "é", "",
                                     base64.b64encode(b"no-colon").decode()])
def test_basic_malformed_payload(payload):
    reject(BASIC, md(f"Basic {payload}"), "malformed basic credentials")


def test_bearer_right():
    assert authenticate(BEARER, md(GO_BEARER_SOME_TOKEN)) == "bearer"


@pytest.mark.parametrize("value", ["Bearer other", "Bearer some-token ", "Bearer ", "Bearer Some-token"])
def test_bearer_wrong(value):
    reject(BEARER, md(value), "invalid credentials")


def test_two_schemes_in_one_group_both_work():
    assert authenticate(MIXED, md(GO_JWT_T)) == "bearer"
    assert authenticate(MIXED, md(GO_BASIC_USER_PASS)) == "basic"
    # The default bearer scheme is not accepted once overridden.
    reject(MIXED, md("Bearer t"), "unknown scheme")
    # A JWT token is not checked against the basic credentials, nor the other way round.
    reject(MIXED, md("JWT dXNlcjpwYXNz"), "invalid credentials")
    reject(MIXED, md("Basic t"), "malformed basic credentials")


@pytest.mark.parametrize("value", ["basic dXNlcjpwYXNz", "BASIC dXNlcjpwYXNz", "bAsIc dXNlcjpwYXNz"])
def test_scheme_is_case_insensitive(value):
    assert authenticate(BASIC, md(value)) == "basic"
    assert authenticate(MIXED, md("jwt t")) == "bearer"


@pytest.mark.parametrize("metadata", [None, {}, {"authorization": GO_BASIC_USER_PASS}, {"Other": "x"}])
def test_missing_authorization(metadata):
    reject(BASIC, metadata, "missing authorization")


@pytest.mark.parametrize("value", ["Basic", "dXNlcjpwYXNz", "", "Bearer\tsome-token"])
def test_payload_without_space(value):
    reject(BASIC, md(value), "malformed authorization")


def test_non_string_authorization():
    reject(BASIC, {"Authorization": b"Basic dXNlcjpwYXNz"}, "malformed authorization")


@pytest.mark.parametrize("value", ["Bearer some-token", "Digest x", " dXNlcjpwYXNz"])
def test_unknown_scheme(value):
    reject(BASIC, md(value), "unknown scheme")


EXTERNAL = Group("ext", (), (ExternalStrategy("http://auth/ext", "Bearer"),))


def test_external_delegates_with_the_whole_value():
    calls = []

    def check(strategy, value):
        calls.append((strategy, value))
        return value == "Bearer good"

    assert authenticate(EXTERNAL, md("Bearer good"), external_check=check) == "external"
    reject(EXTERNAL, md("Bearer bad"), "invalid credentials", external_check=check)
    assert calls == [(EXTERNAL.strategies[0], "Bearer good"), (EXTERNAL.strategies[0], "Bearer bad")]


def test_external_unavailable():
    reject(EXTERNAL, md("Bearer good"), "external authorization unavailable")


def test_external_error_means_unauthorized():
    def check(strategy, value):
        raise OSError("connection refused")

    reject(EXTERNAL, md("Bearer good"), "external authorization failed", external_check=check)


def test_end_to_end_with_parsed_config(tmp_path):
    (tmp_path / "token").write_text("some-token\n")
    config = parse_groups(
        'groups:\n'
        '  app:\n'
        '    authentication:\n'
        '      basic: {username: user, password: pass}\n'
        '      bearer: {tokenPath: token}\n'
        '  jwt:\n'
        '    authentication:\n'
        '      bearer: {hashedToken: "%s", scheme: JWT}\n' % hashlib.sha256(b"t").hexdigest(),
        str(tmp_path / "groups.yml"))
    assert authenticate(config.group("app"), md(GO_BASIC_USER_PASS)) == "basic"
    assert authenticate(config.group("app"), md(GO_BEARER_SOME_TOKEN)) == "bearer"
    assert authenticate(config.group("jwt"), md(GO_JWT_T)) == "bearer"
    reject(config.group("jwt"), md(GO_BEARER_SOME_TOKEN), "unknown scheme")
