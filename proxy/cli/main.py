"""The command line: `run`, `check`, `token`, `login`, `logout`, `demo`, `config`. The only place that exits."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import click

from ..auth.discovery import DiscoveryError
from ..auth.grants.static import StaticSettings
from ..config import (
    CONFIG_SEARCH,
    Config,
    ConfigError,
    WithoutCredentialSecrets,
    config_file_warnings,
    endpoint_missing,
    find_config_path,
    load_config,
    secrets_of,
)
from ..config.schema import credentials_of, for_credential, with_state_file_where_none
from ..core.causes import cause_in_words
from ..core.errors import ProxyError, StoreUnavailable
from ..core.token import sendable
from ..observe.log import mark_worker, setup_logging
from ..tokens.store import STATE_LOGGER, FileStore, UnsafeStateError
from .config_cmd import config_commands
from .login import login_commands, not_logged_in
from .tls_cmd import tls_commands


def _fail_config(error: ConfigError) -> NoReturn:
    for problem in error.problems:
        click.echo(f"config: {problem}" if not problem.startswith("config:") else problem, err=True)
    sys.exit(2)


def _file_warnings(config_path: str | None) -> list[str]:
    """Warnings about the config file itself: a literal secret in a file others can read."""
    return config_file_warnings(find_config_path(config_path, os.environ))


def _no_config_file() -> str:
    """Where `find_config_path` looked when it found no file, for the line ahead of the problems."""
    return (
        "config: no config file found: no -c FILE given, $TOKENPROXY_CONFIG is not set, "
        f"and there is no tokenproxy.toml in {Path.cwd()}"
    )


def _load(
    config_path: str | None, overrides: dict[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    path = find_config_path(config_path, os.environ)
    try:
        return load_config(path, overrides, env)
    except ConfigError as error:
        if path is None:
            click.echo(_no_config_file(), err=True)
        _fail_config(error)


def _require_endpoint(config: Config) -> None:
    """Exit 2 for a config (any credential of it) naming no token endpoint: only `login` can start from one."""
    problems = []
    for name in credentials_of(config):
        problem = endpoint_missing(for_credential(config, name))
        if problem is not None:
            problems.append(problem if not config.routes else _credential_key(config, name) + problem[len("token") :])
    if problems:
        _fail_config(ConfigError(problems))


def _credential_key(config: Config, name: str) -> str:
    """How the config names a credential's table: `credentials.NAME`, or `route[N].token` for an inline one."""
    for index, route in enumerate(config.routes):
        if route.name == name and route.token == name:
            return f"route[{index}].token"
    return f"credentials.{name}"


def _chosen(config: Config, command: str, name: str | None, *, one: bool) -> list[str]:
    """The credentials a command works on: `--credential NAME`, else every one (exit 2 when `one` is needed and
    there are several, or for an unknown name)."""
    names = list(credentials_of(config))
    if name is not None:
        if name not in names:
            click.echo(f"{command}: --credential: no credential {name!r}; the config has {', '.join(names)}", err=True)
            sys.exit(2)
        return [name]
    if one and len(names) > 1:
        click.echo(
            f"{command}: the config has several credentials ({', '.join(names)}): name one with --credential NAME",
            err=True,
        )
        sys.exit(2)
    return names


def _refuse_unsafe_state(state_file: str, command: str) -> None:
    """Exit 1 before anything starts when the state file or its directory could be another user's doing."""
    if not state_file:
        return
    try:
        FileStore(Path(state_file)).check()
    except UnsafeStateError as error:
        _fail_state(error, command)


def _fail_state(error: UnsafeStateError, command: str) -> NoReturn:
    click.echo(f"{command}: {error}", err=True)
    sys.exit(1)


def _token_failure(config: Config, error: ProxyError) -> str:
    """The failure in words; with no refresh token known at all for a refresh_token grant, that no one has
    logged in yet and how to: `tokenproxy login`."""
    missing = not_logged_in(config) if error.code == "login_required" else None
    return f"{error.code}: {missing or error.detail}"


def _fail_discovery(error: DiscoveryError, command: str) -> NoReturn:
    """Exit 1: the issuer's metadata could not be had, so there is no token endpoint to ask."""
    click.echo(f"{command}: discovery: {error}", err=True)
    sys.exit(1)


_config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $TOKENPROXY_CONFIG, then ./tokenproxy.toml).",
)
# The end of every --help that reads a config: where it is looked for, and where to start one.
_CONFIG_EPILOG = (
    f"The config file is looked for at: {CONFIG_SEARCH}. "
    "`tokenproxy config example` prints every key, commented, with its default."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_CONFIG_EPILOG)
@click.version_option(package_name="tokenproxy")
def main() -> None:
    """tokenproxy: a local proxy that adds a fresh bearer token to every request."""


main.add_command(config_commands(_config_option, _load, _CONFIG_EPILOG))
for _command in login_commands(_config_option, _load, _CONFIG_EPILOG):
    main.add_command(_command)
def _load_without_credential_secrets(config_path: str | None) -> Config:
    """The config for commands that only point tools at the proxy: a credential's secret may be unset."""
    return _load(config_path, env=WithoutCredentialSecrets(os.environ))


for _command in tls_commands(_config_option, _load_without_credential_secrets, _CONFIG_EPILOG):
    main.add_command(_command)


@main.command(epilog=_CONFIG_EPILOG)
@_config_option
@click.option("--listen", default=None, metavar="HOST:PORT", help="Override server.listen.")
@click.option("--upstream", default=None, metavar="URL", help="Override upstream.url.")
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Override log.level.",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0),
    metavar="N",
    help="Override server.workers: N processes share the port (0: one per CPU).",
)
# A worker of a group (runtime/workers.py): the socket to its supervisor, and the keys that make it one.
@click.option("--worker-link", default=None, type=int, hidden=True)
@click.option("--worker-set", multiple=True, hidden=True)
def run(
    config_path: str | None,
    listen: str | None,
    upstream: str | None,
    log_level: str | None,
    workers: int | None,
    worker_link: int | None,
    worker_set: tuple[str, ...],
) -> None:
    """Run the proxy until Ctrl-C or SIGTERM."""
    from ..runtime.serve import ListenError, event_loop_factory, serve
    from ..runtime.workers import PRIVATE_STATE_KEY, WORKER_INDEX_KEY

    sets = dict(item.split("=", 1) for item in worker_set)
    if WORKER_INDEX_KEY in sets:
        mark_worker(int(sets.pop(WORKER_INDEX_KEY)))
    # A worker's private state file: for every credential the config keeps no state file for.
    private_state = sets.pop(PRIVATE_STATE_KEY, "").replace("$$", "$")
    overrides: dict[str, Any] = {
        "server.listen": listen,
        "upstream.url": upstream,
        "log.level": log_level,
        "server.workers": workers,
        **sets,
    }

    def load(path: Path | None) -> Config:
        loaded = load_config(path, overrides)
        return with_state_file_where_none(loaded, private_state) if private_state else loaded

    config = _load(config_path, overrides)
    if private_state:
        config = with_state_file_where_none(config, private_state)
    _require_endpoint(config)
    setup_logging(config.log.level, config.log.format, secrets_of(config), access_log=config.log.access_log)
    if worker_link is None:
        for warning in _file_warnings(config_path):
            logging.getLogger("tokenproxy").warning("config: %s", warning)
    for name in credentials_of(config):
        view = for_credential(config, name)
        _refuse_unsafe_state(view.token.state_file, "tokenproxy")
        if (missing := not_logged_in(view)) is not None:
            logging.getLogger("tokenproxy").warning("%s; until then requests get 503 login_required", missing)

    def reload() -> Config:
        # SIGHUP: the same file and command-line overrides, read again.
        return load(find_config_path(config_path, os.environ))

    link = None if worker_link is None else socket.socket(fileno=worker_link)
    if link is None:
        _run_workers_if_asked(config, config_path, {"upstream": upstream, "log-level": log_level})
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(config.server.loop)) as runner:
            runner.run(serve(config, reload, link))
    except UnsafeStateError as error:  # made unsafe after the check above
        _fail_state(error, "tokenproxy")
    except ListenError as error:
        click.echo(f"tokenproxy: {error}", err=True)
        sys.exit(1)
    except DiscoveryError as error:
        _fail_discovery(error, "tokenproxy")
    except OSError as exc:
        click.echo(f"tokenproxy: {cause_in_words(exc) or exc}", err=True)
        sys.exit(1)
    except StoreUnavailable as error:
        # The shared store is pinged before anything listens: a Redis that cannot be reached stops the start.
        click.echo(f"tokenproxy: {error.code}: {error.detail}", err=True)
        sys.exit(1)
    except ProxyError as error:
        # server.fetch_on_start: no first token, so no listener either.
        click.echo(f"tokenproxy: no token at start: {error.code}: {error.detail}", err=True)
        sys.exit(1)
    except asyncio.CancelledError:
        click.echo("tokenproxy: stopped at once by a second signal", err=True)
        sys.exit(1)


def _run_workers_if_asked(config: Config, config_path: str | None, options: dict[str, str | None]) -> None:
    """With `server.workers` other than 1 (on Linux), supervise the workers until stopped, and exit.

    Each worker is this command again, with the same file and options, and the keys that make it
    a worker (runtime/workers.py) as hidden options: it loads, validates and reloads its config as
    a single process does.
    """
    from ..runtime.serve import ListenError
    from ..runtime.workers import resolve_workers, supervise, workers_unsupported

    count = resolve_workers(config.server.workers)
    if count == 1:
        return
    reason = workers_unsupported()
    if reason is not None:
        logging.getLogger("tokenproxy").warning("%s", reason)
        return
    path = find_config_path(config_path, os.environ)
    base = [sys.executable, "-m", "proxy", "run"]
    if path is not None:
        base += ["-c", str(path.absolute())]
    for name, value in options.items():
        if value is not None:
            base += [f"--{name}", value]

    def command(fd: int, overrides: Mapping[str, str]) -> list[str]:
        sets = [arg for key, value in overrides.items() for arg in ("--worker-set", f"{key}={value}")]
        return [*base, "--worker-link", str(fd), *sets]

    try:
        code = supervise(config, count, command)
    except ListenError as error:
        click.echo(f"tokenproxy: {error}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"tokenproxy: {cause_in_words(exc) or exc}", err=True)
        sys.exit(1)
    sys.exit(code)


async def _one_token(config: Config, *, fresh: bool = False) -> tuple[str, float, str, int]:
    """A token of the configured credential: the cached one when still valid, or with `fresh` one fetched now."""
    from ..runtime.clients import token_session
    from ..runtime.credentials import make_token_manager, with_discovery

    session = token_session(config)
    try:
        manager = make_token_manager((await with_discovery(config, session))[0], session)
        try:
            token = await (manager.refresh_now() if fresh else manager.get())
        finally:
            await manager.close()
        return token.value, token.expires_at, token.fingerprint, token.generation
    finally:
        await session.close()


_CREDENTIAL_OPTION = click.option(
    "--credential",
    "credential",
    default=None,
    metavar="NAME",
    help="The credential to use ([credentials.NAME], or a route's name for its [route.token]).",
)


@main.command(epilog=_CONFIG_EPILOG)
@_config_option
@_CREDENTIAL_OPTION
def check(config_path: str | None, credential: str | None) -> None:
    """Validate the config, fetch one token from the token endpoint now and print its expiry (never the token).

    With several credentials, each one in turn (or only `--credential NAME`).
    """
    config = _load(config_path)
    _require_endpoint(config)
    _quiet_logging(config)
    for warning in _file_warnings(config_path):
        click.echo(f"warning: config: {warning}", err=True)
    names = _chosen(config, "check", credential, one=False)
    for name in names:
        _check_one(for_credential(config, name), f"credential {name}: " if config.routes else "")


def _quiet_logging(config: Config) -> None:
    """For `check` and `token`, which say what happened themselves: no log lines, but for the state file's
    warnings (a corrupt file moved aside), which nothing else would tell."""
    setup_logging("critical", "text", secrets_of(config))
    logging.getLogger(STATE_LOGGER).setLevel(logging.WARNING)


def _check_one(config: Config, label: str) -> None:
    """`check` for one credential (`config` as it sees it); exits unless it is ok. `label` names it."""
    _refuse_unsafe_state(config.token.state_file, "check")
    if config.token.grant == "static":
        _check_static(config, label)
        return
    try:
        # A token in the state file proves nothing about the credential now: always ask the endpoint.
        _, expires_at, fp, generation = asyncio.run(_one_token(config, fresh=True))
    except UnsafeStateError as error:
        _fail_state(error, "check")
    except DiscoveryError as error:
        _fail_discovery(error, "check")
    except ProxyError as error:
        click.echo(f"check: {label}{_token_failure(config, error)}", err=True)
        sys.exit(1)
    when = datetime.datetime.fromtimestamp(expires_at, datetime.UTC).isoformat(timespec="seconds")
    remaining = expires_at - datetime.datetime.now(datetime.UTC).timestamp()
    click.echo(
        f"ok: {label}grant {config.token.grant}, token {fp} (generation {generation}), "
        f"expires {when} (in {remaining:.0f}s)"
    )


def _check_static(config: Config, label: str = "") -> None:
    """`check` for a static token: nothing to contact, so only whether it can be sent at all (exit 1 if not)."""
    settings = config.token.settings
    if not isinstance(settings, StaticSettings) or not sendable(settings.access_token):
        click.echo(f"check: {label}token_unavailable: the access token has characters a header cannot carry", err=True)
        sys.exit(1)
    click.echo(f"ok: {label}grant static: nothing to contact; the token is sent as configured")


@main.command(epilog=_CONFIG_EPILOG)
@_config_option
@_CREDENTIAL_OPTION
def token(config_path: str | None, credential: str | None) -> None:
    """Print a valid access token on standard output, for scripts (with several credentials: `--credential NAME`)."""
    config = _load(config_path)
    _require_endpoint(config)
    _quiet_logging(config)
    config = for_credential(config, _chosen(config, "token", credential, one=True)[0])
    _refuse_unsafe_state(config.token.state_file, "token")
    try:
        value, _, _, _ = asyncio.run(_one_token(config))
    except UnsafeStateError as error:
        _fail_state(error, "token")
    except DiscoveryError as error:
        _fail_discovery(error, "token")
    except ProxyError as error:
        click.echo(f"token: {_token_failure(config, error)}", err=True)
        sys.exit(1)
    click.echo(value)


@main.command()
@click.option("--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="Where the proxy listens.")
@click.option("--lifetime", default=10.0, type=float, show_default=True, help="Demo token lifetime in seconds.")
@click.option(
    "--state-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where the demo keeps its state file (default: a temporary folder).",
)
@click.option(
    "--burst",
    default=0,
    type=click.IntRange(min=0, max=10000),
    help="Wait for the token to expire, send N concurrent requests, summarise; exit 0 only if all "
    "succeeded with one refresh.",
)
def demo(listen: str, lifetime: float, state_dir: str | None, burst: int) -> None:
    """Start a demo token server, a demo API and the proxy in front of them, all on 127.0.0.1."""
    from .demo import run_demo

    setup_logging("warning" if burst else "info", "text")
    if state_dir:
        _refuse_unsafe_state(str(Path(state_dir) / "state.json"), "demo")
    sys.exit(asyncio.run(run_demo(listen, lifetime, Path(state_dir) if state_dir else None, burst=burst)))


if __name__ == "__main__":  # pragma: no cover
    main()
