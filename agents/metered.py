"""The metered call: every model call is reserved in the ledger before it is made.

One call, one attempt at a time:

1. count the prompt, once per endpoint tried (see :mod:`agents.tokens`: an upper
   bound unless the endpoint declares its tokenizer);
2. take the endpoint's concurrency slot (``max_concurrency``): a call waiting
   for one holds nothing in the ledger, so no lease runs out while it waits;
3. reserve prompt + ``max_tokens`` priced at the endpoint's rates. When the
   account cannot cover that only because other calls' reservations are in
   flight, wait for them to settle (in line, up to ``wait_s``, default the
   client's ``admission_wait_s``, and never past the caller's ``deadline``);
   when the money is spent, shrink ``max_tokens`` to what the account could
   cover once they settle (waiting for that), and refuse with
   :class:`~budgets.errors.BudgetExceeded` if not even ``min_output_tokens``
   fit (no HTTP request is made);
4. send the request with exactly the reserved output cap (``max_tokens`` or
   ``max_completion_tokens``, per endpoint);
5. settle the reservation exactly once, in one ``finally``, by the outcome
   table of :mod:`agents.settlement`: usage reported → commit the usage;
   sent but no usable usage (a read timeout, cancelled after sending, a stream
   cut off, a wrong-shaped reply) → charge the reservation, flagged estimated;
   never sent (no connection, refused by the ledger, cancelled before sending)
   or refused with an error status → release. A call made with ``keep_as``
   keeps its reply in the commit that pays for it (one atomic step), so work
   paid for before a crash is found, not bought again (:meth:`MeteredClient.kept`).
   A commit that cannot reach Redis is retried until the reservation's lease
   ends: the server may have billed the call.

Retries happen here and only here, on the outcomes the table marks retryable
(no connection, a timeout or dropped connection before any reply, 429 honouring
``Retry-After``, 5xx), with jittered backoff. Each attempt is reserved and paid
on its own; an attempt the account cannot pay for is not made. A reply that
started arriving is never retried. When an endpoint stays down, the call falls
back to the next endpoint of the same or a higher tier, recorded in the
ledger's event tags.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from openai import AsyncOpenAI

from agents.endpoints import Endpoint, EndpointsConfig
from agents.errors import ModelCallFailed
from agents.redact import scrub
from agents.replies import Answer, Usage
from agents.settlement import RULES, Outcome, Pay, Progress, classify, failure
from agents.tokens import ServerTokenCounter, TokenCounter, counter_for, is_openai_model
from agents.wire import http_client, send
from budgets import Amount, BudgetExceeded, Ledger, Reservation
from budgets.errors import LedgerUnavailable, UnknownReservation
from budgets.ledger import MAX_WAIT_S

log = logging.getLogger(__name__)

#: A commit that cannot reach Redis is tried again after this long, doubling up to the cap.
COMMIT_RETRY_FIRST_S = 0.05
COMMIT_RETRY_MAX_S = 1.0

Message = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class CallResult:
    """What one metered call produced and what it cost.

    ``cached_tokens`` (part of ``input_tokens``) and ``reasoning_tokens`` (part of
    ``output_tokens``) are what the server reported; 0 when it reported none.
    """

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
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    #: The account it was paid from.
    account: str = ""

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
        after = error.retry_after_s if isinstance(error, ModelCallFailed) else None
        if after is not None:
            return min(after, self.max_retry_after_s)
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return random.uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class _Call:
    """The fixed parts of one call on one endpoint, shared by its attempts."""

    endpoint: Endpoint
    task_id: str
    account: str
    messages: Sequence[Message]
    max_tokens: int
    min_tokens: int
    prompt_tokens: int
    params: Mapping[str, Any]
    tags: Mapping[str, str]
    stream: bool
    keep_as: str | None = None
    #: ``time.monotonic()`` by which the reservation must be granted.
    admit_until: float = 0.0

    def wait_s(self) -> float:
        """What is left of the call's admission wait."""
        return max(0.0, self.admit_until - time.monotonic())


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
        admission_wait_s: float = 3.0,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self._env = dict(env)
        self._retry = retry or RetryPolicy()
        self._lease_s = lease_s
        self._min_output = min_output_tokens
        if not 0 <= admission_wait_s <= MAX_WAIT_S:
            raise ValueError(f"admission_wait_s must be in [0, {MAX_WAIT_S}]: {admission_wait_s}")
        self._admission_wait_s = admission_wait_s
        self._counters = dict(counters or {})
        self._injected = frozenset(self._counters)
        self._tokenizers: dict[tuple[str, str | bool | None], TokenCounter] = {}
        self._server_counters: dict[str, ServerTokenCounter] = {}
        self._count_http: httpx.AsyncClient | None = None
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
                http_client=http_client(),
            )
            self._clients[endpoint.name] = found
        return found

    def counter(self, endpoint: Endpoint) -> TokenCounter:
        """How prompts for this endpoint are counted without a request (quotes).

        For ``tokenizer = "server"`` this is the byte bound the server count falls
        back to: never less than what a call reserves. Endpoints that count the
        same way share one counter (a tokenizer is loaded once).
        """
        found = self._counters.get(endpoint.name)
        if found is None:
            spec = _counting(endpoint)
            found = self._tokenizers.get(spec)
            if found is None:
                found = self._tokenizers[spec] = counter_for(
                    endpoint.model, tokenizer=endpoint.tokenizer, remote=endpoint.kind == "remote"
                )
            self._counters[endpoint.name] = found
        return found

    async def count_prompt(
        self,
        endpoint: Endpoint,
        messages: Sequence[Message],
        *,
        counted: dict[object, int] | None = None,
    ) -> int:
        """The prompt tokens a call to ``endpoint`` reserves for ``messages``.

        ``counted`` remembers counts across the endpoints one call tries: an
        endpoint that counts the way an earlier one did reuses its count.
        """
        server = endpoint.tokenizer == "server" and endpoint.name not in self._injected
        key: object = ("server", endpoint.base_url) if server else id(self.counter(endpoint))
        if counted is not None and key in counted:
            return counted[key]
        if not server:
            count = self.counter(endpoint).count_messages(messages)
        else:
            found = self._server_counters.get(endpoint.name)
            if found is None:
                if self._count_http is None:
                    self._count_http = httpx.AsyncClient()
                found = ServerTokenCounter(
                    base_url=endpoint.base_url,
                    client=self._count_http,
                    fallback=self.counter(endpoint),
                )
                self._server_counters[endpoint.name] = found
            count = await found.count_messages(messages)
        if counted is not None:
            counted[key] = count
        return count

    def quote(
        self, *, endpoint: str | None, messages: Sequence[Message], output_tokens: int
    ) -> Amount:
        """What a call would reserve at most: the counted prompt plus ``output_tokens``, priced.

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
        if self._count_http is not None:
            await self._count_http.aclose()
            self._count_http = None
        self._server_counters.clear()

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
        keep_as: str | None = None,
        wait_s: float | None = None,
        deadline: float | None = None,
    ) -> CallResult:
        """Make one chat call paid from ``account``; see the module docstring for the steps.

        ``min_tokens`` is the least output worth paying for when the account
        cannot cover ``max_tokens`` (default: the client's ``min_output_tokens``).
        ``keep_as`` names the call's work: its reply is kept by the commit that
        pays for it, in the same atomic step, and :meth:`kept` returns it — a
        caller that crashed after paying finds the reply instead of paying twice.
        Raises :class:`BudgetExceeded` when the account cannot pay for an
        attempt, and :class:`ModelCallFailed` when every endpoint tried failed.
        ``wait_s`` bounds how long the call waits for money held by calls in
        flight (default: the client's ``admission_wait_s``); ``deadline`` (a
        ``time.monotonic()`` value, such as the task's) bounds it too.
        A cancelled call settles its attempt and re-raises ``CancelledError``.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        floor = self._min_output if min_tokens is None else min_tokens
        if floor < 1:
            raise ValueError(f"min_tokens must be at least 1, got {floor}")
        wait = self._admission_wait_s if wait_s is None else wait_s
        if not 0 <= wait <= MAX_WAIT_S:
            raise ValueError(f"wait_s must be in [0, {MAX_WAIT_S}], got {wait}")
        admit_until = time.monotonic() + wait
        if deadline is not None:
            admit_until = min(admit_until, deadline)
        params: dict[str, Any] = {}
        if response_format is not None:
            params["response_format"] = dict(response_format)
        if temperature is not None:
            params["temperature"] = temperature
        first = self.config.get(endpoint) if endpoint else self.config.default_endpoint
        chain = self.config.ordered_fallbacks(first.name) if fallback else [first]
        last_error: ModelCallFailed | None = None
        counted: dict[object, int] = {}  # the prompt is counted once per way of counting
        for hop, ep in enumerate(chain):
            call_tags = dict(tags or {})
            call_tags.update(endpoint=ep.name, model=ep.model, kind=ep.kind)
            if hop:
                call_tags["fallback_from"] = first.name
            call = _Call(
                endpoint=ep,
                task_id=task_id,
                account=account,
                messages=messages,
                max_tokens=max_tokens,
                min_tokens=floor,
                prompt_tokens=await self.count_prompt(ep, messages, counted=counted),
                params=params,
                tags=call_tags,
                stream=stream,
                keep_as=keep_as,
                admit_until=admit_until,
            )
            try:
                return await self._with_retries(call=call)
            except ModelCallFailed as e:
                if not e.transient:
                    raise
                last_error = e
                if hop + 1 < len(chain):
                    log.warning("endpoint %s failed (%s); trying the next one", ep.name, e.reason)
        assert last_error is not None
        raise last_error

    async def _with_retries(self, *, call: _Call) -> CallResult:
        ep = call.endpoint
        attempts = max(1, min(self._retry.attempts, ep.max_retries + 1))
        for attempt in range(1, attempts + 1):
            try:
                return await self._attempt(call=call, attempt=attempt)
            except ModelCallFailed as e:
                if not e.transient or attempt >= attempts:
                    raise
                delay = self._retry.delay_s(attempt - 1, e)
                log.info("retrying %s in %.2fs after %s", ep.name, delay, e.reason)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, *, call: _Call, attempt: int) -> CallResult:
        """One attempt: slot, reserve, send, and settle exactly once by the outcome table."""
        rid = uuid.uuid4().hex  # ours, so a reserve cut off by a cancel can still be released
        progress = Progress()
        reservation: Reservation | None = None
        answer: Answer | None = None
        outcome: Outcome | None = None
        async with self._gate(call.endpoint):
            try:
                reservation = await self._reserve(call=call, reservation_id=rid)
                out_tokens = reservation.tokens - call.prompt_tokens
                answer = await send(
                    self.client(call.endpoint),
                    endpoint=call.endpoint,
                    messages=call.messages,
                    out_tokens=out_tokens,
                    params=call.params,
                    stream=call.stream,
                    progress=progress,
                )
                outcome = Outcome.REPLY
            except BaseException as error:
                outcome = classify(error, progress=progress)
                typed = failure(outcome, error, endpoint=call.endpoint.name, progress=progress)
                if typed is None:
                    raise
                raise typed from scrub(error)
            finally:
                if outcome is None:  # classify itself failed: settle by how far the request got
                    sent = progress.may_have_sent
                    outcome = Outcome.FAILED_AFTER_SEND if sent else Outcome.FAILED_BEFORE_SEND
                # Shielded: a second cancel must not leave the reservation open.
                settled = await asyncio.shield(
                    self._settle(
                        call=call,
                        reservation_id=rid,
                        reservation=reservation,
                        outcome=outcome,
                        usage=progress.usage,
                        answer=answer if outcome is Outcome.REPLY else None,
                        attempt=attempt,
                    )
                )
        assert settled is not None  # a reply was committed
        return settled

    async def kept(self, task_id: str, name: str) -> CallResult | None:
        """The reply of the call made with ``keep_as=name`` and paid for, or ``None``."""
        text = await self.ledger.kept(task_id, name)
        return None if text is None else CallResult(**json.loads(text))

    async def _settle(
        self,
        *,
        call: _Call,
        reservation_id: str,
        reservation: Reservation | None,
        outcome: Outcome,
        usage: Usage | None,
        answer: Answer | None,
        attempt: int,
    ) -> CallResult | None:
        """Pay one attempt as :data:`~agents.settlement.RULES` says.

        Returns the call's result when it answered (``answer``), else ``None``.
        ``reservation=None`` means the reserve did not return: it may still have
        run (a cancel cut it off), so the release is sent anyway and an unknown
        reservation is no error.
        """
        held = reservation is not None
        pay = RULES[outcome].pay(usage)
        if pay is Pay.NOTHING:
            return None
        if pay is Pay.RELEASE:
            try:
                await self.ledger.release(call.task_id, reservation_id, reason=outcome.value)
            except UnknownReservation:
                if held:
                    raise
            return None
        used = None
        if pay is Pay.USAGE and usage is not None:
            cost = call.endpoint.cost_nanos(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens,
            )
            used = Amount(tokens=usage.tokens, nanos=cost)
        result = keep = None
        if answer is not None and reservation is not None:
            # What the commit will charge: the usage, else the whole reservation.
            nanos = reservation.nanos if used is None else used.nanos
            result = _result(
                call=call,
                out_tokens=reservation.tokens - call.prompt_tokens,
                answer=answer,
                nanos=nanos,
                estimated=used is None,
                attempt=attempt,
            )
            if call.keep_as is not None:
                # Its fields are plain values: no deep copy (dataclasses.asdict) needed.
                keep = (call.keep_as, json.dumps({f: getattr(result, f) for f in _RESULT_FIELDS}))
        assert reservation is not None  # what is charged was held
        await self._commit(call, reservation, used=used, keep=keep)
        return result

    async def _commit(
        self,
        call: _Call,
        reservation: Reservation,
        *,
        used: Amount | None,
        keep: tuple[str, str] | None,
    ) -> None:
        """Commit, retrying while Redis is unreachable until the reservation's lease ends.

        The server may have billed the call: its commit outlasts an outage the
        ledger's own client gave up on. Past the lease the error propagates; the
        reservation has expired unspent by then, and a task delivered again
        runs the call again.
        """
        delay_s = COMMIT_RETRY_FIRST_S
        while True:
            try:
                await self.ledger.commit(
                    call.task_id, reservation.id, used=used, tags=call.tags, keep=keep
                )
                return
            except LedgerUnavailable:
                if time.time() + delay_s >= reservation.deadline_ms / 1000:
                    raise
                log.info(
                    "commit of %s waits for Redis (retrying in %.2fs)", reservation.id, delay_s
                )
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, COMMIT_RETRY_MAX_S)

    async def _reserve(self, *, call: _Call, reservation_id: str) -> Reservation:
        ep, prompt = call.endpoint, call.prompt_tokens
        # A caller asking for fewer tokens than the minimum gets what it asked for.
        floor = min(call.min_tokens, call.max_tokens)
        out = min(call.max_tokens, ep.context_window - prompt)
        if out < floor:
            raise BudgetExceeded(
                task_id=call.task_id, account=call.account, unit="tokens",
                requested=prompt + floor, available=ep.context_window,
            )  # fmt: skip
        try:
            return await self._hold(call=call, reservation_id=reservation_id, out_tokens=out)
        except BudgetExceeded:
            # The money is spent (or the wait ran out): shrink max_tokens to what
            # the account can cover, in both units, once the holds in flight
            # settle if there is time left to wait for them, else now.
            view = await self.ledger.account(call.task_id, call.account)
            waiting = call.wait_s() > 0
            fit = out
            if view.available_tokens is not None:
                held = view.reserved_tokens if waiting else 0
                fit = min(fit, view.available_tokens + held - prompt)
            if view.available_nanos is not None:
                held = view.reserved_nanos if waiting else 0
                fit = min(fit, _affordable_output(ep, prompt, view.available_nanos + held))
            if fit < floor:
                raise
            return await self._hold(call=call, reservation_id=reservation_id, out_tokens=fit)

    async def _hold(self, *, call: _Call, reservation_id: str, out_tokens: int) -> Reservation:
        prompt = call.prompt_tokens
        return await self.ledger.reserve(
            call.task_id,
            call.account,
            tokens=prompt + out_tokens,
            nanos=call.endpoint.price.cost_nanos(input_tokens=prompt, output_tokens=out_tokens),
            lease_s=self._lease_s,
            reservation_id=reservation_id,
            tags=call.tags,
            wait_s=call.wait_s(),
        )

    def _gate(self, ep: Endpoint) -> asyncio.Semaphore:
        gate = self._gates.get(ep.name)
        if gate is None:
            gate = self._gates[ep.name] = asyncio.Semaphore(ep.max_concurrency)
        return gate


_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(CallResult))


def _result(
    *, call: _Call, out_tokens: int, answer: Answer, nanos: int, estimated: bool, attempt: int
) -> CallResult:
    usage = answer.usage
    if estimated or usage is None:
        usage = Usage(input_tokens=call.prompt_tokens, output_tokens=out_tokens)
    return CallResult(
        text=answer.text,
        finish_reason=answer.finish_reason,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_nanos=nanos,
        estimated=estimated,
        account=call.account,
        endpoint=call.endpoint.name,
        model=call.endpoint.model,
        attempts=attempt,
        max_tokens=out_tokens,
        cached_tokens=usage.cached_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )


def _counting(ep: Endpoint) -> tuple[str, str | bool | None]:
    """What decides how ``ep`` counts prompts: its declared tokenizer, else its guess."""
    if ep.tokenizer is not None:
        return ("declared", ep.tokenizer)
    return ("guessed", ep.kind == "remote" and is_openai_model(ep.model))


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
