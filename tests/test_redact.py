"""Redacting credentials from provider text before it is kept anywhere."""

from __future__ import annotations

import traceback

import httpx2
import openai
import pytest

from agents.redact import MARK, redact, scrub, short

KEY = "sk-proj-Zx81_kQ-93hh2LmnoP"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Incorrect API key provided: {KEY}.", f"Incorrect API key provided: {MARK}."),
        ("Authorization: Bearer eyJhbGciOi.J9x-y_z", f"Authorization: Bearer {MARK}"),
        ("authorization=Basic dXNlcjpwYXNzd29yZA==", f"authorization=Basic {MARK}"),
        ("GET /v1?api_key=abc123def&x=1", f"GET /v1?api_key={MARK}&x=1"),
        ('{"api_key": "hunter2", "n": 1}', f'{{"api_key": "{MARK}", "n": 1}}'),
        ("{'client_secret': 'abc'}", f"{{'client_secret': '{MARK}'}}"),
        ("x-api-key: 0123abcd", f"x-api-key: {MARK}"),
        ("password=p4ss; next", f"password={MARK}; next"),
        ("key AIzaSyA1234567890abcdefghijklmnopqrstuv end", f"key {MARK} end"),
        ("ghp_abcdefghijklmnopqrstuvwxyz0123 leaked", f"{MARK} leaked"),
    ],
)
def test_credentials_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "overloaded mid-stream",
        "a basic understanding of the task",
        "the token window was exceeded",
        "sk-8",  # too short to be a key
        "HTTP 500: scripted error (HTTP 500)",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_short_is_one_redacted_line_within_the_limit() -> None:
    text = f"line one\nkey {KEY}\n" + "x" * 500
    cut = short(text, limit=40)
    assert "\n" not in cut
    assert KEY not in cut
    assert len(cut) == 40
    assert cut.endswith("…")


def test_scrub_redacts_an_openai_error_as_a_traceback_prints_it() -> None:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    error = openai.APIError(f"bad key {KEY}", request, body={"message": f"bad key {KEY}"})

    scrub(error)

    assert error.message == f"bad key {MARK}"
    assert error.body is None
    printed = "".join(traceback.format_exception(error))
    assert KEY not in printed
    assert KEY not in repr(error)
