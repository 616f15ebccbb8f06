"""The HTTP clients the proxy holds: the upstream client and the token endpoint's session, with their TLS.

Each carries its own client certificate when one is configured: the
upstream's (`upstream.client_cert_file`) goes to the upstream only, the
token endpoint's (`token.client_auth = "tls_client_auth"`) to the token
endpoint only. Both are read when the client is made (at start).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from ..auth.client_auth import TLS_CLIENT_AUTH
from ..config import Config
from ..upstream.fast_client import FastClient
from ..upstream.model import UpstreamClient
from ..upstream.session_client import SessionClient


def _tls(config: Config, cert_file: str = "", key_file: str = "") -> ssl.SSLContext | bool:
    """Verified TLS by default (with `upstream.ca_file`), presenting a client certificate when one is given."""
    if not config.upstream.verify_tls and not cert_file:
        return False
    context = ssl.create_default_context()
    if config.upstream.ca_file:
        context.load_verify_locations(str(Path(config.upstream.ca_file).expanduser()))
    if not config.upstream.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file:
        context.load_cert_chain(Path(cert_file).expanduser(), Path(key_file).expanduser())
    return context


def ssl_context(config: Config) -> ssl.SSLContext | bool:
    """TLS settings for connections to the upstream: verified by default, with an optional extra CA and
    the upstream's client certificate (mTLS) when configured."""
    return _tls(config, config.upstream.client_cert_file, config.upstream.client_key_file)


def token_tls(config: Config) -> ssl.SSLContext | bool:
    """TLS settings for the token endpoint: the upstream's verification, and the client certificate of
    `tls_client_auth` (RFC 8705) when that is the client authentication."""
    settings = config.token.settings
    if getattr(settings, "client_auth", "") == TLS_CLIENT_AUTH:
        return _tls(config, getattr(settings, "client_cert_file", ""), getattr(settings, "client_key_file", ""))
    return _tls(config)


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
    """A small session for the token endpoint: no cookie jar, its own pool, its own TLS."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4, ssl=token_tls(config)),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
