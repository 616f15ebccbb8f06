"""Which headers cross the proxy, in each direction.

Owns: hop-by-hop filtering (RFC 9110 §7.6.1 plus every header that
`Connection` names), dropping the client's own credentials and `Host`, and
keeping everything else in order with repeats kept as repeats. Pure
functions over header pairs; knows nothing of tokens or aiohttp objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from operator import itemgetter

from ..upstream.model import HOP_BY_HOP, PLAIN_CONNECTION, Pairs, as_text

# The proxy sets these itself on the way up: Host is the upstream's,
# Authorization is the bearer, Content-Length follows the body it sends,
# Expect was already answered to the client by the proxy.
REQUEST_DROP: frozenset[str] = HOP_BY_HOP | {"host", "authorization", "content-length", "expect"}
_RESPONSE_DROP: frozenset[str] = HOP_BY_HOP
# The answer's framing is the proxy's own to write (exchange.py): its Content-Length is set from the length.
_RESPONSE_DROP_FRAMED: frozenset[str] = HOP_BY_HOP | {"content-length"}


def _listed_names(values: Iterable[bytes]) -> frozenset[str]:
    """The header names that `Connection` header values list."""
    names: set[str] = set()
    for value in values:
        for token in value.decode("latin-1").split(","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return frozenset(names)


# The few drop sets in use, as lower-case bytes, with the lengths of their names: names are compared
# without decoding them, and only a name of one of those lengths is lowered at all.
_AS_BYTES: dict[frozenset[str], tuple[frozenset[bytes], frozenset[int]]] = {}


def _bytes_of(drop: frozenset[str]) -> tuple[frozenset[bytes], frozenset[int]]:
    found = _AS_BYTES.get(drop)
    if found is None:
        # Names are tokens (ASCII); Latin-1 maps any stray byte one to one.
        names = frozenset(name.encode("latin-1", "replace") for name in drop)
        found = (names, frozenset(len(name) for name in names))
        if len(_AS_BYTES) < 64:
            _AS_BYTES[drop] = found
    return found


def _kept(
    raw: Iterable[tuple[bytes, bytes]],
    drop: frozenset[str],
    as_bytes: tuple[frozenset[bytes], frozenset[int]] | None = None,
) -> list[tuple[bytes, bytes]]:
    # One pass in the common case; a second only when a Connection header names more to drop.
    dropped, sizes = as_bytes or _bytes_of(drop)
    raw = raw if isinstance(raw, (list, tuple)) else list(raw)
    kept = [pair for pair in raw if len(pair[0]) not in sizes or pair[0].lower() not in dropped]
    if len(kept) < len(raw):
        listed = [value for name, value in raw if len(name) == 10 and name.lower() == b"connection"]
        if listed and not all(value.lower() in PLAIN_CONNECTION for value in listed):
            extra, _ = _bytes_of(_listed_names(listed))
            kept = [pair for pair in kept if pair[0].lower() not in extra]
    return kept


_RESPONSE_DROP_FRAMED_BYTES = _bytes_of(_RESPONSE_DROP_FRAMED)


def _filter(raw: Iterable[tuple[bytes, bytes]], drop: frozenset[str]) -> Pairs:
    return as_text(_kept(raw, drop))


def request_drop_set(extra: Iterable[str] = ()) -> frozenset[str]:
    """The request headers never forwarded, plus `extra` ones (such as a client-token header)."""
    names = {name.lower() for name in extra}
    return REQUEST_DROP if names <= REQUEST_DROP else REQUEST_DROP | names


# The request headers the server's parser leaves out of `forwarded` as it goes (server.py), by lower-case
# name and by length: only a name of one of those lengths is lowered at all.
REQUEST_DROP_BYTES, REQUEST_DROP_SIZES = _bytes_of(REQUEST_DROP)


def request_headers(raw: Iterable[tuple[bytes, bytes]], drop: frozenset[str] = REQUEST_DROP) -> Pairs:
    """The client's headers that go upstream, before the proxy adds its own."""
    return _filter(raw, drop)


def forwarded_header_bytes(
    raw: list[tuple[bytes, bytes]], forwarded: list[tuple[bytes, bytes]] | None, drop: frozenset[str]
) -> list[tuple[bytes, bytes]]:
    """The same headers as `request_headers`, as the bytes the client sent: the list the server sorted out
    while parsing (`forwarded`, None when a Connection header names more to leave out) when `drop` is the plain
    set, else the headers of `raw` that `drop` lets through."""
    if forwarded is not None and drop is REQUEST_DROP:
        return forwarded
    return _kept(raw, drop)


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Pairs:
    """The upstream's headers that go back to the client."""
    return _filter(raw, _RESPONSE_DROP)


def response_header_bytes(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers that go back to the client as the bytes it sent, without its framing ones."""
    return _kept(raw, _RESPONSE_DROP_FRAMED, _RESPONSE_DROP_FRAMED_BYTES)


def has_control_character(reason: bytes, pairs: list[tuple[bytes, bytes]], values_checked: bool = False) -> bool:
    """Whether an answer's reason phrase or header values hold a control character (`control_character_in_raw`
    says where): plain C passes over the bytes. `values_checked`: the parser refused any in the values already,
    so only the reason phrase is looked at."""
    if not reason.isalpha() and 0 in reason.translate(_CONTROL_MAP):
        return True
    return not values_checked and 0 in b"".join(map(_VALUE, pairs)).translate(_CONTROL_MAP)


# A control character other than HTAB: no field value or reason phrase may hold one (RFC 9110 §5.5,
# RFC 9112 §4), and aiohttp refuses to write one into a head. The parsers let them through in values.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def control_character_in(reason: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    """Where an answer's reason phrase or header values hold a control character, else None.

    Says `the reason phrase` or `header <name>`: a name is a token (the
    parsers refuse any other), so it may be logged; a value never is. The
    cheap `isprintable` is tried first; it is true for nearly every value.
    """
    if not reason.isprintable() and _CONTROL.search(reason):
        return "the reason phrase"
    for name, value in pairs:
        if not value.isprintable() and _CONTROL.search(value):
            return f"header {name}"
    return None


_VALUE = itemgetter(1)
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Each byte mapped to 0 when it is one of those, else to 1: `translate` then `in` is two plain C passes.
_CONTROL_MAP = bytes(0 if (byte < 0x20 and byte != 0x09) or byte == 0x7F else 1 for byte in range(256))


def control_character_in_raw(reason: bytes, pairs: list[tuple[bytes, bytes]]) -> str | None:
    """`control_character_in` for a head as bytes: one scan of every value at once, then which one."""
    if 0 in reason.translate(_CONTROL_MAP):
        return "the reason phrase"
    for name, value in pairs:
        if _CONTROL_BYTES.search(value):
            return f"header {name.decode('latin-1')}"
    return None


# One auth-param (RFC 9110 §11.2): token BWS "=" BWS ( token / quoted-string ). Scanning left to
# right with this keeps a quoted value whole, so nothing inside quotes is read as a parameter.
_AUTH_PARAM = re.compile(
    r"(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*"
    r'(?:"(?P<quoted>(?:[^"\\]|\\.)*)"?|(?P<token>[^\s,"]*))'
)
_QUOTED_PAIR = re.compile(r"\\(.)")


def challenge_error(www_authenticate: Iterable[str]) -> str | None:
    """The `error` parameter of a Bearer or DPoP challenge, if any.

    `use_dpop_nonce` and `insufficient_scope` mean a new token would not help.
    Parameter names are matched whole and case-insensitively; quoted values
    are unescaped.
    """
    for value in www_authenticate:
        for match in _AUTH_PARAM.finditer(value):
            if match["name"].lower() == "error":
                quoted: str | None = match["quoted"]
                return _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else str(match["token"])
    return None
