"""Scripted replies of the stub model server, and the OpenAI-shaped bodies built from them.

Private to :mod:`agents.stub_server`, which re-exports the public names. Everything here is a
plain value or a pure function, so the server's per-request work stays a few dict builds.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from starlette.responses import Response, StreamingResponse

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
"""The finish reasons the OpenAI client accepts on a chat completion choice."""

DEFAULT_MODEL: Final = "stub-model"
"""The model named in a reply when the request names none, and listed by ``GET /v1/models``."""

PER_MESSAGE_TOKENS: Final = 4
"""Prompt tokens counted for each message on top of its words (role, separators)."""

MALFORMED_BODY: Final = b'{"id": "chatcmpl-stub", "object": "chat.completion", "choices": [{'
"""A body cut off mid-object: not valid JSON, but it starts like a completion."""

WrongShape = Literal["choice-without-message", "choices-string", "content-not-text"]
"""Valid JSON of the wrong shape, sent with status 200 (see :attr:`Reply.wrong_shape`)."""

Cut = Literal["drop", "stall"]
"""How a reply is cut off mid-body: the connection dropped, or no more bytes sent."""

STALL_S: Final = 60.0
"""How long a stalled reply waits before dropping the connection (the server's stop cuts it
short; a client that gives up first closes it)."""

Sleep = Callable[[float], Awaitable[None]]


class DroppedOnPurpose(Exception):
    """Raised inside a response body to make the server drop the connection mid-reply."""


_JSON: Final = "application/json"
_SSE: Final = "text/event-stream"

# One piece per word with the whitespace after it, so that joining the pieces gives back the
# text exactly; the empty match at the end is dropped.
_PIECE: Final = re.compile(r"\S*\s*")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts to report for one reply; ``total_tokens`` is their sum."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    def __post_init__(self) -> None:
        counts = (self.prompt_tokens, self.completion_tokens, self.cached_tokens or 0)
        if min(*counts, self.reasoning_tokens or 0) < 0:
            raise ValueError(f"token counts must be >= 0, got {self}")

    def to_json(self) -> dict[str, Any]:
        """The ``usage`` object as OpenAI sends it, with its details where they are set.

        ``cached_tokens`` goes in ``prompt_tokens_details`` and ``reasoning_tokens`` in
        ``completion_tokens_details``, as sent verbatim: both are part of their totals.
        """
        payload: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens is not None:
            payload["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens is not None:
            payload["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return payload


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer to ``POST /v1/chat/completions``.

    Attributes:
        text: The assistant message's content; for an error status, the error message.
        usage: ``"auto"`` (the default) counts tokens from the request and the text sent (see
            :func:`auto_usage`); a :class:`Usage` is sent verbatim, even if the text was
            truncated; ``None`` sends no ``usage`` at all (and no usage chunk when streaming).
        finish_reason: Sent as is, unless ``max_tokens`` truncates the text, which makes it
            ``"length"``.
        status: HTTP status. Anything but 200 sends an OpenAI-style ``{"error": {...}}`` body.
        retry_after_s: If set, sent as the ``Retry-After`` header (seconds, may be fractional,
            which the OpenAI client accepts), with whatever status the reply has.
        delay_s: Seconds to stall before the first byte (no status line, no headers), to run
            into a client's timeout. Cut short when the server stops, so a long delay never
            holds up ``stop()``.
        malformed: Send a body that is not valid JSON, with ``status`` and a JSON content type
            (or, for a streaming request, one SSE event whose data is not valid JSON).
        json_body: Send exactly this JSON object with ``status``, streaming or not; nothing
            else of the reply is used but ``retry_after_s`` and ``delay_s``.
        wrong_shape: Answer 200 with valid JSON of the wrong shape: a choice without its
            ``message`` (a stream: a chunk's choice without ``delta``), ``choices`` a string,
            or a ``content`` that is a number. Usage is sent as ``usage`` says.
        cut_after_chunks: Cut the reply off mid-body: a stream sends its first
            ``cut_after_chunks`` chunks (the role chunk counts), a plain reply its headers and
            the first half of its body; then :attr:`cut` happens.
        cut: ``"drop"`` closes the connection; ``"stall"`` sends nothing more (for up to
            :data:`STALL_S`, until the client gives up or the server stops), then drops it.
    """

    text: str = ""
    usage: Usage | Literal["auto"] | None = "auto"
    finish_reason: FinishReason = "stop"
    status: int = 200
    retry_after_s: float | None = None
    delay_s: float = 0.0
    malformed: bool = False
    json_body: dict[str, Any] | None = None
    wrong_shape: WrongShape | None = None
    cut_after_chunks: int | None = None
    cut: Cut = "drop"

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status (100-599), got {self.status}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        kinds = [self.malformed, self.json_body is not None, self.wrong_shape is not None]
        if sum(kinds) > 1:
            raise ValueError("a reply is either malformed, a json_body or a wrong_shape, not two")
        if self.cut_after_chunks is not None and self.cut_after_chunks < 0:
            raise ValueError(f"cut_after_chunks must be >= 0, got {self.cut_after_chunks}")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One HTTP request the server received, as it arrived.

    Attributes:
        method: The HTTP method, upper case.
        path: The URL path, without the query string.
        headers: The headers, keys in lower case (so ``headers["authorization"]``).
        body: The body parsed as JSON if it is a JSON object, else ``None``.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


class Responder(Protocol):
    """Builds the reply to a request; used when the script's queue is empty."""

    def __call__(self, request: RecordedRequest) -> Reply:
        """The reply to send to ``request``."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a reply becomes for one request: the text sent, why it ended, the usage sent."""

    text: str
    finish_reason: FinishReason
    usage: Usage | None


def _message_text(content: object) -> str:
    # Content is a string, or a list of parts of which only the text parts carry words.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of a request: for each message, 4 plus the words of its text content.

    Words are whitespace-separated (``str.split()``); a message's text is its ``content``
    string, or the ``text`` of its content parts joined. Other fields count nothing.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        PER_MESSAGE_TOKENS
        + (len(_message_text(m.get("content")).split()) if isinstance(m, dict) else 0)
        for m in messages
    )


def token_limit(body: dict[str, Any]) -> int | None:
    """The request's ``max_completion_tokens``, else its ``max_tokens``, else ``None``."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        # bool is an int subclass; a JSON true is no limit.
        if isinstance(value, int) and not isinstance(value, bool):
            return max(value, 0)
    return None


def shape(reply: Reply, body: dict[str, Any]) -> Outcome:
    """Apply the request's token limit and usage rule to a successful reply.

    If the text has more whitespace-separated words than the limit, only the first ``limit``
    words are sent, joined by single spaces, and the finish reason becomes ``"length"``.
    With ``usage="auto"``, ``prompt_tokens`` is :func:`prompt_tokens` of the request and
    ``completion_tokens`` the number of words sent.
    """
    text, finish_reason = reply.text, reply.finish_reason
    words = text.split()
    limit = token_limit(body)
    if limit is not None and len(words) > limit:
        words = words[:limit]
        text, finish_reason = " ".join(words), "length"
    if reply.usage == "auto":
        usage: Usage | None = Usage(prompt_tokens=prompt_tokens(body), completion_tokens=len(words))
    else:
        usage = reply.usage
    return Outcome(text=text, finish_reason=finish_reason, usage=usage)


def completion_json(
    *, outcome: Outcome, model: str, completion_id: str, created: int
) -> dict[str, Any]:
    """A ``chat.completion`` object as OpenAI sends it."""
    payload: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.text},
                "finish_reason": outcome.finish_reason,
            }
        ],
    }
    if outcome.usage is not None:
        payload["usage"] = outcome.usage.to_json()
    return payload


def stream_events(
    *, outcome: Outcome, model: str, completion_id: str, created: int, include_usage: bool
) -> list[bytes]:
    """The SSE events of a streamed completion, ``data: [DONE]`` last.

    A role chunk, one chunk per word (with its trailing whitespace), a chunk with the finish
    reason; then, if ``include_usage`` and the outcome has usage, a chunk with empty
    ``choices`` and the usage. As OpenAI does, with ``include_usage`` every other chunk
    carries ``"usage": null``.
    """
    base: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if include_usage:
        base["usage"] = None

    def event(choices: list[dict[str, Any]]) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices}).encode() + b"\n\n"

    def choice(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}

    events = [event([choice({"role": "assistant", "content": ""})])]
    events.extend(event([choice({"content": p})]) for p in _PIECE.findall(outcome.text) if p)
    events.append(event([choice({}, outcome.finish_reason)]))
    if include_usage and outcome.usage is not None:
        base["usage"] = outcome.usage.to_json()
        events.append(event([]))
    events.append(b"data: [DONE]\n\n")
    return events


def error_json(*, status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error body for ``status``; ``message`` defaults to one naming it."""
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    elif status >= 500:
        kind, code = "server_error", None
    else:
        kind, code = "invalid_request_error", "invalid_api_key" if status == 401 else None
    return {
        "error": {
            "message": message or f"scripted error (HTTP {status})",
            "type": kind,
            "param": None,
            "code": code,
        }
    }


def wrong_shape_json(
    *, shape: WrongShape, outcome: Outcome, model: str, completion_id: str, created: int
) -> dict[str, Any]:
    """A ``chat.completion`` with one field of the wrong shape; the rest as OpenAI sends it."""
    payload = completion_json(
        outcome=outcome, model=model, completion_id=completion_id, created=created
    )
    choice = payload["choices"][0]
    if shape == "choice-without-message":
        del choice["message"]
    elif shape == "choices-string":
        payload["choices"] = outcome.text or "not a list"
    else:
        choice["message"]["content"] = 42
    return payload


def wrong_shape_events(
    *, shape: WrongShape, outcome: Outcome, model: str, completion_id: str, created: int
) -> list[bytes]:
    """A stream whose second chunk has the wrong shape; usage (if any) and ``[DONE]`` follow."""
    base: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    if shape == "choice-without-message":
        bad: Any = [{"index": 0, "finish_reason": None}]
    elif shape == "choices-string":
        bad = outcome.text or "not a list"
    else:
        bad = [{"index": 0, "delta": {"content": 42}, "finish_reason": None}]
    chunks = [{**base, "choices": [role]}, {**base, "choices": bad}]
    if outcome.usage is not None:
        chunks.append({**base, "choices": [], "usage": outcome.usage.to_json()})
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


async def _iterate(
    events: list[bytes], *, cut_after: int | None = None, cut: Cut = "drop", sleep: Sleep
) -> AsyncIterator[bytes]:
    for sent, event in enumerate(events):
        if sent == cut_after:
            break
        yield event
    else:
        return
    if cut == "stall":
        await sleep(STALL_S)
    raise DroppedOnPurpose(f"cut off after {cut_after} chunks")


def json_response(
    payload: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``payload`` as a JSON response."""
    return Response(json.dumps(payload).encode(), status, headers, _JSON)


def error_response(*, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An OpenAI-style error response; see :func:`error_json`."""
    return json_response(error_json(status=status, message=message), status=status, headers=headers)


def respond(
    *,
    reply: Reply,
    body: dict[str, Any],
    completion_id: str,
    created: int,
    sleep: Sleep = asyncio.sleep,
) -> Response:
    """The HTTP response that sends ``reply`` to the chat completion request ``body``.

    ``sleep`` waits out a stalled reply (the server passes one that its stop cuts short).
    """
    headers: dict[str, str] = {}
    if reply.retry_after_s is not None:
        headers["retry-after"] = format(reply.retry_after_s, "g")
    stream = body.get("stream") is True
    if reply.json_body is not None:
        return json_response(reply.json_body, status=reply.status, headers=headers)
    if reply.malformed and stream:
        events = [b"data: " + MALFORMED_BODY + b"\n\n"]
        return StreamingResponse(_iterate(events, sleep=sleep), reply.status, headers, _SSE)
    if reply.malformed:
        return Response(MALFORMED_BODY, reply.status, headers, _JSON)
    if reply.status != 200:
        return error_response(status=reply.status, message=reply.text, headers=headers)
    outcome = shape(reply, body)
    requested_model = body.get("model")
    ids: dict[str, Any] = {
        "model": requested_model if isinstance(requested_model, str) else DEFAULT_MODEL,
        "completion_id": completion_id,
        "created": created,
    }
    if not stream:
        if reply.wrong_shape is not None:
            payload = wrong_shape_json(shape=reply.wrong_shape, outcome=outcome, **ids)
        else:
            payload = completion_json(outcome=outcome, **ids)
        if reply.cut_after_chunks is None:
            return json_response(payload, headers=headers)
        raw = json.dumps(payload).encode()
        halves = [raw[: len(raw) // 2], raw[len(raw) // 2 :]]
        cut_off = _iterate(halves, cut_after=1, cut=reply.cut, sleep=sleep)
        return StreamingResponse(cut_off, 200, headers, _JSON)
    if reply.wrong_shape is not None:
        events = wrong_shape_events(shape=reply.wrong_shape, outcome=outcome, **ids)
    else:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        events = stream_events(outcome=outcome, include_usage=include_usage, **ids)
    cut_after = reply.cut_after_chunks
    return StreamingResponse(
        _iterate(events, cut_after=cut_after, cut=reply.cut, sleep=sleep), 200, headers, _SSE
    )
