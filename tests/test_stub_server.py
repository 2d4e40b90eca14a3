"""The scripted OpenAI-compatible server, driven through the real ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import select
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from agents.stub_server import (
    DEFAULT_REPLY,
    RecordedRequest,
    Reply,
    ScriptedModelServer,
    Usage,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(server: ScriptedModelServer) -> Iterator[openai.OpenAI]:
    """A sync client that does not retry, so each scripted reply is seen once."""
    with openai.OpenAI(base_url=server.base_url, api_key="sk-test-key", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(server: ScriptedModelServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """An async client that does not retry."""
    async with openai.AsyncOpenAI(
        base_url=server.base_url, api_key="sk-test-key", max_retries=0
    ) as c:
        yield c


def test_scripted_text_and_usage_come_back_exactly(
    server: ScriptedModelServer, client: openai.OpenAI
) -> None:
    server.push(Reply(text="Hello  there.", usage=Usage(prompt_tokens=11, completion_tokens=7)))
    completion = client.chat.completions.create(model="gpt-test", messages=HELLO)
    assert completion.choices[0].message.content == "Hello  there."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-test"
    assert completion.usage is not None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 7, 18)


def test_reply_without_usage_sends_none(server: ScriptedModelServer, client: openai.OpenAI) -> None:
    server.push(Reply(text="no usage here", usage=None))
    completion = client.chat.completions.create(model="m", messages=HELLO)
    assert completion.choices[0].message.content == "no usage here"
    assert completion.usage is None


def test_auto_usage_counts_words_plus_four_per_message(
    server: ScriptedModelServer, client: openai.OpenAI
) -> None:
    server.push(Reply(text="one two three"))
    completion = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say  hi\nplease"}]},
        ],
    )
    assert completion.usage is not None
    # (4 + 3 words) + (4 + 3 words) for the prompt; 3 words sent.
    assert completion.usage.prompt_tokens == 14
    assert completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == 17


def test_rate_limit_with_retry_after(server: ScriptedModelServer, client: openai.OpenAI) -> None:
    server.push(Reply(status=429, retry_after_s=2, text="slow down"))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=HELLO)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.code == "rate_limit_exceeded"
    assert "slow down" in info.value.message


def test_client_retries_after_the_scripted_delay(server: ScriptedModelServer) -> None:
    server.push_many([Reply(status=429, retry_after_s=0.05), Reply(text="second try")])
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=1) as retrying:
        completion = retrying.chat.completions.create(model="m", messages=HELLO)
    assert completion.choices[0].message.content == "second try"
    assert len(server.requests) == 2


def test_server_error(server: ScriptedModelServer, client: openai.OpenAI) -> None:
    server.push(Reply(status=500))
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=HELLO)
    assert info.value.status_code == 500
    assert info.value.type == "server_error"
    assert "retry-after" not in info.value.response.headers


def test_delay_past_the_client_timeout_times_out(server: ScriptedModelServer) -> None:
    server.push(Reply(text="too late", delay_s=2.0))
    with (
        openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=0.2) as c,
        pytest.raises(openai.APITimeoutError),
    ):
        c.chat.completions.create(model="m", messages=HELLO)


def test_delay_within_the_timeout_answers_after_it(
    server: ScriptedModelServer, client: openai.OpenAI
) -> None:
    server.push(Reply(text="patience", delay_s=0.3))
    started = time.monotonic()
    completion = client.chat.completions.create(model="m", messages=HELLO)
    assert time.monotonic() - started >= 0.3
    assert completion.choices[0].message.content == "patience"


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_body_raises_json_decode_error(
    server: ScriptedModelServer, client: openai.OpenAI, stream: bool
) -> None:
    # openai 3.x does not wrap this: a 200 JSON body that does not parse surfaces as the
    # stdlib's JSONDecodeError, not as an openai.APIError (callers must catch it themselves).
    server.push(Reply(malformed=True))

    def call() -> object:
        if stream:
            return list(client.chat.completions.create(model="m", messages=HELLO, stream=True))
        return client.chat.completions.create(model="m", messages=HELLO)

    with pytest.raises(json.JSONDecodeError) as info:
        call()
    assert not isinstance(info.value, openai.OpenAIError)


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_truncates_and_finishes_with_length(
    server: ScriptedModelServer, client: openai.OpenAI, limit_field: str
) -> None:
    server.push(Reply(text="one two  three four five"))
    limit: dict[str, Any] = {limit_field: 3}
    completion = client.chat.completions.create(model="m", messages=HELLO, **limit)
    assert completion.choices[0].message.content == "one two three"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


def test_text_within_the_limit_is_untouched(
    server: ScriptedModelServer, client: openai.OpenAI
) -> None:
    server.push(Reply(text="one  two", usage=Usage(prompt_tokens=1, completion_tokens=9)))
    completion = client.chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    assert completion.choices[0].message.content == "one  two"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 9


async def test_stream_with_usage_sends_text_in_chunks_then_usage(
    server: ScriptedModelServer, aclient: openai.AsyncOpenAI
) -> None:
    server.push(
        Reply(text="streamed  words here\n", usage=Usage(prompt_tokens=5, completion_tokens=3))
    )
    stream = await aclient.chat.completions.create(
        model="m", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == "streamed  words here\n"
    assert len(pieces) == 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f is not None] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.total_tokens) == (5, 8)
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_without_include_usage_has_no_usage_chunk(
    server: ScriptedModelServer, aclient: openai.AsyncOpenAI
) -> None:
    server.push(Reply(text="a b c d"))
    stream = await aclient.chat.completions.create(
        model="m", messages=HELLO, stream=True, max_tokens=2
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "a b"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_requests_are_recorded_with_their_bodies(
    server: ScriptedModelServer, client: openai.OpenAI
) -> None:
    client.chat.completions.create(model="recorded-model", messages=HELLO, max_tokens=7)
    (recorded,) = server.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer sk-test-key"
    assert recorded.body is not None
    assert recorded.body["model"] == "recorded-model"
    assert recorded.body["messages"] == HELLO
    assert recorded.body["max_tokens"] == 7
    server.clear()
    assert server.requests == []


def test_queue_is_fifo_then_falls_back_to_the_default(
    server: ScriptedModelServer, client: openai.OpenAI
) -> None:
    server.push_many([Reply(text="first"), Reply(text="second")])
    server.push(Reply(text="third"))
    assert server.pending == 3
    texts = [
        client.chat.completions.create(model="m", messages=HELLO).choices[0].message.content
        for _ in range(4)
    ]
    assert texts == ["first", "second", "third", DEFAULT_REPLY.text]
    assert server.pending == 0


def test_responder_answers_when_the_queue_is_empty(
    server: ScriptedModelServer, client: openai.OpenAI
) -> None:
    def echo(request: RecordedRequest) -> Reply:
        assert request.body is not None
        return Reply(text="echo: " + request.body["messages"][-1]["content"])

    server.responder = echo
    server.push(Reply(text="scripted first"))
    first = client.chat.completions.create(model="m", messages=HELLO)
    second = client.chat.completions.create(model="m", messages=HELLO)
    assert first.choices[0].message.content == "scripted first"
    assert second.choices[0].message.content == "echo: hello"


async def test_concurrent_async_requests_each_get_their_own_answer(
    server: ScriptedModelServer, aclient: openai.AsyncOpenAI
) -> None:
    def echo(request: RecordedRequest) -> Reply:
        assert request.body is not None
        return Reply(text=request.body["messages"][0]["content"].upper())

    server.responder = echo

    async def ask(i: int) -> str | None:
        completion = await aclient.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"question {i}"}]
        )
        return completion.choices[0].message.content

    answers = await asyncio.gather(*(ask(i) for i in range(50)))
    assert answers == [f"QUESTION {i}" for i in range(50)]
    assert len(server.requests) == 50


def test_json_body_is_sent_verbatim(server: ScriptedModelServer, client: openai.OpenAI) -> None:
    body = {
        "id": "custom-id",
        "object": "chat.completion",
        "created": 1,
        "model": "raw",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "raw!"},
                "finish_reason": "stop",
            }
        ],
    }
    server.push(Reply(json_body=body))
    completion = client.chat.completions.create(model="m", messages=HELLO)
    assert (completion.id, completion.model) == ("custom-id", "raw")
    assert completion.choices[0].message.content == "raw!"


def test_models_and_health(server: ScriptedModelServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["stub-model"]
    health = httpx.get(server.base_url.removesuffix("/v1") + "/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert [r.path for r in server.requests] == ["/v1/models", "/health"]


@pytest.mark.parametrize("content", [b"not json", b'{"model": "m"}', b"[1, 2]"])
def test_bad_request_is_refused_and_uses_no_scripted_reply(
    server: ScriptedModelServer, content: bytes
) -> None:
    server.push(Reply(text="kept"))
    response = httpx.post(server.base_url + "/chat/completions", content=content)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert server.pending == 1
    assert len(server.requests) == 1


def test_unknown_path_is_404_and_recorded(server: ScriptedModelServer) -> None:
    response = httpx.delete(server.base_url + "/nothing")
    assert response.status_code == 404
    assert [(r.method, r.path) for r in server.requests] == [("DELETE", "/v1/nothing")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 99},
        {"status": 600},
        {"delay_s": -1.0},
        {"retry_after_s": -0.5},
        {"malformed": True, "json_body": {}},
    ],
)
def test_invalid_reply_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must|either"):
        Reply(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"wrong_shape": "choices-string", "json_body": {}},
        {"wrong_shape": "choices-string", "malformed": True},
        {"cut_after_chunks": -1},
    ],
)
def test_invalid_fault_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must|not two"):
        Reply(**kwargs)


# -- faults ------------------------------------------------------------------------------------

CHAT: dict[str, Any] = {"model": "m", "messages": HELLO}


def post(server: ScriptedModelServer, **body: Any) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", json={**CHAT, **body})


def sse(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of a text/event-stream body, ``[DONE]`` left out."""
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data:")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def test_wrong_shapes_are_valid_json_of_the_wrong_shape(server: ScriptedModelServer) -> None:
    server.push_many(
        [
            Reply(text="a b", wrong_shape="choice-without-message"),
            Reply(text="a b", wrong_shape="choices-string"),
            Reply(text="a b", wrong_shape="content-not-text"),
        ]
    )
    bodies = [post(server).json() for _ in range(3)]
    assert "message" not in bodies[0]["choices"][0]
    assert bodies[0]["usage"]["completion_tokens"] == 2  # the rest is as usual
    assert bodies[1]["choices"] == "a b"
    assert bodies[2]["choices"][0]["message"]["content"] == 42


def test_wrong_shaped_stream_has_a_bad_second_chunk(server: ScriptedModelServer) -> None:
    server.push(Reply(text="a b", wrong_shape="choice-without-message", usage=None))
    response = post(server, stream=True)
    assert response.status_code == 200
    role, bad = sse(response.text)
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert "delta" not in bad["choices"][0]
    assert response.text.endswith("data: [DONE]\n\n")


def test_usage_details_are_sent_inside_their_totals(server: ScriptedModelServer) -> None:
    usage = Usage(prompt_tokens=10, completion_tokens=4, cached_tokens=6, reasoning_tokens=3)
    server.push(Reply(text="x", usage=usage))
    sent = post(server).json()["usage"]
    assert sent["prompt_tokens_details"] == {"cached_tokens": 6}
    assert sent["completion_tokens_details"] == {"reasoning_tokens": 3}
    assert sent["total_tokens"] == 14


def test_max_completion_tokens_truncates_like_max_tokens(server: ScriptedModelServer) -> None:
    server.push(Reply(text="one two three four"))
    body = post(server, max_completion_tokens=2).json()
    assert body["choices"][0]["message"]["content"] == "one two"
    assert body["choices"][0]["finish_reason"] == "length"


def read_stream(url: str, into: list[bytes], *, timeout_s: float = 5.0) -> None:
    """Read a streamed chat completion's bytes into ``into`` until it ends or fails."""
    body = {**CHAT, "stream": True}
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=timeout_s) as r:
        for chunk in r.iter_bytes():
            into.append(chunk)


def test_a_dropped_stream_sends_its_first_chunks_then_closes(
    server: ScriptedModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.push(Reply(text="one two three four five", cut_after_chunks=3))
    received: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):
        read_stream(server.base_url, received)
    events = sse(b"".join(received).decode())
    assert len(events) == 3
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "one two "
    time.sleep(0.1)
    assert "Exception in ASGI application" not in caplog.text  # dropped on purpose: no traceback


def test_a_dropped_plain_reply_sends_half_its_body(server: ScriptedModelServer) -> None:
    server.push(Reply(text="one two three", cut_after_chunks=1))
    with pytest.raises(httpx.RemoteProtocolError):
        post(server)


def test_a_stalled_stream_runs_into_the_client_timeout(server: ScriptedModelServer) -> None:
    server.push(Reply(text="one two three", cut_after_chunks=2, cut="stall"))
    received: list[bytes] = []
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        read_stream(server.base_url, received, timeout_s=0.3)
    assert time.monotonic() - started >= 0.3
    assert len(sse(b"".join(received).decode())) == 2


def test_stop_cuts_a_stall_short() -> None:
    srv = ScriptedModelServer().start()
    srv.push(Reply(text="one two three", cut_after_chunks=1, cut="stall"))
    failures: list[BaseException] = []

    def ask() -> None:
        try:
            read_stream(srv.base_url, [], timeout_s=30)
        except httpx.HTTPError as e:
            failures.append(e)

    asker = threading.Thread(target=ask)
    asker.start()
    while not srv.requests:
        time.sleep(0.01)
    started = time.monotonic()
    srv.stop()
    asker.join(10)
    assert time.monotonic() - started < 5  # not STALL_S
    assert len(failures) == 1  # the stall ended in a dropped connection


def test_tokenize_count_counts_words(server: ScriptedModelServer) -> None:
    root = server.base_url.removesuffix("/v1")
    response = httpx.post(root + "/extras/tokenize/count", json={"input": "one two  three\n"})
    assert response.json() == {"count": 3}
    assert httpx.post(root + "/extras/tokenize/count", json={"x": 1}).status_code == 400


def test_negative_usage_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Usage(prompt_tokens=-1, completion_tokens=0)


def _stub_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "ScriptedModelServer"}


def test_configured_default_and_clean_stop() -> None:
    before = _stub_threads()
    with ScriptedModelServer(default=Reply(text="ok", usage=None)) as srv:
        assert _stub_threads() - before
        url = srv.base_url
        with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
            completion = c.chat.completions.create(model="m", messages=HELLO)
        assert completion.choices[0].message.content == "ok"
        assert completion.usage is None
    assert _stub_threads() == before
    with pytest.raises(httpx.ConnectError):
        httpx.get(url.removesuffix("/v1") + "/health")
    with pytest.raises(RuntimeError, match="not running"):
        _ = srv.base_url


def test_explicit_start_stop_and_restart() -> None:
    srv = ScriptedModelServer()
    assert srv.start() is srv
    try:
        with pytest.raises(RuntimeError, match="already running"):
            srv.start()
        assert httpx.get(srv.base_url.removesuffix("/v1") + "/health").status_code == 200
    finally:
        srv.stop()
    srv.stop()  # a second stop does nothing
    srv.start()
    try:
        assert httpx.get(srv.base_url.removesuffix("/v1") + "/health").status_code == 200
    finally:
        srv.stop()


def test_stop_cuts_a_long_delay_short() -> None:
    srv = ScriptedModelServer().start()
    srv.push(Reply(text="woken", delay_s=60.0))
    answers: list[str | None] = []

    def ask() -> None:
        with openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0) as c:
            answers.append(
                c.chat.completions.create(model="m", messages=HELLO).choices[0].message.content
            )

    asker = threading.Thread(target=ask)
    asker.start()
    while not srv.requests:
        time.sleep(0.01)
    srv.stop()  # raises if the server thread is still serving after 10 s
    asker.join(10)
    assert answers == ["woken"]


def test_subprocess_mode_answers_requests() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.stub_server", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 20)
        assert readable, "the stub server printed nothing within 20 s"
        word, base_url = proc.stdout.readline().split()
        assert word == "READY"
        assert base_url.startswith("http://127.0.0.1:")
        with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0) as c:
            completion = c.chat.completions.create(model="m", messages=HELLO)
        assert completion.choices[0].message.content == DEFAULT_REPLY.text
        assert completion.usage is not None
        assert completion.usage.completion_tokens == len(DEFAULT_REPLY.text.split())
    finally:
        proc.terminate()
        returncode = proc.wait(timeout=20)
    assert returncode == 0
