"""The redacting log filter on records as the libraries write them: messages, positional args, tracebacks."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis
from uvicorn.logging import AccessFormatter

from detector_service.contract.redaction import REDACTED, RedactSecrets, logging_config, url_password, url_secrets

SECRET = "sk-live-4f9a2c71"


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactSecrets([SECRET, "pw-9s8d7f"]))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("message", "args", "gone"),
    [
        ("upstream said: %s", ("Incorrect API key provided: " + SECRET,), SECRET),
        ("headers %r", ([(b"authorization", b"Bearer sk-unknown-client-1")],), "sk-unknown-client-1"),
        ("headers %s", ({"Authorization": "Basic dXNlcjpwYXNz"},), "dXNlcjpwYXNz"),
        ("connecting to %s", ("rediss://default:other-pass-1@cache:6380/0",), "other-pass-1"),
        ("settings: api_key=%s&x=1", ("plain-value-77",), "plain-value-77"),
        ("config %s", ({"requirepass": "pw-9s8d7f"},), "pw-9s8d7f"),
    ],
)
def test_secrets_leave_the_record(
    log: tuple[logging.Logger, io.StringIO], message: str, args: tuple[object, ...], gone: str
) -> None:
    logger, out = log
    logger.debug(message, *args)
    assert gone not in out.getvalue()
    assert REDACTED in out.getvalue()


def test_tracebacks_are_cleaned(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = log
    try:
        raise ConnectionError(f"cannot reach redis://:{SECRET}@127.0.0.1:1/0")
    except ConnectionError:
        logger.exception("lost Redis")
    assert "ConnectionError" in out.getvalue()
    assert SECRET not in out.getvalue()


def test_ordinary_lines_are_left_alone(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = log
    logger.info("turn %s: %d prompt_tokens, token budget %d, session %s", "t-1", 12, 300, "s-1")
    assert out.getvalue() == "turn t-1: 12 prompt_tokens, token budget 300, session s-1\n"


def test_uvicorn_access_lines_keep_their_arguments() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    handler.addFilter(RedactSecrets([SECRET]))
    logger = logging.getLogger("test.redaction.access")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/v1/models?key={SECRET}", "1.1", 200)
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == f'127.0.0.1:5000 - "GET /v1/models?key={REDACTED} HTTP/1.1" 200 OK\n'


def test_the_services_logging_config_puts_the_filter_on_every_handler() -> None:
    config = logging_config("debug", [SECRET], quiet=["httpx"])
    assert all(h["filters"] == ["redact"] for h in config["handlers"].values())
    assert config["filters"]["redact"]["secrets"] == [SECRET]
    assert config["loggers"]["httpx"] == {"level": logging.WARNING}
    assert "httpx" not in logging_config("trace", [SECRET], quiet=["httpx"])["loggers"]


def test_url_password_is_what_redis_py_would_send() -> None:
    url = "rediss://user:p%40ss%3Aword@cache:6380/0?ssl_cert_reqs=required"
    kwargs = Redis.from_url(url).connection_pool.connection_kwargs
    assert url_password(url) == kwargs["password"] == "p@ss:word"
    assert url_secrets(url) == ["p%40ss%3Aword", "p@ss:word"]
    assert url_password("redis://127.0.0.1:6379/0") is None
