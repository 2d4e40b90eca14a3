"""One chat request on the wire: build it, send it, read the reply, report how far it got.

The metered call (:mod:`agents.metered`) decides what an attempt costs from how
far its request got; this module is where that is observed. The HTTP client
built by :func:`http_client` carries a request hook that asks httpcore to trace
the request: when its headers start going out, the attempt's
:class:`~agents.settlement.Progress` is marked ``sent``; each stream chunk and
any usage read are recorded there too, so even a reply that fails halfway is
paid what it reported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import httpx2
import openai
from openai import AsyncOpenAI

from agents.endpoints import Endpoint
from agents.replies import Answer, BadReply, Usage, parse_chunk, parse_completion, parse_usage
from agents.settlement import Progress
from budgets.money import MAX_NANOS

log = logging.getLogger(__name__)

# The attempt whose request this task is sending, for the HTTP layer's trace to report to.
_PROGRESS: ContextVar[Progress | None] = ContextVar("paymaster_attempt", default=None)


async def _watch_sending(request: httpx2.Request) -> None:
    """An httpx2 request hook: mark the attempt's :class:`Progress` sent when headers go out."""
    progress = _PROGRESS.get()
    if progress is None:
        return

    async def trace(event: str, info: Mapping[str, Any]) -> None:
        progress.traced = True
        if event.endswith(".send_request_headers.started"):
            progress.sent = True

    request.extensions["trace"] = trace


def http_client() -> httpx2.AsyncClient:
    """An HTTP client with openai's defaults that reports when a request is sent."""
    return openai.DefaultAsyncHttpxClient(event_hooks={"request": [_watch_sending]})


async def send(
    client: AsyncOpenAI,
    *,
    endpoint: Endpoint,
    messages: Sequence[Mapping[str, str]],
    out_tokens: int,
    params: Mapping[str, Any],
    stream: bool,
    progress: Progress,
) -> Answer:
    """Send one chat request capped at ``out_tokens`` and read the reply into an :class:`Answer`.

    Raises :class:`BadReply` for a 200 reply that is unusable, and whatever the
    client raises otherwise; ``progress`` says how far the request got.
    """
    body: dict[str, Any] = {
        "model": endpoint.model,
        "messages": [dict(m) for m in messages],
        endpoint.max_tokens_param: out_tokens,
        # the thinking bound of a reasoning model (inside out_tokens); response_format,
        # temperature
        **endpoint.reasoning_params(out_tokens),
        **params,
    }
    current = _PROGRESS.set(progress)
    try:
        progress.requested = True
        if stream:
            return await _streamed(client, endpoint=endpoint, body=body, progress=progress)
        # Posted as it is: the body is plain JSON already, and the SDK's typed
        # ``create`` walks every one of its 40-odd parameters (and a plan's JSON
        # schema) through a recursive transform first, about 0.5 ms a call. The
        # SDK still sends it: its client, headers, timeouts and status errors.
        raw = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        data = _decode(raw.content)
        if isinstance(data, Mapping):
            usage = parse_usage(data.get("usage"), endpoint=endpoint.name)
            progress.usage = _priced(endpoint, usage)
        text, finish = parse_completion(data)
        return Answer(text=text, finish_reason=finish, usage=progress.usage)
    finally:
        _PROGRESS.reset(current)


async def _streamed(
    client: AsyncOpenAI, *, endpoint: Endpoint, body: dict[str, Any], progress: Progress
) -> Answer:
    typed = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature"}
    chunks = await client.chat.completions.create(
        **{k: v for k, v in body.items() if k in typed},
        extra_body={k: v for k, v in body.items() if k not in typed} or None,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    finish, has_choices = "stop", False
    async with chunks:  # closes the connection however the loop ends
        async for chunk in chunks:
            data = chunk.to_dict(warnings=False)
            progress.chunks += 1
            if data.get("usage") is not None:
                usage = parse_usage(data["usage"], endpoint=endpoint.name)
                progress.usage = _priced(endpoint, usage)
            got = parse_chunk(data)
            parts.append(got.text)
            finish = got.finish_reason or finish
            has_choices = has_choices or got.has_choices
    if not has_choices:
        raise BadReply("the reply had no choices")
    return Answer(text="".join(parts), finish_reason=finish, usage=progress.usage)


def _decode(content: bytes) -> object:
    try:
        return json.loads(content)
    except ValueError:  # not JSON, or not UTF-8
        raise BadReply("the reply was not valid JSON") from None


def _priced(ep: Endpoint, usage: Usage | None) -> Usage | None:
    """``usage`` if the ledger can record what it costs, else ``None`` (charge the reservation)."""
    if usage is None:
        return None
    cost = ep.cost_nanos(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_tokens=usage.cached_tokens,
    )
    if cost > MAX_NANOS:
        log.warning("endpoint %s reported usage past the ledger's range; charged all", ep.name)
        return None
    return usage
