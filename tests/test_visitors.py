"""Visitor policy per group (``visitors:``) and ``maxTunnels``: reverst.policy alone with a
fake clock, then a real reverstd with real tunnels and visitors from 127.0.0.x addresses."""
from __future__ import annotations

import http.client
import json
import re
import threading
import time

import pytest
from reverst.auth import basic_authorization
from reverst.config import parse_groups
from reverst.errors import Unauthorized
from reverst.policy import Gate, Limits, TokenBucket, VisitorPolicy

from .conftest import TunnelClient
from .live import UPDATED, LiveServer, write_atomically
from .observe import ManagedServer


# -- the rules, with a fake clock --------------------------------------------------------------------
def no_auth(policy, authorization):
    raise AssertionError("no credentials were to be checked")


def test_a_token_bucket_gives_the_burst_then_the_rate():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(10.0) == 0.0  # refilled, but never past the burst
    assert bucket.tokens == pytest.approx(2.0)


def test_per_visitor_rate_counts_each_address_alone():
    gate = Gate(VisitorPolicy(limits=Limits(requests_per_second=1, burst=2)), "g")
    assert gate.admit("10.0.0.1", None, None, 0.0, no_auth) is None
    assert gate.admit("10.0.0.1", None, None, 0.0, no_auth) is None
    refusal = gate.admit("10.0.0.1", None, None, 0.0, no_auth)
    assert (refusal.status, refusal.reason, refusal.headers) == (429, "rate_limited", (("Retry-After", "1"),))
    assert gate.admit("10.0.0.2", None, None, 0.0, no_auth) is None
    assert gate.admit("10.0.0.1", None, None, 1.0, no_auth) is None


def test_the_group_rate_and_the_concurrency_cap():
    gate = Gate(VisitorPolicy(limits=Limits(group_requests_per_second=1, group_burst=2, concurrent_requests=1)), "g")
    assert gate.admit("10.0.0.1", None, None, 0.0, no_auth) is None
    gate.in_flight += 1
    refusal = gate.admit("10.0.0.2", None, None, 0.0, no_auth)
    assert (refusal.status, refusal.reason) == (503, "concurrency")
    gate.in_flight -= 1
    assert gate.admit("10.0.0.3", None, None, 0.0, no_auth) is None  # the 2nd of the burst (the 503 took none)
    assert gate.admit("10.0.0.4", None, None, 0.0, no_auth).reason == "group_rate_limited"


def test_deny_wins_over_allow_and_unparsable_addresses_are_outside_every_allow():
    policy = parse_groups('groups: {g: {visitors: {allow: ["10.0.0.0/8"], deny: ["10.0.5.0/24"]}}}',
                          "g.yml").groups["g"].visitors
    gate = Gate(policy, "g")
    assert gate.admit("10.1.2.3", None, None, 0.0, no_auth) is None
    assert gate.admit("::ffff:10.1.2.3", None, None, 0.0, no_auth) is None
    for address in ("10.0.5.9", "192.168.0.1", "", "bogus"):
        assert gate.admit(address, None, None, 0.0, no_auth).status == 403


def test_credentials_are_checked_before_limits_that_cost_the_group():
    policy = parse_groups("groups: {g: {visitors: {authentication: {basic: {username: v, password: w}}, "
                          "limits: {groupRequestsPerSecond: 1, maxBodySize: 10}}}}", "g.yml").groups["g"].visitors
    seen = []

    def check(policy, authorization):
        seen.append(authorization)
        if authorization != basic_authorization("v", "w"):
            raise Unauthorized("invalid credentials")
    gate = Gate(policy, "g")
    for _ in range(3):  # wrong credentials never use up the group's budget
        refusal = gate.admit("10.0.0.1", "Basic eDp5", None, 0.0, check)
        assert refusal.status == 401 and refusal.headers == (("WWW-Authenticate", 'Basic realm="g"'),)
    assert gate.admit("10.0.0.1", basic_authorization("v", "w"), 11, 0.0, check).status == 413
    assert gate.admit("10.0.0.1", basic_authorization("v", "w"), 10, 0.0, check) is None
    assert "eDp5" not in repr(gate.admit("10.0.0.1", "Basic eDp5", None, 0.0, check))


def test_a_reload_with_the_same_rates_keeps_the_buckets():
    text = "groups: {g: {visitors: {limits: {requestsPerSecond: 1}}}}"
    gate = Gate(parse_groups(text, "a.yml").groups["g"].visitors, "g")
    assert gate.admit("10.0.0.1", None, None, 0.0, no_auth) is None
    gate.configure(parse_groups(text, "a.yml").groups["g"].visitors)
    assert gate.admit("10.0.0.1", None, None, 0.0, no_auth).status == 429  # not a fresh bucket
    gate.configure(parse_groups(text.replace("1}", "5}"), "a.yml").groups["g"].visitors)
    assert gate.admit("10.0.0.1", None, None, 0.0, no_auth) is None


def test_the_policy_in_words():
    policy = parse_groups('groups: {g: {visitors: {allow: ["10.0.0.0/8"], authentication: {bearer: {token: t}}, '
                          'limits: {requestsPerSecond: 5, concurrentRequests: 20, maxBodySize: 1MiB}}}}',
                          "g.yml").groups["g"].visitors
    assert policy.describe() == ("visitors from 10.0.0.0/8 only; visitors authenticate with Bearer; "
                                 "5 requests/s per visitor (burst 5); at most 20 requests at once; "
                                 "request bodies up to 1048576 bytes")
    assert VisitorPolicy().describe() == "anyone, without limits"


@pytest.mark.parametrize("yaml_text, message", [
    ('visitors: {allow: ["10.0.0.0/8", "10.1.0.0/16"]}', 'groups."g".visitors.allow[1]: 10.1.0.0/16 overlaps 10.0.0.0/8'),
    ('visitors: {allow: ["10.0.0.1/8"]}', 'groups."g".visitors.allow[0]: "10.0.0.1/8" has host bits set'),
    ('visitors: {deny: ["nope"]}', 'groups."g".visitors.deny[0]: "nope" is not an IP address or CIDR network'),
    ('visitors: {allow: ["10.0.0.0/8"], deny: ["10.0.0.0/8"]}', 'groups."g".visitors.deny[0]: 10.0.0.0/8 is also in allow'),
    ("visitors: {limits: {burst: 4}}", 'groups."g".visitors.limits.burst: needs requestsPerSecond'),
    ("visitors: {limits: {requestsPerSecond: -1}}",
     'groups."g".visitors.limits.requestsPerSecond: must be a number of requests per second above 0'),
    ("visitors: {limits: {maxBodySize: huge}}",
     'groups."g".visitors.limits.maxBodySize: must be a size in bytes, such as 1048576, 512KiB, 10MB or 1GiB'),
    ("visitors: {limits: {concurrent: 4}}", 'groups."g".visitors.limits.concurrent: unknown key'),
    ("maxTunnels: 0", 'groups."g".maxTunnels: must be a whole number of at least 1'),
    ("visitors: {authentication: {basic: {username: v}}}", 'groups."g".visitors.authentication.basic.password: required'),
])
def test_bad_policies_are_one_line_errors_naming_file_group_and_key(yaml_text, message):
    from reverst.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        parse_groups(f"groups:\n  g:\n    {yaml_text}\n", "groups.yml")
    assert str(info.value) == f"groups.yml: {message}"
    assert "\n" not in str(info.value)


# -- through reverstd ------------------------------------------------------------------------------
GROUPS = """\
groups:
  app.test:
    hosts: [app.test]
    authentication: {basic: {username: user, password: pass}}
    visitors:
      allow: ["127.0.0.0/8"]
      deny: ["127.0.0.3"]
      limits: {requestsPerSecond: 2, burst: 4, maxBodySize: 1000}
  private.test:
    hosts: [private.test]
    authentication: {basic: {username: user, password: pass}}
    maxTunnels: 1
    visitors:
      authentication: {basic: {username: visitor, password: secret-pw}}
      limits: {concurrentRequests: 2}
"""


def request(port, method, path, host, source="127.0.0.1", headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15, source_address=(source, 0))
    try:
        headers = {"Host": host, **(headers or {})}
        conn.request(method, path, body=body, headers=headers, encode_chunked="Transfer-Encoding" in headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def start_edge(server_class, certs, tmp_path, procs):
    """``server_class`` (a reverstd) on GROUPS, with a tunnel in app.test and in private.test."""
    path = tmp_path / "groups.yml"
    path.write_text(GROUPS)
    server = server_class(certs, path)
    procs.append(server)
    procs.append(TunnelClient(server, certs, name="app"))
    procs.append(TunnelClient(server, certs, group="private.test", name="private"))
    return server


@pytest.fixture
def edge(certs, tmp_path, procs):
    return start_edge(ManagedServer, certs, tmp_path, procs)


def test_allow_and_deny_by_visitor_address(edge):
    assert request(edge.http_port, "GET", "/name", "app.test", source="127.0.0.2")[::2] == (200, b"app")
    status, _, body = request(edge.http_port, "GET", "/name", "app.test", source="127.0.0.3")
    assert (status, body) == (403, b"forbidden: this address may not use this host\n")


def test_a_burst_past_the_rate_gets_429_with_retry_after_and_other_visitors_do_not(edge):
    statuses = [request(edge.http_port, "GET", "/name", "app.test", source="127.0.0.4")[:2] for _ in range(6)]
    assert [s for s, _ in statuses[:4]] == [200] * 4
    assert statuses[4][0] == 429 and statuses[4][1]["Retry-After"] == "1"
    assert request(edge.http_port, "GET", "/name", "app.test", source="127.0.0.5")[0] == 200


def test_a_body_over_the_limit_is_413_before_it_reaches_the_tunnel(edge):
    status, _, body = request(edge.http_port, "POST", "/upload", "app.test", source="127.0.0.6", body=b"x" * 1001)
    assert (status, body) == (413, b"request body larger than 1000 bytes\n")
    assert request(edge.http_port, "POST", "/upload", "app.test", source="127.0.0.7", body=b"x" * 1000)[0] == 200


def test_a_chunked_body_growing_past_the_limit_is_413(edge):
    chunks = iter([b"x" * 600, b"x" * 600])
    status, _, _ = request(edge.http_port, "POST", "/upload", "app.test", source="127.0.0.8", body=chunks,
                           headers={"Transfer-Encoding": "chunked"})
    assert status == 413


def test_visitor_credentials_are_checked_and_never_reach_the_app(edge):
    status, headers, _ = request(edge.http_port, "GET", "/name", "private.test")
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="private.test"'
    wrong = {"Authorization": basic_authorization("visitor", "nope")}
    assert request(edge.http_port, "GET", "/name", "private.test", headers=wrong)[0] == 401
    right = {"Authorization": basic_authorization("visitor", "secret-pw")}
    status, _, body = request(edge.http_port, "GET", "/echo", "private.test", headers=right)
    assert status == 200
    seen = {k.lower() for k, _ in json.loads(body)["headers"]}
    assert "authorization" not in seen
    assert "secret-pw" not in edge.output() and basic_authorization("visitor", "secret-pw") not in edge.output()


def test_the_concurrency_cap_refuses_the_third_request_at_once(edge):
    right = {"Authorization": basic_authorization("visitor", "secret-pw")}
    results = []

    def slow():
        results.append(request(edge.http_port, "GET", "/sleep?ms=1500", "private.test", headers=right)[0])
    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    started = time.monotonic()
    status, headers, _ = request(edge.http_port, "GET", "/name", "private.test", headers=right)
    assert (status, headers.get("Retry-After")) == (503, "1") and time.monotonic() - started < 1.0
    for t in threads:
        t.join(10)
    assert results == [200, 200]
    assert request(edge.http_port, "GET", "/name", "private.test", headers=right)[0] == 200  # released


def test_refusals_are_counted_by_reason(edge):
    request(edge.http_port, "GET", "/name", "app.test", source="127.0.0.3")
    request(edge.http_port, "GET", "/name", "private.test")
    m = edge.metrics()
    family = "reverst_tunnel_group_visitor_refusals_total"
    assert m[family, {"tunnel_group": "app.test", "reason": "denied"}] == 1
    assert m[family, {"tunnel_group": "private.test", "reason": "unauthorized"}] == 1


def test_the_status_page_says_each_groups_policy_in_words(edge):
    groups = {g["name"]: g for g in edge.get("/status").json()["groups"]}
    assert groups["app.test"]["visitors"] == ("visitors from 127.0.0.0/8 only; none from 127.0.0.3/32; "
                                              "2 requests/s per visitor (burst 4); request bodies up to 1000 bytes")
    assert groups["private.test"]["visitors"] == "visitors authenticate with Basic; at most 2 requests at once"
    assert (groups["private.test"]["max_tunnels"], groups["app.test"]["max_tunnels"]) == (1, None)


def test_max_tunnels_refuses_the_next_client_with_a_reason_it_retries_on(edge, certs, procs):
    second = TunnelClient(edge, certs, group="private.test", name="second", wait=False)
    procs.append(second)
    second._wait_or_kill(r"registration with .* failed \(tunnel group full \(1 tunnels\)", timeout=15)
    second._wait_or_kill(r"retrying in", timeout=5)
    assert second.popen.poll() is None  # not fatal: it keeps trying
    assert re.search(r"registration from .* rejected \(group 'private.test'\): tunnel group full", edge.output())


def test_a_policy_changed_live_applies_without_failing_other_groups(certs, tmp_path, procs):
    server = start_edge(LiveServer, certs, tmp_path, procs)
    path = tmp_path / "groups.yml"
    right = {"Authorization": basic_authorization("visitor", "secret-pw")}
    failures, done = [], threading.Event()

    def loop():
        while not done.is_set():
            status = request(server.http_port, "GET", "/name", "private.test", headers=right)[0]
            if status != 200:
                failures.append(status)
            time.sleep(0.02)
    t = threading.Thread(target=loop)
    t.start()
    try:
        assert request(server.http_port, "GET", "/name", "app.test", source="127.0.0.9")[0] == 200
        mark = server.mark()
        write_atomically(path, GROUPS.replace('deny: ["127.0.0.3"]', 'deny: ["127.0.0.3", "127.0.0.9"]'))
        server.wait_after(mark, UPDATED, timeout=8)
        assert request(server.http_port, "GET", "/name", "app.test", source="127.0.0.9")[0] == 403
        mark = server.mark()
        write_atomically(path, GROUPS.replace("deny: [", "deny: [bad, "))  # a bad version: the last good stays
        server.wait_after(mark, r"tunnel groups not reloaded", timeout=8)
        assert request(server.http_port, "GET", "/name", "app.test", source="127.0.0.9")[0] == 403
    finally:
        done.set()
        t.join(10)
    assert failures == []


@pytest.mark.timeout(60)
def test_the_go_client_in_a_full_group_retries_then_gives_up_naming_the_reason(edge, certs, procs):
    from .gopeer import GoClient, go_missing_reason
    if go_missing_reason():
        pytest.skip(go_missing_reason())
    go = GoClient(edge, certs, "http://127.0.0.1:9", group="private.test", wait=False)
    procs.append(go)
    deadline = time.monotonic() + 30
    while go.popen.poll() is None:  # the Go CLI gives up after ~5 failed dials (its own rule)
        assert time.monotonic() < deadline, go.output()[-2000:]
        time.sleep(0.1)
    assert go.popen.returncode == 1
    assert go.output().count("tunnel group full (1 tunnels): server error") >= 3  # it retried: 0x1, not fatal
    assert go.output().strip().splitlines()[-1] == \
        "error: dialing and registering connection: tunnel group full (1 tunnels): server error"
