"""The HTTP clients the proxy holds: the upstream client and the token endpoint's session, with their TLS."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from ..config import Config
from ..upstream.fast_client import FastClient
from ..upstream.model import UpstreamClient
from ..upstream.session_client import SessionClient


def ssl_context(config: Config) -> ssl.SSLContext | bool:
    """TLS settings for outgoing connections: verified by default, with an optional extra CA."""
    if not config.upstream.verify_tls:
        return False
    context = ssl.create_default_context()
    if config.upstream.ca_file:
        context.load_verify_locations(str(Path(config.upstream.ca_file).expanduser()))
    return context


def upstream_client(config: Config) -> UpstreamClient:
    """The way to the upstream that `upstream.client` names, with its pool and timeouts."""
    up = config.upstream
    kind = FastClient if up.client == "fast" else SessionClient
    return kind(
        max_connections=up.max_connections,
        connect_timeout=up.connect_timeout,
        read_timeout=up.read_timeout,
        tls=ssl_context(config),
    )


def token_session(config: Config) -> aiohttp.ClientSession:
    """A small session for the token endpoint: no cookie jar, its own pool."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4, ssl=ssl_context(config)),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
