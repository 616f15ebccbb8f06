"""Every grant against the fake endpoints, through the real proxy: what is sent, rotation, failures."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth.endpoint import MAX_ANSWER_BYTES, lifetime, parse_json, read_answer, token_response
from proxy.auth.protocol import BadAnswer
from proxy.core.errors import FailureKind, GrantError
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, PASSWORD, USERNAME, FakeClock, FakeTokenServer
from tests.helpers import saved_entry

JSON_BODY_MODE = {
    "access_token_path": "data.accessToken",
    "refresh_token_path": "data.refreshToken",
    "expires_in_path": "data.expiresIn",
}


def json_grant(token_server: FakeTokenServer, mode: str) -> dict[str, Any]:
    """The `token` section for the home-made endpoint in body or cookie mode."""
    base = token_server.base_url  # type: ignore[attr-defined]
    if mode == "body":
        return {"grant": "json", "token_url": f"{base}/auth/refresh", "json": JSON_BODY_MODE}
    return {"grant": "json", "token_url": f"{base}/auth/cookie", "json": {"refresh_cookie": "refresh"}}


async def get_ok(client: aiohttp.ClientSession, url: str) -> None:
    """One request through the proxy that must succeed."""
    async with client.get(url) as resp:
        assert resp.status == 200, await resp.read()


async def test_grant_json_body_mode_rotates_over_refreshes(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """The json grant posts the current refresh token and adopts the rotated one from data.refreshToken."""
    proxy = await make_proxy(token=json_grant(token_server, "body"))
    presented = []
    for i in range(4):
        before = token_server.current_refresh
        api.expire_all(token_server.issued_access)
        await get_ok(client, f"{proxy.url}/echo/{i}")
        presented.append((token_server.calls[-1].json_body, before))

    assert token_server.count == 4
    assert all(body == {"refreshToken": expected} for body, expected in presented)
    assert not token_server.reuse_detected


async def test_grant_json_body_mode_reads_expires_in_path(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """The lifetime comes from data.expiresIn, not from the JWT's one-hour exp."""
    clock = FakeClock()
    token_server.lifetime = 120.0
    proxy = await make_proxy(clock=clock, token=json_grant(token_server, "body"))
    await get_ok(client, f"{proxy.url}/echo/x")

    assert proxy.tokens.status().expires_at == clock.now + 120.0


async def test_grant_json_cookie_mode_rotates_over_refreshes(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """In cookie mode the refresh token travels as a cookie and the rotated one is taken from Set-Cookie."""
    proxy = await make_proxy(token=json_grant(token_server, "cookie"))
    for i in range(4):
        before = token_server.current_refresh
        api.expire_all(token_server.issued_access)
        await get_ok(client, f"{proxy.url}/echo/{i}")
        assert token_server.calls[-1].headers["Cookie"] == f"refresh={before}"

    assert token_server.count == 4
    assert not token_server.reuse_detected


@pytest.mark.parametrize("endpoint", ["body", "cookie"])
@pytest.mark.parametrize("fault", ["html", "no_token", "garbage_json"])
async def test_grant_json_bad_answer_gives_token_unavailable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, endpoint: str, fault: str
) -> None:
    """A home-made endpoint answering non-JSON, or JSON without the token, gives token_unavailable."""
    token_server.mode = fault
    proxy = await make_proxy(token=json_grant(token_server, endpoint))

    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
        assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"
        assert json.loads(await resp.read())["error"] == "token_unavailable"


@pytest.mark.parametrize("endpoint", ["body", "cookie"])
async def test_grant_json_rejected_refresh_token_gives_login_required(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, endpoint: str
) -> None:
    """A home-made endpoint refusing the refresh token (401 or 403) gives login_required, for good."""
    token_server.mode = "invalid_grant"
    proxy = await make_proxy(token=json_grant(token_server, endpoint))

    for _ in range(2):
        async with client.get(f"{proxy.url}/echo/x") as resp:
            assert resp.status == 503
            assert resp.headers["X-Tokenproxy-Error"] == "login_required"
            assert json.loads(await resp.read())["error"] == "login_required"
    assert token_server.count == 1


async def test_grant_client_credentials_basic_sends_scope_and_audience(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """client_credentials with basic auth: client in Authorization, scope and audience in the form."""
    proxy = await make_proxy(
        token={
            "grant": "client_credentials",
            "client_auth": "basic",
            "scope": "read write",
            "audience": "https://api",
        }
    )
    await get_ok(client, f"{proxy.url}/echo/x")

    call = token_server.calls[-1]
    assert call.form == {"grant_type": "client_credentials", "scope": "read write", "audience": "https://api"}
    expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert call.headers["Authorization"] == f"Basic {expected}"


async def test_grant_client_credentials_post_sends_client_in_form(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """client_credentials with post auth: client_id and secret in the form, no scope when unset."""
    proxy = await make_proxy(token={"grant": "client_credentials", "client_auth": "post"})
    await get_ok(client, f"{proxy.url}/echo/x")

    call = token_server.calls[-1]
    expected = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    assert call.form == expected
    assert "Authorization" not in call.headers


async def test_grant_client_auth_none_sends_client_id_alone(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """client_auth = "none" (a public client): client_id in the form, no secret anywhere; this endpoint refuses it."""
    proxy = await make_proxy(token={"grant": "client_credentials", "client_auth": "none"})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
        assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"

    call = token_server.calls[-1]
    assert call.form == {"grant_type": "client_credentials", "client_id": CLIENT_ID}
    assert "Authorization" not in call.headers


async def test_grant_client_credentials_expiry_refreshes_with_same_credentials(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """An expired client_credentials token is replaced by asking again with the client's credentials."""
    proxy = await make_proxy(token={"grant": "client_credentials"})
    await get_ok(client, f"{proxy.url}/echo/warm")
    api.expire_all(token_server.issued_access)
    await get_ok(client, f"{proxy.url}/echo/again")

    assert token_server.count == 2
    assert [c.form["grant_type"] for c in token_server.calls] == ["client_credentials"] * 2


async def test_grant_password_sends_username_and_password(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """The password grant sends the configured user's name and password and gets a token."""
    proxy = await make_proxy(token={"grant": "password", "username": USERNAME, "password": PASSWORD})
    await get_ok(client, f"{proxy.url}/echo/x")

    form = token_server.calls[-1].form
    assert (form["grant_type"], form["username"], form["password"]) == ("password", USERNAME, PASSWORD)


async def test_grant_password_wrong_password_gives_503(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A wrong password (invalid_grant) is a configuration fault, final: token_unavailable, no second call."""
    proxy = await make_proxy(token={"grant": "password", "username": USERNAME, "password": "wrong-pw"})

    for _ in range(2):
        async with client.get(f"{proxy.url}/echo/x") as resp:
            assert resp.status == 503
            assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"
    assert token_server.count == 1


async def test_grant_static_token_sent_without_token_calls(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """The static grant sends the configured token and never calls a token endpoint."""
    access = token_server.new_access()
    proxy = await make_proxy(token={"grant": "static", "access_token": access})

    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
        headers = dict((await resp.json())["headers"])
    assert headers["Authorization"] == f"Bearer {access}"
    assert token_server.count == 0


@pytest.mark.parametrize("bad", ["two words", "line\r\nX-Injected: 1", "tab\there", "caf\u00e9"])
async def test_grant_token_that_cannot_be_a_header_refused_never_sent(
    make_proxy, api: FakeApi, client: aiohttp.ClientSession, bad: str
) -> None:
    """A token with a space, CR/LF, a control or non-ASCII character: 503 token_unavailable, nothing reaches the API."""
    proxy = await make_proxy(token={"grant": "static", "access_token": bad})

    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
        assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"
        assert "header" in (await resp.json())["detail"]
    assert api.requests == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (120, 120.0),
        (1.5, 1.5),
        ("3600", 3600.0),
        (1e-9, 1e-9),
        (0, None),
        (-30, None),
        (None, None),
        (True, None),
        ("soon", None),
        ([60], None),
    ],
)
def test_grant_lifetime_reads_positive_numbers_and_ignores_the_rest(value: Any, seconds: float | None) -> None:
    """expires_in: a positive number is the lifetime; zero, negative or not a number says nothing."""
    assert lifetime(value, "expires_in", "rt-new") == seconds


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf"), 10**400, -(10**400), "1e999", "NaN"], ids=str
)
def test_grant_lifetime_not_finite_is_bad_answer_keeping_rotated(value: Any) -> None:
    """A number that is not a finite one is a malformed answer, and the rotated refresh token rides along."""
    with pytest.raises(BadAnswer, match="not a finite number") as raised:
        lifetime(value, "the answer's expires_in", "rt-new")
    assert raised.value.refresh_token == "rt-new"
    assert raised.value.kind is FailureKind.TRANSIENT


@pytest.mark.parametrize("access", [None, "", 42, ["a"]])
def test_grant_answer_without_access_token_keeps_rotated(access: Any) -> None:
    """An answer with no access token still hands back the rotated refresh token it carried."""
    with pytest.raises(BadAnswer, match="has no access_token") as raised:
        token_response(access, 300, "rt-new", "access_token", "expires_in")
    assert raised.value.refresh_token == "rt-new"


def test_grant_parse_json_number_beyond_int_limit_is_infinite_not_unreadable() -> None:
    """A 5 000-digit number (beyond Python's int() limit) still parses: the rest of the answer stays readable."""
    body = b'{"refresh_token": "rt-new", "expires_in": 1' + b"0" * 5000 + b"}"
    data = parse_json(body, "application/json")
    assert data["refresh_token"] == "rt-new"
    with pytest.raises(BadAnswer) as raised:
        token_response("at", data["expires_in"], data["refresh_token"], "access_token", "expires_in")
    assert raised.value.refresh_token == "rt-new"


def test_grant_parse_json_too_deep_is_not_json() -> None:
    """JSON nested deeper than the parser's recursion limit is an unreadable answer, not a crash."""
    with pytest.raises(BadAnswer, match="not JSON"):
        parse_json(b"[" * 200_000 + b"]" * 200_000, "application/json")


class EndlessContent:
    """A response body that never ends, served as aiohttp's StreamReader would: at most `n` bytes a read."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.given = 0

    async def read(self, n: int = -1) -> bytes:
        assert n > 0, "the whole body was asked for"
        n = min(n, 65536)
        if self.limit is not None:
            n = min(n, self.limit - self.given)
        self.given += n
        return b"a" * n


class StubResponse:
    """The part of aiohttp's ClientResponse `read_answer` uses."""

    def __init__(self, content: EndlessContent, content_length: int | None = None) -> None:
        self.content = content
        self.content_length = content_length
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def test_grant_read_answer_reads_at_most_one_byte_beyond_the_cap() -> None:
    """An endless answer: refused after reading MAX_ANSWER_BYTES + 1 bytes, and the connection dropped."""
    resp = StubResponse(EndlessContent())
    with pytest.raises(GrantError, match="larger than 1024 KiB") as raised:
        await read_answer(resp)  # type: ignore[arg-type]
    assert resp.content.given == MAX_ANSWER_BYTES + 1
    assert resp.closed
    assert raised.value.kind is FailureKind.TRANSIENT


async def test_grant_read_answer_declared_too_large_reads_nothing() -> None:
    """A Content-Length beyond the cap is refused before a byte is read."""
    resp = StubResponse(EndlessContent(), content_length=MAX_ANSWER_BYTES + 1)
    with pytest.raises(GrantError, match="larger than"):
        await read_answer(resp)  # type: ignore[arg-type]
    assert resp.content.given == 0
    assert resp.closed


async def test_grant_read_answer_exactly_the_cap_is_read_whole() -> None:
    """An answer of exactly MAX_ANSWER_BYTES is read whole and the connection kept."""
    resp = StubResponse(EndlessContent(limit=MAX_ANSWER_BYTES))
    assert len(await read_answer(resp)) == MAX_ANSWER_BYTES  # type: ignore[arg-type]
    assert not resp.closed


@pytest.mark.parametrize("endpoint", ["oauth", "body", "cookie"])
async def test_grant_rotated_refresh_token_kept_when_access_token_unusable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, endpoint: str
) -> None:
    """Every grant that rotates: an answer with a CR/LF access token still yields its rotated refresh token,
    saved and presented next (no reuse, the grant stays alive)."""
    clock = FakeClock()
    original = token_server.current_refresh
    token_server.access_value = "abc\r\nX-Injected: 1"
    section = {} if endpoint == "oauth" else json_grant(token_server, endpoint)
    proxy = await make_proxy(clock=clock, token={**section, "backoff_initial": 5.0, "backoff_max": 60.0})

    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
        assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"
    rotated = token_server.current_refresh
    assert rotated != original
    assert saved_entry(Path(proxy.config.token.state_file))["refresh_token"] == rotated

    token_server.access_value = None
    clock.advance(6)
    await get_ok(client, f"{proxy.url}/echo/y")
    call = token_server.calls[-1]
    presented = {
        "oauth": call.form.get("refresh_token"),
        "body": (call.json_body or {}).get("refreshToken"),
        "cookie": call.headers.get("Cookie", "").removeprefix("refresh="),
    }[endpoint]
    assert presented == rotated
    assert token_server.count == 2
    assert not token_server.reuse_detected and not token_server.revoked
