"""Secrets never reach the terminal, logs or MLflow: URL passwords, secret-looking query
values and values under secret-looking keys become ***. Plain Python."""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "***"
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)
# scheme://user:PASSWORD@host, also as Hydra prints overrides (scheme\://user\:PASSWORD@)
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*\\?://[^/\s:@\\]*\\?:)(?P<pw>[^@\s/]+)(?=@)"
)
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&][^=&\s]*(?:password|passwd|secret|token|api[_-]?key)[^=&\s]*=)(?P<pw>[^&\s]+)",
    re.IGNORECASE,
)
# key=value, key: value or 'key': 'value' where the key looks secret (overrides, dict reprs)
_KEYED_SECRET = re.compile(
    r"(?P<head>[\w.+~-]*(?:password|passwd|secret|token|api[_-]?key|credential)[\w-]*['\"]?"
    r"\s*[=:]\s*['\"]?)(?P<pw>[^'\",}\]\s]+)",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """A URL's password (scheme://user:PASSWORD@host), secret query values and the values of
    secret-looking keys (`api_token=x`, `'api_token': 'x'`) become ***."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)
    text = _QUERY_SECRET.sub(lambda m: m["head"] + REDACTED, text)
    return _KEYED_SECRET.sub(lambda m: m["head"] + REDACTED, text)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact(value: Any, key: str = "") -> Any:
    """A copy of plain data (dicts, lists, scalars) with secrets replaced by ***."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if is_secret_key(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value


def override_secret(override: str) -> str:
    """An override `a.b.token=x` with the value redacted by key and by URL."""
    key, sep, _ = override.partition("=")
    if sep and is_secret_key(key.rsplit(".", 1)[-1]):
        return f"{key}={REDACTED}"
    return redact_text(override)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (Hydra prints every job's
    overrides at launch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class RedactingStream:
    """A text stream (stdout, stderr) whose writes are redacted: what other libraries print
    (Hydra's own error messages echo the override they reject) passes through here too."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
