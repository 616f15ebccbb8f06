"""Config parsing: defaults, interpolation, and one clear line per problem naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"upstream": {"url": "https://api.example.com"}, "token": {"grant": "static", "access_token": "abc"}}


def problems_of(raw: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env or {})
    return info.value.problems


def test_config_minimal_gets_documented_defaults() -> None:
    """A minimal config fills every other key with the defaults DESIGN.md names."""
    config = parse_config(MINIMAL, {})
    assert config.server.listen == "127.0.0.1:8080"
    assert config.token.refresh_on == (401,)
    assert config.queue.max_waiting == 1000
    assert config.retry.replay_limit == 1048576
    assert config.upstream.verify_tls is True


def test_config_example_file_is_valid_and_complete() -> None:
    """config.example.toml parses, and names every key the schema has, every grant's own keys included."""
    raw = tomllib.loads((ROOT / "config.example.toml").read_text())
    parse_config(raw, {"CLIENT_SECRET": "s", "REFRESH_TOKEN": "r"})
    import dataclasses

    from proxy.auth.registry import GRANTS
    from proxy.config import Config

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if f.name in ("routes", "credentials"):  # [[route]] and [credentials.NAME]: a commented example
                continue
            if f.metadata.get("flat"):  # the grant's keys sit in the section itself
                for grant in GRANTS.values():
                    yield from keys(grant.settings, prefix)
            elif dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                yield from keys(f.default_factory, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    def present(raw, dotted):
        node = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [k for k in keys(Config) if not present(raw, k)]
    assert missing == []


def test_config_env_interpolation_with_default_and_dollar_escape() -> None:
    """${VAR} reads the environment, ${VAR:-d} falls back, $$ is a literal $."""
    raw = {
        "upstream": {"url": "${API:-https://fallback.example}"},
        "token": {"grant": "static", "access_token": "${TOKEN}", "refresh_token": "pa$$word"},
    }
    config = parse_config(raw, {"TOKEN": "from-env"})
    assert config.upstream.url == "https://fallback.example"
    assert config.token.settings.access_token == "from-env"
    assert config.token.refresh_token == "pa$word"


def test_config_missing_variable_names_key_and_variable() -> None:
    """An unset ${VAR} without default is reported on the key that uses it."""
    raw = {**MINIMAL, "token": {"grant": "static", "access_token": "${NOPE_NOT_SET}"}}
    assert problems_of(raw) == ["token.access_token: environment variable NOPE_NOT_SET is not set"]


def test_config_numbers_from_environment_are_accepted() -> None:
    """A number given through ${VAR} (always text) is read as a number."""
    raw = {**MINIMAL, "queue": {"max_waiting": "${MAX:-12}"}}
    assert parse_config(raw, {}).queue.max_waiting == 12


def test_config_every_problem_reported_once_each() -> None:
    """Unknown keys, wrong types, bad URLs and bad choices are all listed, one line each."""
    raw = {
        "server": {"listen": "nope"},
        "upstream": {"url": "api.example.com", "bogus": 1},
        "token": {"grant": "magic", "refresh_on": [200]},
        "queue": {"max_waiting": "many"},
        "log": {"format": "xml"},
        "extra": {},
    }
    problems = problems_of(raw)
    assert "config: " not in problems[0]
    assert "[extra]: unknown section; did you mean [retry]?" in problems
    assert "upstream.bogus: unknown key" in problems
    assert "upstream.url: must be an http(s) URL, got 'api.example.com'" in problems
    assert "queue.max_waiting: must be an integer, got 'many'" in problems
    assert any(p.startswith("server.listen: ") for p in problems)
    assert any(p.startswith("token.grant: must be one of") for p in problems)
    assert any(p.startswith("token.refresh_on: ") for p in problems)
    assert any(p.startswith("log.format: ") for p in problems)
    assert len(problems) == len(set(problems))


def test_config_grant_specific_requirements_named() -> None:
    """Each grant names the keys it needs."""
    assert problems_of({"upstream": {"url": "http://a"}, "token": {"grant": "static"}}) == [
        "token.access_token: is required for grant 'static'"
    ]
    problems = problems_of({"upstream": {"url": "http://a"}, "token": {"grant": "client_credentials"}})
    assert "token.token_url: is required" in problems
    assert "token.client_id: is required for grant 'client_credentials'" in problems
    problems = problems_of(
        {"upstream": {"url": "http://a"}, "token": {"grant": "json", "token_url": "http://t", "json": {"body": "{"}}}
    )
    assert any(p.startswith("token.json.body: must be a JSON document") for p in problems)


def test_config_state_file_tilde_expanded(tmp_path: Path) -> None:
    """A state_file under ~ is expanded once at load."""
    config = parse_config({**MINIMAL, "token": {**MINIMAL["token"], "state_file": "~/x/state.json"}}, {})
    assert not config.token.state_file.startswith("~")


def test_config_file_errors_are_one_line(tmp_path: Path) -> None:
    """A missing file and invalid TOML each give one line naming the file."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml", env={})
    assert info.value.problems == [f"config: {tmp_path / 'absent.toml'}: no such file"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nlisten=")
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    assert len(info.value.problems) == 1 and "not valid TOML" in info.value.problems[0]


def test_config_overrides_from_command_line_win(tmp_path: Path) -> None:
    """--listen and --upstream override the file."""
    path = tmp_path / "c.toml"
    path.write_text('[upstream]\nurl = "http://a.example"\n[token]\ngrant = "static"\naccess_token = "t"\n')
    config = load_config(path, {"server.listen": "127.0.0.1:9999", "upstream.url": "http://b.example"}, env={})
    assert config.server.listen == "127.0.0.1:9999"
    assert config.upstream.url == "http://b.example"


def test_config_client_and_loop_choices_named() -> None:
    """`upstream.client` and `server.loop` accept only their documented values; the defaults are the fast ones."""
    problems = problems_of({"server": {"loop": "trio"}, "upstream": {"url": "http://a", "client": "curl"}, "token": {"grant": "static", "access_token": "t"}})
    assert problems == [
        "server.loop: must be one of uvloop, asyncio, got 'trio'",
        "upstream.client: must be one of fast, session, got 'curl'",
    ]
    config = parse_config({"upstream": {"url": "http://a"}, "token": {"grant": "static", "access_token": "t"}}, {})
    assert (config.server.loop, config.upstream.client) == ("uvloop", "fast")


# -- Messages about secret keys never show the value (issue "Hardened" #8) --

SECRET = "73194628"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ({"grant": "password", "token_url": "http://t", "username": "u", "password": 73194628},
         "token.password: must be a string, got an integer"),
        ({"grant": "static", "access_token": 73194628.5}, "token.access_token: must be a string, got a number"),
        ({"grant": "static", "access_token": "t", "client_secret": [73194628]},
         "token.client_secret: must be a string, got a list"),
        ({"grant": "static", "access_token": "t", "refresh_token": {"v": 73194628}},
         "token.refresh_token: must be a string, got a table"),
        ({"grant": "static", "access_token": "t", "json": {"headers": {"X-Api-Key": 73194628}}},
         "token.json.headers: must be a table of strings, got an integer for 'X-Api-Key'"),
        ({"grant": "static", "access_token": "t", "json": {"headers": "X-Api-Key: 73194628"}},
         "token.json.headers: must be a table of strings, got a string"),
        ({"grant": "static", "access_token": "t", "json": {"body": 73194628}},
         "token.json.body: must be a string, got an integer"),
        ({"grant": "static", "access_token": "t", "json": "73194628"}, "token.json: must be a table, got a string"),
    ],
)
def test_config_secret_key_type_errors_name_the_kind_never_the_value(token: dict, expected: str) -> None:
    """A wrongly typed secret is reported by its kind (`got an integer`), never by its value."""
    problems = problems_of({"upstream": {"url": "http://a"}, "token": token})
    assert expected in problems
    assert not [p for p in problems if SECRET in p]


def test_config_client_token_type_error_hides_value() -> None:
    """server.client_token is a secret too."""
    problems = problems_of({**MINIMAL, "server": {"client_token": 7319462873194628}})
    assert problems == ["server.client_token: must be a string, got an integer"]


def test_config_invalid_json_body_says_where_never_what() -> None:
    """An invalid body template is reported with its parse error's position, without echoing it."""
    body = '{"clientSecret": "body-s3cret-value", "refreshToken": "{refresh_token}"'
    problems = problems_of(
        {"upstream": {"url": "http://a"}, "token": {"grant": "json", "token_url": "http://t", "json": {"body": body}}}
    )
    assert problems == [
        "token.json.body: must be a JSON document (Expecting ',' delimiter at line 1 column 72)"
    ]


def test_config_invalid_json_body_from_environment_not_echoed() -> None:
    """A body filled in from ${VAR}: the value from the environment is not echoed either."""
    raw = {"upstream": {"url": "http://a"}, "token": {"grant": "json", "token_url": "http://t", "json": {"body": "${BODY}"}}}
    problems = problems_of(raw, {"BODY": '{"key": env-s3cret-value}'})
    assert problems == ["token.json.body: must be a JSON document (Expecting value at line 1 column 9)"]


def test_config_secrets_of_includes_json_headers_and_body_literals() -> None:
    """The redaction list has the header values (and an Authorization's credentials alone) and the body's string values.

    Not: the placeholder strings, the body's keys or numbers, or headers that never carry a credential.
    """
    from proxy.config import secrets_of

    config = parse_config(
        {
            "upstream": {"url": "http://a"},
            "token": {
                "grant": "json",
                "token_url": "http://t",
                "refresh_token": "rt-configured",
                "json": {
                    "headers": {
                        "Authorization": "Basic dXNlcjpwYXNzd29yZA==",
                        "X-Api-Key": "${KEY}",
                        "Content-Type": "application/json",
                    },
                    "body": '{"refreshToken": "{refresh_token}", "clientSecret": "body-s3cret", "n": [7, "deep-s3cret"]}',
                },
            },
        },
        {"KEY": "header-key-from-env"},
    )
    assert secrets_of(config) == (
        "rt-configured",
        "Basic dXNlcjpwYXNzd29yZA==",
        "dXNlcjpwYXNzd29yZA==",
        "header-key-from-env",
        "body-s3cret",
        "deep-s3cret",
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"headers": {"X-Api-Key": "k3y-literal", "Accept": "text/plain"}}, ["token.json.headers.X-Api-Key"]),
        ({"headers": {"X-Api-Key": "${KEY}", "Authorization": "Bearer ${T:-}"}}, ["token.json.headers.Authorization"]),
        ({"headers": {"X-Api-Key": "${KEY}"}}, []),
        ({"body": '{"refreshToken": "{refresh_token}"}'}, []),
        ({"body": '{"refreshToken": "{refresh_token}", "secret": "${S}"}'}, []),
        ({"body": '{"refreshToken": "{refresh_token}", "secret": "literal-s3cret"}'}, ["token.json.body"]),
        ({"body": '{"refreshToken": "{refresh_token}", "secret": "${S:-default-s3cret}"}'}, ["token.json.body"]),
        ({"body": '{"refreshToken": "{refresh_token}", "n": 1, "ok": true}'}, []),
    ],
)
def test_config_literal_secrets_cover_json_headers_and_body(spec: dict, expected: list[str]) -> None:
    """For the permission warning, literal header values and body string values count as secrets."""
    from proxy.config import literal_secrets

    assert literal_secrets({"token": {"json": spec}}) == expected
