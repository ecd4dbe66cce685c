"""--trusted-proxies: forwarding headers from a trusted proxy count, anyone else's are
rebuilt from the connection (reverst.forwarding; real reverstd and tunnels for the rest)."""
from __future__ import annotations

import http.client
import ipaddress
import json

import pytest

from reverst.forwarding import TrustedProxies, rebuild

from .conftest import Server, TunnelClient


# -- the rules -----------------------------------------------------------------------------------
def test_parse_lists_addresses_and_networks_and_names_a_bad_entry():
    t = TrustedProxies.parse(" 10.0.0.0/8, 192.168.1.7 ,fd00::/8")
    assert t.networks == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.7/32"),
                          ipaddress.ip_network("fd00::/8")]
    assert TrustedProxies.parse(None).everyone and TrustedProxies.parse("any").everyone
    assert TrustedProxies.parse("none").networks == []
    with pytest.raises(ValueError, match=r"^'10\.0\.0\.300' is not an IP address or CIDR network$"):
        TrustedProxies.parse("10.0.0.0/8,10.0.0.300")


@pytest.mark.parametrize("address, trusted", [
    ("10.1.2.3", True), ("11.0.0.1", False), ("::ffff:10.9.9.9", True), ("fd00::1", True),
    ("fe80::1%eth0", False), ("", False), ("not-an-ip", False)])
def test_trusts_only_peers_inside_the_networks(address, trusted):
    assert TrustedProxies.parse("10.0.0.0/8,fd00::/8").trusts(address) is trusted


def test_no_one_and_anyone():
    assert not TrustedProxies.parse("none").trusts("127.0.0.1")
    assert TrustedProxies.parse("").trusts("203.0.113.9")


def test_rebuild_drops_every_forwarding_header_and_states_the_scheme():
    headers = [("Host", "app.test"), ("X-Forwarded-For", "1.2.3.4"), ("x-forwarded-host", "other"),
               ("X-Forwarded-Proto", "https"), ("X-Real-IP", "1.2.3.4"), ("Forwarded", "for=1.2.3.4"),
               ("X-Forwarded-Port", "443"), ("Accept", "*/*")]
    assert rebuild(headers, "http") == [("Host", "app.test"), ("Accept", "*/*"), ("X-Forwarded-Proto", "http")]


# -- through reverstd ------------------------------------------------------------------------------
def get(server, path, headers, source="127.0.0.1"):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def two_groups(certs, groups_file, procs):
    """reverstd trusting 127.0.0.2 only; app.test served by "a", local.example by "b"."""
    server = Server(certs, groups_file, extra=["--trusted-proxies", "127.0.0.2"])
    procs.append(server)
    procs.append(TunnelClient(server, certs, name="a"))
    procs.append(TunnelClient(server, certs, group="local.example", name="b"))
    return server


def test_a_visitor_cannot_pick_another_group_with_x_forwarded_host(two_groups):
    assert get(two_groups, "/name", {"Host": "app.test", "X-Forwarded-Host": "local.example"}) == (200, b"a")


def test_a_trusted_proxy_picks_the_group_with_x_forwarded_host(two_groups):
    assert get(two_groups, "/name", {"Host": "app.test", "X-Forwarded-Host": "local.example"},
               source="127.0.0.2") == (200, b"b")


def echoed(server, headers, source="127.0.0.1"):
    status, body = get(server, "/echo", {"Host": "app.test", **headers}, source)
    assert status == 200
    data = json.loads(body)
    return {k.lower(): v for k, v in data["headers"]}, data["remote_addr"]


def test_an_untrusted_visitors_forwarding_headers_are_replaced(two_groups):
    headers, remote = echoed(two_groups, {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
                                          "X-Real-IP": "203.0.113.9", "Forwarded": "for=203.0.113.9"})
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert "x-real-ip" not in headers and "forwarded" not in headers
    assert remote == "127.0.0.1"  # the app is told the truth


def test_a_trusted_proxys_x_forwarded_for_is_appended_to(two_groups):
    headers, remote = echoed(two_groups, {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
                             source="127.0.0.2")
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.2"
    assert headers["x-forwarded-proto"] == "https"
    assert remote == "127.0.0.2"


def test_by_default_anyone_is_trusted_and_reverstd_says_so_once(server, certs, procs):
    procs.append(TunnelClient(server, certs, name="a"))
    headers, _ = echoed(server, {"X-Forwarded-For": "203.0.113.9"})
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert "x-forwarded-proto" not in headers  # as the Go reverstd: nothing added
    warnings = [line for line in server.lines if "trusted from any public client" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]


def test_a_bad_trusted_proxies_value_is_a_one_line_error(certs, groups_file):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "reverst.cli", "reverstd", "-n", "localhost", "-k", certs["key"],
                           "-c", certs["cert"], "-g", str(groups_file), "--trusted-proxies", "10.0.0.0/33"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "'10.0.0.0/33' is not an IP address or CIDR network" in done.stderr.strip().splitlines()[-1]


def test_the_visitor_address_behind_trusted_proxies_is_the_nearest_untrusted_hop():
    from reverst.forwarding import visitor_address
    trusted = TrustedProxies.parse("10.0.0.0/8")
    xff = [("X-Forwarded-For", "198.51.100.7, 203.0.113.9"), ("x-forwarded-for", "10.1.1.1")]
    assert visitor_address(xff, "10.0.0.2", trusted) == "203.0.113.9"  # the proxies' own hops skipped
    assert visitor_address(xff, "192.0.2.1", trusted) == "192.0.2.1"  # not a proxy: its own address
    assert visitor_address([("X-Forwarded-For", "10.1.1.1")], "10.0.0.2", trusted) == "10.1.1.1"
    assert visitor_address([], "10.0.0.2", trusted) == "10.0.0.2"
    assert visitor_address(xff, "10.0.0.2", TrustedProxies.parse(None)) == "10.0.0.2"  # "anyone": no one here
