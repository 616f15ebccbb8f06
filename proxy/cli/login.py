"""`tokenproxy login` and `tokenproxy logout`: a person obtains (or gives up) the refresh token the proxy uses.

Owns: the two commands, choosing the flow, the terminal's side of a login
(a countdown redrawn in place on a terminal, plain lines elsewhere),
keeping the tokens in the state file and the exit codes: 0 logged in (or
out), 1 the login failed (denied, expired, timed out, no metadata), 2 a
config that cannot be used for a login, 130 stopped by Ctrl-C. Never
prints a token, code, verifier or secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

import click

from ..auth.discovery import DiscoveryError, ServerMetadata, authorization_server_of
from ..auth.endpoint import TokenEndpoint
from ..auth.grants.oauth import request_fields, token_endpoint
from ..auth.login.browser import CALLBACK_PATH, browser_login
from ..auth.login.device import device_login
from ..auth.login.prompt import LoginError
from ..auth.login.register import register_client
from ..auth.login.revoke import revoke
from ..auth.protocol import GrantContext, TokenResponse
from ..config import Config, endpoint_missing, secrets_of
from ..config.schema import for_route
from ..core.causes import safe_url
from ..core.errors import GrantError, StoreUnavailable
from ..core.token import expiry_of, fingerprint
from ..observe.log import setup_logging
from ..observe.metrics import NULL_METRICS
from ..tokens.coordination import CoordinationUnavailable
from ..tokens.redis_store import RedisCoordination, check_redis
from ..tokens.store import FileStore, NullStore, SavedState, UnsafeStateError

FLOWS = ("device", "code")
_SPINNER = "|/-\\"


class TerminalPrompt:
    """The person's side of a login on `out`: a status line redrawn in place on a terminal, dropped elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._turn = 0
        self._drawn = False

    def line(self, text: str) -> None:
        """One line, below a status line if one is drawn."""
        self.done()
        self._out.write(text + "\n")
        self._out.flush()

    def status(self, text: str) -> None:
        """A spinner and `text`, redrawn in place; nothing when `out` is not a terminal."""
        if not self._tty:
            return
        self._turn += 1
        self._out.write(f"\r{_SPINNER[self._turn % len(_SPINNER)]} {text}\x1b[K")
        self._out.flush()
        self._drawn = True

    def done(self) -> None:
        """Clear the status line."""
        if self._drawn:
            self._out.write("\r\x1b[K")
            self._out.flush()
            self._drawn = False


def can_open_browser(env: dict[str, str] | os._Environ[str]) -> bool:
    """True where a browser can be opened for the person: a graphical session (macOS, Windows, or DISPLAY /
    WAYLAND_DISPLAY set elsewhere) with a browser Python's `webbrowser` knows, and not over SSH without one."""
    if sys.platform not in ("darwin", "win32") and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


async def _open_browser(url: str) -> bool:
    return await asyncio.to_thread(webbrowser.open, url)


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """Where a login goes: from the issuer's metadata, else from the config's keys; "" where not known."""

    authorization: str
    device: str
    revocation: str

    @classmethod
    def of(cls, config: Config, metadata: ServerMetadata | None) -> Endpoints:
        """The issuer's endpoints where it names them, else the configured ones."""
        tok = config.token
        if metadata is None:
            return cls(tok.authorization_url, tok.device_authorization_url, tok.revocation_url)
        return cls(
            metadata.authorization_endpoint or tok.authorization_url,
            metadata.device_authorization_endpoint or tok.device_authorization_url,
            metadata.revocation_endpoint or tok.revocation_url,
        )


def choose_flow(asked: str | None, endpoints: Endpoints, browser: bool) -> str:
    """The flow to use: the one asked for; else `code` where a browser can be opened, else `device`,
    else `code` (its URL can be opened by hand). LoginError when the server offers no way."""
    if asked == "device" and not endpoints.device:
        raise LoginError("the authorization server names no device_authorization_endpoint "
                         "(token.device_authorization_url): use --flow code")
    if asked == "code" and not endpoints.authorization:
        raise LoginError("the authorization server names no authorization_endpoint (token.authorization_url): "
                         "use --flow device")
    if asked:
        return asked
    if endpoints.authorization and (browser or not endpoints.device):
        return "code"
    if endpoints.device:
        return "device"
    raise LoginError("no authorization_endpoint or device_authorization_endpoint is known: set token.issuer, "
                     "or token.authorization_url or token.device_authorization_url")


def _endpoint(config: Config, session: Any) -> TokenEndpoint:
    tok = config.token
    return token_endpoint(tok.settings, GrantContext(session, tok.timeout, tok.default_lifetime))  # type: ignore[arg-type]


async def _login(config: Config, flow: str | None, browser: bool, timeout: float, prompt: TerminalPrompt) -> SavedState:
    from ..runtime.clients import token_session
    from ..runtime.credentials import credential_of, with_discovery

    session = token_session(config)
    try:
        config = await _with_issuer_from_api(config, session, prompt)
        resolved, metadata = await with_discovery(config, session)
        endpoints = Endpoints.of(resolved, metadata)
        chosen = choose_flow(flow, endpoints, browser)
        resolved = await _with_client(resolved, metadata, session, prompt)
        endpoint = _endpoint(resolved, session)
        fields = request_fields(resolved.token.settings)  # type: ignore[arg-type]
        if chosen == "device":
            response = await device_login(endpoint, endpoints.device, fields, prompt, max_wait=timeout)
        else:
            response = await browser_login(
                endpoint,
                endpoints.authorization,
                getattr(resolved.token.settings, "client_id", ""),
                fields,
                prompt,
                port=resolved.token.redirect_port,
                timeout=timeout,
                open_browser=_open_browser if browser else None,
                issuer=metadata.issuer if metadata is not None else "",
            )
    finally:
        await session.close()
    configured = getattr(config.token.settings, "client_id", "")
    registered = "" if configured else getattr(resolved.token.settings, "client_id", "")
    credential = credential_of(resolved.token)
    return await _keep(
        resolved, credential, lambda before: _state_of(resolved, credential, response, registered, before)
    )


async def _keep(config: Config, credential: str, make: Callable[[SavedState | None], SavedState]) -> SavedState:
    """Save `make(what the state file holds now)` under the state file's lock, so that a proxy or script
    refreshing at the same moment never races the login or logout."""
    from ..runtime.credentials import build_coordination, build_redis_coordination

    store = FileStore(Path(config.token.state_file), credential)
    # With the Redis store, under its lease and into Redis (and this machine's state file): the replicas
    # sharing the credential take the login up from there.
    shared = build_redis_coordination(config, store, NULL_METRICS)
    coordination = shared if shared is not None else build_coordination(config.token, store)
    try:
        async with coordination.refresh_right(credential) as right:
            state = make(await right.peer_state())
            await right.save(state)
    finally:
        if shared is not None:
            await shared.aclose()
    return state


async def _newest_state(config: Config, prompt: TerminalPrompt) -> tuple[Config, SavedState | None]:
    """The config with the issuer the API names when it names none (as `login` found it), and the credential's
    newest state: Redis's with the Redis store (when it holds one), else its entry in the state file (which may
    hold other configs' logins too). Its credential is named as `login` named it: by the token endpoint the
    issuer's metadata names, and the client registered there."""
    from ..runtime.clients import token_session
    from ..runtime.credentials import credential_of, redis_settings, with_discovery, with_registered_client

    session = token_session(config)
    try:
        config = await _with_issuer_from_api(config, session, prompt)
        resolved = (await with_discovery(config, session))[0]
    except (DiscoveryError, LoginError):
        resolved = with_registered_client(config)
    finally:
        await session.close()
    credential = credential_of(resolved.token)
    local = FileStore(Path(config.token.state_file), credential).load()
    settings = redis_settings(config)
    if settings is None:
        return config, local
    coordination = RedisCoordination(settings, NullStore())
    try:
        shared = await coordination.shared_state(credential)
    finally:
        await coordination.aclose()
    return config, shared if shared is not None else local


async def _with_issuer_from_api(config: Config, session: Any, prompt: TerminalPrompt) -> Config:
    """A config naming no token endpoint gets the issuer the API names (RFC 9728), and the person is told to add
    it to the config: `run` reads it from there (the state file keeps tokens, not configuration)."""
    if endpoint_missing(config) is None:
        return config
    issuer = await authorization_server_of(session, config.upstream.url, config.token.timeout)
    prompt.line(f"{safe_url(config.upstream.url)} names its authorization server: {issuer}")
    prompt.line(f'Add  issuer = "{issuer}"  to [token] in the config: `tokenproxy run` needs it.')
    return dataclasses.replace(config, token=dataclasses.replace(config.token, issuer=issuer))


async def _with_client(config: Config, metadata: ServerMetadata | None, session: Any, prompt: TerminalPrompt) -> Config:
    """The config with a client id: the configured or already registered one, else one registered now (RFC 7591)
    where the server offers registration; LoginError where it does not."""
    tok = config.token
    if getattr(tok.settings, "client_id", ""):
        return config
    url = metadata.registration_endpoint if metadata is not None else ""
    if not url:
        raise LoginError("token.client_id is not set and the authorization server offers no registration_endpoint: "
                         "set token.client_id")
    port = f":{tok.redirect_port}" if tok.redirect_port else ""
    # RFC 8252 §7.3: a loopback redirect registered without a port matches any port at login time.
    client_id = await register_client(session, url, f"http://127.0.0.1{port}{CALLBACK_PATH}",
                                      getattr(tok.settings, "scope", ""), tok.timeout)
    prompt.line(f"Registered tokenproxy as client {client_id} at {safe_url(url)} (kept in {tok.state_file})")
    settings = dataclasses.replace(tok.settings, client_id=client_id, client_auth="none")  # type: ignore[type-var]
    return dataclasses.replace(config, token=dataclasses.replace(tok, settings=settings))


def _state_of(
    config: Config, credential: str, response: TokenResponse, registered: str, before: SavedState | None
) -> SavedState:
    """The state a login leaves: its tokens, the next generation of the credential's chain (after `before`,
    what the state file held), the client `registered` for a config that names none ("" for one that does)."""
    generation = before.generation + 1 if before is not None and before.credential == credential else 1
    now = time.time()
    try:
        expires_at = expiry_of(response, now, config.token.default_lifetime)
    except GrantError as error:
        raise LoginError(f"the token endpoint's answer is unusable: {error}") from None
    return SavedState(
        credential=credential,
        seed="",  # no configured refresh token: the chain starts from this login
        access_token=response.access_token,
        expires_at=expires_at,
        obtained_at=now,
        refresh_token=response.refresh_token,
        generation=generation,
        # A client the config does not name was registered: kept, so that run and the next login use it.
        client_id=registered,
    )


def _logged_out(state: SavedState, before: SavedState | None) -> SavedState:
    """The state a logout leaves: no token, the next generation of the credential's chain, so that a proxy running
    on it sees the logout at its next refresh (and never presents the refresh token again); a registered client
    stays, for the next login."""
    latest = before if before is not None and before.credential == state.credential else state
    generation = latest.generation + 1
    return SavedState(state.credential, "", "", 0.0, time.time(), None, generation, client_id=state.client_id)


def not_logged_in(config: Config) -> str | None:
    """For a refresh_token grant with no refresh token configured nor kept in the state file: what is missing
    and what to do, in one line. None when a refresh token is known (or the grant needs none)."""
    tok = config.token
    if tok.grant != "refresh_token" or not tok.state_file or tok.refresh_token:
        return None
    if config.store.backend == "redis":
        return None  # the login may be in Redis: the proxy finds it at its first refresh
    from ..runtime.credentials import credential_of, with_registered_client

    entries = FileStore(Path(tok.state_file)).load_all()
    if tok.issuer:  # its token endpoint (part of its credential) is known after discovery only: any login will do
        known = any(state.refresh_token for state in entries.values())
    else:
        state = entries.get(credential_of(with_registered_client(config).token))
        known = state is not None and bool(state.refresh_token)
    if known:
        return None
    return f"not logged in: no token.refresh_token, and none in {tok.state_file}: run `tokenproxy login`"


def _fail(command: str, text: str, code: int) -> NoReturn:
    click.echo(f"{command}: {text}", err=True)
    sys.exit(code)


def one_credential(config: Config, command: str) -> Config:
    """A config with routes as its one credential sees it (with the first route's upstream); exit 2 when it
    has several credentials: `login` and `logout` work on one."""
    if not config.routes:
        return config
    if len(config.credentials) > 1:
        names = ", ".join(config.credentials)
        _fail(command, f"config: {command} works on a config with one credential; this one has several ({names})", 2)
    return for_route(config, config.routes[0])


def _usable_for_login(config: Config, command: str) -> None:
    """Exit 2 unless the config can take a login: a refresh_token grant, a state file, no configured token."""
    tok = config.token
    if tok.grant != "refresh_token":
        _fail(command, f"config: token.grant: must be \"refresh_token\" to log in, got {tok.grant!r}", 2)
    if not tok.state_file:
        _fail(command, "config: token.state_file: must name a file: the login's tokens are kept there", 2)
    if tok.refresh_token:
        _fail(command, "config: token.refresh_token: is set, and it would be used instead of a login: remove it", 2)
    try:
        FileStore(Path(tok.state_file)).check()
    except UnsafeStateError as error:
        _fail(command, str(error), 1)
    from ..runtime.credentials import redis_settings

    settings = redis_settings(config)
    if settings is not None:
        # Before the person spends time on a login whose tokens could not be shared.
        try:
            check_redis(settings)
        except StoreUnavailable as error:
            _fail(command, error.detail, 1)


def login_commands(
    config_option: Callable[[Any], Any], load: Callable[[str | None], Config], epilog: str
) -> list[click.Command]:
    """The `login` and `logout` commands, reading the config with `load` as the other commands do."""

    @click.command(epilog=epilog)
    @config_option
    @click.option("--flow", type=click.Choice(FLOWS), default=None,
                  help="device: enter a code on any device; code: a browser on this machine "
                  "(default: code where a browser can be opened, else device).")
    @click.option("--no-browser", is_flag=True,
                  help="Do not open a browser: the default flow is then device; with --flow code, print its URL only.")
    @click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
                  help="Give up after this many seconds without an approval.")
    def login(config_path: str | None, flow: str | None, no_browser: bool, timeout: float) -> None:
        """Log in as a person and keep the refresh token in the state file, for `tokenproxy run`."""
        config = one_credential(load(config_path), "login")
        setup_logging("warning", "text", secrets_of(config))
        _usable_for_login(config, "login")
        browser = not no_browser and can_open_browser(os.environ)
        prompt = TerminalPrompt(sys.stdout)
        try:
            state = asyncio.run(_login(config, flow, browser, timeout, prompt))
        except KeyboardInterrupt:
            prompt.done()
            _fail("login", "stopped (Ctrl-C): nothing was saved", 130)
        except DiscoveryError as error:
            _fail("login", f"discovery: {error}", 1)
        except LoginError as error:
            _fail("login", str(error), 1)
        except CoordinationUnavailable as error:
            _fail("login", f"cannot keep the tokens in {config.token.state_file}: {error.reason}", 1)
        except OSError as error:
            _fail("login", f"cannot keep the tokens in {config.token.state_file}: {error}", 1)
        left = state.expires_at - time.time()
        click.echo(
            f"Logged in: access token {fingerprint(state.access_token)} (expires in {left:.0f}s) kept in "
            f"{config.token.state_file}"
        )
        if state.refresh_token:
            click.echo("`tokenproxy run` now uses it, and its refresh token, with no secret in its config.")
        else:
            click.echo("The authorization server gave no refresh token (ask for offline_access in token.scope?): "
                       "log in again when the access token expires.")

    @click.command(epilog=epilog)
    @config_option
    def logout(config_path: str | None) -> None:
        """Revoke the refresh token at the authorization server where it can be, and remove it from the state file."""
        config = one_credential(load(config_path), "logout")
        setup_logging("warning", "text", secrets_of(config))
        _usable_for_login(config, "logout")
        try:
            config, state = asyncio.run(_newest_state(config, TerminalPrompt(sys.stdout)))
        except StoreUnavailable as error:
            _fail("logout", error.detail, 1)
        if state is None or not (state.refresh_token or state.access_token):
            click.echo(f"Not logged in: {config.token.state_file} holds no tokens. Nothing was done.")
            return
        revoked = ""
        try:
            if state.refresh_token:
                revoked = asyncio.run(_revoke(config, state.refresh_token))
        except DiscoveryError as error:
            revoked = f"not revoked: discovery: {error}"
        except GrantError as error:
            revoked = f"not revoked: {error}"
        try:
            asyncio.run(_keep(config, state.credential, lambda before: _logged_out(state, before)))
        except CoordinationUnavailable as error:
            _fail("logout", f"cannot remove the tokens from {config.token.state_file}: {error.reason}", 1)
        click.echo(f"Removed the tokens from {config.token.state_file}.")
        if revoked.startswith("not revoked"):
            _fail("logout", f"the refresh token is {revoked}", 1)
        click.echo(revoked or "There was no refresh token to revoke.")

    return [login, logout]


async def _revoke(config: Config, refresh_token: str) -> str:
    """Revoke the refresh token where the server offers revocation; what was done, in words."""
    from ..runtime.clients import token_session
    from ..runtime.credentials import with_discovery

    session = token_session(config)
    try:
        resolved, metadata = await with_discovery(config, session)
        url = Endpoints.of(resolved, metadata).revocation
        if not url:
            return "The authorization server offers no revocation endpoint: the refresh token was not revoked."
        await revoke(_endpoint(resolved, session), url, refresh_token)
        return f"Revoked the refresh token at {safe_url(url)}."
    finally:
        await session.close()
