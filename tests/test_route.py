"""The route a request starts with is the one it finishes with, whatever a reload does meanwhile.

A reload swaps the route (upstream, refresh statuses, redirect rewriting,
...) as one value; a request reads it once, so an answer that arrives after
the swap is handled with the settings its request was sent with. Upstreams
are bare asyncio servers on 127.0.0.1, held by events, never by sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp

from proxy.config import Config
from proxy.runtime.reload import apply_reload
from tests.fakes.raw_upstream import RawUpstream, Request, answer
from tests.fakes.token_server import until

# A request the proxy should answer at once is given this long before it counts as hung.
HANG_BOUND = 10.0


def reloaded(proxy: Any, **sections: dict[str, Any]) -> Config:
    """SIGHUP with some keys of some sections changed, as the proxy's reload puts it in force; the new config."""
    current: Config = proxy.config
    changes = {name: dataclasses.replace(getattr(current, name), **keys) for name, keys in sections.items()}
    new = dataclasses.replace(current, **changes)
    apply_reload(proxy.app, current, new)
    return new


async def test_route_reload_moving_upstream_mid_request_location_rewritten_against_old_upstream(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A redirect answered after a reload moved the upstream is rewritten against the upstream its request went to."""
    release = asyncio.Event()

    async def redirect_when_released(request: Request) -> bool:
        await release.wait()
        location = f"{old.url}/next?a=1"
        await request.conn.send(answer(b"", "302 Found", (f"Location: {location}",)))
        return True

    async def ok(request: Request) -> bool:
        await request.conn.send(answer(b"new"))
        return True

    async with RawUpstream(redirect_when_released) as old, RawUpstream(ok) as new:
        proxy = await make_proxy(upstream={"url": old.url, "rewrite_redirects": True})
        pending = asyncio.create_task(client.get(f"{proxy.url}/start", allow_redirects=False))
        try:
            await until(lambda: len(old.requests) == 1)
            reloaded(proxy, upstream={"url": new.url})
            release.set()
            async with await asyncio.wait_for(pending, HANG_BOUND) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == f"{proxy.url}/next?a=1"
        finally:
            release.set()
            pending.cancel()
    assert new.requests == []


async def test_route_reload_changing_refresh_on_mid_request_answer_judged_by_old_statuses(
    make_proxy: Any, client: aiohttp.ClientSession, token_server: Any
) -> None:
    """A 401 answered after a reload dropped 401 from token.refresh_on still renews and resends, as when sent."""
    release = asyncio.Event()

    async def reject_first(request: Request) -> bool:
        if len(first.requests) == 1:
            await release.wait()
            await request.conn.send(
                answer(b"expired", "401 Unauthorized", ('WWW-Authenticate: Bearer error="invalid_token"',))
            )
        else:
            await request.conn.send(answer(b"resent"))
        return True

    async with RawUpstream(reject_first) as first:
        proxy = await make_proxy(upstream={"url": first.url})
        pending = asyncio.create_task(client.get(f"{proxy.url}/item"))
        try:
            await until(lambda: len(first.requests) == 1)
            calls = len(token_server.calls)
            reloaded(proxy, token={"refresh_on": (403,)})
            release.set()
            async with await asyncio.wait_for(pending, HANG_BOUND) as resp:
                assert (resp.status, await resp.read()) == (200, b"resent")
        finally:
            release.set()
            pending.cancel()
    assert len(token_server.calls) == calls + 1
    assert [r.target for r in first.requests] == ["/item", "/item"]
