"""What neither service ever writes to a log: client and admin keys, the upstream and judge keys, Redis passwords,
``Authorization`` values.

:class:`RedactSecrets` is a ``logging.Filter`` put on every handler (ours and uvicorn's, see
:func:`logging_config`). It rewrites each record before it is formatted: the configured secrets wherever they
appear, and by shape what no configuration names (a bearer token a client sent, the password in any URL, an
``authorization`` header in a debug dump). A record's ``args`` keep their positions, so formatters that read
them (uvicorn's access log) still work.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

REDACTED = "[redacted]"
TRACE = 5  # uvicorn's level below DEBUG: every ASGI message and connection event

# ``Bearer <token>``, also inside repr()s of header lists (``b'Bearer sk-...'``) and JSON.
_BEARER = re.compile(r"(?i)(\bbearer\s+)(?!\[redacted\])[^\s'\",;)}\]]+")
# ``authorization: <value>`` / ``'authorization': '<value>'`` / ``(b'authorization', b'<value>')``, any scheme.
_AUTH_HEADER = re.compile(
    r"(?i)(\b(?:proxy-)?authorization\b['\"]?\s*[:=,]\s*+b?+['\"]?+)"
    r"(?!(?:[a-z]+\s+)?\[redacted\])(?:[a-z]+\s+)?[^'\"\s,;)}\]]+"
)
# The password of any URL: ``redis://:pw@host``, ``rediss://user:pw@host``, ``http://u:pw@host``.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^:/@\s'\"]*:)[^@/\s'\"]+(@)")
# ``api_key=...``, ``"password": "..."`` and the like in dumps of settings, URLs and bodies.
_NAMED_SECRET = re.compile(
    r"(?i)(\b(?:api[_-]?key|admin[_-]?key|access[_-]?token|password|passwd|requirepass|secret)\b['\"]?\s*[:=]\s*b?['\"]?)"
    r"(?!\[redacted\])[^'\"\s,&;)}\]]+"
)
# Secrets shorter than this are not searched for verbatim: replacing every "ab" in a log would destroy it.
_MIN_SECRET_LEN = 6


def url_password(url: str) -> str | None:
    """The password in a URL such as ``rediss://:pw@host:6380/0`` (percent-decoded), if it has one."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def url_secrets(url: str) -> list[str]:
    """The password of a URL as written and as sent: either may end up in a log line."""
    try:
        raw = urlsplit(url).password
    except ValueError:
        return []
    return list(dict.fromkeys(filter(None, [raw, url_password(url)])))


class RedactSecrets(logging.Filter):
    """Rewrites every record so that no secret reaches a handler; never drops a record."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        known = set(self._secrets)
        for secret in secrets:
            if secret and len(secret) >= _MIN_SECRET_LEN and secret not in known:
                self._secrets.append(secret)
                known.add(secret)
        # Longest first: a secret that contains another is replaced whole.
        self._secrets.sort(key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
        text = _AUTH_HEADER.sub(rf"\g<1>{REDACTED}", text)
        text = _URL_PASSWORD.sub(rf"\g<1>{REDACTED}\g<2>", text)
        return _NAMED_SECRET.sub(rf"\g<1>{REDACTED}", text)

    def _arg(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, int | float):
            return value
        if isinstance(value, bytes):
            text = value.decode("latin-1")
            clean = self.redact(text)
            return value if clean == text else clean.encode("latin-1")
        text = str(value) if not isinstance(value, tuple | list | dict) else repr(value)
        clean = self.redact(text)
        return value if clean == text else clean

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.args:
            record.msg = self.redact(str(record.msg))
        else:
            # Each argument in place first (uvicorn's access formatter reads them by position), then what only
            # shows once they are formatted in (a header dict printed whole); the format string itself is code.
            if isinstance(record.args, tuple):
                record.args = tuple(self._arg(a) for a in record.args)
            else:
                record.args = {k: self._arg(v) for k, v in record.args.items()}
            with contextlib.suppress(TypeError, ValueError, KeyError):
                rendered = record.getMessage()
                if (clean := self.redact(rendered)) != rendered:
                    record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatters print ``exc_text`` when it is set: render the traceback here, where it can be cleaned.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install(redactor: RedactSecrets, loggers: Iterable[str] = ("",)) -> None:
    """Put ``redactor`` on every handler of ``loggers`` (the root by default) that does not have it yet."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if redactor not in handler.filters:
                handler.addFilter(redactor)


def redact_also(*secrets: str | None, loggers: Iterable[str] = ("", "uvicorn", "uvicorn.access")) -> None:
    """Teach the redactors already on the handlers of ``loggers`` more secrets: keys known only once the process
    runs (the judge key a pushed profile's ``judge.api_key_env`` names)."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            for found in handler.filters:
                if isinstance(found, RedactSecrets):
                    found.add(*secrets)


def log_level_number(level: str) -> int:
    """``info``, ``DEBUG``, ... as a number; uvicorn's ``trace`` is 5."""
    return TRACE if level.lower() == "trace" else logging.getLevelNamesMapping().get(level.upper(), logging.INFO)


def logging_config(level: str, secrets: Iterable[str | None] = (), *, quiet: Iterable[str] = ()) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for a service: the root logger, uvicorn's loggers and its access log,
    every handler behind one :class:`RedactSecrets` that knows ``secrets``. Given to uvicorn as ``log_config``
    it is applied again in each worker process. ``quiet`` loggers log only warnings and worse below ``trace``
    (their per-request lines would be a second access log)."""
    number = log_level_number(level)
    redact = {"()": f"{__name__}.RedactSecrets", "secrets": [s for s in secrets if s]}
    handler = {"class": "logging.StreamHandler", "filters": ["redact"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": redact},
        "formatters": {
            "default": {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(name)s: %(message)s"},
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
            },
        },
        "handlers": {
            "default": {**handler, "formatter": "default", "stream": "ext://sys.stderr"},
            "access": {**handler, "formatter": "access", "stream": "ext://sys.stdout"},
        },
        "root": {"handlers": ["default"], "level": number},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": number, "propagate": False},
            "uvicorn.error": {"level": number},
            "uvicorn.access": {"handlers": ["access"], "level": number, "propagate": False},
            **{name: {"level": max(number, logging.WARNING)} for name in quiet if number > TRACE},
        },
    }
