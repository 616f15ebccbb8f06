"""Who may use the proxy: client address ranges and a shared client token.

Owns: the access decision for one request, from the peer address and the
headers. A proxy that adds a bearer to every request is a key to the API for
whoever can reach it; this is the lock. Knows nothing of tokens or upstreams.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.errors import Forbidden, ProxyError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
            if sent[:7].lower() == "bearer ":
                sent = sent[7:]
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
