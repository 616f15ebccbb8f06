"""Interoperability: a real echo server nobody here wrote (httpbin) behind the proxy, and real clients in front.

httpbin (Flask, from PyPI) runs under Werkzeug in a subprocess on 127.0.0.1.
The clients are curl, requests (with the proxy as an HTTP_PROXY, too) and
httpx, each as its users would call it.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import shutil
from typing import Any

import httpx
import pytest
import requests


@pytest.fixture
async def proxy_to_httpbin(make_proxy: Any, httpbin: str) -> Any:
    """tokenproxy with the fake token server's refresh grant, in front of httpbin."""
    return await make_proxy(upstream={"url": httpbin})


async def test_interop_httpbin_bearer_sees_the_proxys_token(proxy_to_httpbin: Any, token_server: Any) -> None:
    """httpbin's /bearer, which demands a bearer, accepts the one the proxy added (requests as the client)."""
    resp = await asyncio.to_thread(requests.get, f"{proxy_to_httpbin.url}/bearer", timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"authenticated": True, "token": token_server.issued_access[-1]}


async def test_interop_httpbin_anything_echoes_method_query_headers_body(proxy_to_httpbin: Any) -> None:
    """A JSON POST through the proxy reaches httpbin intact; the client's own Authorization is replaced."""
    resp = await asyncio.to_thread(
        requests.post,
        f"{proxy_to_httpbin.url}/anything/x?a=1&a=2&b=",
        json={"hello": "world", "n": [1, 2]},
        headers={"Authorization": "Basic dXNlcjpwYXNz", "X-Custom": "kept"},
        timeout=10,
    )
    seen = resp.json()
    assert resp.status_code == 200
    assert seen["method"] == "POST"
    assert seen["args"] == {"a": ["1", "2"], "b": ""}
    assert seen["json"] == {"hello": "world", "n": [1, 2]}
    assert seen["headers"]["X-Custom"] == "kept"
    assert seen["headers"]["Authorization"].startswith("Bearer ey")
    assert seen["headers"]["Host"] == proxy_to_httpbin.config.upstream.url.removeprefix("http://")


async def test_interop_httpbin_gzip_redirect_status_stream_with_httpx(proxy_to_httpbin: Any) -> None:
    """httpx through the proxy: gzip decodes, a redirect is handed over (not followed), 204 is empty, a stream arrives whole."""
    async with httpx.AsyncClient(base_url=proxy_to_httpbin.url, timeout=10) as client:
        gz = await client.get("/gzip")
        assert gz.status_code == 200 and gz.headers["content-encoding"] == "gzip"
        assert gz.json()["gzipped"] is True
        redirect = await client.get("/redirect-to", params={"url": "/get", "status_code": 302})
        assert redirect.status_code == 302 and redirect.headers["location"] == "/get"
        empty = await client.get("/status/204")
        assert empty.status_code == 204 and empty.content == b""
        lines = []
        async with client.stream("GET", "/stream/20") as stream:
            async for line in stream.aiter_lines():
                if line:
                    lines.append(json.loads(line))
        assert [item["id"] for item in lines] == list(range(20))


async def test_interop_requests_with_proxy_as_http_proxy(proxy_to_httpbin: Any, httpbin: str) -> None:
    """A legacy tool that only knows HTTP_PROXY (requests with proxies=) reaches the upstream through the proxy."""
    resp = await asyncio.to_thread(
        requests.get, f"{httpbin}/headers", proxies={"http": proxy_to_httpbin.url}, timeout=10
    )
    assert resp.status_code == 200
    assert resp.json()["headers"]["Authorization"].startswith("Bearer ey")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_interop_curl_upload_and_compressed_download(proxy_to_httpbin: Any) -> None:
    """curl: a file upload arrives byte for byte, and --compressed gets gzip bytes it can decode."""
    payload = bytes(range(256)) * 4096  # 1 MiB: at the replay limit
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "-X", "PUT", "--data-binary", "@-", "-H", "Content-Type: application/octet-stream",
        f"{proxy_to_httpbin.url}/anything",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(payload), 30)
    assert proc.returncode == 0
    echoed = json.loads(out)
    assert echoed["headers"]["Content-Length"] == str(len(payload))
    prefix = "data:application/octet-stream;base64,"
    assert echoed["data"].startswith(prefix)
    assert base64.b64decode(echoed["data"][len(prefix):]) == payload
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "--raw", "-H", "Accept-Encoding: gzip", f"{proxy_to_httpbin.url}/gzip",
        stdout=asyncio.subprocess.PIPE,
    )
    raw, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert json.loads(gzip.decompress(raw))["gzipped"] is True
