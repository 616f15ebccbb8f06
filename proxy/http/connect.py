"""CONNECT on the proxy port: TLS interception for the hosts the routes name, 403 (or a blind tunnel) for others.

Owns: the protocol every new connection of the proxy port starts with. It
looks at the first bytes only: a request that is not `CONNECT` is handed at
once to the server's client connection (server.py; one object per
connection, nothing per request). A `CONNECT host:port HTTP/1.1` that opens its connection is
answered here:

- a host a route names: `200 Connection Established`, then a TLS handshake
  with a leaf certificate for that host from the local CA (`proxy.tls`), the
  SNI checked; the requests inside are served by a client connection of the
  same server, so exactly as on the proxy port. Entry checks that they name
  the CONNECT host and routes them by it;
- a host `server.connect_passthrough` matches: a blind tunnel (bytes copied
  both ways with flow control, no token, no interception);
- any other host: 403 `forbidden`; nothing is forwarded anywhere.

A CONNECT later on a kept-alive connection reaches the server, and the
forwarder answers 400. Knows nothing of the config file: `Tunnels` is built
by the composition root.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import ssl
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from multidict import CIMultiDict

from ..core.errors import BadRequest, Forbidden, ProxyError
from ..tls.ca import CAError, LocalCA
from .access import PROXY_CHALLENGE
from .render import raw_answer
from .route import Route
from .server import REFUSAL_LINGER, HeadersTooLarge, RequestTimeout, TargetTooLong

if TYPE_CHECKING:
    from .entry import Entry
    from .server import ProxyServer

logger = logging.getLogger("tokenproxy.server")

_CONNECT = b"CONNECT "
_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
# `CONNECT host:port HTTP/1.x`: a DNS name, an IPv4 address or a bracketed IPv6 address, and a port.
_REQUEST_LINE = re.compile(rb"CONNECT ([A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5}) HTTP/1\.[01]")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([\t\x20-\x7e\x80-\xff]*)")


class NoLocalCA(ProxyError):
    """A route names the CONNECT host, but there is no usable local CA to intercept it with."""

    status = 503
    code = "no_local_ca"


class TunnelUnreachable(ProxyError):
    """A passthrough tunnel's target could not be connected to."""

    status = 502
    code = "upstream_unreachable"


class Tunnels:
    """What the proxy port does with a CONNECT: the local CA (or why there is none), the passthrough patterns.

    Reads the routes from `entry.router` at each CONNECT (a reload replaces
    it whole). The handshakes under way are its tasks, each bounded by
    `server.header_timeout`.
    """

    def __init__(
        self,
        entry: Entry,
        ca: LocalCA | None,
        *,
        ca_problem: str = "",
        passthrough: Sequence[str] = (),
        connect_timeout: float = 10.0,
    ) -> None:
        self.entry = entry
        self.ca = ca
        self.ca_problem = ca_problem
        self.passthrough = tuple(passthrough)
        self.connect_timeout = connect_timeout
        self.tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def load(
        cls, entry: Entry, ca_dir: Path, *, passthrough: Sequence[str] = (), connect_timeout: float = 10.0
    ) -> Tunnels:
        """Tunnels with the CA in `ca_dir`; without one (or an unusable one), a warning when a route names a host,
        and CONNECTs to routed hosts answer 503."""
        try:
            ca: LocalCA | None = LocalCA.load(ca_dir)
            problem = ""
        except CAError as error:
            ca, problem = None, str(error)
            if any(route.host for route in entry.router.routes):
                logger.warning("HTTPS_PROXY tunnels to the routes' hosts are refused (503): %s", problem)
        return cls(entry, ca, ca_problem=problem, passthrough=passthrough, connect_timeout=connect_timeout)

    def protocol(self, server: ProxyServer) -> asyncio.Protocol:
        """The protocol a new connection of the proxy port starts with."""
        return _FirstBytes(server, self)

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a tunnel's opening (handshake or connect) as a task of its own, cancelled by `close`."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        """Cancel the tunnels being opened (shutdown); the ones open are the server's connections."""
        for task in list(self.tasks):
            task.cancel()

    def routed(self, name: str, port: str) -> Route | None:
        """The first route whose `host` names this CONNECT target (with any port, or this one)."""
        authority = f"{name}:{port}"
        for route in self.entry.router.routes:
            if route.host and route.host in (name, authority):
                return route
        return None

    def passes(self, name: str, port: str) -> bool:
        """Whether `server.connect_passthrough` lets a blind tunnel to this target (port 443 unless the pattern
        names one)."""
        for pattern in self.passthrough:
            host_pattern, _, port_pattern = pattern.lower().partition(":")
            if fnmatch.fnmatchcase(name, host_pattern) and fnmatch.fnmatchcase(port, port_pattern or "443"):
                return True
        return False


class _FirstBytes(asyncio.Protocol):
    """A new connection until its first bytes say what it is: a request for the server, or a CONNECT for us."""

    __slots__ = ("_buffer", "_counted", "_linger", "_server", "_timer", "_transport", "_tunnels")

    def __init__(self, server: ProxyServer, tunnels: Tunnels) -> None:
        self._server = server
        self._tunnels = tunnels
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._counted = True  # holds one of server.max_connections until it passes it on or is lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        # A connection that never sends a byte is closed after keepalive_timeout, as a client connection does.
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._server.limits.keepalive_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        if self._transport is not None and self._linger is None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._linger is not None:
            return  # refused: whatever else the client sends is discarded
        if not self._buffer and self._timer is not None:  # the first bytes: the idle timer's job is done
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            data = self._buffer + data
        size = min(len(data), len(_CONNECT))
        if data[:size] != _CONNECT[:size]:
            self._hand_over(transport, data)
            return
        if self._timer is None:
            limits = self._server.limits
            self._timer = asyncio.get_running_loop().call_later(limits.header_timeout, self._timed_out)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > self._head_limit():
                self._refuse(HeadersTooLarge("the CONNECT request's head is larger than the header limits allow"))
            else:
                self._buffer = data
            return
        self._buffer = b""
        self._timer.cancel()
        transport.pause_reading()
        self._connect(transport, data[:end], data[end + 4 :])

    def _head_limit(self) -> int:
        limits = self._server.limits
        return limits.max_request_line + 32 + limits.max_headers * (limits.max_header_size + 2)

    def _hand_over(self, transport: asyncio.Transport, first: bytes) -> None:
        """The connection is the server's from now on: a client connection gets the transport and these bytes."""
        if self._timer is not None:  # armed by a first byte that looked like CONNECT ("C" of "COPY")
            self._timer.cancel()
            self._timer = None
        self._transport = None  # nothing of this protocol acts on the connection any more
        handler = self._server.make_connection()
        self._counted = False  # the client connection's now
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(first)

    def _connect(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        limits = self._server.limits
        line, _, fields = head.partition(b"\r\n")
        if len(line) > limits.max_request_line + 32:
            self._refuse(TargetTooLong(f"the request line is longer than {limits.max_request_line} bytes"))
            return
        match = _REQUEST_LINE.fullmatch(line)
        if match is None or not 0 < int(match[2]) < 65536:
            self._refuse(BadRequest("malformed request: CONNECT needs a target host:port and HTTP/1.1"))
            return
        headers: CIMultiDict[str] = CIMultiDict()
        for field in fields.split(b"\r\n") if fields else ():
            parsed = _HEADER.fullmatch(field)
            if parsed is None or len(field) > limits.max_header_size:
                self._refuse(BadRequest("malformed request: a request header is not valid"))
                return
            headers.add(parsed[1].decode("ascii"), parsed[2].decode("latin-1").strip(" \t"))
        if len(headers) > limits.max_headers:
            self._refuse(HeadersTooLarge(f"the request has more than {limits.max_headers} headers"))
            return
        name, port = match[1].decode("ascii").lower().rstrip("."), match[2].decode("ascii").lstrip("0") or "0"
        tunnels = self._tunnels
        route = tunnels.routed(name, port)
        if route is None:
            if tunnels.passes(name, port):
                tunnels.start(self._passthrough(transport, name, port, rest))
                return
            self._refuse(Forbidden(f"CONNECT to {name}:{port} is not allowed: no route names this host"))
            return
        if route.access.active:
            peer = transport.get_extra_info("peername")
            refusal = route.access.check(str(peer[0]) if isinstance(peer, tuple) else None, headers)
            if refusal is not None:
                self._refuse(refusal)
                return
        if tunnels.ca is None:
            self._refuse(NoLocalCA(f"cannot intercept the tunnel to {name}: {tunnels.ca_problem}"))
            return
        if rest:
            self._refuse(BadRequest("bytes were sent after CONNECT before its answer: wait for the 200"))
            return
        try:
            context = tunnels.ca.context_for(name.strip("[]"))
        except (ValueError, ssl.SSLError) as error:  # pragma: no cover - a name the pattern let through
            logger.warning("cannot make a certificate for %s (%s)", name, type(error).__name__)
            self._refuse(BadRequest(f"cannot intercept a tunnel to {name}"))
            return
        tunnels.start(self._intercept(transport, context, f"{name}:{port}"))

    async def _passthrough(self, transport: asyncio.Transport, name: str, port: str, rest: bytes) -> None:
        """Connect to `name:port`, answer 200, and copy bytes both ways until either side ends: no token, ever."""
        loop = asyncio.get_running_loop()
        host = name.strip("[]")
        try:
            async with asyncio.timeout(self._tunnels.connect_timeout):
                remote, _ = await loop.create_connection(lambda: _Pipe(transport, None), host, int(port))
        except (OSError, TimeoutError) as error:
            why = "timed out" if isinstance(error, TimeoutError) else error.strerror or type(error).__name__
            self._refuse(TunnelUnreachable(f"cannot connect to {name}:{port} ({why})"))
            return
        except BaseException:
            transport.abort()
            raise
        if self._transport is None:  # the client left while we connected
            remote.close()
            return
        logger.info("passthrough tunnel from %s to %s:%s (server.connect_passthrough)", _peer(transport), name, port)
        self._counted = False  # the client's pipe gives it back
        transport.set_protocol(_Pipe(remote, self._server.connection_closed))
        transport.write(_ESTABLISHED)
        if rest:
            remote.write(rest)
        transport.resume_reading()

    async def _intercept(self, transport: asyncio.Transport, context: ssl.SSLContext, authority: str) -> None:
        """Answer 200, complete the TLS handshake as `authority`, and give the tunnel to a client connection."""
        server = self._server
        # The loops deliver the first decrypted bytes (or the loss) as soon as the handshake ends, before this
        # coroutine resumes: a holder takes them until the client connection is connected.
        holder = _Holder()
        transport.write(_ESTABLISHED)
        loop = asyncio.get_running_loop()
        try:
            inner = await loop.start_tls(
                transport, holder, context, server_side=True, ssl_handshake_timeout=server.limits.header_timeout
            )
        except Exception as error:  # noqa: BLE001 - any failure of the handshake: the tunnel is closed, logged
            logger.info(
                "closed a CONNECT tunnel from %s to %s: the TLS handshake failed (%s)",
                _peer(transport),
                authority,
                _handshake_failure(error),
            )
            transport.abort()
            self._release()
            return
        except asyncio.CancelledError:
            transport.abort()
            self._release()
            raise
        if inner is None or holder.lost:  # the client left as the handshake ended
            if inner is not None:
                inner.abort()
            self._release()
            return
        handler = server.make_connection(authority)
        self._counted = False  # the client connection's now
        inner.set_protocol(handler)
        handler.connection_made(inner)
        if holder.data:
            handler.data_received(bytes(holder.data))
        if holder.eof and not handler.eof_received():
            inner.close()

    def _refuse(self, error: ProxyError) -> None:
        """Answer `error` and close: after the answer, what the client sends is read and discarded briefly."""
        transport = self._transport
        if transport is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        if not isinstance(error, RequestTimeout):  # a timeout is logged where it happens
            logger.info("refused a CONNECT from %s: %s (%d)", _peer(transport), error.detail, error.status)
        answer = raw_answer(error)
        if error.status == 407:
            answer = answer.replace(b"\r\n\r\n", b"\r\n" + PROXY_CHALLENGE + b"\r\n", 1)
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.abort)

    def _timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or self._linger is not None:
            return
        logger.info(
            "closed a connection from %s: its request headers were not complete within %gs (server.header_timeout)",
            _peer(transport),
            self._server.limits.header_timeout,
        )
        limit = self._server.limits.header_timeout
        self._refuse(RequestTimeout(f"the request headers did not arrive within {limit:g}s"))

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._timer, self._linger):
            if timer is not None:
                timer.cancel()
        self._transport = None
        self._release()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self._server.connection_closed()


class _Holder(asyncio.Protocol):
    """The protocol of a tunnel's TLS transport from its handshake until its request handler takes over."""

    def __init__(self) -> None:
        self.data = bytearray()  # at most one read's worth: the handler is connected on the next turn
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the handler decides

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True


class _Pipe(asyncio.Protocol):
    """One side of a passthrough tunnel: what arrives is written to the other side, with flow control.

    When either side ends, both are closed. `release` (on the client's side) gives back its place in
    server.max_connections when the client's connection is lost.
    """

    __slots__ = ("_peer", "_release")

    def __init__(self, peer: asyncio.Transport, release: Callable[[], None] | None) -> None:
        self._peer = peer
        self._release = release

    def data_received(self, data: bytes) -> None:
        self._peer.write(data)

    def pause_writing(self) -> None:
        self._peer.pause_reading()  # this side cannot take more: stop reading the side that feeds it

    def resume_writing(self) -> None:
        self._peer.resume_reading()

    def eof_received(self) -> bool:
        return False  # this side is done: close it (and, in connection_lost, the other)

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is None:
            self._peer.close()
        else:
            self._peer.abort()
        if self._release is not None:
            release, self._release = self._release, None
            release()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "a client"


def _handshake_failure(error: BaseException) -> str:
    """Why a handshake failed, in words that never quote the client's bytes."""
    if isinstance(error, ssl.SSLError):
        return error.reason or type(error).__name__
    if isinstance(error, TimeoutError):
        return "it did not complete within server.header_timeout"
    return type(error).__name__
