"""Which headers cross the proxy: the pure functions of proxy.headers, pair by pair."""

from __future__ import annotations

import pytest

from proxy.http.headers import challenge_error, control_character_in, request_headers, response_headers

HOP_BY_HOP = [
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
]


def raw(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    """Header pairs as the bytes aiohttp's raw_headers holds."""
    return [(name.encode(), value.encode()) for name, value in pairs]


# --- request_headers -------------------------------------------------------------------------


def test_request_headers_end_to_end_kept_in_order_with_repeats() -> None:
    """End-to-end headers keep their order, their name's case and their repeats."""
    pairs = [("X-A", "1"), ("accept", "text/plain"), ("X-A", "2"), ("Cookie", "a=1"), ("Cookie", "b=2")]
    assert request_headers(raw(*pairs)) == pairs


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_request_headers_hop_by_hop_dropped(name: str) -> None:
    """Every RFC 9110 hop-by-hop header stops at the proxy, whatever its case."""
    pairs = raw(("X-Before", "1"), (name, "x"), (name.lower(), "y"), (name.upper(), "z"), ("X-After", "2"))
    assert request_headers(pairs) == [("X-Before", "1"), ("X-After", "2")]


def test_request_headers_connection_named_dropped() -> None:
    """Headers that any Connection line names (any case, spaces, empty items) stop at the proxy too."""
    pairs = raw(
        ("Connection", " X-Hop-One ,, keep-alive"),
        ("X-Hop-One", "1"),
        ("connection", "x-hop-two"),
        ("X-HOP-TWO", "2"),
        ("X-Kept", "3"),
    )
    assert request_headers(pairs) == [("X-Kept", "3")]


@pytest.mark.parametrize("name", ["Host", "Authorization", "Content-Length", "Expect"])
def test_request_headers_proxy_set_headers_dropped(name: str) -> None:
    """Host, Authorization, Content-Length and Expect are the proxy's to set, so the client's are dropped."""
    assert request_headers(raw((name, "value"), (name.lower(), "again"), ("X-Kept", "1"))) == [("X-Kept", "1")]


def test_request_headers_content_encoding_kept() -> None:
    """Content-Encoding and Content-Type describe the body and travel with it."""
    pairs = [("Content-Type", "application/json"), ("Content-Encoding", "gzip")]
    assert request_headers(raw(*pairs)) == pairs


def test_request_headers_empty_value_kept() -> None:
    """A header with an empty value is kept as it is."""
    assert request_headers(raw(("X-Empty", ""))) == [("X-Empty", "")]


def test_request_headers_utf8_value_decoded_as_utf8() -> None:
    """UTF-8 value bytes become the str that serialises back to the same bytes."""
    value = "caf\u00e9 \u2713"
    assert request_headers([(b"X-Name", value.encode())]) == [("X-Name", value)]


def test_request_headers_non_utf8_value_read_as_latin1() -> None:
    """Bytes that are not UTF-8 are read as Latin-1 (obs-text), not dropped."""
    assert request_headers([(b"X-Name", b"caf\xe9")]) == [("X-Name", "caf\u00e9")]


def test_request_headers_no_headers_empty() -> None:
    """No headers in, none out."""
    assert request_headers([]) == []


# --- response_headers ------------------------------------------------------------------------


def test_response_headers_set_cookie_repeats_kept() -> None:
    """Several Set-Cookie lines stay several, in order."""
    pairs = [("Set-Cookie", "a=1; Path=/"), ("Content-Type", "text/plain"), ("Set-Cookie", "b=2; Path=/")]
    assert response_headers(raw(*pairs)) == pairs


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_response_headers_hop_by_hop_dropped(name: str) -> None:
    """Every hop-by-hop header from the upstream stops at the proxy."""
    assert response_headers(raw((name, "x"), ("X-Kept", "1"))) == [("X-Kept", "1")]


def test_response_headers_connection_named_dropped() -> None:
    """A header the upstream's Connection names stops at the proxy."""
    pairs = raw(("Connection", "X-Private-Hop"), ("X-Private-Hop", "secret"), ("X-End-To-End", "kept"))
    assert response_headers(pairs) == [("X-End-To-End", "kept")]


def test_response_headers_framing_and_identity_kept() -> None:
    """Content-Length, Content-Encoding, Server, WWW-Authenticate and Location reach the client."""
    pairs = [
        ("Content-Length", "12"),
        ("Content-Encoding", "gzip"),
        ("Server", "upstream/1.0"),
        ("WWW-Authenticate", 'Bearer error="invalid_token"'),
        ("Location", "/next"),
    ]
    assert response_headers(raw(*pairs)) == pairs


def test_response_headers_utf8_value_decoded_as_utf8() -> None:
    """A UTF-8 file name in Content-Disposition survives as the same characters."""
    value = 'attachment; filename="r\u00e9sum\u00e9.pdf"'
    assert response_headers([(b"Content-Disposition", value.encode())]) == [("Content-Disposition", value)]


# --- challenge_error -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenges", "expected"),
    [
        (['Bearer realm="api", error="invalid_token", error_description="expired"'], "invalid_token"),
        (['Bearer error="insufficient_scope", scope="read"'], "insufficient_scope"),
        (["Bearer error=invalid_token"], "invalid_token"),
        (["Bearer error=invalid_token, realm=api"], "invalid_token"),
        (['Bearer error = "invalid_token"'], "invalid_token"),
        (['Bearer ERROR="invalid_token"'], "invalid_token"),
        (['DPoP error="use_dpop_nonce", error_description="Resource server requires nonce"'], "use_dpop_nonce"),
        (['Basic realm="api", Bearer error="invalid_token"'], "invalid_token"),
        (['Basic realm="api"', 'Bearer error="insufficient_scope"'], "insufficient_scope"),
    ],
    ids=[
        "quoted-after-realm",
        "quoted-first",
        "token",
        "token-then-comma",
        "spaces-around-equals",
        "upper-case-name",
        "dpop-nonce",
        "second-challenge-same-line",
        "second-header-line",
    ],
)
def test_challenge_error_parameter_found(challenges: list[str], expected: str) -> None:
    """The `error` auth-param is found in quoted or token form, in any challenge."""
    assert challenge_error(challenges) == expected


@pytest.mark.parametrize(
    "challenges",
    [[], ['Bearer realm="api"'], ["Bearer"], ['Basic realm="terror"']],
    ids=["no-header", "realm-only", "bare-scheme", "error-inside-realm-word"],
)
def test_challenge_error_no_parameter_none(challenges: list[str]) -> None:
    """Without an `error` parameter the answer is None."""
    assert challenge_error(challenges) is None


def test_challenge_error_description_before_error_ignored() -> None:
    """`error_description` coming first is not mistaken for `error`."""
    challenge = 'Bearer error_description="token expired", error="invalid_token"'
    assert challenge_error([challenge]) == "invalid_token"


def test_challenge_error_inside_quoted_string_ignored() -> None:
    """`error=` written inside another parameter's quoted value is not the error parameter."""
    challenge = 'Bearer realm="api", error_description="got error=insufficient_scope before", error="invalid_token"'
    assert challenge_error([challenge]) == "invalid_token"


def test_challenge_error_longer_param_name_ignored() -> None:
    """A parameter whose name merely ends in `error` (x_error) is not the error parameter."""
    assert challenge_error(['Bearer x_error="insufficient_scope", error="invalid_token"']) == "invalid_token"


def test_challenge_error_escaped_quote_in_value_unescaped() -> None:
    """A quoted value with an escaped quote is read whole and unescaped."""
    assert challenge_error(['Bearer error="odd\\"name"']) == 'odd"name'


# --- control_character_in ------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\r", "\n", "\x1b", "\x1f", "\x7f"])
def test_control_character_in_header_value_names_the_header(char: str) -> None:
    """A control character (other than HTAB) in a value: the answer names that header, and only its name."""
    pairs = [("X-Fine", "ok"), ("X-Bad", f"se{char}cret"), ("X-Later", "also\x01bad")]
    assert control_character_in("OK", pairs) == "header X-Bad"


def test_control_character_in_reason_phrase_named() -> None:
    """A control character in the reason phrase is reported as such, before any header."""
    assert control_character_in("O\x01K", [("X-Bad", "a\x01b")]) == "the reason phrase"


def test_control_character_in_tab_obs_text_and_unicode_pass() -> None:
    """HTAB, Latin-1 obs-text, C1 characters, no-break spaces and UTF-8 text are not control characters here."""
    pairs = [("X-Tab", "a\tb"), ("X-Latin", "caf\xe9 \x85\xa0"), ("X-Utf8", "r\u00e9sum\u00e9 \u2713 \u20ac"), ("X-Empty", "")]
    assert control_character_in("Quite \tFine \xe9", pairs) is None
