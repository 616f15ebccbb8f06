"""The upstream as the forwarder sees it: its address, the request going there, and the answer coming back.

Owns: `Upstream` (origin and base path, split once), `Outgoing` (one
request as it leaves the proxy) and the two interfaces every way of reaching
the upstream implements, `UpstreamClient` and `UpstreamAnswer`. The forwarder
is written against these alone; `session_client.py` (aiohttp's
ClientSession) and `fast_client.py` (a lean keep-alive pool) fill them in.
Errors leave a client only as ProxyError (errors.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDictProxy
from yarl import URL

from ..core.errors import ProxyError

# Header pairs as aiohttp's writers take them.
Pairs = list[tuple[str, str]]

# Raw header pairs, as aiohttp's parsers hand them over.
RawHeaders = tuple[tuple[bytes, bytes], ...]

# Methods a request may be sent again for when a kept-alive connection turned out
# to be closed before it answered (RFC 9110 §9.2.2, RFC 9112 §9.3.1.1).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# Hop-by-hop headers (RFC 9110 §7.6.1): never passed on by a proxy, in either direction; a `Connection` header
# also names more of them, unless it holds one of the plain values.
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
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})

# Methods sent without any body framing when they carry no body; every other one
# states `Content-Length: 0`, as aiohttp's client does (some servers answer 411 otherwise).
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


@dataclass(frozen=True)
class RequestBody:
    """What will be sent upstream as the body, and whether it can be sent twice."""

    data: bytes | None  # the whole body when it is replayable
    stream: AsyncIterator[bytes] | None  # the body when it is not
    length: int | None  # the Content-Length to send, when known
    held: int = 0  # bytes taken from the ReplayMemory for it: give them back when the request is done

    @property
    def replayable(self) -> bool:
        """True when the body can be sent again after a refresh."""
        return self.stream is None


def header_text(raw: bytes) -> str:
    """Header bytes as the str that aiohttp will write back as the same bytes.

    aiohttp serialises header strings as UTF-8, so UTF-8 (and ASCII) bytes
    are decoded as UTF-8 and cross unchanged. Bytes that are not UTF-8 have
    no such str; they are read as Latin-1 (obs-text), so the value keeps its
    characters though its bytes are re-encoded.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def as_text(pairs: Iterable[tuple[bytes, bytes]]) -> Pairs:
    """Header bytes as the strs aiohttp writes back as the same bytes (see `header_text`)."""
    return [(header_text(name), header_text(value)) for name, value in pairs]


@dataclass(frozen=True)
class Upstream:
    """The upstream's origin and base path, split once at start-up."""

    scheme: str
    host: str
    port: int
    base_path: str  # without a trailing slash

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """Split a validated `upstream.url`."""
        parsed = URL(url)
        assert parsed.host is not None and parsed.port is not None
        return cls(parsed.scheme, parsed.raw_host or parsed.host, parsed.port, parsed.raw_path.rstrip("/"))

    @property
    def origin(self) -> str:
        """scheme://host:port, for messages: never the base path, a query or a secret."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def authority(self) -> str:
        """The Host header the upstream gets: host, and the port unless it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.scheme == "https" else 80
        return host if self.port == default_port else f"{host}:{self.port}"

    def origin_form_of(self, target: str) -> str | None:
        """The path and query of an absolute-form target naming this upstream's host (RFC 9112 §3.2.2).

        `http://` and `https://` both count, so a tool that can only be given an
        HTTP proxy works; any other host, or an explicit other port, gives None.
        """
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return None
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
        authority, remainder = rest[:cut], rest[cut:]
        if "@" in authority:
            return None
        host, _, port = authority.rpartition(":") if not authority.endswith("]") else (authority, "", "")
        if not host:
            host, port = authority, ""
        if host.lower().strip("[]") != self.host.lower().strip("[]"):
            return None
        if port and port != str(self.port) and port != ("443" if scheme.lower() == "https" else "80"):
            return None
        return remainder if remainder.startswith("/") else "/" + remainder

    def client_location(self, location: str, client_origin: str, prefix: str = "") -> str | None:
        """`location` re-pointed at `client_origin` (and `prefix`, the path a route took off the client's), when it
        names this upstream's origin and base path.

        For `upstream.rewrite_redirects`. A path-absolute Location (`/base/x`)
        names this upstream's origin too, when there is a base path to take
        off or a prefix to put on. Any other Location (another host, another
        scheme or port, userinfo, outside the base path, or relative with
        neither, which already resolves right against the proxy) gives None:
        left as it is.
        """
        if location.startswith("/") and not location.startswith("//"):
            if not self.base_path and not prefix:
                return None
            remainder = location
        else:
            scheme, sep, rest = location.partition("://")
            if not sep or scheme.lower() != self.scheme:
                return None
            cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i != -1), default=len(rest))
            authority, remainder = rest[:cut].lower(), rest[cut:]
            host = (f"[{self.host}]" if ":" in self.host else self.host).lower()
            default_port = 443 if self.scheme == "https" else 80
            if authority != f"{host}:{self.port}" and not (authority == host and self.port == default_port):
                return None
        if not remainder.startswith(self.base_path):
            return None
        remainder = remainder[len(self.base_path) :]
        if remainder[:1] not in ("", "/", "?", "#"):
            return None  # /v1 is the base, /v10 is not under it
        return client_origin + prefix + (remainder if remainder.startswith("/") else "/" + remainder)

    def url_for(self, target: str) -> URL:
        """The upstream URL for an origin-form request target, path and query byte for byte."""
        path, mark, query = target.partition("?")
        if mark and not query:
            # yarl cannot hold an empty query; an encoded path may end in the bare `?`.
            path += "?"
        return URL.build(
            scheme=self.scheme,
            host=self.host,
            port=self.port,
            path=self.base_path + path,
            query_string=query,
            encoded=True,
        )


@dataclass(slots=True)
class Outgoing:
    """One request as it leaves the proxy, minus its bearer; sent once, or twice after a refresh."""

    upstream: Upstream
    method: str
    target: str  # origin form, as the client sent it; the upstream's base path is not yet applied
    headers: list[tuple[bytes, bytes]]  # the client's headers that go upstream, in order, as received
    body: RequestBody
    # False once this sending was already the one more try after a kept-alive connection closed unanswered.
    resend_left: bool = True

    @property
    def may_resend(self) -> bool:
        """True when a connection that closed before answering may be tried once more (idempotent, replayable,
        and not tried once more already)."""
        return self.resend_left and self.method in IDEMPOTENT_METHODS and self.body.replayable


class Discard(list[tuple[bytes, bytes]]):
    """A header list that keeps nothing: where the headers go that nobody will read."""

    def append(self, item: tuple[bytes, bytes], /) -> None:
        """Dropped."""


class UpstreamAnswer(Protocol):
    """The upstream's answer: status and headers at once, the body as it arrives.

    Every read raises only ProxyError. The owner ends it with `release` (read
    to the end: the connection may be reused) or `close` (anything else: the
    connection is dropped); calling either again does nothing.
    """

    @property
    def status(self) -> int:
        """The status code."""

    @property
    def reason(self) -> str:
        """The reason phrase; bytes that are not UTF-8 are kept as surrogates (`encode("utf-8", "surrogateescape")`
        gives back what the upstream sent)."""

    @property
    def reason_bytes(self) -> bytes:
        """The reason phrase byte for byte as the upstream sent it."""

    @property
    def raw_headers(self) -> RawHeaders:
        """The headers as received, in order, repeats kept."""

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The headers by name, for reading single values."""

    @property
    def content_length(self) -> int | None:
        """The announced body length, if any."""

    @property
    def values_checked(self) -> bool:
        """True when the header values are known to hold no control character (the parser refused any)."""

    @property
    def relayed_headers(self) -> list[tuple[bytes, bytes]] | None:
        """The headers that go back to the client (hop-by-hop and framing ones left out), when they were sorted
        out as the head was parsed; None: they are to be worked out from `raw_headers`."""

    def at_eof(self) -> bool:
        """True once the whole body has been read."""

    async def read(self, limit: int) -> bytes:
        """Up to `limit` body bytes; b"" at the end."""

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body, chunk by chunk as it arrives."""

    def release(self) -> None:
        """Done, with the body read to its end: the connection may carry another request."""

    def close(self) -> None:
        """Done early or after a failure: the connection is closed, never reused."""


class ArrivedAnswer(UpstreamAnswer, Protocol):
    """An answer handed over in a callback, with what of its body came with its head."""

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived."""

    def take_body(self) -> bytes:
        """Every body byte that has arrived and not been read, at once."""


class AnswerSink(Protocol):
    """Who is told of an answer in callbacks instead of awaiting it (the forwarder's quick path)."""

    def answered(self, answer: ArrivedAnswer) -> None:
        """The answer's head is in (and its whole body, when `answer.complete`)."""

    def failed(self, error: ProxyError, *, resendable: bool = False) -> None:
        """No answer came: `error`; `resendable` when the request surely was not acted on (a kept-alive
        connection closed before any byte of an answer), so an idempotent one may be sent again."""


class QuickExchange(Protocol):
    """A request sent by `UpstreamClient.start`, until its sink is told of its answer or failure."""

    def abandon(self) -> None:
        """Nobody wants the answer any more: the exchange is dropped (its connection is not reused)."""


class UpstreamClient(Protocol):
    """One way of reaching the upstream: sends a request, hands back the answer's head."""

    def use(self, upstream: Upstream) -> None:
        """Where new requests go from now on (at start, and after a reload moved the upstream).

        Requests already under way finish with the upstream they started with.
        """

    def start(self, request: Outgoing, authorization: str, sink: AnswerSink) -> QuickExchange | None:
        """Send `request` at once on a kept-alive connection, `sink` to be told of its answer; None, with
        nothing sent, when that cannot be done without waiting (use `send`)."""

    async def send(self, request: Outgoing, authorization: str) -> UpstreamAnswer:
        """Send `request` with `authorization` as its Authorization header.

        Raises UpstreamUnreachable, UpstreamTimeout, or BadRequest when the
        client's streamed body breaks off malformed.
        """

    async def close(self) -> None:
        """Close every connection; used at shutdown."""
