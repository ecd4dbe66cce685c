"""Command-line parsing, no network: flag > env > config file > default for `reverst expose`.

``reverst.cli._run_client`` (the part that dials) is replaced by a recorder, so these
tests only check what the commands would run with.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from reverst import cli, proxy

WIDE = {"terminal_width": 400, "max_content_width": 400}



@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("REVERST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def runs(monkeypatch):
    """Every would-be client run: {"app", "description", "opts", "threads", "proxy_kwargs"}."""
    calls: list[dict] = []
    proxies: list[dict] = []

    class RecordingProxy(proxy.LocalProxy):
        def __init__(self, target, **kwargs):
            proxies.append(kwargs)
            super().__init__(target, **kwargs)

    def fake_run_client(app, description, opts, threads):
        calls.append({"app": app, "description": description, "opts": dict(opts), "threads": threads,
                      "proxy_kwargs": proxies[-1] if proxies else None})

    monkeypatch.setattr(cli, "_run_client", fake_run_client)
    monkeypatch.setattr(proxy, "LocalProxy", RecordingProxy)
    return calls


@pytest.fixture
def run(runs, tmp_path, monkeypatch):
    """Invoke ``reverst ARGS`` in an empty directory (no config.yml there unless a test writes one)."""
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)

    def invoke(args, env=None, files=None):
        for name, text in (files or {}).items():
            (tmp_path / name).write_text(text)
        result = runner.invoke(cli.main, args, env=env or {}, catch_exceptions=False, **WIDE)
        return result, (runs[-1] if result.exit_code == 0 and runs else None)

    return invoke


# -- defaults and precedence ---------------------------------------------------------------------
def test_defaults(run):
    result, call = run(["expose", "-n", "tunnel.example.com", "8080"])
    assert result.exit_code == 0, result.output
    opts = call["opts"]
    assert opts["tunnel_address"] == "127.0.0.1:7171"
    assert opts["server_name"] == "tunnel.example.com"
    assert opts["tunnel_group"] is None  # the server name is used later, in _run_client
    assert opts["max_idle_timeout"] == 60.0
    assert opts["keep_alive_period"] == 30.0
    assert opts["connections"] == 1
    assert opts["grace_period"] == 30.0
    assert opts["log"] == "info"
    assert opts["insecure"] is False
    for name in ("cacert_path", "username", "password", "token", "scheme"):
        assert opts[name] is None, name
    assert call["app"].target == "http://127.0.0.1:8080"
    assert call["description"] == "http://127.0.0.1:8080"
    assert call["proxy_kwargs"] == {"rewrite_host": False, "timeout": 60.0, "verify": True, "cooperative": True}


def test_env_overrides_default(run):
    env = {"REVERST_TUNNEL_ADDRESS": "10.0.0.2:7000", "REVERST_SERVER_NAME": "env.example",
           "REVERST_TUNNEL_GROUP": "g.env", "REVERST_MAX_IDLE_TIMEOUT": "90s",
           "REVERST_KEEP_ALIVE_PERIOD": "500ms", "REVERST_CONNECTIONS": "3", "REVERST_INSECURE": "true",
           "REVERST_USERNAME": "u", "REVERST_PASSWORD": "p", "REVERST_LOG": "debug",
           "REVERST_GRACE_PERIOD": "2s", "REVERST_REWRITE_HOST": "1", "REVERST_LOCAL_TIMEOUT": "5s",
           "REVERST_LOCAL_INSECURE": "yes"}
    result, call = run(["expose", "9000"], env=env)
    assert result.exit_code == 0, result.output
    opts = call["opts"]
    assert opts["tunnel_address"] == "10.0.0.2:7000"
    assert opts["server_name"] == "env.example"
    assert opts["tunnel_group"] == "g.env"
    assert (opts["max_idle_timeout"], opts["keep_alive_period"], opts["grace_period"]) == (90.0, 0.5, 2.0)
    assert opts["connections"] == 3
    assert opts["insecure"] is True
    assert (opts["username"], opts["password"], opts["log"]) == ("u", "p", "debug")
    assert call["proxy_kwargs"] == {"rewrite_host": True, "timeout": 5.0, "verify": False, "cooperative": True}


CONFIG = """\
tunnel-address: 10.0.0.1:1000
server-name: file.example
tunnel-group: g.file
max-idle-timeout: 2m
keep-alive-period: 10s
connections: 2
username: file-user
password: file-pass
local-timeout: 7s
"""


def test_config_file_overrides_default(run):
    result, call = run(["expose", "--config", "my.yml", "8080"], files={"my.yml": CONFIG})
    assert result.exit_code == 0, result.output
    opts = call["opts"]
    assert opts["tunnel_address"] == "10.0.0.1:1000"
    assert opts["server_name"] == "file.example"
    assert opts["tunnel_group"] == "g.file"
    assert (opts["max_idle_timeout"], opts["keep_alive_period"]) == (120.0, 10.0)
    assert opts["connections"] == 2
    assert (opts["username"], opts["password"]) == ("file-user", "file-pass")
    assert call["proxy_kwargs"]["timeout"] == 7.0
    assert opts["grace_period"] == 30.0  # not in the file: the default


def test_default_config_yml_is_read(run):
    result, call = run(["expose", "8080"], files={"config.yml": CONFIG})
    assert result.exit_code == 0, result.output
    assert call["opts"]["server_name"] == "file.example"


def test_env_overrides_config_file(run):
    env = {"REVERST_TUNNEL_ADDRESS": "10.0.0.2:2000", "REVERST_CONNECTIONS": "5",
           "REVERST_KEEP_ALIVE_PERIOD": "1s", "REVERST_LOCAL_TIMEOUT": "8s"}
    result, call = run(["expose", "--config", "my.yml", "8080"], env=env, files={"my.yml": CONFIG})
    assert result.exit_code == 0, result.output
    opts = call["opts"]
    assert opts["tunnel_address"] == "10.0.0.2:2000"
    assert opts["connections"] == 5
    assert opts["keep_alive_period"] == 1.0
    assert call["proxy_kwargs"]["timeout"] == 8.0
    assert opts["tunnel_group"] == "g.file"  # not in the environment: from the file
    assert opts["max_idle_timeout"] == 120.0


def test_config_named_by_env(run):
    result, call = run(["expose", "8080"], env={"REVERST_CONFIG": "my.yml"}, files={"my.yml": CONFIG})
    assert result.exit_code == 0, result.output
    assert call["opts"]["tunnel_group"] == "g.file"


def test_flag_overrides_everything(run):
    env = {"REVERST_TUNNEL_ADDRESS": "10.0.0.2:2000", "REVERST_CONNECTIONS": "5",
           "REVERST_TUNNEL_GROUP": "g.env", "REVERST_MAX_IDLE_TIMEOUT": "3m"}
    result, call = run(["expose", "--config", "my.yml", "-a", "10.0.0.3:3000", "--connections", "4",
                        "-g", "g.flag", "--max-idle-timeout", "45s", "-n", "flag.example",
                        "--local-timeout", "9s", "8080"], env=env, files={"my.yml": CONFIG})
    assert result.exit_code == 0, result.output
    opts = call["opts"]
    assert opts["tunnel_address"] == "10.0.0.3:3000"
    assert opts["connections"] == 4
    assert opts["tunnel_group"] == "g.flag"
    assert opts["max_idle_timeout"] == 45.0
    assert opts["server_name"] == "flag.example"
    assert call["proxy_kwargs"]["timeout"] == 9.0


def test_missing_default_config_yml_is_fine(run, tmp_path):
    assert not (tmp_path / "config.yml").exists()
    result, call = run(["expose", "-n", "x.example", "8080"])
    assert result.exit_code == 0, result.output
    assert call is not None


def test_a_client_without_a_config_file_does_not_load_yaml(tmp_path):
    """PyYAML (~1 MB of a client's memory) is imported only to read a config file (or a
    groups file, which a client never reads)."""
    code = ("import sys\n"
            "from reverst import cli, client\n"
            "cli._run_client = lambda *args, **kwargs: print('ran')\n"
            "try:\n"
            "    cli.main(['expose', '-n', 'x.example', '8080'])\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "print('yaml' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVERST_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ran", "False"]


def test_missing_named_config_is_an_error(run, runs):
    result, _ = run(["expose", "-n", "x.example", "--config", "nope.yml", "8080"])
    assert result.exit_code == 2
    assert "nope.yml" in result.output
    assert "no such file" in result.output
    assert runs == []


def test_missing_config_named_by_env_is_an_error(run, runs):
    result, _ = run(["expose", "-n", "x.example", "8080"], env={"REVERST_CONFIG": "gone.yml"})
    assert result.exit_code == 2
    assert "gone.yml" in result.output
    assert runs == []


def test_unknown_config_key_is_an_error_naming_it(run, runs):
    result, _ = run(["expose", "--config", "my.yml", "8080"],
                    files={"my.yml": "server-name: x.example\ntunnel-adress: 1.2.3.4:5\n"})
    assert result.exit_code == 2
    assert "tunnel-adress" in result.output
    assert "unknown key" in result.output
    assert runs == []


def test_config_that_is_not_a_mapping_is_an_error(run, runs):
    result, _ = run(["expose", "--config", "my.yml", "8080"], files={"my.yml": "- a\n- b\n"})
    assert result.exit_code == 2
    assert "my.yml" in result.output
    assert runs == []


def test_invalid_duration_in_config_file(run, runs):
    result, _ = run(["expose", "--config", "my.yml", "8080"],
                    files={"my.yml": "server-name: x.example\nkeep-alive-period: soon\n"})
    assert result.exit_code == 2
    assert "invalid duration" in result.output
    assert runs == []


# -- the http alias, ADDR forms, errors -------------------------------------------------------------
def test_http_is_an_alias_of_expose(run):
    result, call = run(["http", "-n", "x.example", "--connections", "2", "127.0.0.1:8081"])
    assert result.exit_code == 0, result.output
    assert call["app"].target == "http://127.0.0.1:8081"
    assert call["opts"]["connections"] == 2


@pytest.mark.parametrize("addr, target", [
    ("8080", "http://127.0.0.1:8080"),
    ("localhost:3000", "http://localhost:3000"),
    ("127.0.0.1:3000", "http://127.0.0.1:3000"),
    ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
    ("http://127.0.0.1:3000/prefix/", "http://127.0.0.1:3000/prefix"),
    ("https://internal.example/api", "https://internal.example/api"),
])
def test_addr_forms(run, addr, target):
    result, call = run(["expose", "-n", "x.example", addr])
    assert result.exit_code == 0, result.output
    assert call["app"].target == target


@pytest.mark.parametrize("addr, message", [
    ("70000", "invalid port"),
    ("0", "invalid port"),
    ("ftp://127.0.0.1:21", "invalid local address"),
    ("127.0.0.1:notaport", "invalid local address"),
    ("http://127.0.0.1:8080/?q=1", "no query"),
])
def test_invalid_addr_is_a_clear_error(run, runs, addr, message):
    result, _ = run(["expose", "-n", "x.example", addr])
    assert result.exit_code == 2
    assert "ADDR" in result.output
    assert message in result.output
    assert runs == []


def test_addr_is_required(run, runs):
    result, _ = run(["expose", "-n", "x.example"])
    assert result.exit_code == 2
    assert "ADDR" in result.output
    assert runs == []


@pytest.mark.parametrize("flag", ["--max-idle-timeout", "--keep-alive-period", "--grace-period",
                                  "--local-timeout"])
def test_invalid_duration(run, runs, flag):
    result, _ = run(["expose", "-n", "x.example", flag, "10parsecs", "8080"])
    assert result.exit_code == 2
    assert 'invalid duration "10parsecs"' in result.output
    assert flag in result.output
    assert runs == []


def test_invalid_duration_from_env_names_the_value(run, runs):
    result, _ = run(["expose", "-n", "x.example", "8080"], env={"REVERST_MAX_IDLE_TIMEOUT": "1 minute"})
    assert result.exit_code == 2
    assert "invalid duration" in result.output
    assert runs == []


@pytest.mark.parametrize("value", ["0", "65"])
def test_connections_out_of_range(run, runs, value):
    result, _ = run(["expose", "-n", "x.example", "--connections", value, "8080"])
    assert result.exit_code == 2
    assert "--connections" in result.output
    assert runs == []


def test_server_name_is_required(run, runs):
    result, _ = run(["expose", "8080"])
    assert result.exit_code == 2
    assert "--server-name" in result.output
    assert runs == []


def test_wsgi_shares_the_client_options(run, tmp_path):
    (tmp_path / "cli_test_app.py").write_text("def app(environ, start_response):\n    return []\n")
    try:
        result, call = run(["wsgi", "-n", "x.example", "--connections", "2", "cli_test_app:app"],
                           env={"REVERST_TUNNEL_GROUP": "g.env"})
    finally:
        sys.modules.pop("cli_test_app", None)
        if sys.path and sys.path[0] == ".":
            sys.path.pop(0)
    assert result.exit_code == 0, result.output
    assert call["opts"]["connections"] == 2
    assert call["opts"]["tunnel_group"] == "g.env"
    assert call["threads"] == 100
    assert call["description"] == "cli_test_app:app"


# -- help texts --------------------------------------------------------------------------------------
# ../shared/PROTOCOL.md §6: reverstd's flags and defaults (None: no default shown).
REVERSTD_FLAGS = [
    ("-l", "--log", "info"),
    ("-a", "--tunnel-address", "127.0.0.1:7171"),
    ("-s", "--http-address", "0.0.0.0:8181"),
    ("-n", "--server-name", "required"),
    ("-k", "--private-key-path", "required"),
    ("-c", "--certificate-path", "required"),
    ("-g", "--tunnel-groups", "groups.yml"),
    ("-w", "--watch-groups", None),
    (None, "--management-address", None),
    (None, "--max-idle-timeout", "1m"),
    (None, "--keep-alive-period", "30s"),
]


def _help_lines(args) -> dict[str, str]:
    result = CliRunner().invoke(cli._entry, args, catch_exceptions=False, **WIDE)
    assert result.exit_code == 0, result.output
    lines: dict[str, str] = {}
    current = None
    for line in result.output.splitlines():
        if m := re.match(r"  (?:(-\w), )?(--[\w-]+)", line):
            current = m.group(2)
            lines[current] = line
        elif current and line.startswith("    "):  # the help of a long option spec goes below it
            lines[current] += " " + line.strip()
        else:
            current = None
    return lines


@pytest.mark.parametrize("short, long, default", REVERSTD_FLAGS, ids=[f[1] for f in REVERSTD_FLAGS])
def test_reverstd_help_lists_protocol_flags_with_env_vars(short, long, default):
    lines = _help_lines(["reverstd", "--help"])
    assert long in lines, f"{long} missing from reverstd --help"
    line = lines[long]
    if short:
        assert line.lstrip().startswith(f"{short}, {long}")
    env = "REVERST_" + long[2:].upper().replace("-", "_")
    assert f"env var: {env}" in line
    if default == "required":
        assert "required" in line
    elif default is not None:
        assert re.search(rf"default: {re.escape(default)}[];]", line), line


# ../shared/PROTOCOL.md §7: the client flags (shared by expose, http and wsgi), plus ours.
CLIENT_FLAGS = [
    ("-l", "--log", "info"), ("-a", "--tunnel-address", "127.0.0.1:7171"), ("-n", "--server-name", "required"),
    ("-g", "--tunnel-group", None), ("-c", "--cacert-path", None), (None, "--insecure", None),
    (None, "--username", None), (None, "--password", None), (None, "--token", None), (None, "--scheme", None),
    (None, "--max-idle-timeout", "1m"), (None, "--keep-alive-period", "30s"), (None, "--config", "config.yml"),
    (None, "--connections", "1"), (None, "--grace-period", "30s"),
]
EXPOSE_ONLY_FLAGS = [(None, "--rewrite-host", None), (None, "--local-timeout", "60s"),
                     (None, "--local-insecure", None)]


def check_help(args, flags):
    lines = _help_lines(args)
    missing = [long for _, long, _ in flags if long not in lines]
    assert not missing
    for short, long, default in flags:
        line = lines[long]
        if short:
            assert line.lstrip().startswith(f"{short}, {long}"), line
        assert f"env var: REVERST_{long[2:].upper().replace('-', '_')}" in line, line
        if default == "required":
            assert "required" in line, line
        elif default is not None:
            assert re.search(rf"default: {re.escape(default)}[];]", line), line


@pytest.mark.parametrize("command", ["expose", "http", "wsgi"])
def test_client_help_lists_client_flags_with_env_vars(command):
    check_help(["client", command, "--help"], CLIENT_FLAGS)


def test_expose_help_lists_its_own_flags_with_env_vars():
    check_help(["client", "expose", "--help"], EXPOSE_ONLY_FLAGS)


def test_expose_only_flags_read_their_env_vars(run):
    result, call = run(["expose", "-n", "x.example", "8080"],
                       env={"REVERST_REWRITE_HOST": "true", "REVERST_LOCAL_TIMEOUT": "3s",
                            "REVERST_LOCAL_INSECURE": "1"})
    assert result.exit_code == 0, result.output
    assert call["proxy_kwargs"] == {"rewrite_host": True, "timeout": 3.0, "verify": False, "cooperative": True}
