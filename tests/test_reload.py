"""Live reload of a groups file with ``reverstd -w``: every kind of change, each while
another group keeps serving public requests without a single failure.

One reverstd and one steady tunnel client serve the whole module; every test writes the
complete file it needs (the steady group is always in it)."""
import hashlib
import os
import re
import time

import pytest

from .conftest import TunnelClient
from .live import (
    NOT_RELOADED, UPDATED, LiveServer, apply, basic, bearer, steady_traffic, wait_closed,
    write_atomically, write_in_place,
)

STEADY = """\
groups:
  steady.test:
    hosts: [steady.test]
    authentication:
      basic: {username: user, password: pass}
"""

DELAYS: list[float] = []  # how long each change took to be applied, for the summary


@pytest.fixture(scope="module")
def live(certs, tmp_path_factory):
    path = tmp_path_factory.mktemp("reload") / "groups.yml"
    path.write_text(STEADY)
    server = LiveServer(certs, path)
    steady = TunnelClient(server, certs, group="steady.test", name="steady")
    yield server, path
    steady.stop()
    server.stop()
    if DELAYS:
        print(f"\nreload pickup: n={len(DELAYS)} max={max(DELAYS):.2f}s mean={sum(DELAYS) / len(DELAYS):.2f}s")


@pytest.fixture
def server(live):
    return live[0]


@pytest.fixture
def path(live):
    server, path = live
    if path.read_text() != STEADY:  # back to the steady file only, before each test
        mark = server.mark()
        write_atomically(path, STEADY)
        # Applied, or already in effect (after an invalid version, say).
        server.wait_after(mark, f"{UPDATED}|configuration they make is the same", timeout=4)
    return path


@pytest.fixture
def clients(server, certs):
    started = []

    def start(**kwargs):
        client = TunnelClient(server, certs, **kwargs)
        started.append(client)
        return client
    yield start
    for client in started:
        client.stop()


def change(server, write, *args):
    delay = apply(server, write, *args)
    DELAYS.append(delay)
    assert delay < 2.0, f"change applied after {delay:.2f}s"
    return delay


def test_steady_group_serves(server, path):
    with steady_traffic(server) as t:
        time.sleep(0.3)
    assert t.ok > 10


def test_add_group(server, path, clients):
    assert server.get("new.test").text == "bad gateway\n"
    with steady_traffic(server):
        change(server, write_atomically, path, STEADY + """\
  new.test:
    hosts: [new.test]
    authentication:
      basic: {username: new, password: secret}
""")
        r = server.get("new.test")
        assert (r.status_code, r.text) == (502, "")  # the group exists, no tunnel yet
        clients(group="new.test", name="new", auth=("new", "secret"))
        r = server.get("new.test")
        assert (r.status_code, r.text) == (200, "new")


def test_remove_group_disconnects_its_tunnels(server, path, clients, registrar):
    change(server, write_atomically, path, STEADY + """\
  gone.test:
    hosts: [gone.test]
    authentication:
      bearer: {token: gone-token}
""")
    clients(group="gone.test", name="gone", auth=None, extra=["--token", "gone-token"])
    raw, closed = registrar.register("gone.test", bearer("gone-token"))
    assert closed is None
    assert server.get("gone.test").text == "gone"
    with steady_traffic(server):
        mark = server.mark()
        change(server, write_atomically, path, STEADY)
        reason = wait_closed(raw)
        assert (reason.error_code, reason.application) == (0x0, True)
        assert reason.reason == "tunnel group removed"
        server.wait_after(mark, r"tunnel \S+ left group 'gone.test': tunnel group removed \(application error 0x0\)")
        r = server.get("gone.test")
        assert (r.status_code, r.text) == (502, "bad gateway\n")


def test_change_hosts_reroutes(server, path, clients):
    group = """\
  moving.test:
    hosts: [{hosts}]
    authentication:
      basic: {{username: user, password: pass}}
"""
    change(server, write_atomically, path, STEADY + group.format(hosts="old.test"))
    clients(group="moving.test", name="moving")
    assert server.get("old.test").text == "moving"
    with steady_traffic(server):
        change(server, write_atomically, path, STEADY + group.format(hosts="new-host.test, other.test"))
        assert (server.get("old.test").status_code, server.get("old.test").text) == (502, "bad gateway\n")
        # The connected tunnel stays: the same client now answers for the new hosts.
        assert server.get("new-host.test").text == "moving"
        assert server.get("other.test").text == "moving"


def test_change_password_applies_to_new_registrations(server, path, registrar):
    group = """\
  pw.test:
    hosts: [pw.test]
    authentication:
      basic: {{username: user, password: {password}}}
"""
    change(server, write_atomically, path, STEADY + group.format(password="first"))
    first, closed = registrar.register("pw.test", basic("user", "first"))
    assert closed is None
    with steady_traffic(server):
        change(server, write_atomically, path, STEADY + group.format(password="second"))
        assert not registrar.accepted("pw.test", basic("user", "first"))
        assert registrar.accepted("pw.test", basic("user", "second"))
    assert first.conn.is_open  # established tunnels are not re-checked


@pytest.mark.parametrize("bad,error", [
    (STEADY.replace("hosts:", "hostz:"), r'groups.yml: groups."steady.test".hostz: unknown key$'),
    (STEADY + "  broken: {hosts: [x\n", r"groups.yml: line \d+, column \d+: invalid YAML"),
    (STEADY + "  dup:\n    hosts: [steady.test]\n", r'groups.yml: groups."dup".hosts: host "steady.test" is already in group "steady.test"$'),
    (STEADY + "  b:\n    authentication:\n      bearer: {scheme: X}\n",
     r'groups.yml: groups."b".authentication.bearer: one of token, tokenPath, hashedToken, hashedTokenPath is required$'),
], ids=["unknown-key", "yaml-syntax", "duplicate-host", "bearer-without-token"])
def test_invalid_file_is_logged_and_ignored(server, path, bad, error):
    with steady_traffic(server):
        mark = server.mark()
        write_atomically(path, bad)
        line = server.wait_after(mark, NOT_RELOADED + ".*", timeout=3).group(0)
        assert str(path) in line and re.search(error, line), line
        time.sleep(0.6)  # another poll: the same bad file is not reported twice
        assert len(server.lines_after(mark, NOT_RELOADED)) == 1
        assert not server.lines_after(mark, UPDATED)
        # And the next good version applies.
        change(server, write_atomically, path, STEADY + "  after.test: {hosts: [after.test], "
                                                         "authentication: {basic: {username: a, password: b}}}\n")
        assert server.get("after.test").status_code == 502 and server.get("after.test").text == ""


def test_atomic_rename(server, path):
    with steady_traffic(server):
        change(server, write_atomically, path, STEADY + "  renamed.test: {hosts: [renamed.test], "
                                                         "authentication: {basic: {username: a, password: b}}}\n")
    assert server.get("renamed.test").text == ""


def test_in_place_edit_of_the_same_size(server, path, registrar):
    group = "  inplace.test: {{hosts: [inplace.test], authentication: {{basic: {{username: u, password: {pw}}}}}}}\n"
    change(server, write_atomically, path, STEADY + group.format(pw="aaaa"))
    with steady_traffic(server):
        inode = os.stat(path).st_ino
        change(server, write_in_place, path, STEADY + group.format(pw="bbbb"))
        assert os.stat(path).st_ino == inode
        assert registrar.accepted("inplace.test", basic("u", "bbbb"))
        assert not registrar.accepted("inplace.test", basic("u", "aaaa"))


def test_delete_and_recreate(server, path):
    def recreate(path, text):
        os.remove(path)
        time.sleep(0.05)
        path.write_text(text)

    with steady_traffic(server):
        change(server, recreate, path, STEADY + "  recreated.test: {hosts: [recreated.test], "
                                                 "authentication: {basic: {username: a, password: b}}}\n")
    assert server.get("recreated.test").text == ""


def test_removed_file_keeps_last_good_until_it_returns(server, path):
    with steady_traffic(server):
        mark = server.mark()
        os.remove(path)
        line = server.wait_after(mark, NOT_RELOADED + ".*", timeout=3).group(0)
        assert line.endswith(f"{path}: cannot read {path}: No such file or directory")
        time.sleep(0.6)
        change(server, path.write_text, STEADY + "  back.test: {hosts: [back.test]}\n")
        assert len(server.lines_after(mark, NOT_RELOADED)) == 1


def test_kubernetes_style_symlink_swap(server, path, tmp_path):
    """A ConfigMap volume: groups.yml -> ..data/groups.yml, ..data -> ..<version>, swapped atomically."""
    volume = tmp_path / "volume"
    volume.mkdir()

    def publish(version, text):
        (volume / version).mkdir()
        (volume / version / "groups.yml").write_text(text)
        os.symlink(version, volume / "..data_tmp")
        os.replace(volume / "..data_tmp", volume / "..data")

    publish("..v1", STEADY)
    os.symlink(volume / "..data" / "groups.yml", volume / "link")
    mark = server.mark()
    os.replace(volume / "link", path)  # the same content behind a symlink now: nothing to apply
    with steady_traffic(server):
        change(server, publish, "..v2", STEADY + "  swapped.test: {hosts: [swapped.test]}\n")
        assert server.get("swapped.test").text == ""
        change(server, publish, "..v3", STEADY)
        assert server.get("swapped.test").text == "bad gateway\n"
    assert len(server.lines_after(mark, UPDATED)) == 2


@pytest.mark.parametrize("key", ["tokenPath", "hashedTokenPath"])
def test_token_file_change_applies(server, path, registrar, tmp_path, key):
    token_file = tmp_path / "token"

    def token(value):
        text = value if key == "tokenPath" else hashlib.sha256(value.encode()).hexdigest()
        write_atomically(token_file, text + "\n")

    token("first-token")
    change(server, write_atomically, path, STEADY + f"""\
  token.test:
    hosts: [token.test]
    authentication:
      bearer: {{{key}: '{token_file}'}}
""")
    assert registrar.accepted("token.test", bearer("first-token"))
    with steady_traffic(server):
        change(server, token, "second-token")
        assert registrar.accepted("token.test", bearer("second-token"))
        assert not registrar.accepted("token.test", bearer("first-token"))
        # An unusable token file is an invalid configuration: logged, the last good stays.
        mark = server.mark()
        write_in_place(token_file, "")
        line = server.wait_after(mark, NOT_RELOADED + ".*", timeout=3).group(0)
        assert f'groups.yml: groups."token.test".authentication.bearer.{key}: file {token_file}' in line
        assert "second-token" not in line
        assert registrar.accepted("token.test", bearer("second-token"))


def test_open_groups_are_warned_about_on_every_reload(server, path):
    warning = r"WARNING reverst.server: tunnel group 'open.test' has no authentication: anyone can register"
    with steady_traffic(server):
        mark = server.mark()
        change(server, write_atomically, path, STEADY + "  open.test: {hosts: [open.test]}\n")
        server.wait_after(mark, warning)
        mark = server.mark()
        change(server, write_atomically, path, STEADY + "  open.test: {hosts: [open.test, open2.test]}\n")
        server.wait_after(mark, warning)
        assert len(server.lines_after(mark, warning)) == 1


def test_without_watch_the_file_is_read_once(certs, tmp_path):
    path = tmp_path / "groups.yml"
    path.write_text(STEADY)
    server = LiveServer(certs, path, extra=())
    try:
        assert not server.lines_after(0, "watching")
        write_atomically(path, STEADY + "  late.test: {hosts: [late.test]}\n")
        time.sleep(1.5)
        assert server.get("late.test").text == "bad gateway\n"
        assert not server.lines_after(0, UPDATED)
    finally:
        server.stop()
