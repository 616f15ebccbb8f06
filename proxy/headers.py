"""Which headers cross the proxy, in each direction.

Owns: hop-by-hop filtering (RFC 9110 §7.6.1 plus every header that
`Connection` names), dropping the client's own credentials and `Host`, and
keeping everything else in order with repeats kept as repeats. Pure
functions over header pairs; knows nothing of tokens or aiohttp objects.
"""

from __future__ import annotations

from collections.abc import Iterable

Pairs = list[tuple[str, str]]

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# The proxy sets these itself on the way up: Host is the upstream's,
# Authorization is the bearer, Content-Length follows the body it sends,
# Expect was already answered to the client by the proxy.
_REQUEST_DROP: frozenset[str] = HOP_BY_HOP | {"host", "authorization", "content-length", "expect"}
_RESPONSE_DROP: frozenset[str] = HOP_BY_HOP


def _connection_listed(raw: Iterable[tuple[bytes, bytes]]) -> frozenset[str]:
    names: set[str] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            for token in value.decode("latin-1").split(","):
                token = token.strip().lower()
                if token:
                    names.add(token)
    return frozenset(names)


def _filter(raw: Iterable[tuple[bytes, bytes]], drop: frozenset[str]) -> Pairs:
    raw = tuple(raw)
    extra = _connection_listed(raw)
    if extra:
        drop = drop | extra
    out: Pairs = []
    for name, value in raw:
        text = name.decode("latin-1")
        if text.lower() not in drop:
            out.append((text, value.decode("latin-1")))
    return out


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> Pairs:
    """The client's headers that go upstream, before the proxy adds its own."""
    return _filter(raw, _REQUEST_DROP)


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Pairs:
    """The upstream's headers that go back to the client."""
    return _filter(raw, _RESPONSE_DROP)


def challenge_error(www_authenticate: Iterable[str]) -> str | None:
    """The `error` parameter of a Bearer or DPoP challenge, if any.

    `use_dpop_nonce` and `insufficient_scope` mean a new token would not help.
    """
    for value in www_authenticate:
        lower = value.lower()
        index = lower.find("error")
        while index != -1:
            rest = value[index + len("error") :].lstrip()
            if rest.startswith("="):
                rest = rest[1:].lstrip()
                if rest.startswith('"'):
                    return rest[1:].split('"', 1)[0]
                return rest.split(",", 1)[0].split()[0] if rest.split() else ""
            index = lower.find("error", index + 1)
    return None
