"""Several APIs through one proxy: `[[route]]` tables, each with its upstream and credential.

Two fake APIs, each trusting only its own fake token server (or both the
same one, for a shared credential), on 127.0.0.1; the proxy is the real
application built from a parsed config. What a person sees is asserted:
statuses, JSON bodies, the token calls and upstream requests counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Config, exposed_secrets_warning, parse_config
from proxy.core.token import fingerprint
from proxy.http.admin import build_admin_app
from proxy.runtime.app import METRICS, ROUTING, build_app
from proxy.runtime.credentials import credential_of
from proxy.runtime.reload import apply_reload
from proxy.runtime.serve import make_runner, start_listener
from proxy.tokens.store import SavedState
from tests.fakes.api_server import FakeApi
from tests.fakes.counting_upstream import CountingUpstream
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer
from tests.helpers import (
    assert_proxy_error,
    raw_exchange,
    read_until,
    run_cli,
    start_cli,
    stop_process,
    write_config,
)

HANG_BOUND = 10.0


@dataclasses.dataclass
class Side:
    """One API and the token server it trusts."""

    tokens: FakeTokenServer
    api: FakeApi


async def _side(aiohttp_server: Any, tokens: FakeTokenServer | None = None) -> Side:
    if tokens is None:
        tokens = FakeTokenServer()
        server = await aiohttp_server(tokens.app(), host="127.0.0.1")
        tokens.base_url = str(server.make_url("")).rstrip("/")
    api = FakeApi(tokens.signing_key)
    api_server = await aiohttp_server(api.app(), host="127.0.0.1")
    api.base_url = str(api_server.make_url("")).rstrip("/")
    return Side(tokens, api)


@pytest.fixture
async def left(aiohttp_server: Any) -> Side:
    """An API and its own token server."""
    return await _side(aiohttp_server)


@pytest.fixture
async def right(aiohttp_server: Any) -> Side:
    """Another API and its own token server."""
    return await _side(aiohttp_server)


def credential(side: Side, state: Path) -> dict[str, Any]:
    """A `[credentials.NAME]` table for a side's token server."""
    return {
        "grant": "refresh_token",
        "token_url": f"{side.tokens.base_url}/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": side.tokens.current_refresh,
        "state_file": str(state),
        "min_refresh_interval": 0.0,
        "timeout": 5.0,
    }


class Routed:
    """Starts proxies from raw configs with routes; stops them all."""

    def __init__(self, upstream_client: str) -> None:
        self.started: list[tuple[aiohttp.web.Application, Any]] = []
        self.upstream_client = upstream_client

    async def __call__(self, raw: dict[str, Any]) -> tuple[str, Config, aiohttp.web.Application]:
        shared = {"server": {"listen": "127.0.0.1:0"}, "queue": {"wait_timeout": 10.0}}
        config = parse_config({**shared, "upstream": {"client": self.upstream_client}, **raw}, {})
        app = build_app(config)
        runner = make_runner(app, config)
        await runner.setup()
        self.started.append((app, runner))
        url = await start_listener(runner, "127.0.0.1:0")
        return url, config, app


@pytest.fixture
async def routed(upstream_client: str) -> AsyncIterator[Routed]:
    """A factory of proxies with routes (with each upstream client in turn), every one stopped at the end."""
    factory = Routed(upstream_client)
    yield factory
    for _, runner in reversed(factory.started):
        await runner.cleanup()


def two_routes(left: Side, right: Side, state: Path, extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Routes `left` (host left.test) and `right` (host right.test), each with its own credential; `extra`
    adds keys to a route by its name."""
    route_keys = extra or {}
    return {
        "credentials": {"lc": credential(left, state), "rc": credential(right, state)},
        "route": [
            {"name": "left", "host": "left.test", "url": left.api.base_url, "token": "lc", **route_keys.get("left", {})},
            {"name": "right", "host": "right.test", "url": right.api.base_url, "token": "rc", **route_keys.get("right", {})},
        ],
    }


async def get(client: aiohttp.ClientSession, url: str, host: str) -> tuple[int, Any]:
    """GET `url` with this Host header; the status and the JSON body."""
    async with client.get(url, headers={"Host": host}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_routes_by_host_each_upstream_gets_its_own_credential(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A request for left.test reaches the left API with the left token; right.test the right one with its own."""
    url, _, _ = await routed(two_routes(left, right, tmp_path / "state.json"))
    assert (await get(client, f"{url}/echo/a", "left.test"))[0] == 200
    assert (await get(client, f"{url}/echo/b", "right.test:8080"))[0] == 200  # a route's host matches any port
    assert (left.api.requests, right.api.requests) == (1, 1)
    assert left.api.tokens_seen == left.tokens.issued_access
    assert right.api.tokens_seen == right.tokens.issued_access
    assert (left.tokens.count, right.tokens.count) == (1, 1)


async def test_routes_by_path_prefix_strip_prefix_removes_it_at_a_path_boundary(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """`/l/echo/x?q=1` goes to the left API as `/echo/x?q=1` (strip_prefix); `/echo/...` keeps its path; `/lx` is no route."""
    state = tmp_path / "state.json"
    raw = {
        "credentials": {"lc": credential(left, state), "rc": credential(right, state)},
        "route": [
            {"name": "left", "path_prefix": "/l", "strip_prefix": True, "url": left.api.base_url, "token": "lc"},
            {"name": "right", "path_prefix": "/echo", "url": right.api.base_url, "token": "rc"},
        ],
    }
    url, _, _ = await routed(raw)
    status, body = await get(client, f"{url}/l/echo/x?q=1", "anything")
    assert (status, body["raw_path"]) == (200, "/echo/x?q=1")
    status, body = await get(client, f"{url}/echo/y", "anything")
    assert (status, body["raw_path"]) == (200, "/echo/y")
    async with client.get(f"{url}/lx/echo/z") as resp:
        assert_proxy_error(resp.status, resp.headers.getall, await resp.read(), 404, "no_route")
    assert (left.api.requests, right.api.requests) == (1, 1)


async def test_routes_strip_prefix_rewrite_redirects_puts_the_prefix_back(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With strip_prefix and rewrite_redirects, the upstream's `Location: /echo/after-redirect` reaches the client
    as `http://HOST/l/echo/after-redirect`: followed, it comes back to the same route, not to another one."""
    state = tmp_path / "state.json"
    raw = {
        "credentials": {"lc": credential(left, state), "rc": credential(right, state)},
        "route": [
            {
                "name": "left",
                "path_prefix": "/l",
                "strip_prefix": True,
                "rewrite_redirects": True,
                "url": left.api.base_url,
                "token": "lc",
            },
            {"name": "right", "path_prefix": "/echo", "url": right.api.base_url, "token": "rc"},
        ],
    }
    url, _, _ = await routed(raw)
    async with client.get(f"{url}/l/redirect", headers={"Host": "proxy.test:8080"}, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "http://proxy.test:8080/l/echo/after-redirect"


async def test_routes_no_route_unknown_host_or_path_404_nothing_forwarded(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host no route names, or a path under no prefix, gets 404 no_route: no API and no token server saw it;
    its access line says `route=-` and /metrics counts it as unrouted, not as any route's request."""
    state = tmp_path / "state.json"
    url, _, app = await routed(two_routes(left, right, state, {"left": {"path_prefix": "/echo"}}))
    for host, path in (("other.test", "/echo/x"), ("left.test", "/elsewhere")):
        async with client.get(f"{url}{path}?secret=1", headers={"Host": host}) as resp:
            body = await resp.read()
            assert_proxy_error(resp.status, resp.headers.getall, body, 404, "no_route")
            assert json.loads(body) == {
                "error": "no_route",
                "detail": "no configured route takes this request's host and path",
            }
    assert (left.api.requests, right.api.requests, left.tokens.count, right.tokens.count) == (0, 0, 0, 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access"]
    assert [line.replace(" 0.0ms ", " ") for line in lines] == [
        '"GET /echo/x" 404 resent=no gen=- route=-',
        '"GET /elsewhere" 404 resent=no gen=- route=-',
    ]
    text = app[METRICS].render().decode()
    assert "tokenproxy_unrouted_requests_total 2.0" in text
    assert 'status_class="4xx"} 0.0' in text and 'status_class="4xx"} 1.0' not in text


async def test_routes_absolute_form_routed_host_served_unrouted_host_refused(
    routed: Routed, left: Side, right: Side, tmp_path: Path
) -> None:
    """`GET http://left.test/...` is served by the left route; `GET http://evil.test/...` gets 404 no_route,
    whatever its Host header says, and reaches nothing."""
    url, _, _ = await routed(two_routes(left, right, tmp_path / "state.json"))
    served = await raw_exchange(url, b"GET http://left.test/echo/abs HTTP/1.1\r\nHost: left.test\r\nConnection: close\r\n\r\n")
    assert served.status == 200
    assert json.loads(served.body)["raw_path"] == "/echo/abs"
    refused = await raw_exchange(url, b"GET http://evil.test/echo/abs HTTP/1.1\r\nHost: left.test\r\nConnection: close\r\n\r\n")
    assert_proxy_error(refused.status, refused.all, refused.body, 404, "no_route")
    assert (left.api.requests, right.api.requests, right.tokens.count) == (1, 0, 0)


async def test_routes_shared_credential_refresh_storm_across_routes_one_token_call(
    routed: Routed, aiohttp_server: Any, left: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Two routes naming one credential: 40 requests across both, after the token expired, cost one token call."""
    other = await _side(aiohttp_server, left.tokens)  # a second API trusting the same token server
    raw = {
        # No state file: only the one manager of the credential can keep the refreshes to one.
        "credentials": {"shared": {**credential(left, tmp_path / "state.json"), "state_file": ""}},
        "route": [
            {"name": "one", "host": "one.test", "url": left.api.base_url, "token": "shared"},
            {"name": "two", "host": "two.test", "url": other.api.base_url, "token": "shared"},
        ],
    }
    url, _, app = await routed(raw)
    assert (await get(client, f"{url}/echo/warm", "one.test"))[0] == 200
    assert left.tokens.count == 1
    left.api.expire_all(left.tokens.issued_access)
    other.api.expire_all(left.tokens.issued_access)
    hosts = ["one.test", "two.test"] * 20
    results = await asyncio.wait_for(
        asyncio.gather(*(get(client, f"{url}/echo/{i}", host) for i, host in enumerate(hosts))), HANG_BOUND
    )
    assert [status for status, _ in results] == [200] * 40
    assert left.tokens.count == 2
    assert len(app[ROUTING].credentials) == 1


async def test_routes_state_file_holds_every_credential_under_its_identity(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Both credentials' tokens are in the one state file, each keyed by its credential's identity."""
    state = tmp_path / "state" / "state.json"
    url, config, _ = await routed(two_routes(left, right, state))
    assert (await get(client, f"{url}/echo/a", "left.test"))[0] == 200
    assert (await get(client, f"{url}/echo/b", "right.test"))[0] == 200
    entries = json.loads(state.read_text())["credentials"]
    ids = {name: credential_of(config.credentials[name]) for name in ("lc", "rc")}
    assert sorted(entries) == sorted(ids.values())
    assert entries[ids["lc"]]["access_token"] == left.tokens.issued_access[-1]
    assert entries[ids["rc"]]["access_token"] == right.tokens.issued_access[-1]


async def test_routes_one_client_two_audiences_are_two_credentials(
    routed: Routed, aiohttp_server: Any, left: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """One client_credentials client asked for two audiences (one per API): two tokens, each sent to its own API,
    each kept in the state file under its own entry (never one audience's token sent to the other API)."""
    other = await _side(aiohttp_server, left.tokens)
    state = tmp_path / "state.json"

    def client_for(audience: str) -> dict[str, Any]:
        return {"grant": "client_credentials", "token_url": f"{left.tokens.base_url}/oauth/token",
                "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "audience": audience, "state_file": str(state)}

    raw = {
        "credentials": {"a": client_for("https://a.example"), "b": client_for("https://b.example")},
        "route": [
            {"name": "a", "host": "a.test", "url": left.api.base_url, "token": "a"},
            {"name": "b", "host": "b.test", "url": other.api.base_url, "token": "b"},
        ],
    }
    url, _, _ = await routed(raw)
    assert (await get(client, f"{url}/echo/1", "a.test"))[0] == 200
    assert (await get(client, f"{url}/echo/2", "b.test"))[0] == 200
    assert sorted(call.form.get("audience", "") for call in left.tokens.calls) == [
        "https://a.example", "https://b.example"]
    by_audience = {call.form["audience"]: token for call, token in zip(left.tokens.calls, left.tokens.issued_access, strict=True)}
    assert left.api.tokens_seen == [by_audience["https://a.example"]]
    assert other.api.tokens_seen == [by_audience["https://b.example"]]
    assert len(json.loads(state.read_text())["credentials"]) == 2


async def test_routes_two_credentials_that_are_one_refused(tmp_path: Path) -> None:
    """Two credential tables naming the same client, grant and request would share one token and state: exit 2."""
    table = 'grant = "client_credentials"\ntoken_url = "https://t.example/token"\nclient_id = "c"\nclient_secret = "s"\n'
    body = (
        f"[credentials.one]\n{table}[credentials.two]\n{table}"
        '[[route]]\nname = "a"\nhost = "a.test"\nurl = "https://a.example"\ntoken = "one"\n'
        '[[route]]\nname = "b"\nhost = "b.test"\nurl = "https://b.example"\ntoken = "two"\n'
    )
    code, out, err = await run_cli("check", "-c", str(_config_file(tmp_path / "c.toml", body)))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "config: credentials.two: is the same credential as credentials.one (same grant, endpoint, client and what "
        "is asked for), so the two would share one token and one state: name one credential in both routes"
    ]


async def test_routes_old_single_state_file_upgraded_token_kept(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A state file of one state (before routes) is read as its credential's entry: its valid token is used
    without a token call, and the next save keeps it beside the other credential's."""
    state = tmp_path / "state" / "state.json"
    raw = two_routes(left, right, state)
    config = parse_config({**raw, "server": {"listen": "127.0.0.1:0"}}, {})
    answer = left.tokens.issue()
    old = SavedState(
        credential=credential_of(config.credentials["lc"]),
        seed=fingerprint(config.credentials["lc"].refresh_token),
        access_token=answer["access_token"],
        expires_at=time.time() + 300,
        obtained_at=1.0,
        refresh_token=None,
        generation=7,
    )
    state.parent.mkdir(mode=0o700)
    state.write_text(json.dumps(dataclasses.asdict(old)))
    state.chmod(0o600)
    url, _, _ = await routed(raw)
    assert (await get(client, f"{url}/echo/a", "left.test"))[0] == 200
    assert left.tokens.count == 0  # the upgraded entry's token was used
    assert (await get(client, f"{url}/echo/b", "right.test"))[0] == 200  # its save rewrites the file
    entries = json.loads(state.read_text())["credentials"]
    assert entries[old.credential]["generation"] == 7
    assert entries[old.credential]["access_token"] == old.access_token
    assert len(entries) == 2


async def test_routes_reload_adds_removes_changes_routes_unchanged_credential_keeps_token(
    routed: Routed, aiohttp_server: Any, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A reload that removes `right`, adds `third` on the left credential and moves `left` to another API:
    the left credential's manager and token carry over (no token call), `right.test` is no route any more."""
    state = tmp_path / "state.json"
    url, config, app = await routed(two_routes(left, right, state))
    assert (await get(client, f"{url}/echo/a", "left.test"))[0] == 200
    assert (await get(client, f"{url}/echo/b", "right.test"))[0] == 200
    manager = app[ROUTING].credentials["lc"].manager
    moved = await _side(aiohttp_server, left.tokens)
    new_raw = {
        "server": {"listen": "127.0.0.1:0"},
        "upstream": {"client": routed.upstream_client},
        "queue": {"wait_timeout": 10.0},
        "credentials": {"lc": credential(left, state)},
        "route": [
            {"name": "left", "host": "left.test", "url": moved.api.base_url, "token": "lc"},
            {"name": "third", "path_prefix": "/echo", "url": left.api.base_url, "token": "lc"},
        ],
    }
    new_raw["credentials"]["lc"]["refresh_token"] = config.credentials["lc"].refresh_token
    notes = apply_reload(app, config, parse_config(new_raw, {}))
    assert [note.text for note in notes] == ["credential lc: current token kept", "credential rc removed"]
    assert app[ROUTING].credentials["lc"].manager is manager
    assert (await get(client, f"{url}/echo/c", "left.test"))[0] == 200
    assert (await get(client, f"{url}/echo/d", "right.test"))[0] == 200  # now taken by `third`, by its path
    async with client.get(f"{url}/other", headers={"Host": "right.test"}) as resp:
        assert_proxy_error(resp.status, resp.headers.getall, await resp.read(), 404, "no_route")
    assert (moved.api.requests, left.api.requests, right.api.requests) == (1, 2, 1)
    assert left.tokens.count == 1
    assert moved.api.tokens_seen == left.tokens.issued_access


async def test_routes_readyz_per_route_and_unknown_route_404(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path, aiohttp_server: Any
) -> None:
    """/readyz is ready when every credential is; `?route=NAME` answers for that route's; an unknown name is 404."""
    url, _, app = await routed(two_routes(left, right, tmp_path / "state.json"))
    admin_app = build_admin_app(lambda: app[ROUTING].first, routes=app[ROUTING].in_force)
    admin = str((await aiohttp_server(admin_app, host="127.0.0.1")).make_url("")).rstrip("/")
    assert (await get(client, f"{url}/echo/a", "left.test"))[0] == 200
    async with client.get(f"{admin}/readyz?route=left") as resp:
        assert (resp.status, (await resp.json())["status"]) == (200, "ready")
    async with client.get(f"{admin}/readyz?route=right") as resp:
        assert (resp.status, await resp.json()) == (
            503,
            {
                "status": "not_ready",
                "reason": "no_token_yet",
                "detail": "no token has been obtained yet: one is fetched by the first request, or at start with "
                "server.fetch_on_start = true",
            },
        )
    async with client.get(f"{admin}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["detail"].startswith("credential rc: no token has been obtained yet")
    async with client.get(f"{admin}/readyz?route=nope") as resp:
        assert_proxy_error(resp.status, resp.headers.getall, await resp.read(), 404, "no_route")
    async with client.get(f"{admin}/status") as resp:
        document = await resp.json()
    assert document["routes"] == [{"name": "left", "credential": "lc"}, {"name": "right", "credential": "rc"}]
    assert (document["credentials"]["lc"]["ready"], document["credentials"]["rc"]["ready"]) == (True, False)


async def test_routes_metrics_carry_route_and_credential_labels(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Requests are counted per route, refreshes and token gauges per credential, by their configured names."""
    url, _, app = await routed(two_routes(left, right, tmp_path / "state.json"))
    assert (await get(client, f"{url}/echo/a", "left.test"))[0] == 200
    assert (await get(client, f"{url}/echo/b", "left.test"))[0] == 200
    assert (await get(client, f"{url}/echo/c", "right.test"))[0] == 200
    text = app[METRICS].render().decode()
    assert 'tokenproxy_requests_total{route="left",status_class="2xx"} 2.0' in text
    assert 'tokenproxy_requests_total{route="right",status_class="2xx"} 1.0' in text
    assert 'tokenproxy_refreshes_total{credential="lc",grant="refresh_token",result="ok"} 1.0' in text
    assert 'tokenproxy_token_generation{credential="rc"} 1.0' in text
    assert 'route="default"' not in text  # labels only ever hold configured names


async def test_routes_access_line_names_the_route(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The access line of a routed request ends with the route's name."""
    url, _, _ = await routed(two_routes(left, right, tmp_path / "state.json"))
    assert (await get(client, f"{url}/echo/a", "right.test"))[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access"]
    assert len(lines) == 1 and lines[0].startswith('"GET /echo/a" 200 ') and lines[0].endswith(" route=right")


def _config_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("body", "problems"),
    [
        (
            '[credentials.github]\ngrant = "client_credentials"\ntoken_url = "https://t.example/token"\n'
            'client_id = "c"\nclient_secret = "s"\n'
            '[[route]]\nname = "a"\nhost = "a.test"\nurl = "ftp://a.example"\ntoken = "gihub"\n'
            '[[route]]\nname = "a"\nurl = "https://b.example"\ntoken = "github"\n',
            [
                "route[0].token: no [credentials.gihub] table; did you mean 'github'?",
                "route[0].url: must be an http(s) URL, got 'ftp://a.example'",
                "route[1].name: 'a' is already the name of route[0]",
                "route[1]: give host or path_prefix (or both): with several routes, each says which requests it takes",
            ],
        ),
        (
            '[upstream]\nurl = "https://api.example"\n'
            '[[route]]\nurl = "https://b.example"\npath_prefix = "/v1/"\n'
            '[route.token]\ngrant = "nope"\n',
            [
                "upstream.url: with [[route]] tables each route gives its url; [upstream] holds only what they share",
                "route[0].path_prefix: must start with / and not end with /, without a query, got '/v1/'",
                "route[0].token.grant: must be one of "
                "refresh_token, client_credentials, password, token_exchange, command, json, static, got 'nope'",
            ],
        ),
        (
            '[[route]]\nurl = "https://a.example"\ntokn = "x"\n',
            [
                "route[0].tokn: unknown key; did you mean token?",
                "route[0].token: is required: a [credentials.NAME] table's name, or a [route.token] table",
            ],
        ),
    ],
)
async def test_routes_config_errors_exit_2_naming_each_key(body: str, problems: list[str], tmp_path: Path) -> None:
    """Each problem of the routes and credentials is one line naming its key; `check` exits 2 before any call."""
    path = _config_file(tmp_path / "c.toml", body)
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"config: {line}" for line in problems]


async def test_routes_check_each_credential_and_token_needs_a_name(
    left: Side, right: Side, tmp_path: Path
) -> None:
    """`check` checks every credential, one line each; `token` with several wants `--credential NAME`."""
    state = tmp_path / "state" / "s.json"
    raw = two_routes(left, right, state)
    lines = []
    for name, table in raw["credentials"].items():
        lines.append(f"[credentials.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    for route in raw["route"]:
        lines.append("[[route]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in route.items()]
    path = _config_file(tmp_path / "c.toml", "\n".join(lines) + "\n")
    tomllib.loads(path.read_text())
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, err) == (0, "")
    assert [line.split(",")[0] for line in out.splitlines()] == [
        "ok: credential lc: grant refresh_token",
        "ok: credential rc: grant refresh_token",
    ]
    code, out, err = await run_cli("token", "-c", str(path))
    assert (code, out, err) == (
        2,
        "",
        "token: the config has several credentials (lc, rc): name one with --credential NAME\n",
    )
    code, out, err = await run_cli("token", "-c", str(path), "--credential", "rc")
    assert (code, out, err) == (0, right.tokens.issued_access[-1] + "\n", "")


async def test_routes_single_upstream_config_unchanged(tmp_path: Path, token_server: Any, api: Any) -> None:
    """A config of `[upstream]` and `[token]` alone still checks as before, with no credential named."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "state" / "s.json")
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert (code, err) == (0, "")
    assert out.startswith("ok: grant refresh_token, token ")
    logging.getLogger("tokenproxy").debug("checked")


def test_routes_commented_example_in_config_example_parses() -> None:
    """The commented routes example of config.example.toml, uncommented and named, is a valid config."""
    text = (Path(__file__).parent.parent / "config.example.toml").read_text()
    part = text[text.index("# [credentials.github]") :]
    body = "\n".join(line[2:] if line.startswith("# ") else "" for line in part.splitlines())
    body = body.replace('name = ""', 'name = "issues"', 1).replace('host = ""', 'host = "issues.local"', 1)
    config = parse_config(tomllib.loads(body), {"GITHUB_CLIENT_SECRET": "s"})
    assert [(route.name, route.token) for route in config.routes] == [("issues", "github"), ("search", "github")]


def test_routes_literal_secret_in_a_credential_named_in_the_readable_file_warning() -> None:
    """A config file others may read with a literal secret in a credential's table is warned about by its key."""
    raw = {
        "credentials": {"gh": {"client_secret": "literal-secret", "client_id": "x"}},
        "route": [{"name": "a", "token": {"refresh_token": "${FROM_ENV}"}}],
    }
    assert exposed_secrets_warning("c.toml", 0o644, raw) == (
        "c.toml is readable by other users and holds credentials.gh.client_secret as literal text: "
        "chmod 600 the file, or write ${VAR} there and set the variable"
    )


async def test_routes_reload_restart_only_key_of_a_route_warned_and_kept(
    routed: Routed, left: Side, right: Side, tmp_path: Path
) -> None:
    """A reload changing a route's read_timeout (restart-only) warns naming `route[N].read_timeout`."""
    raw = two_routes(left, right, tmp_path / "state.json")
    url, config, app = await routed(raw)
    changed = two_routes(left, right, tmp_path / "state.json", {"right": {"read_timeout": 3.0}})
    for name in ("lc", "rc"):
        changed["credentials"][name]["refresh_token"] = config.credentials[name].refresh_token
    changed["upstream"] = {"client": routed.upstream_client}
    notes = apply_reload(app, config, parse_config({"server": {"listen": "127.0.0.1:0"}, **changed}, {}))
    assert notes[0] == (logging.WARNING, "route[1].read_timeout changed; it takes effect after a restart")


@pytest.mark.parametrize("upstream_client", ["fast"])
async def test_routes_reload_moving_a_route_closes_the_old_upstreams_idle_connections(
    routed: Routed, left: Side, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """A reload that points the only route at another upstream closes the kept-alive connection to the old one."""
    async with CountingUpstream() as old, CountingUpstream() as new:
        raw = {
            "credentials": {"lc": credential(left, tmp_path / "state.json")},
            "route": [{"name": "only", "url": old.url, "token": "lc"}],
        }
        url, config, app = await routed(raw)
        async with client.get(f"{url}/a") as resp:
            assert resp.status == 200
        assert await old.wait_open(lambda n: n == 1) == 1  # kept alive for the next request
        raw["route"][0]["url"] = new.url
        raw["credentials"]["lc"]["refresh_token"] = config.credentials["lc"].refresh_token
        apply_reload(app, config, parse_config({"server": {"listen": "127.0.0.1:0"}, **raw}, {}))
        assert await old.wait_open(lambda n: n == 0) == 0
        async with client.get(f"{url}/b") as resp:
            assert resp.status == 200
        assert (old.requests, new.requests) == (1, 1)


async def test_routes_config_show_writes_routes_and_credentials_secrets_as_set(tmp_path: Path) -> None:
    """`config show` writes the [[route]] tables and each credential, a secret as `<set>`; it reads back the same."""
    path = _config_file(
        tmp_path / "c.toml",
        '[credentials.gh]\ngrant = "client_credentials"\ntoken_url = "https://t.example/token"\n'
        'client_id = "c"\nclient_secret = "literal-s3cret"\n'
        '[[route]]\nname = "a"\nhost = "a.test"\nurl = "https://a.example"\ntoken = "gh"\n'
        '[[route]]\nname = "b"\npath_prefix = "/b"\nurl = "https://b.example"\nread_timeout = 5.0\n'
        '[route.token]\ngrant = "client_credentials"\ntoken_url = "https://u.example/token"\n'
        'client_id = "d"\nclient_secret = "other-s3cret"\n',
    )
    code, out, err = await run_cli("config", "show", "-c", str(path))
    assert (code, err) == (0, "")
    assert "s3cret" not in out
    shown = tomllib.loads(out)
    assert shown["credentials"]["gh"]["client_secret"] == "<set>"
    assert [(r["name"], r["read_timeout"]) for r in shown["route"]] == [("a", 60.0), ("b", 5.0)]
    assert shown["route"][0]["token"] == "gh"
    assert shown["route"][1]["token"]["client_secret"] == "<set>"  # the inline [route.token]
    again = parse_config(shown, {})
    original = parse_config(tomllib.loads(path.read_text()), {})
    assert again.routes == original.routes
    assert again.credentials["b"].settings.client_secret == "<set>"  # type: ignore[attr-defined]


async def test_routes_logout_one_credential_uses_it_several_refused(tmp_path: Path) -> None:
    """`logout` on a routes config works on its one credential's state file, and refuses (exit 2) several."""
    state = tmp_path / "state" / "s.json"
    credential_table = (
        f'grant = "refresh_token"\ntoken_url = "https://t.example/token"\nclient_id = "c"\nstate_file = "{state}"\n'
    )
    one = _config_file(
        tmp_path / "one.toml",
        f'[credentials.gh]\n{credential_table}[[route]]\nurl = "https://a.example"\ntoken = "gh"\n',
    )
    code, out, err = await run_cli("logout", "-c", str(one))
    assert (code, out, err) == (0, f"Not logged in: {state} holds no tokens. Nothing was done.\n", "")
    other_client = credential_table.replace('client_id = "c"', 'client_id = "c2"')
    two = _config_file(
        tmp_path / "two.toml",
        f'[credentials.gh]\n{credential_table}[credentials.gl]\n{other_client}'
        '[[route]]\nname = "a"\nhost = "a.test"\nurl = "https://a.example"\ntoken = "gh"\n'
        '[[route]]\nname = "b"\nhost = "b.test"\nurl = "https://b.example"\ntoken = "gl"\n',
    )
    code, out, err = await run_cli("logout", "-c", str(two))
    assert (code, out, err) == (
        2,
        "",
        "logout: config: logout works on a config with one credential; this one has several (gh, gl)\n",
    )


async def test_routes_cli_run_fetches_each_credential_at_start_and_sighup_adds_a_route(
    left: Side, right: Side, tmp_path: Path
) -> None:
    """`tokenproxy run` with fetch_on_start gets every credential's token before listening, names its routes,
    and a SIGHUP adding a route on a kept credential serves it without another token call."""
    state = tmp_path / "state" / "s.json"
    raw = two_routes(left, right, state)

    def toml(routes: list[dict[str, Any]]) -> str:
        lines = ['[server]\nlisten = "127.0.0.1:0"\nfetch_on_start = true']
        for name, table in raw["credentials"].items():
            lines.append(f"[credentials.{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        for route in routes:
            lines.append("[[route]]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in route.items()]
        return "\n".join(lines) + "\n"

    path = _config_file(tmp_path / "c.toml", toml(raw["route"]))
    proc = await start_cli("run", "-c", str(path))
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"first token \w{8} obtained before listening \(credential lc\)", seen)
        await read_until(proc.stderr, r"first token \w{8} obtained before listening \(credential rc\)", seen)
        match = await read_until(
            proc.stderr, r"listening on http://127\.0\.0\.1:(\d+), forwarding to routes left, right", seen
        )
        url = f"http://127.0.0.1:{match.group(1)}"
        extra = {"name": "more", "path_prefix": "/echo", "url": right.api.base_url, "token": "rc"}
        path.write_text(toml([*raw["route"], extra]))
        proc.send_signal(signal.SIGHUP)
        await read_until(proc.stderr, r"config reloaded: credential rc: current token kept", seen)
        async with aiohttp.ClientSession() as session, session.get(f"{url}/echo/new", headers={"Host": "x"}) as resp:
            assert resp.status == 200
        await read_until(proc.stderr, r'"GET /echo/new" 200 .* route=more', seen)
        assert (left.tokens.count, right.tokens.count, right.api.requests) == (1, 1, 1)
    finally:
        log = "".join(seen) + await stop_process(proc)
    assert right.tokens.issued_access[0] not in log


async def test_routes_token_log_lines_name_their_credential(
    routed: Routed, left: Side, right: Side, client: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With several credentials, each token manager's line names its credential, in the text and as a JSON key."""
    caplog.set_level(logging.INFO, logger="tokenproxy.tokens")
    url, _, _ = await routed(two_routes(left, right, tmp_path / "state.json"))
    assert (await get(client, f"{url}/echo/a", "left.test"))[0] == 200
    assert (await get(client, f"{url}/echo/b", "right.test"))[0] == 200
    refreshes = [r for r in caplog.records if r.name == "tokenproxy.tokens" and "refresh ok" in r.getMessage()]
    assert sorted(r.getMessage().partition(" grant=")[0] for r in refreshes) == [
        "credential lc: refresh ok",
        "credential rc: refresh ok",
    ]
    assert sorted(getattr(r, "credential", None) for r in refreshes) == ["lc", "rc"]
    assert all(getattr(r, "grant", None) == "refresh_token" for r in refreshes)  # the line's other fields are kept
