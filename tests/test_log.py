"""Logging: fingerprints, the redaction filter, JSON lines."""

from __future__ import annotations

import io
import json
import logging

import jwt

from proxy.core.token import fingerprint
from proxy.observe.log import JsonFormatter, RedactingFilter, redact

A_JWT = jwt.encode({"sub": "x", "exp": 2_000_000_000}, "k" * 32, algorithm="HS256")


def make_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test.{id(handler)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    return logger


def test_fingerprint_is_8_hex_and_stable() -> None:
    """A fingerprint is the first 8 hex digits of SHA-256: short, stable, not the token."""
    assert fingerprint("abc") == "ba7816bf"
    assert fingerprint(A_JWT) == fingerprint(A_JWT)


def test_redact_replaces_jwts_and_bearer_values() -> None:
    """Anything shaped like a JWT or following `Bearer ` is replaced."""
    text = redact(f"header was Authorization: Bearer opaque-token-1234567 and {A_JWT}")
    assert A_JWT not in text
    assert "opaque-token-1234567" not in text
    assert f"<jwt {fingerprint(A_JWT)}>" in text


def test_redacting_filter_removes_configured_secrets_and_tracebacks() -> None:
    """The last line of defence: configured secrets and exception text never reach the output."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(("client-secret-value",)))
    logger = make_logger(handler)
    logger.info("oops %s", "client-secret-value")
    try:
        raise ValueError(f"bad token {A_JWT}")
    except ValueError:
        logger.exception("failed")
    out = stream.getvalue()
    assert "client-secret-value" not in out
    assert A_JWT not in out
    assert "Traceback" not in out
    assert "failed (ValueError)" in out


def test_json_formatter_writes_one_object_per_line_with_extras() -> None:
    """log.format = json: each line parses, and `extra` fields become keys."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = make_logger(handler)
    logger.info("GET %s", "/x", extra={"status": 200, "resent": False})
    logger.warning("second line")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["message"] == "GET /x"
    assert first["status"] == 200 and first["resent"] is False
    assert first["level"] == "info"
    assert json.loads(lines[1])["level"] == "warning"


def test_redacting_filter_hides_json_grant_header_and_body_secrets() -> None:
    """With the config's secrets (secrets_of), a `[token.json]` header value, the credentials of an
    Authorization header alone, and a literal string of the body template never reach a log line."""
    from proxy.config import parse_config, secrets_of

    config = parse_config(
        {
            "upstream": {"url": "http://a"},
            "token": {
                "grant": "json",
                "token_url": "http://t",
                "refresh_token": "r",
                "json": {
                    "headers": {"X-Api-Key": "hdr-s3cret-4b9e1f", "Authorization": "Basic dXNlcjpzM2NyM3Q="},
                    "body": '{"refreshToken": "{refresh_token}", "secret": "body-s3cret-7c2d0a"}',
                },
            },
        },
        {},
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(secrets_of(config)))
    logger = make_logger(handler)
    logger.warning("endpoint said: bad key %s", "hdr-s3cret-4b9e1f")
    logger.warning("sent Authorization: Basic dXNlcjpzM2NyM3Q= and then dXNlcjpzM2NyM3Q= alone")
    logger.warning("body had %s", "body-s3cret-7c2d0a")
    logger.info("refresh ok grant=json refreshToken=field")  # the body's keys and placeholder are not secrets
    out = stream.getvalue()
    for secret in ("hdr-s3cret-4b9e1f", "dXNlcjpzM2NyM3Q=", "body-s3cret-7c2d0a"):
        assert secret not in out
    assert out.splitlines() == [
        "endpoint said: bad key <secret>",
        "sent Authorization: <secret> and then <secret> alone",
        "body had <secret>",
        "refresh ok grant=json refreshToken=field",
    ]
