"""Command-line entry points: ``reverstd`` (the tunnel server) and ``reverst`` (clients).

This is the only module that parses argv/environment and configures logging.
"""
from __future__ import annotations

import importlib
import logging
import signal
import sys

import click

from .durations import parse_duration
from .errors import ConfigError, ReverstError

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR}


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=LOG_LEVELS[level.lower()], stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level.lower() != "debug":
        logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic logs every stream reset at info


def _duration(ctx, param, value):
    try:
        return parse_duration(value)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc)) from None


def _address(ctx, param, value):
    if value is None:
        return None
    from .server import parse_address
    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _opt(*decls, env: str, **kwargs):
    return click.option(*decls, envvar=f"REVERST_{env}", show_envvar=True, **kwargs)


_log_choice = click.Choice(sorted(LOG_LEVELS), case_sensitive=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_opt("-l", "--log", env="LOG", default="info", show_default=True, type=_log_choice, help="Log level.")
@_opt("-a", "--tunnel-address", env="TUNNEL_ADDRESS", default="127.0.0.1:7171", show_default=True,
      callback=_address, help="UDP address for QUIC tunnel connections.")
@_opt("-s", "--http-address", env="HTTP_ADDRESS", default="0.0.0.0:8181", show_default=True,
      callback=_address, help="TCP address for public HTTP.")
@_opt("-n", "--server-name", env="SERVER_NAME", required=True, help="TLS server name.")
@_opt("-k", "--private-key-path", env="PRIVATE_KEY_PATH", required=True,
      type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
@_opt("-c", "--certificate-path", env="CERTIFICATE_PATH", required=True,
      type=click.Path(exists=True, dir_okay=False), help="PEM certificate.")
@_opt("-g", "--tunnel-groups", env="TUNNEL_GROUPS", default="groups.yml", show_default=True,
      help="Tunnel groups: a path, file:///path or k8s://configmap/<ns>/<name>/<key>.")
@_opt("-w", "--watch-groups", env="WATCH_GROUPS", is_flag=True, default=False,
      help="Watch the groups source for changes.")
@_opt("--management-address", env="MANAGEMENT_ADDRESS", default=None, callback=_address,
      help="HTTP address for /metrics and /healthz (off by default).")
@_opt("--max-idle-timeout", env="MAX_IDLE_TIMEOUT", default="1m", show_default=True, callback=_duration,
      help="QUIC idle timeout (Go duration).")
@_opt("--keep-alive-period", env="KEEP_ALIVE_PERIOD", default="30s", show_default=True,
      callback=_duration, help="QUIC keep-alive period (Go duration).")
def reverstd(log, tunnel_address, http_address, server_name, private_key_path, certificate_path,
             tunnel_groups, watch_groups, management_address, max_idle_timeout, keep_alive_period):
    """Run the reverst tunnel server."""
    _setup_logging(log)
    from .config import load_groups
    from .server import TunnelServer
    try:
        groups = load_groups(tunnel_groups)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if watch_groups:
        logging.getLogger("reverst").warning("--watch-groups is not implemented yet; groups are read once")
    server = TunnelServer(
        groups, certificate_path=certificate_path, private_key_path=private_key_path,
        server_name=server_name, tunnel_address=tunnel_address, http_address=http_address,
        management_address=management_address, max_idle_timeout=max_idle_timeout,
        keep_alive_period=keep_alive_period)
    try:
        server.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc}") from None
    _stop_on_signals(server.stop)
    server.serve_forever()


def _stop_on_signals(stop) -> None:
    import gevent
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, lambda: gevent.spawn(stop))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """reverst tunnel clients."""


def _client_options(fn):
    for decorator in reversed([
        _opt("-l", "--log", env="LOG", default="info", show_default=True, type=_log_choice),
        _opt("-a", "--tunnel-address", env="TUNNEL_ADDRESS", default="127.0.0.1:7171", show_default=True,
             help="reverstd's QUIC address."),
        _opt("-n", "--server-name", env="SERVER_NAME", required=True, help="TLS server name."),
        _opt("-g", "--tunnel-group", env="TUNNEL_GROUP", default=None,
             help="Tunnel group to join (default: the server name)."),
        _opt("-c", "--cacert-path", env="CACERT_PATH", default=None,
             type=click.Path(exists=True, dir_okay=False), help="Extra CA certificate (PEM)."),
        _opt("--insecure", env="INSECURE", is_flag=True, default=False, help="Skip TLS verification."),
        _opt("--username", env="USERNAME", default=None, help="Basic auth username."),
        _opt("--password", env="PASSWORD", default=None, help="Basic auth password."),
        _opt("--token", env="TOKEN", default=None, help="Bearer token."),
        _opt("--scheme", env="SCHEME", default=None, help="Override the Authorization scheme."),
        _opt("--max-idle-timeout", env="MAX_IDLE_TIMEOUT", default="1m", show_default=True,
             callback=_duration),
        _opt("--keep-alive-period", env="KEEP_ALIVE_PERIOD", default="30s", show_default=True,
             callback=_duration),
    ]):
        fn = decorator(fn)
    return fn


def _auth(username, password, token, scheme):
    from .client import BasicAuth, BearerAuth
    if token and (username or password):
        raise click.UsageError("use either --token or --username/--password")
    if token:
        return BearerAuth(token, scheme or "Bearer")
    if username or password:
        if not (username and password):
            raise click.UsageError("--username and --password go together")
        return BasicAuth(username, password, scheme or "Basic")
    return None


def _load_app(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        app = getattr(module, attr or "app")
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load WSGI app {spec!r}: {exc}") from None
    return app


@main.command("wsgi")
@_client_options
@click.option("--threads", default=100, show_default=True,
              help="Threads running the app; 0 runs it in greenlets (gevent-friendly apps).")
@click.argument("app")
def wsgi_command(log, tunnel_address, server_name, tunnel_group, cacert_path, insecure, username,
                 password, token, scheme, max_idle_timeout, keep_alive_period, threads, app):
    """Serve the WSGI application APP (module:attribute) through the tunnel."""
    _setup_logging(log)
    sys.path.insert(0, ".")
    from .client import Client
    client = Client(
        _load_app(app), tunnel_address, tunnel_group=tunnel_group or server_name,
        server_name=server_name, auth=_auth(username, password, token, scheme), ca_file=cacert_path,
        insecure=insecure, max_idle_timeout=max_idle_timeout, keep_alive_period=keep_alive_period,
        app_threads=threads,
        on_ready=lambda c: click.echo(f"serving {app} through {c.host}:{c.port} in group "
                                      f"{c.tunnel_group!r}", err=True))
    _stop_on_signals(client.stop)
    try:
        client.dial_and_serve()
    except ReverstError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@click.group()
def _entry():
    """``python -m reverst.cli reverstd ...`` / ``python -m reverst.cli client ...``."""


_entry.add_command(reverstd)
_entry.add_command(main, "client")

if __name__ == "__main__":
    _entry()
