"""The metered call against a real Redis ledger, the scripted server and the real openai client.

Every test reads back what the ledger recorded: a call's cost must match the
usage the server reported, to the nano-dollar, and every reservation must end
committed or released.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from decimal import Decimal
from typing import Any

import pytest

from agents.endpoints import Endpoint, EndpointsConfig
from agents.errors import ModelCallFailed
from agents.metered import CallResult, MeteredClient, RetryPolicy
from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer, Usage
from agents.tokens import counter_for
from budgets import Budget, BudgetExceeded, Ledger
from budgets.money import Price
from budgets.tree import AccountView, LedgerEvent
from orchestrator.redis_server import free_port

TASK = "task-metered"
ACCOUNT = "root"
MODEL = "stub-model"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three primes."},
]
#: What MeteredClient reserves for MESSAGES' prompt (the byte bound: "stub-model" is not OpenAI's).
PROMPT = counter_for(MODEL).count_messages(MESSAGES)
#: Odd prices, so every cost is rounded up and an off-by-one shows.
PRICE_IN, PRICE_OUT = Decimal("0.1234567"), Decimal("0.7654321")
PRICE = Price.of(PRICE_IN, PRICE_OUT)
FAST = RetryPolicy(attempts=3, backoff_s=0.01)
MIN_OUTPUT = 16
SECRET = "sk-test-DO-NOT-LEAK-4f1b9c"

Build = Callable[..., MeteredClient]


def endpoint(base_url: str, **overrides: Any) -> Endpoint:
    """A remote endpoint at ``base_url`` with the test prices; ``overrides`` replace fields."""
    fields: dict[str, Any] = {
        "name": "stub",
        "base_url": base_url,
        "model": MODEL,
        "kind": "remote",
        "input_usd_per_mtok": PRICE_IN,
        "output_usd_per_mtok": PRICE_OUT,
        "timeout_s": 5.0,
        "max_concurrency": 8,
    }
    fields.update(overrides)
    return Endpoint(**fields)


def full_cost(max_tokens: int) -> int:
    """What a reservation of PROMPT plus ``max_tokens`` holds, in nano-dollars."""
    return PRICE.cost_nanos(input_tokens=PROMPT, output_tokens=max_tokens)


async def chat(client: MeteredClient, **overrides: Any) -> CallResult:
    """One metered call on the test task with the test messages."""
    kwargs: dict[str, Any] = {
        "task_id": TASK,
        "account": ACCOUNT,
        "messages": MESSAGES,
        "max_tokens": 100,
    }
    kwargs.update(overrides)
    return await client.chat(**kwargs)


async def root(ledger: Ledger) -> AccountView:
    return await ledger.account(TASK, ACCOUNT)


async def call_events(ledger: Ledger) -> list[LedgerEvent]:
    """The task's reserve, commit and release events, oldest first."""
    return [
        e for e in await ledger.events(TASK) if e.op in ("reserve", "commit", "release", "overrun")
    ]


def ops(events: list[LedgerEvent]) -> list[str]:
    return [e.op for e in events]


async def assert_settled(ledger: Ledger) -> AccountView:
    """No reservation is left open; returns the account."""
    acct = await root(ledger)
    assert (acct.reserved_tokens, acct.reserved_nanos, acct.open_reservations) == (0, 0, 0)
    return acct


@pytest.fixture
async def build(ledger: Ledger) -> AsyncIterator[Build]:
    """Builds MeteredClients on the test ledger; closes them all after the test."""
    made: list[MeteredClient] = []

    def make(
        *endpoints: Endpoint,
        env: Mapping[str, str] | None = None,
        retry: RetryPolicy = FAST,
        min_output_tokens: int = MIN_OUTPUT,
    ) -> MeteredClient:
        config = EndpointsConfig(endpoints=list(endpoints))
        client = MeteredClient(
            ledger=ledger,
            config=config,
            env=env or {},
            retry=retry,
            min_output_tokens=min_output_tokens,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


async def open_task(ledger: Ledger, *, tokens: int | None = None, nanos: int | None = None) -> None:
    await ledger.open_task(TASK, Budget.from_nanos(tokens=tokens, nanos=nanos))


# -- what is charged ---------------------------------------------------------------------------


async def test_ledger_matches_the_reported_usage_exactly(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push(Reply(text="two three five", usage=Usage(prompt_tokens=37, completion_tokens=11)))
    client = build(endpoint(server.base_url))

    result = await chat(client, max_tokens=200, tags={"step": "plan"})

    assert (result.text, result.finish_reason, result.cut_short) == (
        "two three five",
        "stop",
        False,
    )
    assert (result.input_tokens, result.output_tokens, result.tokens) == (37, 11, 48)
    assert result.cost_nanos == PRICE.cost_nanos(input_tokens=37, output_tokens=11)
    assert (result.estimated, result.attempts, result.max_tokens) == (False, 1, 200)
    assert (result.endpoint, result.model) == ("stub", MODEL)
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (48, result.cost_nanos)
    assert acct.estimated_commits == 0
    # The request asks for exactly the output tokens that were reserved.
    (request,) = server.requests
    assert request.body is not None
    assert request.body["max_tokens"] == 200
    assert request.body["model"] == MODEL
    assert request.body["messages"] == MESSAGES
    reserve, commit = await call_events(ledger)
    assert (reserve.op, commit.op) == ("reserve", "commit")
    assert (reserve.tokens, reserve.nanos) == (PROMPT + 200, full_cost(200))
    assert (commit.tokens, commit.nanos) == (48, result.cost_nanos)
    assert commit.op_id == reserve.op_id
    for event in (reserve, commit):
        assert event.tags == {"step": "plan", "endpoint": "stub", "model": MODEL, "kind": "remote"}


async def test_reply_without_usage_is_charged_the_whole_reservation_as_estimated(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push(Reply(text="no usage", usage=None))

    result = await chat(build(endpoint(server.base_url)), max_tokens=64)

    assert result.estimated
    assert (result.input_tokens, result.output_tokens) == (PROMPT, 64)
    assert result.cost_nanos == full_cost(64)
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (PROMPT + 64, full_cost(64))
    assert acct.estimated_commits == 1
    commit = (await call_events(ledger))[-1]
    assert commit.op == "commit"
    assert commit.extra.get("estimated") == "1"


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -3, "completion_tokens": 5, "total_tokens": 2},
        {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
        {},
    ],
    ids=["negative", "null", "empty"],
)
async def test_unusable_usage_is_charged_as_estimated_and_leaves_nothing_open(
    ledger: Ledger, server: ScriptedModelServer, build: Build, usage: dict[str, Any]
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    body = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }
    server.push(Reply(json_body=body))

    result = await chat(build(endpoint(server.base_url)), max_tokens=50)

    assert result.text == "hi"
    assert result.estimated
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (PROMPT + 50, full_cost(50))
    assert acct.estimated_commits == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_reply_without_choices_fails_and_is_charged_as_estimated(
    ledger: Ledger, server: ScriptedModelServer, build: Build, *, stream: bool
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push(Reply(json_body={"object": "error-page", "detail": "not a completion"}))

    with pytest.raises(ModelCallFailed) as info:
        await chat(build(endpoint(server.base_url)), max_tokens=50, stream=stream)

    assert info.value.transient is False
    assert "no choices" in info.value.reason
    assert len(server.requests) == 1
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (PROMPT + 50, full_cost(50))
    assert acct.estimated_commits == 1


async def test_reply_without_choices_is_charged_the_usage_it_reports(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    usage = {"prompt_tokens": 30, "completion_tokens": 0, "total_tokens": 30}
    server.push(Reply(json_body={"object": "chat.completion", "choices": [], "usage": usage}))

    with pytest.raises(ModelCallFailed, match="no choices"):
        await chat(build(endpoint(server.base_url)), max_tokens=50)

    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (
        30,
        PRICE.cost_nanos(input_tokens=30, output_tokens=0),
    )
    assert acct.estimated_commits == 0


async def test_error_event_inside_a_stream_fails_and_is_charged_as_estimated(
    ledger: Ledger, build: Build
) -> None:
    # The scripted server cannot send an error event after a 200, so a raw one does.
    await open_task(ledger, tokens=100_000, nanos=10**9)
    event = b'data: {"error": {"message": "overloaded mid-stream", "type": "server_error"}}\n\n'
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m",'
    chunk += b'"choices":[{"index":0,"delta":{"content":"Two "},"finish_reason":null}]}\n\n'
    body = chunk + event
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(head + body)
        await writer.drain()
        writer.close()

    raw = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    try:
        client = build(endpoint(f"http://127.0.0.1:{port}/v1"))
        with pytest.raises(ModelCallFailed) as info:
            await chat(client, max_tokens=50, stream=True)
    finally:
        raw.close()
        await raw.wait_closed()

    assert "overloaded mid-stream" in info.value.reason
    assert info.value.transient is False
    assert len(seen) == 1
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.estimated_commits) == (PROMPT + 50, 1)


async def test_finish_reason_length_is_cut_short(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push(Reply(text=" ".join(f"w{i}" for i in range(40))))

    result = await chat(build(endpoint(server.base_url)), max_tokens=20)

    assert result.cut_short
    assert result.finish_reason == "length"
    assert result.text == " ".join(f"w{i}" for i in range(20))
    assert result.output_tokens == 20
    acct = await assert_settled(ledger)
    assert acct.spent_tokens == result.input_tokens + 20


async def test_max_tokens_below_the_minimum_output_is_sent_as_asked(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push(Reply(text="ok"))

    result = await chat(build(endpoint(server.base_url)), max_tokens=5)

    assert result.max_tokens == 5
    (request,) = server.requests
    assert request.body is not None
    assert request.body["max_tokens"] == 5
    await assert_settled(ledger)


# -- refusals before any request -----------------------------------------------------------------


async def test_prompt_too_large_for_the_budget_is_refused_before_any_request(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=PROMPT + MIN_OUTPUT - 1, nanos=10**9)
    before = (await ledger.snapshot(TASK)).model_dump_json()
    events_before = await ledger.events(TASK)

    with pytest.raises(BudgetExceeded) as info:
        await chat(build(endpoint(server.base_url)), max_tokens=100)

    assert server.requests == []
    assert (info.value.account, info.value.unit) == (ACCOUNT, "tokens")
    assert info.value.available == PROMPT + MIN_OUTPUT - 1
    assert (await ledger.snapshot(TASK)).model_dump_json() == before
    assert await ledger.events(TASK) == events_before


async def test_max_tokens_shrinks_to_what_the_money_left_pays_for(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    affordable = 40
    # One nano-dollar short of paying for one more output token.
    nanos = PRICE.cost_nanos(input_tokens=PROMPT, output_tokens=affordable + 1) - 1
    await open_task(ledger, nanos=nanos)
    server.push(Reply(text="short answer"))

    result = await chat(build(endpoint(server.base_url)), max_tokens=1000)

    (request,) = server.requests
    assert request.body is not None
    assert request.body["max_tokens"] == affordable
    assert MIN_OUTPUT <= affordable < 1000
    assert result.max_tokens == affordable
    reserve = (await call_events(ledger))[0]
    assert reserve.op == "reserve"
    assert (reserve.tokens, reserve.nanos) == (PROMPT + affordable, full_cost(affordable))
    acct = await assert_settled(ledger)
    assert acct.spent_nanos == result.cost_nanos <= nanos


async def test_max_tokens_shrinks_to_the_tokens_left(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=PROMPT + 30)
    server.push(Reply(text="short"))

    result = await chat(build(endpoint(server.base_url)), max_tokens=500)

    assert result.max_tokens == 30
    assert server.requests[0].body is not None
    assert server.requests[0].body["max_tokens"] == 30
    await assert_settled(ledger)


# -- retries -----------------------------------------------------------------------------------


async def test_429_with_retry_after_is_retried_after_the_wait(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push_many([Reply(status=429, retry_after_s=0.3), Reply(text="second try")])

    started = time.monotonic()
    result = await chat(build(endpoint(server.base_url)), max_tokens=50)
    elapsed = time.monotonic() - started

    assert result.text == "second try"
    assert result.attempts == 2
    assert elapsed >= 0.3
    assert len(server.requests) == 2
    events = await call_events(ledger)
    assert ops(events) == ["reserve", "release", "reserve", "commit"]
    first, released, second, committed = events
    # Each attempt holds its own reservation, the failed one released.
    assert first.op_id == released.op_id != second.op_id == committed.op_id
    assert (released.tokens, released.nanos) == (PROMPT + 50, full_cost(50))
    acct = await assert_settled(ledger)
    assert acct.spent_nanos == result.cost_nanos


async def test_500_then_success_is_retried_with_a_new_reservation(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push_many([Reply(status=500), Reply(status=503), Reply(text="third time lucky")])

    result = await chat(build(endpoint(server.base_url)), max_tokens=50)

    assert result.attempts == 3
    assert len(server.requests) == 3
    events = await call_events(ledger)
    assert ops(events) == ["reserve", "release", "reserve", "release", "reserve", "commit"]
    assert len({e.op_id for e in events if e.op == "reserve"}) == 3
    acct = await assert_settled(ledger)
    assert acct.spent_tokens == result.tokens


async def test_500_on_every_attempt_fails_transient_and_releases_everything(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.responder = lambda request: Reply(status=500)

    with pytest.raises(ModelCallFailed) as info:
        await chat(build(endpoint(server.base_url)), max_tokens=50, fallback=False)

    assert info.value.transient is True
    # The status and the provider's short reason (the stub's default error message).
    assert (info.value.status, info.value.reason) == (500, "HTTP 500: scripted error (HTTP 500)")
    assert len(server.requests) == FAST.attempts
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (0, 0)


async def test_budget_runs_out_mid_retry_after_a_charged_timeout(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    # Room for one attempt, and less than a minimum attempt after it.
    limit = (PROMPT + 50) + (PROMPT + MIN_OUTPUT - 1)
    await open_task(ledger, tokens=limit)
    server.push(Reply(text="too late", delay_s=1.0))
    client = build(endpoint(server.base_url, timeout_s=0.2))

    with pytest.raises(BudgetExceeded) as info:
        await chat(client, max_tokens=50)

    # The timed-out attempt may have been billed: it is charged, so no second one fits.
    assert len(server.requests) == 1
    assert (info.value.account, info.value.unit) == (ACCOUNT, "tokens")
    assert info.value.available == PROMPT + MIN_OUTPUT - 1
    assert "cannot cover" in str(info.value)
    acct = await assert_settled(ledger)
    assert acct.spent_tokens == PROMPT + 50 <= limit
    assert acct.estimated_commits == 1
    assert ops(await call_events(ledger)) == ["reserve", "commit"]


# -- failures that are not retried ----------------------------------------------------------------


async def test_400_is_not_retried_nor_falls_back_and_releases_the_reservation(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push(Reply(status=400, text="bad request"))
    client = build(endpoint(server.base_url), endpoint(server.base_url, name="other"))

    with pytest.raises(ModelCallFailed) as info:
        await chat(client, max_tokens=50)

    assert info.value.transient is False
    assert (info.value.endpoint, info.value.reason) == ("stub", "HTTP 400: bad request")
    assert info.value.status == 400
    assert len(server.requests) == 1
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (0, 0)
    assert ops(await call_events(ledger)) == ["reserve", "release"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_malformed_json_fails_and_is_charged_as_estimated(
    ledger: Ledger, server: ScriptedModelServer, build: Build, *, stream: bool
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push(Reply(malformed=True))

    with pytest.raises(ModelCallFailed) as info:
        await chat(build(endpoint(server.base_url)), max_tokens=50, stream=stream)

    assert info.value.transient is False
    assert "not valid JSON" in info.value.reason
    assert len(server.requests) == 1
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (PROMPT + 50, full_cost(50))
    assert acct.estimated_commits == 1


# -- fallback ----------------------------------------------------------------------------------


def _down_endpoint(server: ScriptedModelServer, how: str) -> Endpoint:
    if how == "dead-port":
        return endpoint(f"http://127.0.0.1:{free_port()}/v1", name="down", model="down-model")
    server.responder = lambda r: (
        Reply(status=500) if _model(r) == "down-model" else Reply(text="ok")
    )
    return endpoint(server.base_url, name="down", model="down-model")


def _model(request: RecordedRequest) -> object:
    return (request.body or {}).get("model")


@pytest.mark.parametrize("how", ["dead-port", "always-500"])
async def test_fallback_to_the_next_endpoint_of_the_same_tier(
    ledger: Ledger, server: ScriptedModelServer, build: Build, how: str
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    down = _down_endpoint(server, how)
    client = build(down, endpoint(server.base_url, name="backup"))

    result = await chat(client, max_tokens=50, endpoint="down")

    assert (result.endpoint, result.model) == ("backup", MODEL)
    assert _model(server.requests[-1]) == MODEL
    events = await call_events(ledger)
    assert ops(events) == ["reserve", "release"] * FAST.attempts + ["reserve", "commit"]
    commit = events[-1]
    assert commit.tags["fallback_from"] == "down"
    assert (commit.tags["endpoint"], commit.tags["model"]) == ("backup", MODEL)
    assert all("fallback_from" not in e.tags for e in events[:-2])
    acct = await assert_settled(ledger)
    assert acct.spent_tokens == result.tokens


@pytest.mark.parametrize("how", ["dead-port", "always-500"])
async def test_without_fallback_a_down_endpoint_fails(
    ledger: Ledger, server: ScriptedModelServer, build: Build, how: str
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    down = _down_endpoint(server, how)
    client = build(down, endpoint(server.base_url, name="backup"))

    with pytest.raises(ModelCallFailed) as info:
        await chat(client, max_tokens=50, endpoint="down", fallback=False)

    assert (info.value.endpoint, info.value.transient) == ("down", True)
    assert all(_model(r) == "down-model" for r in server.requests)
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (0, 0)


# -- streaming ---------------------------------------------------------------------------------


async def test_streaming_assembles_the_text_and_commits_the_usage(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    text = "Two, three,  five\nand seven."
    server.push(Reply(text=text, usage=Usage(prompt_tokens=21, completion_tokens=6)))

    result = await chat(build(endpoint(server.base_url)), max_tokens=80, stream=True)

    assert result.text == text
    assert (result.input_tokens, result.output_tokens, result.estimated) == (21, 6, False)
    assert result.cost_nanos == PRICE.cost_nanos(input_tokens=21, output_tokens=6)
    (request,) = server.requests
    assert request.body is not None
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["max_tokens"] == 80
    acct = await assert_settled(ledger)
    assert (acct.spent_tokens, acct.spent_nanos) == (27, result.cost_nanos)


# -- concurrency -------------------------------------------------------------------------------


async def test_max_concurrency_keeps_calls_to_an_endpoint_one_at_a_time(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    delay_s = 0.1
    arrivals: dict[str, list[float]] = {"serial": [], "parallel": []}
    lock = threading.Lock()

    def responder(request: RecordedRequest) -> Reply:
        with lock:
            arrivals[str(_model(request))].append(time.monotonic())
        return Reply(text="ok", delay_s=delay_s)

    server.responder = responder
    client = build(
        endpoint(server.base_url, name="serial", model="serial", max_concurrency=1),
        endpoint(server.base_url, name="parallel", model="parallel", max_concurrency=5),
    )

    async def five(name: str) -> float:
        started = time.monotonic()
        await asyncio.gather(*(chat(client, endpoint=name, max_tokens=20) for _ in range(5)))
        return time.monotonic() - started

    serial_s = await five("serial")
    await five("parallel")

    assert serial_s >= 5 * delay_s
    # Each request of the serial endpoint arrives only after the previous one was answered.
    serial = sorted(arrivals["serial"])
    assert len(serial) == 5
    assert min(b - a for a, b in itertools.pairwise(serial)) >= delay_s * 0.95
    # The same measurement sees overlap where the limit allows it.
    parallel = sorted(arrivals["parallel"])
    assert parallel[-1] - parallel[0] < delay_s
    await assert_settled(ledger)


async def test_many_concurrent_calls_never_spend_beyond_the_limit(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    max_tokens, fits = 40, 17
    per_call = PROMPT + max_tokens
    # Too little left over for even a shrunken call once `fits` calls have paid.
    limit = fits * per_call + PROMPT + MIN_OUTPUT - 1
    await open_task(ledger, tokens=limit)

    def bill_everything(request: RecordedRequest) -> Reply:
        # Usage equal to the reservation: nothing flows back, so exactly `fits` calls fit.
        assert request.body is not None
        usage = Usage(prompt_tokens=PROMPT, completion_tokens=request.body["max_tokens"])
        return Reply(text="ok", usage=usage)

    server.responder = bill_everything
    client = build(endpoint(server.base_url, max_concurrency=50))

    outcomes = await asyncio.gather(
        *(chat(client, max_tokens=max_tokens) for _ in range(50)), return_exceptions=True
    )

    done = [o for o in outcomes if isinstance(o, CallResult)]
    refused = [o for o in outcomes if isinstance(o, BudgetExceeded)]
    assert (len(done), len(refused)) == (fits, 50 - fits)
    assert len(server.requests) == fits
    acct = await assert_settled(ledger)
    assert acct.spent_tokens == sum(r.tokens for r in done) == fits * per_call <= limit
    assert acct.overrun_tokens == 0


# -- secrets -----------------------------------------------------------------------------------


async def test_api_key_reaches_the_server_and_nowhere_else(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    server.push(Reply(text="ok"))
    server.push_many([Reply(status=401, text="bad key"), *[Reply(status=500)] * FAST.attempts])
    client = build(endpoint(server.base_url, api_key_env="STUB_KEY"), env={"STUB_KEY": SECRET})

    await chat(client, max_tokens=20)
    errors: list[BaseException] = []
    for _ in range(2):
        with pytest.raises(ModelCallFailed) as info:
            await chat(client, max_tokens=20, fallback=False)
        errors.append(info.value)

    assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in server.requests)
    recorded = [e.model_dump_json() for e in await ledger.events(TASK)]
    recorded.append((await ledger.snapshot(TASK)).model_dump_json())
    for error in errors:
        recorded += [str(error), repr(error), str(error.__cause__), repr(error.__cause__)]
    assert recorded
    assert not [text for text in recorded if SECRET in text]


async def test_missing_api_key_variable_fails_naming_it_and_releases(
    ledger: Ledger, server: ScriptedModelServer, build: Build
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    client = build(endpoint(server.base_url, api_key_env="STUB_KEY"), env={})

    with pytest.raises(ValueError, match="STUB_KEY"):
        await chat(client, max_tokens=20)

    assert server.requests == []
    acct = await assert_settled(ledger)
    assert acct.spent_tokens == 0


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [0, -5])
async def test_bad_max_tokens_is_refused_and_changes_nothing(
    ledger: Ledger, server: ScriptedModelServer, build: Build, max_tokens: int
) -> None:
    await open_task(ledger, tokens=100_000, nanos=10**9)
    before = (await ledger.snapshot(TASK)).model_dump_json()

    with pytest.raises(ValueError, match="max_tokens"):
        await chat(build(endpoint(server.base_url)), max_tokens=max_tokens)

    assert server.requests == []
    assert (await ledger.snapshot(TASK)).model_dump_json() == before
