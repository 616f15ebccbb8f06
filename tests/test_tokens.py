"""Pure decisions of the token manager: what a 401 calls for, a token's deadlines, expiry, back-off."""

from __future__ import annotations

import jwt
import pytest

from proxy.auth.grants import TokenResponse
from proxy.core.errors import FailureKind, GrantError
from proxy.core.renewal import Renewal, backoff_delay, decide_renewal
from proxy.core.token import expiry_of, lifetime_floor, lifetime_warning, make_token

NOW = 1_700_000_000.0


def token(generation: int = 1, obtained_at: float = NOW - 100, lifetime: float = 300.0):
    """A token of the given generation, obtained `NOW - obtained_at` seconds ago."""
    return make_token("value", obtained_at + lifetime, obtained_at, generation, 30.0)


def test_decide_renewal_newer_generation_uses_current() -> None:
    """A 401 for an older generation than the current one resends with the current token."""
    assert decide_renewal(1, token(generation=2), NOW, 5.0, "invalid_token") is Renewal.USE_CURRENT


def test_decide_renewal_newer_generation_uses_current_even_when_young() -> None:
    """Someone already refreshed: the current token is used however young it is."""
    assert decide_renewal(1, token(generation=2, obtained_at=NOW), NOW, 60.0, None) is Renewal.USE_CURRENT


def test_decide_renewal_same_generation_old_enough_refreshes() -> None:
    """A 401 for the current, old enough token calls for the one refresh."""
    assert decide_renewal(1, token(generation=1), NOW, 5.0, None) is Renewal.REFRESH


def test_decide_renewal_invalid_token_challenge_refreshes() -> None:
    """`error="invalid_token"` is exactly what a refresh fixes."""
    assert decide_renewal(3, token(generation=3), NOW, 5.0, "invalid_token") is Renewal.REFRESH


def test_decide_renewal_no_current_token_refreshes() -> None:
    """With no current token at all, the only way on is a refresh."""
    assert decide_renewal(1, None, NOW, 5.0, None) is Renewal.REFRESH


def test_decide_renewal_young_token_gives_up() -> None:
    """A token younger than min_refresh_interval is rejected for another reason: pass the 401 through."""
    assert decide_renewal(1, token(obtained_at=NOW - 2), NOW, 5.0, None) is Renewal.GIVE_UP


@pytest.mark.parametrize("error", ["insufficient_scope", "use_dpop_nonce", "invalid_request"])
def test_decide_renewal_other_challenge_error_gives_up(error: str) -> None:
    """A challenge naming another error than invalid_token is not fixed by a new token."""
    assert decide_renewal(1, token(), NOW, 5.0, error) is Renewal.GIVE_UP


def test_make_token_long_lifetime_leeway_is_one_second() -> None:
    """A long-lived token stops being sent one second before it expires."""
    t = make_token("v", NOW + 300, NOW, 1, 30.0)
    assert t.usable_until == NOW + 299
    assert t.usable_at(NOW + 298.9) and not t.usable_at(NOW + 299)


def test_make_token_short_lifetime_leeway_is_a_tenth() -> None:
    """A short-lived token's leeway is a tenth of its lifetime, not a whole second."""
    t = make_token("v", NOW + 5, NOW, 1, 30.0)
    assert t.usable_until == pytest.approx(NOW + 4.5)


def test_make_token_refresh_before_sets_refresh_point() -> None:
    """Refresh-ahead starts `refresh_before` seconds before expiry when the lifetime allows it."""
    t = make_token("v", NOW + 300, NOW, 1, 30.0)
    assert t.refresh_at == NOW + 270


def test_make_token_short_lifetime_refresh_point_capped_at_half() -> None:
    """A lifetime shorter than twice `refresh_before` refreshes at half-life, not at once."""
    t = make_token("v", NOW + 40, NOW, 1, 30.0)
    assert t.refresh_at == NOW + 20


def test_make_token_already_expired_has_no_usable_time() -> None:
    """A token whose expiry lies before it was obtained is never usable."""
    t = make_token("v", NOW - 10, NOW, 1, 30.0)
    assert not t.usable_at(NOW)


def test_make_token_header_and_repr_built_once_without_value() -> None:
    """The bearer header is built from the value; the repr shows only the fingerprint."""
    t = make_token("secret-value", NOW + 300, NOW, 7, 30.0)
    assert t.header == "Bearer secret-value"
    assert "secret-value" not in repr(t)
    assert t.fingerprint in repr(t) and "generation=7" in repr(t)


@pytest.mark.parametrize(
    ("expires_at", "why"),
    [
        (NOW + 1e-9, "a nanosecond lifetime"),
        (NOW, "expired on arrival"),
        (NOW - 3600, "exp an hour in the past (clock skew)"),
        (-5.0, "a negative exp"),
        (NOW + 4.9, "just under the floor"),
    ],
)
def test_make_token_shorter_than_floor_is_used_and_kept_until_the_floor(expires_at: float, why: str) -> None:
    """A lifetime under the floor: sent, and not refreshed by the clock, until `floor` after it arrived."""
    t = make_token("v", expires_at, NOW, 1, 30.0, floor=5.0)
    assert t.usable_until == t.refresh_at == NOW + 5.0, why
    assert t.usable_at(NOW + 4.99) and not t.usable_at(NOW + 5.0)
    assert t.expires_at == expires_at  # what the answer said is still what is reported


@pytest.mark.parametrize(
    ("lifetime", "usable_until", "refresh_at"),
    [
        (5.0, NOW + 4.5, NOW + 2.5),  # exactly the floor: the usual leeway and half-life
        (40.0, NOW + 39.0, NOW + 20.0),
        (300.0, NOW + 299.0, NOW + 270.0),
    ],
)
def test_make_token_floor_leaves_longer_lifetimes_alone(
    lifetime: float, usable_until: float, refresh_at: float
) -> None:
    """A lifetime of at least the floor keeps its leeway and refresh-ahead point."""
    t = make_token("v", NOW + lifetime, NOW, 1, 30.0, floor=5.0)
    assert (t.usable_until, t.refresh_at) == (pytest.approx(usable_until), pytest.approx(refresh_at))


@pytest.mark.parametrize(
    ("min_refresh_interval", "floor"), [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (5.0, 5.0), (60.0, 60.0)]
)
def test_lifetime_floor_is_min_refresh_interval_at_least_one_second(min_refresh_interval: float, floor: float) -> None:
    """The floor is min_refresh_interval, never under 1 s (min_refresh_interval = 0 must not allow a call per request)."""
    assert lifetime_floor(min_refresh_interval) == floor


@pytest.mark.parametrize(
    ("expires_at", "words"),
    [
        (NOW + 300, None),
        (NOW + 5, None),
        (NOW + 0.001, ["lives 0.001s", "less than 5s", "clock skew"]),
        (NOW + 2, ["lives 2s", "less than 5s"]),
        (NOW, ["already expired when it arrived (0s ago", "clock skew"]),
        (NOW - 3600, ["already expired when it arrived (3600s ago", "clock skew", "using it for 5s"]),
    ],
)
def test_lifetime_warning_names_short_lifetimes_and_clock_skew(expires_at: float, words: list[str] | None) -> None:
    """No warning at or above the floor; below it one naming the lifetime, and clock skew for a past exp."""
    warning = lifetime_warning(expires_at, NOW, 5.0)
    if words is None:
        assert warning is None
    else:
        assert warning is not None
        assert all(word in warning for word in words), warning


def test_expiry_of_expires_in_wins() -> None:
    """`expires_in` counts from when the token was obtained, ahead of the JWT's exp."""
    access = jwt.encode({"exp": NOW + 9999}, "k" * 32, algorithm="HS256")
    assert expiry_of(TokenResponse(access, expires_in=120.0), NOW, 300.0) == NOW + 120


def test_expiry_of_no_expires_in_reads_jwt_exp() -> None:
    """Without `expires_in`, the JWT's exp claim is read without verifying the signature."""
    access = jwt.encode({"exp": int(NOW + 3600)}, "some-key-the-proxy-does-not-know", algorithm="HS256")
    assert expiry_of(TokenResponse(access), NOW, 300.0) == NOW + 3600


def test_expiry_of_expired_jwt_still_reads_exp() -> None:
    """An already expired JWT's exp is still read (not rejected by PyJWT's own exp check)."""
    access = jwt.encode({"exp": int(NOW - 60)}, "k" * 32, algorithm="HS256")
    assert expiry_of(TokenResponse(access), NOW, 300.0) == NOW - 60


def test_expiry_of_jwt_without_exp_uses_default() -> None:
    """A JWT with no exp claim lives `default_lifetime`."""
    access = jwt.encode({"sub": "alice"}, "k" * 32, algorithm="HS256")
    assert expiry_of(TokenResponse(access), NOW, 300.0) == NOW + 300


def test_expiry_of_opaque_token_uses_default() -> None:
    """A token that is not a JWT lives `default_lifetime`."""
    assert expiry_of(TokenResponse("opaque-abc123"), NOW, 42.0) == NOW + 42


def test_expiry_of_non_numeric_exp_uses_default() -> None:
    """An exp claim that is not a number is ignored."""
    access = jwt.encode({"exp": "tomorrow"}, "k" * 32, algorithm="HS256")
    assert expiry_of(TokenResponse(access), NOW, 300.0) == NOW + 300


@pytest.mark.parametrize("expires_in", [0.0, -30.0])
def test_expiry_of_zero_or_negative_expires_in_says_nothing(expires_in: float) -> None:
    """A zero or negative expires_in is no lifetime: the JWT's exp decides, else the default."""
    access = jwt.encode({"exp": int(NOW + 3600)}, "k" * 32, algorithm="HS256")
    assert expiry_of(TokenResponse(access, expires_in=expires_in), NOW, 300.0) == NOW + 3600
    assert expiry_of(TokenResponse("opaque", expires_in=expires_in), NOW, 300.0) == NOW + 300


def test_expiry_of_tiny_expires_in_is_returned_as_stated() -> None:
    """A nanosecond expires_in is what the answer says; the floor (make_token) copes with it."""
    assert expiry_of(TokenResponse("opaque", expires_in=1e-9), NOW, 300.0) == NOW + 1e-9


def test_expiry_of_negative_exp_is_returned_as_stated() -> None:
    """A negative exp is a (very) past time: returned, the floor and a clock-skew warning follow."""
    access = jwt.encode({"exp": -5}, "k" * 32, algorithm="HS256")
    assert expiry_of(TokenResponse(access), NOW, 300.0) == -5.0


@pytest.mark.parametrize("exp", [float("nan"), float("inf"), float("-inf"), 10**400, -(10**400)], ids=str)
def test_expiry_of_non_finite_exp_is_a_malformed_answer(exp: float) -> None:
    """An exp that is a number but not a finite one (NaN, Infinity, 400 digits) makes the answer malformed."""
    access = jwt.encode({"exp": exp}, "k" * 32, algorithm="HS256")
    with pytest.raises(GrantError, match="exp claim is not a finite number") as raised:
        expiry_of(TokenResponse(access), NOW, 300.0)
    assert raised.value.kind is FailureKind.TRANSIENT  # backed off and retried, not dead


def test_backoff_delay_first_failure_waits_initial() -> None:
    """The first failure waits `backoff_initial`."""
    assert backoff_delay(1, 0.5, 60.0) == 0.5


def test_backoff_delay_doubles_per_failure() -> None:
    """Each further failure doubles the wait."""
    assert [backoff_delay(n, 1.0, 60.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]


def test_backoff_delay_is_capped() -> None:
    """The wait never exceeds `backoff_max`."""
    assert backoff_delay(10, 1.0, 60.0) == 60.0


def test_backoff_delay_after_days_of_failures_stays_capped() -> None:
    """Thousands of failures (an endpoint down for a day) still give the cap, not an overflow."""
    assert backoff_delay(5000, 1.0, 60.0) == 60.0
