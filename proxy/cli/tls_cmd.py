"""`tokenproxy ca init|path`: the local certificate authority that CONNECT interception signs with."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..config import Config, find_config_path
from ..tls.ca import CAError, ca_paths, create_ca, default_ca_dir
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

    return [ca]
