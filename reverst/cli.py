"""Command-line entry points: ``reverstd`` (the tunnel server) and ``reverst`` (clients).

This is the only module that parses argv/environment and configures logging.
"""
from __future__ import annotations

import importlib
import logging
import signal
import sys
import time

import click

from . import _malloc
from .durations import parse_duration
from .errors import ConfigError, ReverstError

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR}


def _setup_logging(level: str, fmt: str = "text") -> None:
    from .logs import formatter
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt.lower()))
    logging.basicConfig(level=LOG_LEVELS[level.lower()], handlers=[handler])
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
    from ._transport import parse_address
    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _trusted_proxies(ctx, param, value):
    from .forwarding import TrustedProxies
    try:
        return TrustedProxies.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _opt(*decls, env: str, **kwargs):
    return click.option(*decls, envvar=f"REVERST_{env}", show_envvar=True, **kwargs)


DATAGRAM_HELP = ("Largest UDP datagram this side sends. Keep the default on real networks; "
                 "up to 16000 only where both ends allow it (loopback, jumbo frames): much "
                 "faster bulk transfers with aioquic.")
BACKEND_HELP = ("QUIC implementation: qh3 (native core, much faster; pip install 'reverst[fast]'), "
                "aioquic (pure Python), or auto: qh3 when installed.")
_backend_choice = click.Choice(["auto", "aioquic", "qh3"], case_sensitive=False)
_log_choice = click.Choice(sorted(LOG_LEVELS), case_sensitive=False)
_log_format_choice = click.Choice(["text", "json"], case_sensitive=False)
_retry_choice = click.Choice(["auto", "always", "never"], case_sensitive=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_opt("-l", "--log", env="LOG", default="info", show_default=True, type=_log_choice, help="Log level.")
@_opt("--log-format", env="LOG_FORMAT", default="text", show_default=True, type=_log_format_choice,
      help="text, or json: one object a line for log shippers.")
@_opt("--access-log/--no-access-log", env="ACCESS_LOG", default=True, show_default=True,
      help="One info line per public request (logger reverst.access).")
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
      help="Follow the groups source and its token files/secrets: changes apply while running.")
@_opt("--management-address", env="MANAGEMENT_ADDRESS", default=None, callback=_address,
      help="HTTP address for /metrics, /healthz, /readyz, /status and a status page "
           "(off by default; never expose it publicly).")
@_opt("--max-idle-timeout", env="MAX_IDLE_TIMEOUT", default="1m", show_default=True, callback=_duration,
      help="QUIC idle timeout (Go duration).")
@_opt("--keep-alive-period", env="KEEP_ALIVE_PERIOD", default="30s", show_default=True,
      callback=_duration, help="QUIC keep-alive period (Go duration).")
@_opt("--max-datagram-size", env="MAX_DATAGRAM_SIZE", default=1452, show_default=True,
      type=click.IntRange(1200, 16000), help=DATAGRAM_HELP)
@_opt("--quic-backend", env="QUIC_BACKEND", default="auto", show_default=True, type=_backend_choice,
      help=BACKEND_HELP)
@_opt("--drain-timeout", env="DRAIN_TIMEOUT", default="30s", show_default=True, callback=_duration,
      help="On SIGTERM, how long in-flight public requests may take before tunnels close.")
@_opt("--drain-delay", env="DRAIN_DELAY", default="5s", show_default=True, callback=_duration,
      help="On SIGTERM, how long new public connections are still accepted after /readyz turned 503 "
           "(the time a load balancer takes to notice).")
@_opt("--reuse-port", env="REUSE_PORT", is_flag=True, default=False,
      help="Share the public port with other reverstd processes on this host (SO_REUSEPORT).")
@_opt("--wait-for-tunnels", env="WAIT_FOR_TUNNELS", default="0s", show_default=True, callback=_duration,
      help="/readyz stays 503 until a first tunnel registered, at most this long after start (a "
           "replica behind a load balancer should not take public traffic before its clients found it).")
@_opt("--https-address", env="HTTPS_ADDRESS", default=None, callback=_address,
      help="TCP address for public HTTPS (off by default). Certificates: --https-certificate-path/"
           "--https-private-key-path for any name, and a group's own tls: chosen by SNI.")
@_opt("--https-certificate-path", env="HTTPS_CERTIFICATE_PATH", default=None,
      type=click.Path(exists=True, dir_okay=False), help="PEM certificate (chain) of the HTTPS listener.")
@_opt("--https-private-key-path", env="HTTPS_PRIVATE_KEY_PATH", default=None,
      type=click.Path(exists=True, dir_okay=False), help="PEM private key of --https-certificate-path.")
@_opt("--trusted-proxies", env="TRUSTED_PROXIES", default=None, callback=_trusted_proxies,
      help="Comma-separated addresses/CIDRs of the proxies in front that may set X-Forwarded-For/-Host/-Proto "
           "(or 'none'); from any other peer they are dropped and rebuilt. Default: trusted from anyone, as Go.")
@_opt("--quic-retry", env="QUIC_RETRY", default="auto", show_default=True, type=_retry_choice,
      help="QUIC address validation with Retry packets (RFC 9000 8.1): auto (while many handshakes are in "
           "progress: under a flood), always (every new connection, one round trip more), or never.")
@_opt("--handshake-timeout", env="HANDSHAKE_TIMEOUT", default="5s", show_default=True, callback=_duration,
      help="A QUIC handshake not finished this long after its first packet is dropped (Go duration; "
           "at most the registration timeout).")
@_opt("--registration-timeout", env="REGISTRATION_TIMEOUT", default="10s", show_default=True, callback=_duration,
      help="How long a tunnel connection has from its first packet to a registration (Go duration).")
def reverstd(log, log_format, access_log, tunnel_address, http_address, server_name, private_key_path,
             certificate_path, tunnel_groups, watch_groups, management_address, max_idle_timeout,
             keep_alive_period, max_datagram_size, quic_backend, drain_timeout, drain_delay, reuse_port,
             wait_for_tunnels, https_address, https_certificate_path, https_private_key_path, trusted_proxies,
             quic_retry, handshake_timeout, registration_timeout):
    """Run the reverst tunnel server."""
    _setup_logging(log, log_format)
    _malloc.fix_mmap_threshold()
    https_certificate = _https_certificate(https_address, https_certificate_path, https_private_key_path)
    from .server import TunnelServer
    from .sources import GroupsWatcher, SourceUnavailable
    watcher = None
    try:
        watcher = GroupsWatcher(tunnel_groups)
        groups = watcher.load()
    except SourceUnavailable as exc:  # serve (not ready: /readyz 503) and keep trying
        logging.getLogger("reverst").warning("tunnel groups not loaded yet, retrying: %s", exc)
        groups = None
    except ConfigError as exc:
        if watcher is not None:
            watcher.stop()
        raise click.ClickException(str(exc)) from None
    try:
        server = TunnelServer(
            groups, certificate_path=certificate_path, private_key_path=private_key_path,
            server_name=server_name, tunnel_address=tunnel_address, http_address=http_address,
            management_address=management_address, max_idle_timeout=max_idle_timeout,
            keep_alive_period=keep_alive_period, access_log=access_log, max_datagram_size=max_datagram_size,
            quic_backend=quic_backend, reuse_port=reuse_port, wait_for_tunnels=wait_for_tunnels,
            trusted_proxies=trusted_proxies, https_address=https_address, https_certificate=https_certificate,
            quic_retry=quic_retry.lower(), handshake_timeout=min(handshake_timeout, registration_timeout),
            registration_timeout=registration_timeout)
    except ImportError as exc:  # --quic-backend qh3 without qh3 installed
        watcher.stop()
        raise click.ClickException(str(exc)) from None
    watcher.on_error = lambda exc: server.metrics.reloaded(ok=False)
    try:
        server.start()
    except OSError as exc:
        watcher.stop()
        raise click.ClickException(f"cannot listen: {exc}") from None
    if groups is None:
        _load_in_background(watcher, server, watch_groups)
    elif watch_groups:
        watcher.start(server.groups_updater())
    _drain_on_signals(server, drain_delay, drain_timeout)
    try:
        server.serve_forever()
    finally:
        watcher.stop()


def _https_certificate(address, certificate, key) -> tuple[str, str] | None:
    """The HTTPS listener's default certificate pair, checked now (one line if it is bad)."""
    if (certificate is None) != (key is None):
        raise click.UsageError("--https-certificate-path and --https-private-key-path go together")
    if certificate is None:
        return None
    if address is None:
        raise click.UsageError("--https-certificate-path needs --https-address")
    from .tls import describe_error, server_context
    try:
        server_context(certificate, key)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(describe_error(exc), param_hint="--https-private-key-path") from None
    return certificate, key


def _load_in_background(watcher, server, watch: bool, interval: float = 2.0) -> None:
    """Retry an unreachable groups source until it loads, then apply it (and follow it)."""
    import threading
    from .sources import SourceUnavailable
    update = server.groups_updater()
    log = logging.getLogger("reverst")

    def run():
        while not server._stopped.is_set():
            try:
                groups = watcher.load()
            except SourceUnavailable as exc:
                log.debug("tunnel groups still unavailable: %s", exc)
                time.sleep(interval)
                continue
            except ConfigError as exc:
                log.error("tunnel groups source is invalid, retrying: %s", exc)
                time.sleep(interval)
                continue
            log.info("tunnel groups loaded from %s", watcher.source)
            update(groups)
            if watch:
                watcher.start(update)
            return
    threading.Thread(target=run, name="reverst-groups-loader", daemon=True).start()


def _drain_on_signals(server, delay: float, timeout: float) -> None:
    """SIGTERM drains (see TunnelServer.drain); SIGINT drains without the delay (a person
    at a terminal); a second signal stops at once."""
    import gevent
    signals = []

    def on_signal(sig) -> None:
        signals.append(sig)
        if len(signals) > 1:
            logging.getLogger("reverst").info("second signal: stopping now")
            gevent.spawn(server.stop, 0)
        else:
            gevent.spawn(server.drain, delay if sig == signal.SIGTERM else 0.0, timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, on_signal, sig)


def _stop_on_signals(stop) -> None:
    import gevent
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, lambda: gevent.spawn(stop))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """reverst tunnel clients: publish a local port or a WSGI app through reverstd."""


def _load_config(ctx, param, value):
    """``--config FILE``: YAML whose keys are long flag names; they become defaults that
    environment variables and flags override.  A missing default ``config.yml`` is fine."""
    import os
    explicit = value is not None  # given by flag or REVERST_CONFIG: it must exist
    value = value or "config.yml"
    if not os.path.exists(value):
        if explicit:
            raise click.BadParameter(f"{value}: no such file", ctx=ctx, param=param)
        return value
    import yaml  # (only with a file: ~1 MB a client without one need not carry)
    try:
        with open(value, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{value}: {str(exc).splitlines()[0]}", ctx=ctx, param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value}: expected a mapping of flag names to values", ctx=ctx, param=param)
    known = {p.name: p for p in ctx.command.params if isinstance(p, click.Option) and p.name != "config"}
    defaults = {}
    for key, val in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise click.BadParameter(f"{value}: unknown key {key!r}", ctx=ctx, param=param)
        defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _client_options(fn):
    for decorator in reversed([
        _opt("--config", env="CONFIG", default=None, is_eager=True, expose_value=False,
             callback=_load_config,
             help="YAML file of flag values (keys are long flag names; the default file "
                  "may be absent)  [default: config.yml]"),
        _opt("-l", "--log", env="LOG", default="info", show_default=True, type=_log_choice),
        _opt("--log-format", env="LOG_FORMAT", default="text", show_default=True, type=_log_format_choice,
             help="text, or json: one object a line."),
        _opt("-a", "--tunnel-address", env="TUNNEL_ADDRESS", default="127.0.0.1:7171", show_default=True,
             help="reverstd's QUIC address; several separated by commas, and a name with several "
                  "addresses: the client registers with every replica."),
        _opt("--resolve-interval", env="RESOLVE_INTERVAL", default="30s", show_default=True,
             callback=_duration, help="How often the tunnel address is resolved again (replicas come "
                                      "and go); also after failures."),
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
        _opt("--max-datagram-size", env="MAX_DATAGRAM_SIZE", default=1452, show_default=True,
             type=click.IntRange(1200, 16000), help=DATAGRAM_HELP),
        _opt("--quic-backend", env="QUIC_BACKEND", default="auto", show_default=True, type=_backend_choice,
             help=BACKEND_HELP),
        _opt("--connections", env="CONNECTIONS", default=1, show_default=True,
             type=click.IntRange(1, 64), help="Independent tunnel connections to open (to each replica)."),
        _opt("--grace-period", env="GRACE_PERIOD", default="30s", show_default=True, callback=_duration,
             help="On SIGINT/SIGTERM, how long in-flight requests may take to finish."),
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


def _cooperative() -> None:
    from gevent import monkey
    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def _run_client(app, description: str, opts: dict, threads: int) -> None:
    """Serve ``app`` until a signal (graceful stop, exit 0) or a fatal registration error (exit 2).

    ``threads=0`` runs requests in greenlets: the port forwarder's own sockets are gevent's
    (``LocalProxy(cooperative=True)``); ``reverst wsgi --threads 0`` monkey-patches the
    process before it imports the app.
    """
    _malloc.fix_mmap_threshold()
    from .client import Client
    group = opts["tunnel_group"] or opts["server_name"]
    announced = []

    def ready(client):
        if not announced:
            announced.append(True)
            click.echo(f"reverst: {description} is reachable through {client.host}:{client.port} "
                       f"in tunnel group {group!r}", err=True)

    try:
        client = Client(
            app, opts["tunnel_address"], tunnel_group=group, server_name=opts["server_name"],
            auth=_auth(opts["username"], opts["password"], opts["token"], opts["scheme"]),
            ca_file=opts["cacert_path"], insecure=opts["insecure"], max_idle_timeout=opts["max_idle_timeout"],
            keep_alive_period=opts["keep_alive_period"], app_threads=threads,
            connections=opts["connections"], max_datagram_size=opts["max_datagram_size"], on_ready=ready,
            quic_backend=opts["quic_backend"], resolve_interval=opts["resolve_interval"])
    except ImportError as exc:  # --quic-backend qh3 without qh3 installed
        raise click.ClickException(str(exc)) from None
    _stop_on_signals(lambda: client.stop(opts["grace_period"]))
    try:
        client.dial_and_serve()
    except ReverstError as exc:
        click.echo(f"reverst: {exc}", err=True)
        sys.exit(2)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    logging.getLogger("reverst").info("stopped")


@main.command("expose")
@_client_options
@_opt("--rewrite-host", env="REWRITE_HOST", is_flag=True, default=False,
      help="Send the local address as Host instead of the public one.")
@_opt("--local-timeout", env="LOCAL_TIMEOUT", default="60s", show_default=True,
      callback=_duration, help="Give up on a silent local service after this long (504).")
@_opt("--local-insecure", env="LOCAL_INSECURE", is_flag=True, default=False,
      help="Do not verify the certificate of an https local service.")
@click.argument("addr")
def expose_command(addr, rewrite_host, local_timeout, local_insecure, **opts):
    """Publish the local HTTP service ADDR (8080, host:port or http(s)://host:port/prefix)."""
    _setup_logging(opts["log"], opts["log_format"])
    from .proxy import LocalProxy
    try:
        proxy = LocalProxy(addr, rewrite_host=rewrite_host, timeout=local_timeout, verify=not local_insecure,
                           cooperative=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ADDR") from None
    _run_client(proxy, proxy.target, opts, threads=0)


main.add_command(expose_command, "http")  # the Go CLI's name


@main.command("wsgi")
@_client_options
@_opt("--threads", env="THREADS", default=100, show_default=True,
              help="Threads running the app; 0 runs it in greenlets (gevent-friendly apps).")
@click.argument("app")
def wsgi_command(app, threads, **opts):
    """Serve the WSGI application APP (module:attribute) through the tunnel."""
    if threads == 0:
        _cooperative()  # before the app imports anything that binds to sockets
    _setup_logging(opts["log"], opts["log_format"])
    sys.path.insert(0, ".")
    _run_client(_load_app(app), app, opts, threads)


@click.group()
def _entry():
    """``python -m reverst.cli reverstd ...`` / ``python -m reverst.cli client ...``."""


_entry.add_command(reverstd)
_entry.add_command(main, "client")

if __name__ == "__main__":
    _entry()
