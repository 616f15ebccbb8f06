"""`tokenproxy ca init|path`, `env` and `exec`: the local CA, and pointing tools at the proxy as their HTTPS_PROXY."""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import click

from ..config import Config, find_config_path, parse_listen
from ..tls.ca import CAError, ca_paths, create_ca, default_ca_dir, trust_bundle
from ..tokens.store import UnsafeStateError

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def ca_dir_of(config: Config) -> Path:
    """`server.ca_dir`, with `~` expanded."""
    return Path(config.server.ca_dir).expanduser()


def tls_commands(config_option: Decorator, load: Callable[[str | None], Config], epilog: str) -> list[click.Command]:
    """The `ca` command group; `load` reads the config (exiting 2 on a bad one) as every command does."""

    def directory(config_path: str | None) -> Path:
        # Without any config file the default directory is meant; with one, its server.ca_dir.
        if find_config_path(config_path, os.environ) is None:
            return default_ca_dir()
        return ca_dir_of(load(config_path))

    @click.group("ca", epilog=epilog)
    def ca() -> None:
        """The local certificate authority for HTTPS_PROXY tunnels (server.ca_dir)."""

    @ca.command(epilog=epilog)
    @config_option
    @click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True, help="Validity in days.")
    @click.option("--force", is_flag=True, help="Replace an existing CA (tools trusting the old one stop working).")
    def init(config_path: str | None, days: int, force: bool) -> None:
        """Create the CA: ca.key (0600) and ca.crt in server.ca_dir (created 0700)."""
        where = directory(config_path)
        try:
            cert = create_ca(where, days=days, force=force)
        except (CAError, UnsafeStateError) as error:
            click.echo(f"ca init: {error}", err=True)
            sys.exit(1)
        except OSError as error:
            click.echo(f"ca init: cannot write the CA in {where} ({error.strerror})", err=True)
            sys.exit(1)
        click.echo(f"created a local CA valid for {days} days: {cert}")
        click.echo("tools trust it through `tokenproxy env` or `tokenproxy exec`; its key never leaves this machine")

    @ca.command(epilog=epilog)
    @config_option
    def path(config_path: str | None) -> None:
        """Print the CA certificate's path (the only line), for a tool's --cacert."""
        where = directory(config_path)
        try:
            cert, _ = ca_paths(where)
        except CAError as error:
            click.echo(f"ca path: {error}", err=True)
            sys.exit(1)
        click.echo(str(cert))

    def environment(command: str, config_path: str | None) -> dict[str, str]:
        """The variables that point tools at the running proxy (exit 1 when no proxy or CA is there)."""
        config = load(config_path)
        proxy = proxy_url(config.server.listen)
        if proxy is None:
            fail(command, f"server.listen is {config.server.listen!r}: tools need a TCP address for HTTPS_PROXY")
        problem = proxy_problem(config.server.listen)
        if problem is not None:
            fail(command, problem)
        server = config.server
        if server.client_token and server.client_token_header.lower() == "proxy-authorization":
            # What a proxy URL can carry: tools send its user:password@ as Proxy-Authorization: Basic.
            proxy = proxy.replace("http://", f"http://tokenproxy:{quote(server.client_token, safe='')}@", 1)
        where = ca_dir_of(config)
        try:
            cert, _ = ca_paths(where)
            bundle = trust_bundle(where, cert)
        except CAError as error:
            fail(command, str(error))
        except OSError as error:
            fail(command, f"cannot write the CA bundle in {where} ({error.strerror})")
        return {
            "HTTPS_PROXY": proxy,
            "https_proxy": proxy,
            "HTTP_PROXY": proxy,
            "http_proxy": proxy,  # curl reads only the lower-case one for http://
            "NO_PROXY": NO_PROXY,
            "no_proxy": NO_PROXY,
            "CURL_CA_BUNDLE": str(bundle),
            "SSL_CERT_FILE": str(bundle),
            "REQUESTS_CA_BUNDLE": str(bundle),
            "NODE_EXTRA_CA_CERTS": str(cert),  # Node adds it to its own roots
        }

    @click.command(epilog=epilog)
    @config_option
    def env(config_path: str | None) -> None:
        """Print the `export` lines that point tools at the running proxy: `eval "$(tokenproxy env)"`."""
        for name, value in environment("env", config_path).items():
            click.echo(f"export {name}={shlex.quote(value)}")

    @click.command(
        "exec", epilog=epilog, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
    )
    @config_option
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    def exec_(config_path: str | None, command: tuple[str, ...]) -> None:
        """Run COMMAND with the variables of `tokenproxy env` set; its exit status is the command's."""
        variables = environment("exec", config_path)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execvpe(command[0], list(command), {**os.environ, **variables})
        except FileNotFoundError:
            fail("exec", f"{command[0]}: command not found", 127)
        except OSError as error:
            fail("exec", f"{command[0]}: cannot run it ({error.strerror})", 126)

    return [ca, env, exec_]


NO_PROXY = "localhost,127.0.0.1,::1"
# How long `env` and `exec` wait for the running proxy to answer.
_PROBE_TIMEOUT = 3.0
# A CONNECT only tokenproxy answers with its own error (403, or 502 when passed through): nothing is forwarded.
_PROBE = b"CONNECT tokenproxy-probe.invalid:443 HTTP/1.1\r\nHost: tokenproxy-probe.invalid:443\r\n\r\n"


def fail(command: str, message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit."""
    click.echo(f"{command}: {message}", err=True)
    sys.exit(code)


def proxy_url(listen: str) -> str | None:
    """The URL tools reach `server.listen` at (a wildcard address as loopback); None for a unix socket."""
    if listen.startswith("unix:"):
        return None
    host, port = parse_listen(listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def proxy_problem(listen: str) -> str | None:
    """None when a tokenproxy answers on `listen` (a TCP connect and one CONNECT it refuses); else why not."""
    url = proxy_url(listen)
    assert url is not None
    host, port = parse_listen(listen)
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    none = f"no tokenproxy answers on {url.removeprefix('http://')} (server.listen)"
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT) as sock:
            sock.sendall(_PROBE)
            answer = b""
            while b"\r\n\r\n" not in answer and len(answer) < 65536:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
    except OSError as error:
        if isinstance(error, ConnectionRefusedError):
            cause = "nothing listens there"
        elif isinstance(error, TimeoutError):
            cause = f"nothing answered within {_PROBE_TIMEOUT:g}s"
        else:
            cause = error.strerror or type(error).__name__
        return f"{none}: {cause}; start it with `tokenproxy run` and this config"
    if b"\r\nx-tokenproxy-error:" not in answer.lower():
        return f"{none}: something else listens there"
    return None
