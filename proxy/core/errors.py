"""The few errors tokenproxy answers itself, each mapped to one HTTP answer.

Owns: the exception types, each with its status and code (http/render.py
renders them). Must not know about tokens, grants, the request journey or
aiohttp. No message ever carries a
token or a secret: callers build the detail from codes and fingerprints only.
"""

from __future__ import annotations

import enum


class ProxyError(Exception):
    """An error that becomes tokenproxy's own HTTP answer."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after

    def again(self) -> ProxyError:
        """A fresh copy, so each waiter raises its own instance."""
        return type(self)(self.detail, retry_after=self.retry_after)


class UpstreamUnreachable(ProxyError):
    """The upstream could not be reached or reset before answering."""

    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    """The upstream did not answer within its timeout."""

    status = 504
    code = "upstream_timeout"


class TokenUnavailable(ProxyError):
    """No token could be obtained (endpoint down, bad answer, backing off)."""

    status = 503
    code = "token_unavailable"


class LoginRequired(ProxyError):
    """The refresh token was rejected and no other grant can log in."""

    status = 503
    code = "login_required"


class QueueFull(ProxyError):
    """Too many requests already wait for a token."""

    status = 503
    code = "queue_full"


class QueueTimeout(ProxyError):
    """A request waited longer than `queue.wait_timeout` for a token."""

    status = 503
    code = "queue_timeout"


class StoreUnavailable(ProxyError):
    """The shared store (Redis) is down, and refreshing without it could present a rotated refresh token twice."""

    status = 503
    code = "store_unavailable"


class ShuttingDown(ProxyError):
    """The proxy stopped while the request was waiting."""

    status = 503
    code = "shutting_down"


class Forbidden(ProxyError):
    """The client may not use the proxy."""

    status = 403
    code = "forbidden"


class NoRoute(ProxyError):
    """No configured route takes the request: it is forwarded nowhere."""

    status = 404
    code = "no_route"


class NotFound(ProxyError):
    """The admin port has no such endpoint."""

    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    """The admin port's endpoint does not take this method."""

    status = 405
    code = "method_not_allowed"


class BadRequest(ProxyError):
    """The request cannot be forwarded as it is."""

    status = 400
    code = "bad_request"


class ExpectationFailed(ProxyError):
    """An `Expect` header other than 100-continue."""

    status = 417
    code = "bad_request"


class FailureKind(enum.Enum):
    """What a failed token fetch means for the next attempt."""

    TRANSIENT = "transient"  # the endpoint, network or answer failed: back off and try again
    MISCONFIGURED = "misconfigured"  # retrying with the same configuration cannot help
    LOGIN_REQUIRED = "login_required"  # the refresh token itself was refused: a person must log in again


class GrantError(Exception):
    """A token endpoint failed to give a token.

    `kind` says whether trying again can help. `oauth_error` is the endpoint's
    own error code when it sent one (`invalid_grant`, `invalid_client`, ...).
    The message never contains a secret.
    """

    def __init__(
        self,
        reason: str,
        *,
        kind: FailureKind = FailureKind.TRANSIENT,
        oauth_error: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.oauth_error = oauth_error

