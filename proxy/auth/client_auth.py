"""How an OAuth client proves who it is to the token endpoint (RFC 6749 §2.3).

Owns: one class per `token.client_auth` method and the table naming them.
A method adds its credentials to the token request's form or headers; the
secret-based ones are made from the client id and secret (CLIENT_AUTH),
`private_key_jwt` from a loaded private key (its key file is read and checked
by `load_signing_key`), and `tls_client_auth` names the client in the form
while its certificate goes with the TLS connection (the token session's
business). Knows nothing of grants, the endpoint's answers or the config file.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


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
PRIVATE_KEY_JWT = "private_key_jwt"
TLS_CLIENT_AUTH = "tls_client_auth"
# Every `token.client_auth` method, in the order messages list them.
CLIENT_AUTH_METHODS = (*CLIENT_AUTH, PRIVATE_KEY_JWT, TLS_CLIENT_AUTH)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# How long a client assertion is good for: long enough for one request, short enough not to be worth stealing.
ASSERTION_LIFETIME = 60
# The signing algorithms a client assertion may use, and the key type each needs.
ASSERTION_ALGS = ("RS256", "PS256", "ES256")
# The most a key file may hold: a PEM private key is a few KiB.
MAX_KEY_FILE_BYTES = 64 * 1024

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class KeyFileError(ValueError):
    """A client key file that cannot be used; the message names what is wrong, never the key's content."""


def load_signing_key(path: str, alg: str) -> tuple[SigningKey, str]:
    """The private key in a PEM file and the algorithm to sign with: `alg`, or the key's own when empty.

    An RSA key signs RS256 (or PS256 when asked); an EC key on P-256 signs
    ES256. Raises KeyFileError for a missing, unreadable, unparsable,
    encrypted or unsuitable key.
    """
    file = Path(path).expanduser()
    try:
        with file.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot be read ({exc.strerror or type(exc).__name__}), got {path!r}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"is larger than {MAX_KEY_FILE_BYTES // 1024} KiB, not a PEM private key, got {path!r}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"holds an encrypted key; give it unencrypted (mode 0600), got {path!r}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"is not a PEM private key, got {path!r}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        chosen = alg or "RS256"
        if chosen not in ("RS256", "PS256"):
            raise KeyFileError(f"holds an RSA key, which cannot sign {chosen} (use RS256 or PS256), got {path!r}")
        if key.key_size < 2048:
            raise KeyFileError(f"holds an RSA key of {key.key_size} bits; at least 2048 are needed, got {path!r}")
        return key, chosen
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        chosen = alg or "ES256"
        if chosen != "ES256":
            raise KeyFileError(f"holds a P-256 key, which signs ES256 only, got {path!r}")
        return key, chosen
    raise KeyFileError(f"holds a key that signs none of {', '.join(ASSERTION_ALGS)} (RSA or EC P-256), got {path!r}")


@dataclass(frozen=True)
class PrivateKeyJwt:
    """`private_key_jwt` (RFC 7523 §2.2): a client assertion signed with the client's private key, fresh each time.

    `iss` and `sub` are the client id, `aud` the token endpoint (or the
    configured audience), with a new `jti`, `iat` now and `exp` a minute on.
    Safe to call from many requests at once: nothing is shared but the key.
    """

    client_id: str
    key: SigningKey = field(repr=False)
    alg: str
    audience: str
    key_id: str = ""
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def assertion(self) -> str:
        """A newly signed client assertion."""
        now = int(self.clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": self.key_id} if self.key_id else None
        return jwt.encode(claims, self.key, algorithm=self.alg, headers=headers)

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        """Add client_id, the assertion's type and a fresh assertion to the form."""
        form["client_id"] = self.client_id
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = self.assertion()


@dataclass(frozen=True)
class TlsClientAuth:
    """`tls_client_auth` (RFC 8705 §2): the client names itself; its certificate on the connection proves it."""

    client_id: str

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        """Add client_id alone: the token session presents the certificate."""
        if self.client_id:
            form["client_id"] = self.client_id
