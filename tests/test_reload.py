"""A reload does what it logs: a change to what the token request asks for fetches a new token.

Proxies run in front of the fake token server and API on 127.0.0.1; a
reload is `apply_reload` with a changed config, as SIGHUP puts it in force;
what is observed is the note it logs, which token reaches the API and what
the token endpoint was asked. `decide_change` is the pure decision under it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Config
from proxy.runtime.credentials import credential_of
from proxy.runtime.reload import Note, apply_reload
from proxy.tokens.change import Reconfigured, TokenChange, decide_change
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import FakeTokenServer, until

KEPT = Note(logging.INFO, "current token kept")


def with_token(config: Config, settings: dict[str, Any] | None = None, **token: Any) -> Config:
    """`config` with some `[token]` keys changed: shared ones as keywords, the grant's own in `settings`."""
    tok = config.token
    if settings:
        tok = dataclasses.replace(tok, settings=dataclasses.replace(tok.settings, **settings))
    return dataclasses.replace(config, token=dataclasses.replace(tok, **token))


async def get_ok(client: aiohttp.ClientSession, url: str) -> None:
    """One request through the proxy, answered 200."""
    async with client.get(url) as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    ("grant", "settings", "note"),
    [
        # A refresh token's chain is one credential whatever it asks for; for the other grants what the request
        # asks for is part of the credential (a token for another audience is another credential's).
        ("refresh_token", {"scope": "read write"}, "token request changed (scope)"),
        ("client_credentials", {"audience": "https://api.example"}, "credential changed (audience)"),
        ("client_credentials", {"client_auth": "post"}, "credential changed (client_auth)"),
        ("client_credentials", {"scope": "read", "audience": "https://api.example"}, "credential changed (scope, audience)"),
    ],
)
async def test_reload_request_change_fetches_new_token_and_drops_old(
    make_proxy: Any,
    token_server: FakeTokenServer,
    api: FakeApi,
    client: aiohttp.ClientSession,
    grant: str,
    settings: dict[str, Any],
    note: str,
) -> None:
    """Scope, audience or client authentication changed: the note says so, the next request gets a token asked for
    with the new values, and the old token is not sent again."""
    proxy = await make_proxy(token={"grant": grant})
    await get_ok(client, f"{proxy.url}/echo/before")
    new = with_token(proxy.config, settings)
    notes = apply_reload(proxy.app, proxy.config, new)
    assert notes == [Note(logging.INFO, f"{note}: a new token will be fetched")]
    await get_ok(client, f"{proxy.url}/echo/after")
    await get_ok(client, f"{proxy.url}/echo/again")
    assert token_server.count == 2
    for key, value in settings.items():
        if key != "client_auth":
            assert token_server.calls[-1].form[key] == value
    first, second = token_server.issued_access
    assert api.tokens_seen == [first, second, second]


async def test_reload_client_auth_change_sends_client_secret_in_form(
    make_proxy: Any, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """client_auth basic -> post: the new token is asked for with the client's secret in the form."""
    proxy = await make_proxy(token={"grant": "client_credentials"})
    await get_ok(client, f"{proxy.url}/echo/before")
    assert "client_secret" not in token_server.calls[0].form
    apply_reload(proxy.app, proxy.config, with_token(proxy.config, {"client_auth": "post"}))
    await get_ok(client, f"{proxy.url}/echo/after")
    assert "client_secret" in token_server.calls[1].form


async def test_reload_scope_change_on_refresh_token_grant_continues_the_chain(
    make_proxy: Any, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A scope change keeps the credential (its state-file key) and presents the refresh token the last answer rotated."""
    proxy = await make_proxy()
    await get_ok(client, f"{proxy.url}/echo/before")
    rotated = token_server.current_refresh
    new = with_token(proxy.config, {"scope": "read write"})
    assert credential_of(new.token) == credential_of(proxy.config.token)
    apply_reload(proxy.app, proxy.config, new)
    await get_ok(client, f"{proxy.url}/echo/after")
    assert token_server.calls[1].form["refresh_token"] == rotated
    assert token_server.calls[1].form["scope"] == "read write"
    assert not token_server.reuse_detected
    state = Path(proxy.config.token.state_file).read_text()
    assert token_server.current_refresh in state and token_server.issued_access[1] in state


async def test_reload_unchanged_request_keeps_token(
    make_proxy: Any, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """Only timings changed (refresh_before, the client secret): the current token is kept and still sent."""
    proxy = await make_proxy(token={"grant": "client_credentials"})
    await get_ok(client, f"{proxy.url}/echo/before")
    new = with_token(proxy.config, {"client_secret": "another-secret"}, refresh_before=10.0)
    assert apply_reload(proxy.app, proxy.config, new) == [KEPT]
    await get_ok(client, f"{proxy.url}/echo/after")
    assert token_server.count == 1
    assert api.tokens_seen == [token_server.issued_access[0]] * 2


async def test_reload_request_change_with_fetch_on_start_fetches_at_once(
    make_proxy: Any, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """server.fetch_on_start: the new token is fetched by the reload itself, before any request asks."""
    proxy = await make_proxy(server={"fetch_on_start": True})
    await get_ok(client, f"{proxy.url}/echo/before")
    apply_reload(proxy.app, proxy.config, with_token(proxy.config, {"scope": "read write"}))
    await until(lambda: proxy.tokens.status().generation == 2)
    assert token_server.calls[-1].form["scope"] == "read write"
    await get_ok(client, f"{proxy.url}/echo/after")
    assert token_server.count == 2
    assert api.tokens_seen[-1] == token_server.issued_access[1]


async def test_reload_request_change_during_refresh_discards_its_token_keeps_rotation(
    make_proxy: Any, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """The scope changes while a refresh runs: its token (old scope) is never sent or saved, the refresh token it
    rotated is presented next, and its waiter gets 503 token_unavailable."""
    token_server.gate = asyncio.Event()
    proxy = await make_proxy()
    waiting = asyncio.ensure_future(client.get(f"{proxy.url}/echo/during"))
    await token_server.entered.wait()
    apply_reload(proxy.app, proxy.config, with_token(proxy.config, {"scope": "read write"}))
    token_server.gate.set()
    resp = await waiting
    assert resp.status == 503
    assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"
    resp.release()
    await get_ok(client, f"{proxy.url}/echo/after")
    assert token_server.calls[1].form["scope"] == "read write"
    assert not token_server.reuse_detected
    voided, used = token_server.issued_access
    assert api.tokens_seen == [used]
    assert voided not in Path(proxy.config.token.state_file).read_text()


async def test_reload_json_body_template_change_fetches_new_token(
    make_proxy: Any, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """grant json: a changed body template is a changed request (named, its value not shown); the new token is asked
    for with the new body."""
    paths = {"access_token_path": "data.accessToken", "refresh_token_path": "data.refreshToken"}
    proxy = await make_proxy(
        token={"grant": "json", "token_url": f"{token_server.base_url}/auth/refresh", "json": paths}
    )
    await get_ok(client, f"{proxy.url}/echo/before")
    json_settings = dataclasses.replace(
        proxy.config.token.settings.json, body='{"refreshToken": "{refresh_token}", "tenant": "blue"}'
    )
    notes = apply_reload(proxy.app, proxy.config, with_token(proxy.config, {"json": json_settings}))
    assert notes == [Note(logging.INFO, "token request changed (json.body): a new token will be fetched")]
    await get_ok(client, f"{proxy.url}/echo/after")
    assert token_server.calls[-1].json_body["tenant"] == "blue"
    assert api.tokens_seen == token_server.issued_access


async def test_reload_static_token_change_sends_new_token(
    make_proxy: Any, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """grant static: another configured token is sent from the reload on (the note names the key, not the token)."""
    one, two = token_server.new_access(), token_server.new_access()
    proxy = await make_proxy(token={"grant": "static", "access_token": one})
    await get_ok(client, f"{proxy.url}/echo/before")
    notes = apply_reload(proxy.app, proxy.config, with_token(proxy.config, {"access_token": two}))
    assert notes == [Note(logging.INFO, "credential changed (access_token): a new token will be fetched")]
    await get_ok(client, f"{proxy.url}/echo/after")
    assert api.tokens_seen == [one, two]


async def test_reload_restart_only_keys_compared_with_config_in_force(make_proxy: Any) -> None:
    """A restart-only key is named, as a warning, against the config the proxy started with."""
    proxy = await make_proxy()
    moved = dataclasses.replace(proxy.config, server=dataclasses.replace(proxy.config.server, listen="127.0.0.1:9"))
    warning = Note(logging.WARNING, "server.listen changed; it takes effect after a restart")
    assert apply_reload(proxy.app, proxy.config, moved) == [warning, KEPT]
    assert apply_reload(proxy.app, proxy.config, proxy.config) == [KEPT]


CHAIN = ("cred", "seed", (("grant", "refresh_token"), ("scope", "")))


@pytest.mark.parametrize(
    ("credential", "seed", "request_shape", "want"),
    [
        ("cred", "seed", CHAIN[2], Reconfigured(TokenChange.KEPT, ())),
        ("cred", "", CHAIN[2], Reconfigured(TokenChange.KEPT, ())),
        ("cred", "seed", (("grant", "refresh_token"), ("scope", "a")), Reconfigured(TokenChange.REQUEST, ("scope",))),
        ("cred", "seed", (("grant", "refresh_token"),), Reconfigured(TokenChange.REQUEST, ("scope",))),
        ("cred", "other", CHAIN[2], Reconfigured(TokenChange.LOGIN, ("refresh_token",))),
        ("other", "seed", (("grant", "password"), ("scope", "")), Reconfigured(TokenChange.CREDENTIAL, ("grant",))),
    ],
)
def test_decide_change_table(
    credential: str, seed: str, request_shape: tuple[tuple[str, str], ...], want: Reconfigured
) -> None:
    """Kept only when credential, login and request are the same; else the first of credential, login, request."""
    got = decide_change(*CHAIN, new_credential=credential, new_seed=seed, new_request=request_shape)
    assert got == want
