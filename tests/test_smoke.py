"""The first request through the proxy gets a token and reaches the API."""

import aiohttp


async def test_proxy_first_request_fetches_token_and_forwards(make_proxy, token_server, api, client: aiohttp.ClientSession) -> None:
    """A GET through the proxy arrives at the API with a bearer; one token call."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/hello?a=1&a=2") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["raw_path"] == "/echo/hello?a=1&a=2"
    assert token_server.count == 1
