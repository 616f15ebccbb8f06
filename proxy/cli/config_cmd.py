"""`tokenproxy config example` and `tokenproxy config show`: help with writing and reading a config file."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from ..config import Config, find_config_path
from ..config.show import effective_toml, example_config

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def config_commands(config_option: Decorator, load: Callable[[str | None], Config], epilog: str) -> click.Group:
    """The `config` command group; `load` reads the config (exiting 2 on a bad one) as every command does."""

    @click.group("config", epilog=epilog)
    def config() -> None:
        """Print the commented example config, or the effective one."""

    @config.command()
    def example() -> None:
        """Print the commented example config: every key with its default (the same as config.example.toml)."""
        click.echo(example_config(), nl=False)

    @config.command(epilog=epilog)
    @config_option
    def show(config_path: str | None) -> None:
        """Print the effective config as TOML: every default filled in, every secret shown as <set>."""
        path = find_config_path(config_path, os.environ)
        loaded = load(config_path)
        source = f"read from {path}" if path else "no config file: the defaults"
        heading = (
            f"tokenproxy's effective config, {source}.\nEvery key with its value; a secret that is set shows <set>."
        )
        click.echo(effective_toml(loaded, heading), nl=False)

    return config
