"""The grant registry and the config's field metadata: credential ids, secret keys, restart-only keys, §5 answers."""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

import pytest

from proxy.auth.endpoint import Answer, failure_kind, oauth_error, oauth_token
from proxy.auth.registry import GRANTS
from proxy.config import Config, is_secret_key, parse_config, restart_only_changes, secrets_of
from proxy.config.secrets import SECRET_KEYS
from proxy.core.errors import FailureKind
from proxy.runtime.credentials import credential_of

UPSTREAM = {"url": "http://a"}


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ({"grant": "refresh_token", "token_url": "https://id.example/token", "client_id": "app"}, "6436572532bfee41"),
        (
            {"grant": "client_credentials", "token_url": "https://id.example/token", "client_id": "app",
             "client_secret": "s"},
            "7d34511469959ca7",
        ),
        (
            {"grant": "password", "token_url": "https://id.example/token", "client_id": "app", "username": "ann",
             "password": "pw"},
            "c8cef1c3d007f8a4",
        ),
        ({"grant": "json", "token_url": "https://id.example/refresh"}, "e17b9607ba0241ab"),
        ({"grant": "json", "json": {"url": "https://id.example/refresh2"}}, "e4ed3712e4d497a2"),
        ({"grant": "static", "access_token": "t"}, "b4174cb0efe445a5"),
    ],
    ids=["refresh_token", "client_credentials", "password", "json", "json_url", "static"],
)
def test_registry_credential_id_same_as_before_for_every_grant(token: dict[str, Any], expected: str) -> None:
    """Each grant's credential id is pinned. A grant with a refresh token chain (refresh_token, json) keeps the id
    earlier releases wrote into state files, so its chain resumes; the others' ids take in what their request asks
    for (a token for another scope or audience is another credential's), and their token is fetched anew once."""
    assert credential_of(parse_config({"upstream": UPSTREAM, "token": token}, {}).token) == expected


def test_registry_secret_keys_are_the_marked_fields() -> None:
    """The secret keys read from field metadata are exactly the credentials: none lost, none added."""
    assert set(SECRET_KEYS) == {
        "server.client_token",
        "token.refresh_token",
        "token.client_secret",
        "token.password",
        "token.access_token",
        "token.subject_token",
        "token.json.headers",
        "token.json.body",
        "store.url",
    }
    assert is_secret_key("token.json") and is_secret_key("token.json.headers.X-Api-Key")
    assert not is_secret_key("token.client_id") and not is_secret_key("token.username")


@pytest.mark.parametrize(
    ("token", "secret"),
    [
        ({"grant": "client_credentials", "token_url": "http://t", "client_id": "c", "client_secret": "cs-8f2e"}, "cs-8f2e"),
        ({"grant": "password", "token_url": "http://t", "username": "u", "password": "pw-1c9d"}, "pw-1c9d"),
        ({"grant": "static", "access_token": "at-5b7a"}, "at-5b7a"),
    ],
)
def test_registry_secrets_of_reads_each_grants_secret_fields(token: dict[str, Any], secret: str) -> None:
    """The redaction list holds each grant's secret setting, found through its field metadata."""
    assert secret in secrets_of(parse_config({"upstream": UPSTREAM, "token": token}, {}))


def test_registry_settings_keep_only_the_chosen_grants_keys() -> None:
    """Another grant's keys are accepted and type-checked in `[token]`, but the grant's settings hold only its own."""
    config = parse_config(
        {"upstream": UPSTREAM, "token": {"grant": "static", "access_token": "t", "username": "u", "client_id": "c"}}, {}
    )
    assert [f.name for f in dataclasses.fields(config.token.settings)] == ["access_token"]


def test_registry_keys_shared_by_grants_have_one_type() -> None:
    """A key two grants both have (token_url, client_id, ...) means the same thing in each: one type."""
    seen: dict[str, Any] = {}
    for grant in GRANTS.values():
        for name, tp in get_type_hints(grant.settings).items():
            assert seen.setdefault(name, tp) == tp, name


def test_registry_settings_are_frozen_and_grants_build_with_defaults_known() -> None:
    """Every grant's settings dataclass is frozen and can be made from its defaults alone."""
    for grant in GRANTS.values():
        settings = grant.settings()
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.__setattr__(dataclasses.fields(settings)[0].name, "x")


def _with(config: Config, section: str, **changes: Any) -> Config:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def test_restart_only_changes_names_exactly_the_restart_keys() -> None:
    """Changing every key that needs a restart names each of them, dotted, in schema order."""
    old = parse_config({"upstream": UPSTREAM, "token": {"grant": "static", "access_token": "t"}}, {})
    new = _with(
        old,
        "server",
        listen="127.0.0.1:1",
        admin_listen="127.0.0.1:2",
        socket_mode=0o660,
        max_connections=3,
        header_timeout=4.0,
        body_timeout=5.0,
        keepalive_timeout=6.0,
        max_headers=7,
        max_header_size=800,
        max_request_line=900,
        loop="asyncio",
    )
    new = _with(
        new, "upstream", connect_timeout=1.0, read_timeout=2.0, verify_tls=False, ca_file="/x", max_connections=3,
        client="session",
    )
    new = _with(new, "token", state_file="/elsewhere/state.json")
    assert restart_only_changes(old, new) == [
        "server.listen",
        "server.admin_listen",
        "server.socket_mode",
        "server.max_connections",
        "server.header_timeout",
        "server.body_timeout",
        "server.keepalive_timeout",
        "server.max_headers",
        "server.max_header_size",
        "server.max_request_line",
        "server.loop",
        "upstream.connect_timeout",
        "upstream.read_timeout",
        "upstream.verify_tls",
        "upstream.ca_file",
        "upstream.max_connections",
        "upstream.client",
        "token.state_file",
    ]


def test_restart_only_changes_ignores_reloadable_keys_and_grant_changes() -> None:
    """A new upstream URL, new credentials or even another grant take effect on reload: nothing to restart."""
    old = parse_config({"upstream": UPSTREAM, "token": {"grant": "static", "access_token": "t"}}, {})
    new = parse_config(
        {
            "upstream": {"url": "http://b", "rewrite_redirects": True},
            "server": {"allow_from": ["10.0.0.0/8"]},
            "token": {"grant": "client_credentials", "token_url": "http://t", "client_id": "c", "refresh_on": [401, 403]},
            "queue": {"max_waiting": 5},
        },
        {},
    )
    assert restart_only_changes(old, new) == []


@pytest.mark.parametrize(
    ("code", "spends_refresh_token", "kind"),
    [
        ("invalid_grant", True, FailureKind.LOGIN_REQUIRED),
        ("invalid_grant", False, FailureKind.MISCONFIGURED),
        ("invalid_client", True, FailureKind.MISCONFIGURED),
        ("unauthorized_client", False, FailureKind.MISCONFIGURED),
        ("unsupported_grant_type", False, FailureKind.MISCONFIGURED),
        ("invalid_scope", False, FailureKind.MISCONFIGURED),
        ("invalid_request", True, FailureKind.TRANSIENT),
        ("temporarily_unavailable", False, FailureKind.TRANSIENT),
    ],
)
def test_endpoint_error_code_decides_failure_kind(code: str, spends_refresh_token: bool, kind: FailureKind) -> None:
    """RFC 6749 §5.2: the error code, as data, says whether to back off, give up, or ask for a new login."""
    assert failure_kind(code, spends_refresh_token=spends_refresh_token) is kind


def _answer(status: int, body: bytes) -> Answer:
    from multidict import CIMultiDict, CIMultiDictProxy

    return Answer(status, "application/json", CIMultiDictProxy(CIMultiDict()), body)


def test_endpoint_error_answer_carries_code_as_data() -> None:
    """A §5.2 error answer becomes a GrantError with the code in `oauth_error`, its description left out."""
    error = oauth_error(
        _answer(400, b'{"error": "invalid_grant", "error_description": "token rt-9a8b revoked"}'),
        spends_refresh_token=True,
    )
    assert (error.oauth_error, error.kind, error.reason) == (
        "invalid_grant",
        FailureKind.LOGIN_REQUIRED,
        "token endpoint refused: invalid_grant",
    )


def test_endpoint_success_answer_reads_every_section_5_1_field() -> None:
    """access_token, token_type, expires_in, refresh_token and scope are read from a 200 answer."""
    body = b'{"access_token": "at", "token_type": "Bearer", "expires_in": 60, "refresh_token": "rt", "scope": "a b"}'
    response = oauth_token(_answer(200, body))
    assert (response.access_token, response.token_type, response.expires_in, response.refresh_token, response.scope) == (
        "at",
        "Bearer",
        60.0,
        "rt",
        "a b",
    )
