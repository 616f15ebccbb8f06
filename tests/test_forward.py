"""Forwarding is exact: methods, targets, headers and bodies cross the proxy unchanged, errors are the proxy's own."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.fakes.api_server import GZIP_PAYLOAD, FakeApi
from tests.fakes.token_server import FakeTokenServer
from tests.helpers import (
    RAW_BOUND,
    assert_proxy_error,
    close_raw,
    open_raw,
    parse_response,
    raw_exchange,
    raw_exchange_kept_alive,
    read_one_answer,
)

HOP_BY_HOP_NAMES = {
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def echo_headers(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The header pairs the echo route saw, in order."""
    return [(k, v) for k, v in data["headers"]]


class RawUpstream:
    """A bare HTTP server on 127.0.0.1: records each request head and writes `answer` as it is."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(self.answer)
        await writer.drain()
        writer.close()


# --- methods and request targets -------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "MKCALENDAR"])
async def test_method_any_token_reaches_upstream_unchanged(
    make_proxy: Any, client: aiohttp.ClientSession, method: str
) -> None:
    """Standard, WebDAV and made-up methods all reach the API as the client sent them."""
    proxy = await make_proxy()
    async with client.request(method, f"{proxy.url}/method") as resp:
        assert resp.status == 200
        assert resp.headers["X-Method"] == method


async def test_method_unregistered_token_reaches_upstream_unchanged(make_proxy: Any) -> None:
    """A method token no registry knows (FOO) is a valid HTTP method and reaches the upstream as sent."""
    async with RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        resp = await raw_exchange(proxy.url, b"FOO /thing HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    assert upstream.heads[0].startswith(b"FOO /thing HTTP/1.1\r\n")


class MethodEcho:
    """A bare kept-alive HTTP server on 127.0.0.1 that answers each request with its request line and body.

    Bare because aiohttp's own server would refuse a method llhttp does not know.
    """

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def __aenter__(self) -> MethodEcho:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(100):  # bounded: a test sends a few requests
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                answer = head.split(b"\r\n", 1)[0] + b"|" + body
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_method_unregistered_token_pipelined_after_get_with_body_reaches_upstream(make_proxy: Any) -> None:
    """FOO with a body, written in the same packet right behind a GET, is forwarded as FOO with its body, in order."""
    async with MethodEcho() as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        reader, writer = await open_raw(proxy.url)
        try:
            writer.write(
                b"GET /first HTTP/1.1\r\nHost: c\r\n\r\n"
                b"FOO /second HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /third HTTP/1.1\r\nHost: c\r\n\r\n"
            )
            await writer.drain()
            answers = [parse_response(await read_one_answer(reader)) for _ in range(3)]
        finally:
            await close_raw(writer)
    assert [a.body for a in answers] == [
        b"GET /first HTTP/1.1|",
        b"FOO /second HTTP/1.1|hello",
        b"GET /third HTTP/1.1|",
    ]


async def test_method_unregistered_token_split_across_writes_reaches_upstream(make_proxy: Any) -> None:
    """A made-up method whose bytes arrive in two packets (PU, then RGEX) is forwarded whole."""
    async with MethodEcho() as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        reader, writer = await open_raw(proxy.url)
        try:
            for part in (b"GET /warm HTTP/1.1\r\nHost: c\r\n\r\nPU", b"RGEX /split HTTP/1.1\r\nHost: c\r\n\r\n"):
                writer.write(part)
                await writer.drain()
                if part.endswith(b"PU"):
                    first = parse_response(await read_one_answer(reader))
            second = parse_response(await read_one_answer(reader))
            writer.write(b"FO")
            await writer.drain()
            writer.write(b"O /third HTTP/1.1\r\nHost: c\r\n\r\n")
            third = parse_response(await read_one_answer(reader))
        finally:
            await close_raw(writer)
    assert first.body == b"GET /warm HTTP/1.1|"
    assert second.body == b"PURGEX /split HTTP/1.1|"
    assert third.body == b"FOO /third HTTP/1.1|"


async def test_method_invalid_token_gets_400_never_forwarded(make_proxy: Any) -> None:
    """A method that is not an RFC 9110 token (F(O) is still refused: 400 bad_request, nothing forwarded."""
    async with MethodEcho() as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        resp = await raw_exchange(proxy.url, b"F(O /thing HTTP/1.1\r\nHost: c\r\n\r\n")
        assert_proxy_error(resp.status, resp.all, resp.body, 400, "bad_request")


TARGETS = [
    "/echo/a%2Fb/c%20d",
    "/echo/x?key=1&key=2&key=3",
    "/echo/x?empty=&flag&other=",
    "/echo/x;matrix=1?semi=a;b&plus=a+b",
    "/echo/%7Euser/%E2%82%AC?q=%2F%20%3F%26%3D",
]


@pytest.mark.parametrize("target", TARGETS)
async def test_target_percent_encoded_path_and_query_arrive_byte_for_byte(make_proxy: Any, target: str) -> None:
    """Escapes, repeated keys, empty values, `;` and `+` reach the API exactly as sent."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url, f"GET {target} HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n\r\n".encode()
    )
    assert resp.status == 200
    assert resp.json()["raw_path"] == target


async def test_target_empty_query_question_mark_arrives_unchanged(make_proxy: Any) -> None:
    """A target ending in a bare `?` keeps it."""
    proxy = await make_proxy()
    resp = await raw_exchange(proxy.url, b"GET /echo/x? HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.json()["raw_path"] == "/echo/x?"


async def test_target_percent_encoded_via_aiohttp_client_arrive_byte_for_byte(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """An aiohttp client sending an already-encoded URL sees it arrive unchanged."""
    proxy = await make_proxy()
    target = "/echo/a%2Fb%20c?x=1&x=2&e=&p=a+b;c"
    async with client.get(URL(proxy.url + target, encoded=True)) as resp:
        assert resp.status == 200
        assert (await resp.json())["raw_path"] == target


async def test_target_path_starting_with_double_slash_arrives_unchanged(make_proxy: Any, api: FakeApi) -> None:
    """A path beginning `//` is a path, not a host: it is appended to the base path as it is."""
    proxy = await make_proxy(upstream={"url": api.base_url + "/echo"})  # type: ignore[attr-defined]
    resp = await raw_exchange(
        proxy.url, b"GET //double//slash?q=%2F HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n\r\n"
    )
    assert resp.status == 200
    assert resp.json()["raw_path"] == "/echo//double//slash?q=%2F"


# --- request headers -------------------------------------------------------------------------


async def test_request_headers_end_to_end_arrive_in_order_with_repeats(make_proxy: Any) -> None:
    """End-to-end headers reach the API in the client's order, repeated ones as several lines."""
    proxy = await make_proxy()
    sent = [("X-First", "1"), ("X-Repeat", "a"), ("Accept", "text/plain"), ("X-Repeat", "b"), ("x-lower", "v")]
    lines = "".join(f"{k}: {v}\r\n" for k, v in sent)
    resp = await raw_exchange(
        proxy.url, f"GET /echo HTTP/1.1\r\nHost: client.example\r\n{lines}Connection: close\r\n\r\n".encode()
    )
    seen = [(k, v) for k, v in echo_headers(resp.json()) if k.lower() not in {"host", "authorization"}]
    assert seen == sent


async def test_request_header_utf8_value_arrives_byte_for_byte(make_proxy: Any) -> None:
    """A header value with UTF-8 bytes reaches the API as the same bytes, not re-encoded."""
    proxy = await make_proxy()
    value = "caf\u00e9 \u2713".encode()
    resp = await raw_exchange(
        proxy.url, b"GET /echo HTTP/1.1\r\nHost: c\r\nX-Name: " + value + b"\r\nConnection: close\r\n\r\n"
    )
    seen = [v for k, v in echo_headers(resp.json()) if k == "X-Name"]
    assert [v.encode("latin-1") for v in seen] == [value]


async def test_request_header_non_utf8_value_keeps_its_characters(make_proxy: Any, upstream_client: str) -> None:
    """An obs-text (Latin-1) value: the fast path sends its bytes unchanged; the session path its characters as UTF-8."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url, b"GET /echo HTTP/1.1\r\nHost: c\r\nX-Name: caf\xe9\r\nConnection: close\r\n\r\n"
    )
    seen = [v.encode("latin-1") for k, v in echo_headers(resp.json()) if k == "X-Name"]
    assert seen == ([b"caf\xe9"] if upstream_client == "fast" else ["caf\u00e9".encode()])


async def test_request_hop_by_hop_headers_not_forwarded(make_proxy: Any) -> None:
    """Connection, Keep-Alive, TE, Trailer, Upgrade, Proxy-* and Connection-named headers stop at the proxy."""
    proxy = await make_proxy()
    request = (
        b"GET /echo HTTP/1.1\r\n"
        b"Host: client.example\r\n"
        b"Connection: keep-alive, X-Private-Hop\r\n"
        b"Connection: close\r\n"
        b"X-Private-Hop: secret-hop\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-End-To-End: kept\r\n"
        b"\r\n"
    )
    resp = await raw_exchange(proxy.url, request)
    assert resp.status == 200
    names = {k.lower() for k, _ in echo_headers(resp.json())}
    assert not names & (HOP_BY_HOP_NAMES | {"x-private-hop"})
    assert "x-end-to-end" in names


async def test_request_h2c_upgrade_attempt_forwarded_as_plain_request(make_proxy: Any) -> None:
    """An `Upgrade: h2c` offer stops at the proxy: the API gets a plain request without Upgrade or HTTP2-Settings."""
    proxy = await make_proxy()
    request = (
        b"GET /echo HTTP/1.1\r\nHost: c\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Kept: 1\r\n\r\n"
    )
    resp = await raw_exchange_kept_alive(proxy.url, request)
    assert resp.status == 200
    names = {k.lower() for k, _ in echo_headers(resp.json())}
    assert not names & {"connection", "upgrade", "http2-settings"}
    assert "x-kept" in names


async def test_request_chunked_upload_transfer_encoding_not_forwarded(make_proxy: Any) -> None:
    """The client's chunked framing ends at the proxy: a small chunked body goes up with a length."""
    proxy = await make_proxy()
    request = (
        b"POST /upload HTTP/1.1\r\nHost: client.example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    resp = await raw_exchange(proxy.url, request)
    data = resp.json()
    assert data["length"] == 11
    assert data["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert data["content_length"] == "11"
    assert data["transfer_encoding"] is None


async def test_request_host_is_upstreams(make_proxy: Any, api: FakeApi) -> None:
    """The API sees its own host and port in Host, once, whatever the client sent."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url, b"GET /echo HTTP/1.1\r\nHost: client.example:9999\r\nConnection: close\r\n\r\n"
    )
    hosts = [v for k, v in echo_headers(resp.json()) if k.lower() == "host"]
    assert hosts == [URL(api.base_url).raw_authority]  # type: ignore[attr-defined]


async def test_request_client_authorization_replaced_by_single_bearer(
    make_proxy: Any, token_server: FakeTokenServer
) -> None:
    """The client's own Authorization is dropped: the API sees exactly one, the token server's JWT."""
    proxy = await make_proxy()
    request = (
        b"GET /echo HTTP/1.1\r\nHost: client.example\r\n"
        b"Authorization: Basic Y2xpZW50OnNlY3JldA==\r\nAuthorization: Bearer client-own\r\n"
        b"Connection: close\r\n\r\n"
    )
    resp = await raw_exchange(proxy.url, request)
    assert resp.status == 200
    auths = [v for k, v in echo_headers(resp.json()) if k.lower() == "authorization"]
    assert len(auths) == 1
    assert auths[0].startswith("Bearer ")
    assert auths[0][len("Bearer ") :] in token_server.issued_access


async def test_request_get_proxy_adds_no_headers_of_its_own(make_proxy: Any) -> None:
    """A bare GET arrives with only Host, the client's one header and the bearer: no User-Agent, Accept, ..."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url, b"GET /echo HTTP/1.1\r\nHost: client.example\r\nX-Only: 1\r\nConnection: close\r\n\r\n"
    )
    names = sorted(k.lower() for k, _ in echo_headers(resp.json()))
    assert names == ["authorization", "host", "x-only"]


@pytest.mark.parametrize("replay_limit", [1048576, 2], ids=["replayable", "streamed"])
async def test_request_post_without_content_type_gets_none_added(make_proxy: Any, replay_limit: int) -> None:
    """A body sent without Content-Type arrives without one; only its Content-Length travels with it."""
    proxy = await make_proxy(retry={"replay_limit": replay_limit})
    resp = await raw_exchange(
        proxy.url,
        b"POST /echo HTTP/1.1\r\nHost: client.example\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    data = resp.json()
    assert data["body"] == "hello"
    assert sorted(k.lower() for k, _ in echo_headers(data)) == ["authorization", "content-length", "host"]


# --- response headers ------------------------------------------------------------------------


async def test_response_set_cookie_repeated_stays_several(make_proxy: Any) -> None:
    """Two Set-Cookie lines from the API reach the client as two lines, in order."""
    proxy = await make_proxy()
    resp = await raw_exchange(proxy.url, b"GET /cookies HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_response_hop_by_hop_headers_not_relayed(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """The API's Connection-named, Keep-Alive, Proxy-Authenticate, Trailer and Upgrade headers stop at the proxy."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/hop") as resp:
        assert await resp.read() == b"hop"
        names = {k.decode("latin-1").lower() for k, _ in resp.raw_headers}
        connection = resp.headers.getall("Connection", [])
    assert not names & {"x-private-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"}
    assert all("x-private-hop" not in value.lower() for value in connection)
    assert resp.headers["X-End-To-End"] == "kept"


async def test_response_without_content_type_or_server_gets_none_added(make_proxy: Any) -> None:
    """An answer with no Content-Type and no Server reaches the client without either."""
    async with RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Raw: 1\r\n\r\nhello") as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        resp = await raw_exchange(proxy.url, b"GET /bare HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    assert resp.body == b"hello"
    assert resp.all("X-Raw") == ["1"]
    assert resp.all("Content-Type") == []
    assert resp.all("Server") == []


async def test_response_header_utf8_value_arrives_byte_for_byte(make_proxy: Any) -> None:
    """A response header with UTF-8 bytes (a Content-Disposition file name) reaches the client unchanged."""
    disposition = 'attachment; filename="r\u00e9sum\u00e9.pdf"'.encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Disposition: " + disposition + b"\r\nContent-Length: 2\r\n\r\nok"
    async with RawUpstream(answer) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        resp = await raw_exchange(proxy.url, b"GET /f HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert [v.encode("latin-1") for v in resp.all("Content-Disposition")] == [disposition]


async def test_response_server_header_upstreams_relayed_not_replaced(make_proxy: Any) -> None:
    """The API's own Server and Content-Type are relayed once each, never replaced by the proxy's."""
    answer = b"HTTP/1.1 200 OK\r\nServer: upstream/1.0\r\nContent-Type: text/x-custom\r\nContent-Length: 2\r\n\r\nok"
    async with RawUpstream(answer) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        resp = await raw_exchange(proxy.url, b"GET /x HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.all("Server") == ["upstream/1.0"]
    assert resp.all("Content-Type") == ["text/x-custom"]


# --- bodies and framing ----------------------------------------------------------------------


async def test_request_content_length_kept_not_chunked(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """A body sent with Content-Length goes up with the same Content-Length, not chunked."""
    proxy = await make_proxy()
    body = bytes(range(256)) * 100
    async with client.post(f"{proxy.url}/upload", data=body) as resp:
        data = await resp.json()
    assert data["content_length"] == str(len(body))
    assert data["transfer_encoding"] is None
    assert data["sha256"] == hashlib.sha256(body).hexdigest()


async def test_request_content_length_above_replay_limit_kept_not_chunked(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A streamed (too large to replay) body with Content-Length keeps its length upstream."""
    proxy = await make_proxy(retry={"replay_limit": 1024})
    body = bytes(range(256)) * 64  # 16 KiB

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with client.post(
        f"{proxy.url}/upload", data=chunks(), headers={"Content-Length": str(len(body))}
    ) as resp:
        data = await resp.json()
    assert data["content_length"] == str(len(body))
    assert data["transfer_encoding"] is None
    assert data["sha256"] == hashlib.sha256(body).hexdigest()


async def test_request_content_length_zero_kept(make_proxy: Any) -> None:
    """An empty body announced with `Content-Length: 0` goes up announced the same way."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url, b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    data = resp.json()
    assert data["length"] == 0
    assert data["content_length"] == "0"
    assert data["transfer_encoding"] is None


async def test_request_chunked_upload_above_replay_limit_arrives_intact(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A chunked upload larger than the replay limit is streamed up chunked, every byte intact."""
    proxy = await make_proxy(retry={"replay_limit": 1024})
    pieces = [bytes([i]) * 3000 for i in range(20)]

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with client.post(f"{proxy.url}/upload", data=chunks()) as resp:
        data = await resp.json()
    whole = b"".join(pieces)
    assert data["length"] == len(whole)
    assert data["sha256"] == hashlib.sha256(whole).hexdigest()
    assert data["transfer_encoding"] == "chunked"
    assert data["content_length"] is None


async def test_request_gzip_body_arrives_still_compressed(
    make_proxy: Any, api: FakeApi, aiohttp_server: Any, client: aiohttp.ClientSession
) -> None:
    """A gzip request body reaches the API as the same compressed bytes, header kept."""
    raw_api = await aiohttp_server(api.app(), host="127.0.0.1", auto_decompress=False)
    proxy = await make_proxy(upstream={"url": str(raw_api.make_url("")).rstrip("/")})
    compressed = gzip.compress(b"request body, compressed " * 50, mtime=0)
    async with client.post(
        f"{proxy.url}/echo", data=compressed, headers={"Content-Encoding": "gzip"}
    ) as resp:
        data = await resp.json()
    assert data["body_sha256"] == hashlib.sha256(compressed).hexdigest()
    assert ("Content-Encoding", "gzip") in echo_headers(data)


async def test_response_reason_phrase_relayed(make_proxy: Any) -> None:
    """The upstream's status code and reason phrase reach the client as they were."""
    async with RawUpstream(b"HTTP/1.1 299 Quite Fine\r\nContent-Length: 0\r\n\r\n") as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        url = URL(proxy.url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(b"GET /x HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
            status_line = await asyncio.wait_for(reader.readline(), RAW_BOUND)
        finally:
            writer.close()
            await writer.wait_closed()
    assert status_line == b"HTTP/1.1 299 Quite Fine\r\n"


async def test_response_close_delimited_body_arrives_whole(make_proxy: Any) -> None:
    """A body the upstream ends by closing (no length, not chunked) reaches the client whole."""
    body = bytes(range(256)) * 40
    async with RawUpstream(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        resp = await raw_exchange(proxy.url, b"GET /x HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    assert resp.body == body


async def test_response_gzip_body_passed_untouched(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """A gzip answer reaches the client as the API's exact compressed bytes, Content-Encoding kept."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == GZIP_PAYLOAD


async def test_response_redirect_passed_not_followed(
    make_proxy: Any, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A 302 reaches the client with its Location; the proxy does not follow it."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/echo/after-redirect"
    assert api.requests == 1


async def test_head_answer_has_content_length_and_no_body(make_proxy: Any) -> None:
    """HEAD gets the API's headers (Content-Length included) and not a single body byte."""
    proxy = await make_proxy()
    resp = await raw_exchange(proxy.url, b"HEAD /method HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    assert resp.all("X-Method") == ["HEAD"]
    assert resp.all("Content-Length") == [str(len("HEAD"))]
    assert resp.rest == b""


@pytest.mark.parametrize("code", [204, 304])
async def test_status_without_body_answer_has_no_body(make_proxy: Any, code: int) -> None:
    """204 and 304 answers carry their headers and no body bytes, not even a chunk terminator."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url, f"GET /status/{code} HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n".encode()
    )
    assert resp.status == code
    assert resp.all("ETag") == ['"v1"']
    assert resp.all("Transfer-Encoding") == []
    assert resp.rest == b""


async def test_head_keep_alive_next_answer_framed_correctly(make_proxy: Any) -> None:
    """After a HEAD on a kept-alive connection the next answer starts right after the HEAD's headers."""
    proxy = await make_proxy()
    pipelined = (
        b"HEAD /method HTTP/1.1\r\nHost: c\r\n\r\n"
        b"GET /sized/3 HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n"
    )
    first = await raw_exchange(proxy.url, pipelined)
    second = parse_response(first.rest)
    assert first.status == 200
    assert second.status == 200
    assert second.body == b"xxx"


async def test_expect_100_continue_gets_continue_then_answer(make_proxy: Any) -> None:
    """`Expect: 100-continue` is answered 100 before the body is sent; the upload then succeeds."""
    proxy = await make_proxy()
    url = URL(proxy.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            b"PUT /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        await writer.drain()
        resp = parse_response(await asyncio.wait_for(reader.read(), RAW_BOUND))
    finally:
        writer.close()
        await writer.wait_closed()
    assert resp.status == 200
    assert resp.json()["sha256"] == hashlib.sha256(b"hello").hexdigest()


# --- the proxy's own answers -----------------------------------------------------------------


async def test_upstream_closed_port_gives_502_unreachable(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """An upstream nobody listens on yields 502 upstream_unreachable as JSON."""
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{closed_port()}"})
    async with client.get(f"{proxy.url}/anything") as resp:
        body = await resp.read()
        assert_proxy_error(resp.status, lambda n: resp.headers.getall(n, []), body, 502, "upstream_unreachable")


async def test_upstream_hanging_gives_504_timeout(
    make_proxy: Any, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """An upstream that never answers within upstream.read_timeout yields 504 upstream_timeout as JSON."""
    proxy = await make_proxy(upstream={"read_timeout": 0.5})
    async with client.get(f"{proxy.url}/hang") as resp:
        body = await resp.read()
        assert_proxy_error(resp.status, lambda n: resp.headers.getall(n, []), body, 504, "upstream_timeout")
    assert api.hang_entered.is_set()


async def test_connect_to_a_host_no_route_names_gives_403_forbidden(make_proxy: Any, api: FakeApi) -> None:
    """CONNECT to a host no route names is refused with 403 forbidden; nothing reaches the API."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n"
    )
    assert_proxy_error(resp.status, resp.all, resp.body, 403, "forbidden")
    assert json.loads(resp.body)["detail"] == "CONNECT to example.com:443 is not allowed: no route names this host"
    assert api.requests == 0


async def test_absolute_form_other_host_gives_400_bad_request(make_proxy: Any, api: FakeApi) -> None:
    """A request for another origin in absolute form is refused with 400 bad_request; nothing reaches the API."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url,
        b"GET http://other.example/echo HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    assert_proxy_error(resp.status, resp.all, resp.body, 400, "bad_request")
    assert api.requests == 0


async def test_absolute_form_upstream_host_forwarded_as_origin_form(make_proxy: Any, api: FakeApi) -> None:
    """Absolute form naming the upstream's own host (as an HTTP_PROXY client sends it) is forwarded, path and query intact."""
    proxy = await make_proxy()
    host = URL(api.base_url).host  # type: ignore[attr-defined]
    resp = await raw_exchange(
        proxy.url,
        f"GET http://{host}/echo/abs?a=1&a=2 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert resp.status == 200
    assert json.loads(resp.body)["raw_path"] == "/echo/abs?a=1&a=2"


async def test_absolute_form_with_userinfo_gives_400(make_proxy: Any, api: FakeApi) -> None:
    """An absolute-form target with userinfo (`http://x@host/`) cannot smuggle another host: 400."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url,
        b"GET http://127.0.0.1@other.example/echo HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    assert_proxy_error(resp.status, resp.all, resp.body, 400, "bad_request")
    assert api.requests == 0


async def test_expect_other_than_100_continue_gets_417(make_proxy: Any, api: FakeApi) -> None:
    """An Expect the proxy does not understand is refused with 417 and the JSON error; nothing is forwarded."""
    proxy = await make_proxy()
    resp = await raw_exchange(
        proxy.url,
        b"POST /echo/x HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    assert_proxy_error(resp.status, resp.all, resp.body, 417, "bad_request")
    assert api.requests == 0
