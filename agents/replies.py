"""What a chat server sent back, checked at the edge: a completion, a stream's chunks, usage.

The ``openai`` client builds its reply objects leniently (a ``choices`` that is a
string stays a string), so a wrong-shaped 200 reply would surface later as an
``AttributeError``. Here the decoded JSON is validated against the few fields
Paymaster reads; anything else raises :class:`BadReply`, which the metered call
charges (the server did answer) and turns into a typed
:class:`~agents.errors.ModelCallFailed`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from pydantic import BaseModel, ConfigDict, ValidationError

from budgets.money import MAX_TOKENS

log = logging.getLogger(__name__)


class BadReply(ValueError):
    """A 200 reply that is not a usable chat completion; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts a server reported, checked: whole, non-negative, details within totals.

    ``cached_tokens`` are part of ``input_tokens`` (OpenAI's
    ``prompt_tokens_details.cached_tokens``), ``reasoning_tokens`` part of
    ``output_tokens`` (``completion_tokens_details.reasoning_tokens``).
    """

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def tokens(self) -> int:
        """Input plus output tokens, as the ledger counts them."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Answer:
    """A usable reply: the text, why it ended, and the usage (``None``: none usable)."""

    text: str
    finish_reason: str
    usage: Usage | None


class _Edge(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Message(_Edge):
    content: str | None = None


class _Choice(_Edge):
    message: _Message
    finish_reason: str | None = None


class _Completion(_Edge):
    choices: list[_Choice]


class _Delta(_Edge):
    content: str | None = None


class _DeltaChoice(_Edge):
    delta: _Delta
    finish_reason: str | None = None


class _Chunk(_Edge):
    choices: list[_DeltaChoice] | None = None


def parse_usage(raw: object, *, endpoint: str) -> Usage | None:
    """The usage in a reply's ``usage`` field, or ``None`` if there is none usable.

    A server may send ``null``, negative or missing counts; those are ``None`` (the
    reservation is charged, estimated). Details that do not fit inside their totals
    are ignored (no cached discount, no reasoning count), which never undercharges.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        log.warning("endpoint %s sent usage that is not an object; charging it all", endpoint)
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not (_is_count(prompt) and _is_count(completion)) or prompt + completion > MAX_TOKENS:
        log.warning("endpoint %s sent unusable usage counts; charging it all", endpoint)
        return None
    cached = _detail(
        raw, "prompt_tokens_details", "cached_tokens", within=prompt, endpoint=endpoint
    )
    reasoning = _detail(
        raw, "completion_tokens_details", "reasoning_tokens", within=completion, endpoint=endpoint
    )
    return Usage(prompt, completion, cached, reasoning)


def _detail(raw: Mapping[str, Any], group: str, name: str, *, within: int, endpoint: str) -> int:
    details = raw.get(group)
    if details is None:
        return 0
    value = details.get(name) if isinstance(details, Mapping) else None
    if value is None:
        return 0
    if _is_count(value) and value <= within:
        return value
    log.warning("endpoint %s sent an unusable %s.%s; ignoring it", endpoint, group, name)
    return 0


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_completion(data: object) -> tuple[str, str]:
    """``(text, finish_reason)`` of a decoded ``chat.completion``; :class:`BadReply` if unusable."""
    if not isinstance(data, Mapping):
        raise BadReply("the reply was not a JSON object")
    if not data.get("choices"):
        raise BadReply("the reply had no choices")
    try:
        completion = _Completion.model_validate(data)
    except ValidationError as e:
        raise BadReply(f"the reply was not a chat completion ({_where(e)})") from None
    choice = completion.choices[0]
    return choice.message.content or "", choice.finish_reason or "stop"


@dataclass(frozen=True, slots=True)
class ChunkParts:
    """What one stream chunk adds: text, a finish reason, and whether it had choices."""

    text: str
    finish_reason: str | None
    has_choices: bool


def parse_chunk(data: object) -> ChunkParts:
    """The parts of a decoded ``chat.completion.chunk``; :class:`BadReply` if it is wrong-shaped."""
    if not isinstance(data, Mapping):
        raise BadReply("a stream chunk was not a JSON object")
    try:
        chunk = _Chunk.model_validate(data)
    except ValidationError as e:
        raise BadReply(f"a stream chunk was not a completion chunk ({_where(e)})") from None
    choices = chunk.choices or []
    text = "".join(c.delta.content or "" for c in choices)
    finish = next((c.finish_reason for c in choices if c.finish_reason), None)
    return ChunkParts(text=text, finish_reason=finish, has_choices=bool(choices))


def _where(error: ValidationError) -> str:
    # Field path and pydantic's message only: the input value may be provider text.
    first = error.errors(include_url=False, include_input=False)[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    return f"{loc}: {first['msg']}" if loc else str(first["msg"])
