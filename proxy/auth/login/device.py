"""The device authorization grant (RFC 8628): a code the person enters on another device, and polling.

Owns: the device authorization request (§3.1-3.2), what is shown to the
person (§3.3), polling the token endpoint at the interval the server asks,
`slow_down` adding 5 s (§3.5), and the answers that end the wait
(`access_denied`, `expired_token`). Knows nothing of terminals or the state
file. The device code is never shown; the user code is meant to be.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable

from ...core.causes import safe_url
from ...core.errors import FailureKind, GrantError
from ..endpoint import TokenEndpoint, exchange, oauth_error, parse_json
from ..protocol import TokenResponse
from .prompt import LoginError, Prompt

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL = 5.0  # §3.2: when the server names none
SLOW_DOWN_STEP = 5.0  # §3.5
DEFAULT_EXPIRY = 600.0  # when the server names no expires_in (it must: §3.2)

Sleep = Callable[[float], Awaitable[None]]


def _server_trouble(url: str, status: int) -> GrantError | None:
    if status >= 500 or status == 429:
        return GrantError(f"device authorization endpoint {safe_url(url)}: answered {status}")
    return None


async def authorize_device(endpoint: TokenEndpoint, url: str, fields: dict[str, str]) -> dict[str, object]:
    """Ask the device authorization endpoint for a device code and a user code (§3.1); LoginError if refused."""
    form = dict(fields)
    headers = {"Accept": "application/json"}
    endpoint.client.apply(form, headers)
    try:
        answer = await exchange(
            endpoint.session,
            "POST",
            url,
            data=form,
            headers=headers,
            timeout=endpoint.timeout,
            refuse=functools.partial(_server_trouble, url),
            what="device authorization endpoint",
        )
        if answer.status != 200:
            code = oauth_error(answer, spends_refresh_token=False).oauth_error
            said = f"refused: {code}" if code else f"answered {answer.status}"
            raise LoginError(f"no device code: device authorization endpoint {safe_url(url)} {said}")
        data = parse_json(answer.body, answer.content_type)
    except GrantError as error:
        raise LoginError(f"no device code: {error}") from None
    if not isinstance(data, dict):
        raise LoginError(f"device authorization endpoint {safe_url(url)}: the answer is not a JSON object")
    for name in ("device_code", "user_code"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise LoginError(f"device authorization endpoint {safe_url(url)}: the answer has no {name}")
    # `verification_url` is what some servers (Google) send for `verification_uri`.
    if not isinstance(data.get("verification_uri") or data.get("verification_url"), str):
        raise LoginError(f"device authorization endpoint {safe_url(url)}: the answer has no verification_uri")
    return data


def _seconds(value: object, default: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return default


def _clock_text(seconds: float) -> str:
    whole = max(0, math.ceil(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


async def device_login(
    endpoint: TokenEndpoint,
    device_url: str,
    fields: dict[str, str],
    prompt: Prompt,
    *,
    max_wait: float,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> TokenResponse:
    """Log in with the device grant: show where to go and the code, then poll until approved, refused or expired.

    Waits at most the code's lifetime or `max_wait`, whichever is shorter,
    counting down once a second on `prompt.status`. `sleep` and `clock` are
    asyncio's and the monotonic clock but for tests.
    """
    data = await authorize_device(endpoint, device_url, fields)
    uri = str(data.get("verification_uri") or data.get("verification_url"))
    complete = data.get("verification_uri_complete")
    prompt.line(f"To log in, open {uri}")
    prompt.line(f"and enter the code: {data['user_code']}")
    if isinstance(complete, str) and complete:
        prompt.line(f"(or open {complete}, which has the code in it)")
    interval = _seconds(data.get("interval"), DEFAULT_INTERVAL)
    lifetime = _seconds(data.get("expires_in"), DEFAULT_EXPIRY)
    deadline = clock() + min(lifetime, max_wait)
    form = {"grant_type": DEVICE_GRANT, "device_code": str(data["device_code"])}
    prompt.line(f"Waiting for the login to be approved (the code expires in {_clock_text(lifetime)}) ...")
    try:
        while True:
            next_poll = clock() + interval
            while (left := min(next_poll, deadline) - clock()) > 0:
                prompt.status(f"waiting for approval, {_clock_text(deadline - clock())} left")
                await sleep(min(1.0, left))
            if clock() >= deadline:
                if max_wait < lifetime:
                    raise LoginError(f"the login was not approved within {max_wait:g} s (--timeout)")
                raise LoginError("the code expired before the login was approved: run `tokenproxy login` again")
            try:
                return await endpoint.request(dict(form), spends_refresh_token=False)
            except GrantError as error:
                interval = _next_interval(error, interval)
    finally:
        prompt.done()


def _next_interval(error: GrantError, interval: float) -> float:
    """The interval before the next poll after the answer `error` stands for; LoginError when polling must stop."""
    code = error.oauth_error
    if code == "authorization_pending":
        return interval
    if code == "slow_down":
        return interval + SLOW_DOWN_STEP
    if code == "access_denied":
        raise LoginError("the login was denied at the authorization server (access_denied)")
    if code == "expired_token":
        raise LoginError("the code expired before the login was approved (expired_token): run `tokenproxy login` again")
    if code is None and error.kind is FailureKind.TRANSIENT:
        return interval  # the endpoint's trouble (5xx, no connection): the code is still good, poll again
    raise LoginError(f"the token endpoint refused the device code: {error}")
