"""Redacting credentials from text a provider or a server sent back.

A provider may echo the key it was sent ("Incorrect API key provided: sk-..."),
and an error body can carry tokens of its own. Anything kept from such text —
an exception's message, a log line, an audit event — goes through
:func:`redact` first. It errs towards redacting: a false positive costs a few
characters of an error message, a false negative leaks a key.
"""

from __future__ import annotations

import re
from typing import Final

MARK: Final = "[REDACTED]"
"""What replaces a credential."""

_PATTERNS: Final = (
    # OpenAI-style secret keys: sk-..., sk-proj-..., sk-ant-... (any provider copying the form).
    re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"),
    # An Authorization header's value: a bearer token, or basic credentials (base64).
    re.compile(
        r"(?i)\b(bearer)(\s+)[A-Za-z0-9_\-.~+/=:]{6,}"
        r"|\b(basic)(\s+)(?=[A-Za-z0-9+/]*[0-9+/])[A-Za-z0-9+/]{12,}=*"
    ),
    # key=value, key: value, "key": "value" for names that hold secrets.
    re.compile(
        r"(?i)([\"']?\b[\w\-]*(?:api[_\-]?key|apikey|access[_\-]?token|auth[_\-]?token|"
        r"secret|password|passwd|authorization|x-api-key)[\"']?\s*[:=]\s*)"
        r"([\"']?)(?!\[REDACTED\]|(?:bearer|basic)\s)[^\s\"',&;}]+"
    ),
    # Google API keys and GitHub tokens have fixed prefixes.
    re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
)


def redact(text: str) -> str:
    """``text`` with everything that looks like a credential replaced by ``[REDACTED]``.

    Covers ``sk-...`` keys, ``Bearer`` and ``Basic`` credentials, ``api_key=...``,
    ``"secret": "..."`` and similar assignments, Google (``AIza...``) and GitHub
    (``ghp_...``) tokens. Everything else is left as it was.
    """
    text = _PATTERNS[0].sub(MARK, text)
    text = _PATTERNS[1].sub(lambda m: f"{m[1] or m[3]}{m[2] or m[4]}{MARK}", text)
    text = _PATTERNS[2].sub(lambda m: f"{m[1]}{m[2]}{MARK}", text)
    for pattern in _PATTERNS[3:]:
        text = pattern.sub(MARK, text)
    return text


def short(text: str, *, limit: int = 160) -> str:
    """``text`` redacted, on one line, cut to about ``limit`` characters."""
    flat = " ".join(redact(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def scrub(error: BaseException) -> BaseException:
    """Redact the provider text an exception carries, in place, and return it.

    An ``openai`` error keeps the provider's message in ``args`` and ``message``
    and the decoded body in ``body``; a traceback (``log.exception``) prints
    ``str(error)``. The body is dropped, the message redacted, so a chained
    exception (``raise ... from error``) cannot carry a key into a log.
    """
    error.args = tuple(redact(a) if isinstance(a, str) else a for a in error.args)
    message = getattr(error, "message", None)
    if isinstance(message, str):
        setattr(error, "message", redact(message))  # noqa: B010 - any exception with a message
    if hasattr(error, "body"):
        error.body = None
    return error
