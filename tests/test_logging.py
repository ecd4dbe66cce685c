"""Logs of real reverstd and client processes: the access log (on by default, off by flag or
env), --log-format json, the client's connection and request lines, and no secret anywhere
(logs at debug, /status, the page, /metrics) while registering with every strategy."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from .conftest import GROUPS, READY_SERVER, Proc, TunnelClient
from .observe import ManagedServer, eventually

ACCESS = re.compile(r"INFO reverst\.access: (.*)$")


def get(server, path, host="app.test", **kwargs):
    return requests.get(server.url(path), headers={"Host": host}, timeout=10, **kwargs)


def access_lines(proc):
    return [m.group(1) for line in proc.lines if (m := ACCESS.search(line))]


def test_access_log_has_one_line_per_request_without_the_query(server, start_client):
    start_client()
    assert get(server, "/hello?token=query-secret-123").status_code == 200
    assert get(server, "/status/503", host="app.test:80").status_code == 503
    assert get(server, "/x", host="nobody.test").status_code == 502
    lines = eventually(lambda: len(access_lines(server)) == 3 and access_lines(server))
    hello, failed, unknown = lines
    assert re.fullmatch(r"method=GET host=app\.test path=/hello status=200 bytes=13 duration_ms=\d+\.\d "
                        r"tunnel=127\.0\.0\.1:\d+ client=127\.0\.0\.1", hello), hello
    assert re.fullmatch(r"method=GET host=app\.test path=/status/503 status=503 bytes=10 .* tunnel=127\.0\.0\.1:\d+ "
                        r"client=127\.0\.0\.1", failed), failed
    assert re.fullmatch(r"method=GET host=nobody\.test path=/x status=502 bytes=12 duration_ms=\S+ tunnel=- "
                        r"client=127\.0\.0\.1", unknown), unknown
    assert "query-secret-123" not in server.output()
    # pywsgi's own access line is gone: ours is the only one.
    assert not any('"GET /hello' in line for line in server.lines)


def test_access_log_is_off_with_the_flag(certs, groups_file, procs):
    server = ManagedServer(certs, groups_file, extra=["--no-access-log"])
    procs.append(server)
    procs.append(TunnelClient(server, certs))
    assert get(server, "/hello").status_code == 200
    assert get(server, "/hello").status_code == 200
    eventually(lambda: server.metrics()["reverst_tunnel_group_proxy_requests_total",
                                        {"host": "app.test", "status": "2XX"}] == 2)
    assert access_lines(server) == []


def test_access_log_is_off_with_the_env_var(certs, groups_file, procs):
    proc = Proc([sys.executable, "-m", "reverst.cli", "reverstd", "-n", "localhost", "-k", certs["key"],
                 "-c", certs["cert"], "-g", str(groups_file), "-a", "127.0.0.1:0", "-s", "127.0.0.1:0",
                 "--drain-delay", "0s"], env={"REVERST_ACCESS_LOG": "false"})
    procs.append(proc)
    port = int(proc.wait_for(READY_SERVER.pattern).group(2).rsplit(":", 1)[1])
    assert requests.get(f"http://127.0.0.1:{port}/", headers={"Host": "nobody.test"}, timeout=5).status_code == 502
    proc.stop()
    assert access_lines(proc) == []


def test_json_log_format_for_server_and_client(certs, groups_file, procs):
    server = Proc([sys.executable, "-m", "reverst.cli", "reverstd", "-l", "debug", "--log-format", "json",
                   "-n", "localhost", "-k", certs["key"], "-c", certs["cert"], "-g", str(groups_file),
                   "-a", "127.0.0.1:0", "-s", "127.0.0.1:0"])
    procs.append(server)
    m = server.wait_for(r'listening for tunnels on udp ([^\s"]+), public http on tcp ([^\s"]+)')
    server.tunnel_address, server.http_port = m.group(1), int(m.group(2).rsplit(":", 1)[1])
    server.url = lambda path: f"http://127.0.0.1:{server.http_port}{path}"
    client = TunnelClient(server, certs, extra=["--log-format", "json"])
    procs.append(client)
    assert get(server, "/hello").status_code == 200

    def records(proc):
        return [json.loads(line) for line in proc.lines if not line.startswith("reverst: ")]
    access = eventually(lambda: [r for r in records(server) if r["logger"] == "reverst.access"])
    assert len(access) == 1
    record = access[0]
    assert record["level"] == "info" and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", record["time"])
    assert {k: record[k] for k in ("method", "host", "path", "status", "bytes")} == {
        "method": "GET", "host": "app.test", "path": "/hello", "status": 200, "bytes": 13}
    assert isinstance(record["duration_ms"], float) and re.fullmatch(r"127\.0\.0\.1:\d+", record["tunnel"])
    assert record["message"].startswith("method=GET host=app.test path=/hello status=200")
    server_records = records(server)
    assert any(r["message"].startswith("tunnel 127.0.0.1:") and "registered in group 'app.test'" in r["message"]
               for r in server_records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in server_records)
    client_records = eventually(lambda: [r for r in records(client) if r["message"].startswith("GET /hello")])
    assert client_records[0]["level"] == "debug" and client_records[0]["logger"] == "reverst.client"
    assert any("registered with" in r["message"] for r in records(client))


def test_client_logs_connected_reconnecting_and_each_request(certs, groups_file, procs):
    server = ManagedServer(certs, groups_file)
    procs.append(server)
    client = TunnelClient(server, certs)  # -l debug
    procs.append(client)
    client.wait_for(r"connection registered with 127\.0\.0\.1:\d+ in group 'app.test'")
    assert get(server, "/hello?x=secret-in-query").status_code == 200
    client.wait_for(r"DEBUG reverst\.client: GET /hello -> 200, 13 bytes, \d+\.\d ms$")
    assert "secret-in-query" not in client.output()
    address = server.tunnel_address
    server.stop(signal.SIGTERM)  # closes the tunnel with 0x0: the client says why and when it retries
    client.wait_for(r"connection lost \(server draining \(application error 0x0\)\); reconnecting in \d+\.\ds")
    client.wait_for(r"registration with 127\.0\.0\.1:\d+ failed \(.+\); retrying in \d+\.\ds", timeout=20)
    assert address


# -- no secret anywhere ---------------------------------------------------------------------------
EXTERNAL_TOKEN = "ext-token-K9v"
ENDPOINT_PASSWORD = "endpoint-pw-R4"


class _Authorizer(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Authorization") == f"Bearer {EXTERNAL_TOKEN}"
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def authorizer():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Authorizer)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_no_secret_in_logs_status_page_or_metrics_with_every_strategy(certs, tmp_path, procs, authorizer):
    (tmp_path / "token.txt").write_text("file-token-T2x\n")
    hashed = hashlib.sha256(b"hashed-token-H5q").hexdigest()
    groups = tmp_path / "groups.yml"
    groups.write_text(GROUPS + f"""\
  path.test:
    authentication:
      bearer: {{tokenPath: token.txt}}
  hashed.test:
    authentication:
      bearer: {{hashedToken: "{hashed}", scheme: JWT}}
  external.test:
    authentication:
      external: {{endpoint: "http://auth:{ENDPOINT_PASSWORD}@127.0.0.1:{authorizer}/check", timeout: 2s}}
""")
    server = ManagedServer(certs, groups)  # -l debug
    procs.append(server)
    good = [("app.test", ["--username", "user", "--password", "pass"]),
            ("bearer.test", ["--token", "some-token"]),
            ("local.example", ["--token", "some-token"]),
            ("path.test", ["--token", "file-token-T2x"]),
            ("hashed.test", ["--token", "hashed-token-H5q", "--scheme", "JWT"]),
            ("external.test", ["--token", EXTERNAL_TOKEN])]
    bad = [("app.test", ["--username", "user", "--password", "wrong-pass-P8"]),
           ("bearer.test", ["--token", "wrong-token-B1"]),
           ("external.test", ["--token", "wrong-ext-token-E3"])]
    clients = []
    for group, args in good:
        clients.append(TunnelClient(server, certs, group=group, auth=None, extra=args))
        procs.append(clients[-1])
        assert get(server, "/hello", host=group if group != "app.test" else "app.test").status_code in (200, 502)
    for group, args in bad:
        c = TunnelClient(server, certs, group=group, auth=None, extra=args, wait=False)
        procs.append(c)
        assert c.popen.wait(15) == 2
        clients.append(c)

    status = server.get("/status").text
    page = server.get("/").text
    metrics = server.get("/metrics").text
    tunnels = {g["name"]: len(g["tunnels"]) for g in json.loads(status)["groups"]}
    assert tunnels == {"app.test": 1, "bearer.test": 1, "local.example": 1, "empty.test": 0,
                       "path.test": 1, "hashed.test": 1, "external.test": 1}
    server.stop(signal.SIGTERM)
    for c in clients:
        c.stop(signal.SIGTERM)
    logs = "\n".join([server.output()] + [c.output() for c in clients])
    assert "registration from" in logs and "rejected" in logs  # the rejections were logged...
    assert "DEBUG" in server.output()  # ...at debug level

    secrets = ["some-token", "file-token-T2x", "hashed-token-H5q", hashed, EXTERNAL_TOKEN, ENDPOINT_PASSWORD,
               "wrong-pass-P8", "wrong-token-B1", "wrong-ext-token-E3"]
    secrets += [base64.b64encode(f"user:{p}".encode()).decode() for p in ("pass", "wrong-pass-P8")]
    for where, text in (("logs", logs), ("/status", status), ("the page", page), ("/metrics", metrics)):
        for secret in secrets:
            assert secret not in text, f"{secret!r} in {where}"
        assert not re.search(r"\bpass\b", text), f"'pass' in {where}: " + next(
            line for line in text.splitlines() if re.search(r"\bpass\b", line))


def test_log_flags_are_in_the_help_with_their_env_vars():
    from .test_cli import check_help
    check_help(["reverstd", "--help"], [(None, "--log-format", "text"), (None, "--access-log", None)])
    for command in ("expose", "http", "wsgi"):
        check_help(["client", command, "--help"], [(None, "--log-format", "text")])
