"""The metered call: every model call is reserved in the ledger before it is made.

One call, one attempt at a time:

1. count the prompt (before anything is sent);
2. reserve prompt + ``max_tokens`` priced at the endpoint's rates; if the
   account cannot cover that, shrink ``max_tokens`` to what it can cover, and
   refuse with :class:`~budgets.errors.BudgetExceeded` if not even
   ``min_output_tokens`` fit (no HTTP request is made);
3. send the request with exactly the reserved ``max_tokens``;
4. commit the usage the server reports (or, with none or unusable counts, the
   whole reservation, flagged estimated); release the reservation if the
   request failed before the server could have done any work (no connection,
   an error status). A timeout, or a 200 reply that is not valid JSON, has no
   choices or carries an error event, may have been billed: it is charged,
   estimated, and the last three raise :class:`~agents.errors.ModelCallFailed`.

Retries happen here and only here, on named transient errors (connection
errors, timeouts, 429 honouring ``Retry-After``, 5xx), with jittered backoff.
Each attempt is reserved and paid on its own; an attempt the account cannot pay
for is not made. When an endpoint stays down, the call falls back to the next
endpoint of the same or a higher tier, recorded in the ledger's event tags.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import openai
from openai import AsyncOpenAI

from agents.endpoints import Endpoint, EndpointsConfig
from agents.errors import ModelCallFailed
from agents.tokens import TokenCounter, counter_for
from budgets import Amount, BudgetExceeded, Ledger, Reservation
from budgets.money import MAX_NANOS, MAX_TOKENS

log = logging.getLogger(__name__)

Message = Mapping[str, str]
_TRANSIENT = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    openai.InternalServerError,
)


@dataclass(frozen=True, slots=True)
class CallResult:
    """What one metered call produced and what it cost."""

    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    estimated: bool
    endpoint: str
    model: str
    attempts: int
    max_tokens: int

    @property
    def cut_short(self) -> bool:
        """True when the model stopped because it hit ``max_tokens``."""
        return self.finish_reason == "length"

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient failures are retried; ``attempts=1`` turns retries off (tests)."""

    attempts: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 30.0

    def delay_s(self, attempt: int, error: BaseException) -> float:
        """Seconds to wait before attempt ``attempt + 1``: Retry-After if given, else jitter."""
        after = _retry_after_s(error)
        if after is not None:
            return min(after, self.max_retry_after_s)
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return random.uniform(0, ceiling)


def _retry_after_s(error: BaseException) -> float | None:
    if not isinstance(error, openai.APIStatusError):
        return None
    raw = error.response.headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


class MeteredClient:
    """Calls model endpoints and pays for every call from the ledger.

    One ``AsyncOpenAI`` client per endpoint, built on first use and reused;
    one semaphore per endpoint caps concurrent calls at its ``max_concurrency``.
    """

    def __init__(
        self,
        *,
        ledger: Ledger,
        config: EndpointsConfig,
        env: Mapping[str, str],
        retry: RetryPolicy | None = None,
        lease_s: float = 300.0,
        min_output_tokens: int = 16,
        counters: Mapping[str, TokenCounter] | None = None,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self._env = dict(env)
        self._retry = retry or RetryPolicy()
        self._lease_s = lease_s
        self._min_output = min_output_tokens
        self._counters = dict(counters or {})
        self._clients: dict[str, AsyncOpenAI] = {}
        self._gates: dict[str, asyncio.Semaphore] = {}

    def client(self, endpoint: Endpoint) -> AsyncOpenAI:
        """The endpoint's shared client (retries off: this module retries)."""
        found = self._clients.get(endpoint.name)
        if found is None:
            found = AsyncOpenAI(
                base_url=endpoint.base_url,
                api_key=endpoint.api_key(self._env) or "not-needed",
                timeout=endpoint.timeout_s,
                max_retries=0,
            )
            self._clients[endpoint.name] = found
        return found

    def counter(self, endpoint: Endpoint) -> TokenCounter:
        """How prompts for this endpoint are counted before a call."""
        found = self._counters.get(endpoint.name)
        if found is None:
            found = self._counters[endpoint.name] = counter_for(endpoint.model)
        return found

    def quote(
        self, *, endpoint: str | None, messages: Sequence[Message], output_tokens: int
    ) -> Amount:
        """What a call would reserve: the counted prompt plus ``output_tokens``, priced.

        No request is made and nothing is reserved; callers use it to size an
        account before they open it.
        """
        ep = self.config.get(endpoint) if endpoint else self.config.default_endpoint
        prompt = self.counter(ep).count_messages(messages)
        nanos = ep.price.cost_nanos(input_tokens=prompt, output_tokens=output_tokens)
        return Amount(tokens=prompt + output_tokens, nanos=nanos)

    async def aclose(self) -> None:
        """Close every HTTP client."""
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def chat(
        self,
        *,
        task_id: str,
        account: str,
        messages: Sequence[Message],
        max_tokens: int,
        endpoint: str | None = None,
        response_format: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        fallback: bool = True,
        stream: bool = False,
        min_tokens: int | None = None,
        temperature: float | None = None,
    ) -> CallResult:
        """Make one chat call paid from ``account``; see the module docstring for the steps.

        ``min_tokens`` is the least output worth paying for when the account
        cannot cover ``max_tokens`` (default: the client's ``min_output_tokens``).
        Raises :class:`BudgetExceeded` when the account cannot pay for an
        attempt, and :class:`ModelCallFailed` when every endpoint tried failed.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        floor = self._min_output if min_tokens is None else min_tokens
        extra: dict[str, Any] = {}
        if response_format is not None:
            extra["response_format"] = dict(response_format)
        if temperature is not None:
            extra["temperature"] = temperature
        if floor < 1:
            raise ValueError(f"min_tokens must be at least 1, got {floor}")
        first = self.config.get(endpoint) if endpoint else self.config.default_endpoint
        chain = self.config.ordered_fallbacks(first.name) if fallback else [first]
        last_error: BaseException | None = None
        for hop, ep in enumerate(chain):
            call_tags = dict(tags or {})
            call_tags.update(endpoint=ep.name, model=ep.model, kind=ep.kind)
            if hop:
                call_tags["fallback_from"] = first.name
            try:
                return await self._with_retries(
                    ep, task_id, account, messages, max_tokens, extra, call_tags, stream,
                    floor,
                )  # fmt: skip
            except ModelCallFailed as e:
                if not e.transient:
                    raise
                last_error = e
                if hop + 1 < len(chain):
                    log.warning("endpoint %s failed (%s); trying the next one", ep.name, e.reason)
        assert last_error is not None
        raise last_error

    async def _with_retries(
        self,
        ep: Endpoint,
        task_id: str,
        account: str,
        messages: Sequence[Message],
        max_tokens: int,
        extra: Mapping[str, Any],
        tags: dict[str, str],
        stream: bool,
        floor: int,
    ) -> CallResult:
        attempts = max(1, min(self._retry.attempts, ep.max_retries + 1))
        for attempt in range(attempts):
            try:
                return await self._attempt(
                    ep, task_id, account, messages, max_tokens, extra, tags, stream,
                    attempt + 1, floor,
                )  # fmt: skip
            except _TRANSIENT as e:
                if attempt + 1 >= attempts:
                    raise ModelCallFailed(ep.name, _describe(e), transient=True) from e
                delay = self._retry.delay_s(attempt, e)
                log.info("retrying %s in %.2fs after %s", ep.name, delay, _describe(e))
                await asyncio.sleep(delay)
            except openai.APIStatusError as e:  # 4xx other than 429: not worth retrying
                raise ModelCallFailed(ep.name, _describe(e), transient=False) from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def _reserve(
        self, ep: Endpoint, task_id: str, account: str, prompt: int, max_tokens: int,
        tags: dict[str, str], least: int,
    ) -> Reservation:  # fmt: skip
        price = ep.price
        # A caller asking for fewer tokens than the minimum gets what it asked for.
        floor = min(least, max_tokens)
        out = min(max_tokens, ep.context_window - prompt)
        if out < floor:
            raise BudgetExceeded(
                task_id=task_id, account=account, unit="tokens",
                requested=prompt + floor, available=ep.context_window,
            )  # fmt: skip
        try:
            return await self.ledger.reserve(
                task_id, account, tokens=prompt + out,
                nanos=price.cost_nanos(input_tokens=prompt, output_tokens=out),
                lease_s=self._lease_s, tags=tags,
            )  # fmt: skip
        except BudgetExceeded:
            # Shrink max_tokens to what the account can still cover, in both units.
            view = await self.ledger.account(task_id, account)
            fit = out
            if view.available_tokens is not None:
                fit = min(fit, view.available_tokens - prompt)
            if view.available_nanos is not None:
                fit = min(fit, _affordable_output(ep, prompt, view.available_nanos))
            if fit < floor:
                raise
            return await self.ledger.reserve(
                task_id, account, tokens=prompt + fit,
                nanos=price.cost_nanos(input_tokens=prompt, output_tokens=fit),
                lease_s=self._lease_s, tags=tags,
            )  # fmt: skip

    async def _attempt(
        self, ep: Endpoint, task_id: str, account: str, messages: Sequence[Message],
        max_tokens: int, extra: Mapping[str, Any], tags: dict[str, str],
        stream: bool, attempt: int, floor: int,
    ) -> CallResult:  # fmt: skip
        prompt = self.counter(ep).count_messages(messages)
        res = await self._reserve(ep, task_id, account, prompt, max_tokens, tags, floor)
        out_tokens = res.tokens - prompt
        body: dict[str, Any] = {
            "model": ep.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": out_tokens,
        }
        body.update(extra)  # response_format, temperature
        try:
            async with self._gate(ep):
                answer = await self._send(ep, body, stream)
        except openai.APITimeoutError:
            # The server may have done (and billed) the work: charge the
            # reservation, flagged estimated, rather than hide it.
            await self.ledger.commit(task_id, res.id, used=None, tags=tags)
            raise
        except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
            # The server answered 200, so it did the work: charge it, estimated.
            await self.ledger.commit(task_id, res.id, used=None, tags=tags)
            raise ModelCallFailed(ep.name, "the reply was not valid JSON", transient=False) from e
        except (openai.APIConnectionError, openai.APIStatusError):
            await self.ledger.release(task_id, res.id, reason="call failed")
            raise
        except openai.APIError as e:
            # An error event inside a streamed 200 reply: the work was (partly) done.
            await self.ledger.commit(task_id, res.id, used=None, tags=tags)
            reason = f"the reply reported an error: {e.message[:200]}"
            raise ModelCallFailed(ep.name, reason, transient=False) from e
        except BaseException:
            await self.ledger.release(task_id, res.id, reason="call failed")
            raise
        usage = _checked_usage(ep, answer.usage)
        if usage is None:
            done = await self.ledger.commit(task_id, res.id, used=None, tags=tags)
            in_tokens, out_used, cost, estimated = prompt, out_tokens, done.nanos, True
        else:
            in_tokens, out_used, cost = usage
            await self.ledger.commit(
                task_id, res.id, used=Amount(tokens=in_tokens + out_used, nanos=cost), tags=tags
            )
            estimated = False
        if not answer.has_choices:
            raise ModelCallFailed(ep.name, "the reply had no choices", transient=False)
        return CallResult(
            text=answer.text, finish_reason=answer.finish_reason, input_tokens=in_tokens,
            output_tokens=out_used, cost_nanos=cost, estimated=estimated, endpoint=ep.name,
            model=ep.model, attempts=attempt, max_tokens=out_tokens,
        )  # fmt: skip

    def _gate(self, ep: Endpoint) -> asyncio.Semaphore:
        gate = self._gates.get(ep.name)
        if gate is None:
            gate = self._gates[ep.name] = asyncio.Semaphore(ep.max_concurrency)
        return gate

    async def _send(self, ep: Endpoint, body: dict[str, Any], stream: bool) -> _Answer:
        client = self.client(ep)
        if not stream:
            reply = await client.chat.completions.create(**body)
            u = reply.usage
            usage = None if u is None else (u.prompt_tokens, u.completion_tokens)
            if not reply.choices:
                return _Answer("", "stop", usage, has_choices=False)
            choice = reply.choices[0]
            text, finish = choice.message.content or "", choice.finish_reason or "stop"
            return _Answer(text, finish, usage, has_choices=True)
        chunks = await client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        parts: list[str] = []
        finish, usage, has_choices = "stop", None, False
        async with chunks:  # closes the connection however the loop ends
            async for chunk in chunks:
                for c in chunk.choices or ():
                    has_choices = True
                    if c.delta.content:
                        parts.append(c.delta.content)
                    if c.finish_reason:
                        finish = c.finish_reason
                if chunk.usage is not None:
                    usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        return _Answer("".join(parts), finish, usage, has_choices=has_choices)


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the server sent back: text, finish reason, usage as reported (unchecked)."""

    text: str
    finish_reason: str
    usage: tuple[object, object] | None
    has_choices: bool


def _checked_usage(
    ep: Endpoint, usage: tuple[object, object] | None
) -> tuple[int, int, int] | None:
    """``(input, output, cost_nanos)`` if the reported usage is usable, else ``None`` (estimate).

    A server may send ``null`` or negative counts; the ledger would refuse them
    after the call, leaving the reservation open until its lease ran out.
    """
    if usage is None:
        return None
    prompt, completion = usage
    if _is_count(prompt) and _is_count(completion) and prompt + completion <= MAX_TOKENS:
        cost = ep.price.cost_nanos(input_tokens=prompt, output_tokens=completion)
        if cost <= MAX_NANOS:
            return prompt, completion, cost
    log.warning("endpoint %s reported unusable usage %r; charging the reservation", ep.name, usage)
    return None


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _affordable_output(ep: Endpoint, prompt: int, nanos: int) -> int:
    """The most output tokens ``nanos`` pays for after the prompt (cost rounds up)."""
    price = ep.price
    if price.cost_nanos(input_tokens=prompt, output_tokens=0) > nanos:
        return -1
    lo, hi = 0, 1
    while hi < 10**9 and price.cost_nanos(input_tokens=prompt, output_tokens=hi) <= nanos:
        lo, hi = hi, hi * 2
    while lo + 1 < hi:  # binary search: exact with integer, rounded-up costs
        mid = (lo + hi) // 2
        if price.cost_nanos(input_tokens=prompt, output_tokens=mid) <= nanos:
            lo = mid
        else:
            hi = mid
    return lo


def _describe(error: BaseException) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}"
    return type(error).__name__
