"""How an OAuth client proves who it is to the token endpoint (RFC 6749 §2.3).

Owns: one class per `token.client_auth` method and the table naming them.
A method adds its credentials to the token request's form or headers; a
new one (private_key_jwt, mTLS) is one class and one line in CLIENT_AUTH.
Knows nothing of grants, the endpoint's answers or the config file.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote


class ClientAuth(Protocol):
    """A client authentication method, applied to each token request."""

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        """Add the client's credentials to the request's form fields or headers."""


@dataclass(frozen=True)
class ClientSecretBasic:
    """`basic`: the client id and secret in an `Authorization: Basic` header (RFC 6749 §2.3.1)."""

    client_id: str
    client_secret: str = field(repr=False)

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        """Send the pair as Basic credentials; without a client id, send nothing."""
        if self.client_id:
            # Both parts are form-urlencoded before Basic encoding (§2.3.1).
            pair = f"{quote(self.client_id, safe='')}:{quote(self.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")


@dataclass(frozen=True)
class ClientSecretPost:
    """`post`: the client id and secret as form fields."""

    client_id: str
    client_secret: str = field(repr=False)

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        """Add client_id, and client_secret when there is one."""
        if self.client_id:
            form["client_id"] = self.client_id
            if self.client_secret:
                form["client_secret"] = self.client_secret


@dataclass(frozen=True)
class PublicClient:
    """`none`: a public client names itself and proves nothing."""

    client_id: str
    client_secret: str = field(repr=False)  # unused: a public client has no secret to send

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        """Add client_id alone."""
        if self.client_id:
            form["client_id"] = self.client_id


# `token.client_auth` -> the method, made from the client id and secret. The order is the one messages list.
CLIENT_AUTH: dict[str, Callable[[str, str], ClientAuth]] = {
    "basic": ClientSecretBasic,
    "post": ClientSecretPost,
    "none": PublicClient,
}
