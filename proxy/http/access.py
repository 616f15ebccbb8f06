"""Who may use the proxy: client address ranges and a shared client token.

Owns: the access decision for one request, from the peer address and the
headers. A proxy that adds a bearer to every request is a key to the API for
whoever can reach it; this is the lock. Knows nothing of tokens or upstreams.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.errors import Forbidden, ProxyError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# Sent with a 407: either scheme carries the client token (Basic is what a proxy URL's user:password@ becomes).
PROXY_CHALLENGE = b'Proxy-Authenticate: Bearer realm="tokenproxy"\r\nProxy-Authenticate: Basic realm="tokenproxy"\r\n'


class ProxyAuthRequired(ProxyError):
    """The client token is required and was not sent."""

    status = 407
    code = "forbidden"


@dataclass(frozen=True)
class AccessRules:
    """Address ranges that may connect and the client token they must present (either may be empty)."""

    allow_from: tuple[Network, ...] = ()
    client_token: str = ""
    token_header: str = "Proxy-Authorization"

    @classmethod
    def build(cls, allow_from: tuple[str, ...], client_token: str, token_header: str) -> AccessRules:
        """Rules from validated config values."""
        return cls(
            tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allow_from),
            client_token,
            token_header,
        )

    # True when any rule applies (set once: it is read for every request).
    active: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "active", bool(self.allow_from or self.client_token))

    def check(self, remote: str | None, headers: Mapping[str, str]) -> ProxyError | None:
        """None when the client may go on; else the error to answer (403, or 407 without a credential)."""
        if self.allow_from and (not remote or not self._address_allowed(remote)):
            return Forbidden("this client address may not use the proxy (server.allow_from)")
        if self.client_token:
            sent = headers.get(self.token_header)
            if sent is None:
                return ProxyAuthRequired(f"send the client token in {self.token_header}")
            scheme = sent[:7].lower()
            if scheme == "bearer ":
                sent = sent[7:]
            elif scheme[:6] == "basic ":
                sent = _basic_token(sent[6:])
            if not hmac.compare_digest(sent.strip().encode(), self.client_token.encode()):
                return Forbidden("wrong client token")
        return None

    def _address_allowed(self, remote: str) -> bool:
        try:
            address = ipaddress.ip_address(remote.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow_from)


def _basic_token(credentials: str) -> str:
    """The client token in Basic credentials: the password (any user name), or the user name when the password is
    empty (`-U TOKEN`); "" when they are not base64 of UTF-8."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    user, _, password = decoded.partition(":")
    return password or user
