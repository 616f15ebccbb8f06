"""Finding an authorization server's endpoints from its issuer: RFC 8414 and OpenID Connect discovery.

Owns: where the metadata documents of an issuer are (RFC 8414 §3.1: the
well-known part goes between the host and the issuer's path; OpenID
Connect Discovery §4: it is appended to the issuer), fetching one (bounded
by a timeout and a size, no redirects), checking that it names the issuer
asked for (RFC 8414 §3.3) and reading the endpoints and methods tokenproxy
uses; and RFC 9728 protected-resource metadata, which leads from an API to
its authorization server. Knows nothing of the config file, grants or
caching. Messages name the URL tried (never a query string) and never a
token or secret.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..core.causes import cause_in_words, safe_url

# A metadata document is a few KiB; more is not one.
MAX_METADATA_BYTES = 1 << 20
OAUTH_WELL_KNOWN = "/.well-known/oauth-authorization-server"
OIDC_WELL_KNOWN = "/.well-known/openid-configuration"
RESOURCE_WELL_KNOWN = "/.well-known/oauth-protected-resource"


class DiscoveryError(Exception):
    """No usable metadata: the message is one line naming the URL(s) tried and what went wrong."""


@dataclass(frozen=True)
class ServerMetadata:
    """What tokenproxy takes from an authorization server's metadata (RFC 8414 §2); "" where not offered."""

    issuer: str
    token_endpoint: str
    source: str  # the URL the document came from, for messages
    authorization_endpoint: str = ""
    device_authorization_endpoint: str = ""
    registration_endpoint: str = ""
    revocation_endpoint: str = ""
    # RFC 8414 §2: omitted means client_secret_basic only.
    token_endpoint_auth_methods: tuple[str, ...] = ("client_secret_basic",)
    code_challenge_methods: tuple[str, ...] = ()


def metadata_urls(issuer: str) -> list[str]:
    """The URLs an issuer's metadata may be at, in the order they are tried: RFC 8414's, then OpenID Connect's.

    For an issuer with a path, RFC 8414 puts the well-known part before the
    path (`https://h/.well-known/oauth-authorization-server/tenant`); OpenID
    Connect appends it (`https://h/tenant/.well-known/openid-configuration`).
    """
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return [
        urlunsplit((parts.scheme, parts.netloc, OAUTH_WELL_KNOWN + path, "", "")),
        urlunsplit((parts.scheme, parts.netloc, path + OIDC_WELL_KNOWN, "", "")),
    ]


class _NotThere(Exception):
    """A metadata URL answered 404 or 410: the next place may hold the document."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def fetch_json(session: aiohttp.ClientSession, url: str, timeout: float) -> dict[str, Any]:
    """GET a JSON object (at most MAX_METADATA_BYTES), or DiscoveryError naming `url` (_NotThere for 404/410)."""
    where = safe_url(url)
    try:
        async with session.get(
            url,
            headers={"Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            if resp.status in (404, 410):
                raise _NotThere(resp.status)
            if resp.status != 200:
                raise DiscoveryError(f"{where}: answered {resp.status}")
            body = await resp.content.read(MAX_METADATA_BYTES + 1)
            kind = resp.content_type
    except asyncio.TimeoutError:
        raise DiscoveryError(f"{where}: timed out after {timeout:g} s (token.timeout)") from None
    except aiohttp.ClientError as exc:
        cause = cause_in_words(exc, host=urlsplit(url).hostname) or f"the connection failed ({type(exc).__name__})"
        raise DiscoveryError(f"{where}: {cause}") from None
    if len(body) > MAX_METADATA_BYTES:
        raise DiscoveryError(f"{where}: the document is larger than {MAX_METADATA_BYTES // 1024} KiB")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise DiscoveryError(f"{where}: answered with something that is not JSON ({kind})") from None
    if not isinstance(data, dict):
        raise DiscoveryError(f"{where}: the document is not a JSON object")
    return data


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    return value if isinstance(value, str) else ""


def _texts(data: dict[str, Any], name: str, default: Sequence[str] = ()) -> tuple[str, ...]:
    value = data.get(name)
    if not isinstance(value, list):
        return tuple(default)
    return tuple(item for item in value if isinstance(item, str))


def read_metadata(data: dict[str, Any], issuer: str, source: str) -> ServerMetadata:
    """The metadata in a document fetched for `issuer`, or DiscoveryError when it names another issuer or no
    token endpoint (RFC 8414 §3.3: a document for another issuer must not be used)."""
    where = safe_url(source)
    named = _text(data, "issuer")
    if named != issuer:
        raise DiscoveryError(
            f"{where}: the document names issuer {named or '(none)'!r}, not token.issuer {issuer!r}; "
            "it is not used"
        )
    token_endpoint = _text(data, "token_endpoint")
    if not token_endpoint:
        raise DiscoveryError(f"{where}: the document has no token_endpoint")
    return ServerMetadata(
        issuer=issuer,
        token_endpoint=token_endpoint,
        source=source,
        authorization_endpoint=_text(data, "authorization_endpoint"),
        device_authorization_endpoint=_text(data, "device_authorization_endpoint"),
        registration_endpoint=_text(data, "registration_endpoint"),
        revocation_endpoint=_text(data, "revocation_endpoint"),
        token_endpoint_auth_methods=_texts(data, "token_endpoint_auth_methods_supported", ("client_secret_basic",)),
        code_challenge_methods=_texts(data, "code_challenge_methods_supported"),
    )


async def discover(session: aiohttp.ClientSession, issuer: str, timeout: float) -> ServerMetadata:
    """The issuer's metadata: the first of `metadata_urls` that has a document, which must name `issuer`.

    A URL answering 404 or 410 passes to the next; any other failure (no
    connection, a timeout, an error status, a broken or mismatched document)
    ends the search with a DiscoveryError naming that URL.
    """
    tried = []
    for url in metadata_urls(issuer):
        try:
            data = await fetch_json(session, url, timeout)
        except _NotThere as gone:
            tried.append(f"{safe_url(url)} answered {gone.status}")
            continue
        return read_metadata(data, issuer, url)
    raise DiscoveryError(f"no metadata for token.issuer {issuer!r}: {'; '.join(tried)}")


def resource_metadata_url(challenge: str) -> str:
    """The `resource_metadata` parameter of a `WWW-Authenticate: Bearer ...` challenge (RFC 9728 §5.1), or ""."""
    scheme, _, params = challenge.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    for part in _split_params(params):
        name, sep, value = part.partition("=")
        if sep and name.strip().lower() == "resource_metadata":
            return value.strip().strip('"')
    return ""


def _split_params(params: str) -> list[str]:
    """`a="x, y", b=z` split at the commas outside quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in params:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


async def authorization_server_of(session: aiohttp.ClientSession, api_url: str, timeout: float) -> str:
    """The issuer an API names (RFC 9728): a GET of `api_url` answered 401 with a `resource_metadata` challenge,
    then the first of `authorization_servers` in that document. DiscoveryError when any step gives nothing."""
    where = safe_url(api_url)
    try:
        async with session.get(
            api_url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as resp:
            status = resp.status
            challenges = resp.headers.getall("WWW-Authenticate", [])
    except asyncio.TimeoutError:
        raise DiscoveryError(f"{where}: timed out after {timeout:g} s (token.timeout)") from None
    except aiohttp.ClientError as exc:
        cause = cause_in_words(exc, host=urlsplit(api_url).hostname) or f"the connection failed ({type(exc).__name__})"
        raise DiscoveryError(f"{where}: {cause}") from None
    found = next((url for url in map(resource_metadata_url, challenges) if url), "")
    if status != 401 or not found:
        raise DiscoveryError(
            f"{where}: answered {status} without a Bearer resource_metadata challenge, so it names no "
            "authorization server: set token.issuer or token.token_url"
        )
    try:
        data = await fetch_json(session, found, timeout)
    except _NotThere as gone:
        raise DiscoveryError(f"{safe_url(found)}: answered {gone.status}") from None
    servers = _texts(data, "authorization_servers")
    if not servers:
        raise DiscoveryError(f"{safe_url(found)}: the document lists no authorization_servers")
    return servers[0]
