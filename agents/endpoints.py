"""Model endpoints: where a model is served, what it costs, and how to reach it.

Endpoints are read from a TOML file (see ``docs/endpoints.md``) and validated
here, at the edge. An API key never appears in the configuration: an endpoint
names the environment variable that holds it (``api_key_env``), and the caller
resolves it with :meth:`Endpoint.api_key` from the environment it passes in.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agents.errors import ConfigError, UnknownEndpoint
from budgets.money import Price, check_tokens, usd_to_nanos

#: The name and model alias of the bundled local model.
LOCAL_MODEL_NAME = "smollm2"
LOCAL_MODEL_ALIAS = "SmolLM2-135M-Instruct"
#: Where the embedded default expects the local model when no config file is given.
DEFAULT_LOCAL_PORT = 8439
DEFAULT_LOCAL_BASE_URL = f"http://127.0.0.1:{DEFAULT_LOCAL_PORT}/v1"
#: Key of the passed environment that moves the embedded default's local model.
LOCAL_URL_ENV = "PAYMASTER_LOCAL_MODEL_URL"

StructuredOutput = Literal["json_schema", "json_object", "none"]
"""How an endpoint can be held to a JSON schema (the manager's plan and review use it).

``json_schema``: OpenAI's structured outputs, ``response_format={"type": "json_schema",
...}``. ``json_object``: llama.cpp's form (llama-server and llama-cpp-python),
``response_format={"type": "json_object", "schema": ...}``, which compiles the
schema to a grammar so even a tiny model's reply parses. ``none``: ask for JSON
in the prompt and parse the text.
"""

MaxTokensParam = Literal["max_tokens", "max_completion_tokens"]
"""The request field that caps the reply: OpenAI's reasoning models (o1, o3, o4, gpt-5) refuse
``max_tokens`` and require ``max_completion_tokens``; most other servers read ``max_tokens``."""

ReasoningControl = Literal["none", "effort", "budget"]
"""How a reasoning model's thinking is bounded from the call's output tier (its reserved
``max_tokens``): ``effort`` sends ``reasoning_effort`` (``low`` up to 1,024 tokens,
``medium`` up to 4,096, ``high`` above; OpenAI's o-series and gpt-5), ``budget`` sends
``reasoning_budget_field`` (default ``thinking_budget``) set to three quarters of
``max_tokens``, so the thinking always fits inside what was reserved; ``none`` sends
nothing. The prompt states the budget either way."""

#: Output tiers up to which each reasoning effort is asked for; above the last, ``high``.
REASONING_EFFORT_TIERS: tuple[tuple[int, str], ...] = ((1024, "low"), (4096, "medium"))

_TOKENIZER = r"^(bytes|server|tiktoken:[A-Za-z0-9_.\-]{1,64})$"


def _check_base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    # Credentials in a URL would leak into every repr and log line.
    if parts.username or parts.password:
        raise ValueError("must not contain credentials; name the key's variable in api_key_env")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    return value.rstrip("/")


def _check_price(value: Decimal) -> Decimal:
    usd_to_nanos(value, field="price")  # enforces the ledger's upper bound
    return value


_Usd = Annotated[Decimal, Field(ge=0, allow_inf_nan=False), AfterValidator(_check_price)]


class Endpoint(BaseModel):
    """One model behind an OpenAI-compatible API, with its price and limits.

    Prices are in USD per million tokens, exact (``Decimal``); write them as
    strings in TOML (``"0.15"``). ``tier`` ranks capability from 1 (weakest and
    cheapest) to 5; a failed call falls back to endpoints of the same or a
    higher tier.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    base_url: Annotated[str, AfterValidator(_check_base_url)]
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    input_usd_per_mtok: _Usd = Decimal(0)
    output_usd_per_mtok: _Usd = Decimal(0)
    cached_input_usd_per_mtok: _Usd | None = None
    kind: Literal["local", "remote"]
    context_window: int = Field(default=8192, gt=0)
    max_concurrency: int = Field(default=4, ge=1)
    structured_output: StructuredOutput = "none"
    tier: int = Field(default=1, ge=1, le=5)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    max_tokens_param: MaxTokensParam = "max_tokens"
    reasoning: ReasoningControl = "none"
    reasoning_budget_field: str = Field(default="thinking_budget", pattern=r"^[a-z][a-z_]{0,39}$")
    tokenizer: str | None = Field(default=None, pattern=_TOKENIZER)
    """How prompts are counted before a call: ``"bytes"`` (an upper bound for any byte-level
    tokenizer), ``"server"`` (the server's own tokenizer through llama-cpp-python's
    ``/extras/tokenize/count``), ``"tiktoken:<encoding>"`` (an offline tiktoken encoding), or
    ``None``: tiktoken's cl100k for a remote OpenAI model, the byte bound for anything else."""

    @model_validator(mode="after")
    def _cached_price_bounded(self) -> Endpoint:
        # The prompt is reserved at the input price before the call, when nobody knows what
        # will be cached: a dearer cached price would let the bill exceed the reservation.
        cached = self.cached_input_usd_per_mtok
        if cached is not None and cached > self.input_usd_per_mtok:
            raise ValueError(
                "cached_input_usd_per_mtok must not exceed input_usd_per_mtok (the prompt "
                "is reserved at the input price)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        # A key pasted into the file is refused by name, without echoing it.
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                "api_key must not be written in the configuration; put the key in an "
                "environment variable and give that variable's name in api_key_env"
            )
        if isinstance(data, dict) and "json_schema" in data:
            raise ValueError(
                "json_schema is now structured_output: write structured_output = "
                '"json_schema" (OpenAI), "json_object" (llama.cpp) or "none"'
            )
        return data

    def reasoning_params(self, out_tokens: int) -> dict[str, Any]:
        """The request fields that bound a reasoning model's thinking for ``out_tokens``."""
        if self.reasoning == "effort":
            effort = next((e for most, e in REASONING_EFFORT_TIERS if out_tokens <= most), "high")
            return {"reasoning_effort": effort}
        if self.reasoning == "budget":
            return {self.reasoning_budget_field: max(1, out_tokens * 3 // 4)}
        return {}

    @functools.cached_property
    def _rates(self) -> tuple[int, int, int]:
        """Input, cached-input and output prices in nano-dollars per million tokens."""
        in_rate = usd_to_nanos(self.input_usd_per_mtok)
        cached = self.cached_input_usd_per_mtok
        return (
            in_rate,
            in_rate if cached is None else usd_to_nanos(cached),
            usd_to_nanos(self.output_usd_per_mtok),
        )

    @functools.cached_property
    def price(self) -> Price:
        """What a call costs, for the ledger (every prompt token at the input price)."""
        return Price.of(self.input_usd_per_mtok, self.output_usd_per_mtok)

    def cost_nanos(self, *, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> int:
        """Exact cost in nano-dollars, rounded up once, with ``cached_tokens`` of the prompt
        at ``cached_input_usd_per_mtok`` (the input price when unset).

        With no cached tokens it equals ``price.cost_nanos``. Reasoning tokens are part of
        ``output_tokens`` (OpenAI counts them in ``completion_tokens``) and cost the same.
        """
        check_tokens(input_tokens, field="input_tokens")
        check_tokens(output_tokens, field="output_tokens")
        check_tokens(cached_tokens, field="cached_tokens")
        if cached_tokens > input_tokens:
            raise ValueError(f"cached_tokens {cached_tokens} exceed input_tokens {input_tokens}")
        in_rate, cached_rate, out_rate = self._rates
        numerator = (
            in_rate * (input_tokens - cached_tokens)
            + cached_rate * cached_tokens
            + out_rate * output_tokens
        )
        return -(-numerator // 1_000_000)

    def api_key(self, env: Mapping[str, str]) -> str | None:
        """The API key from ``env`` (the caller passes ``os.environ``); ``None`` if none is needed.

        Raises :class:`ConfigError` naming the variable (never a value) when
        ``api_key_env`` is set but the variable is missing or empty.
        """
        if self.api_key_env is None:
            return None
        key = env.get(self.api_key_env, "")
        if not key:
            raise ConfigError(
                f"endpoint {self.name!r}",
                [
                    f"api_key_env: the environment variable {self.api_key_env} is not set; "
                    f"export {self.api_key_env} with the API key for {self.base_url}"
                ],
            )
        return key


class EndpointsConfig(BaseModel):
    """Every configured endpoint, and which ones the manager and workers use by default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoints: list[Endpoint] = Field(min_length=1)
    default: str | None = None
    manager: str | None = None
    worker: str | None = None
    #: The endpoint the manager reviews results on (default: the manager's).
    review: str | None = None

    @field_validator("endpoints")
    @classmethod
    def _unique_names(cls, endpoints: list[Endpoint]) -> list[Endpoint]:
        seen: dict[str, int] = {}
        for i, endpoint in enumerate(endpoints):
            if endpoint.name in seen:
                raise ValueError(
                    f"duplicate name {endpoint.name!r} in endpoints[{seen[endpoint.name]}] "
                    f"and endpoints[{i}]; names must be unique"
                )
            seen[endpoint.name] = i
        return endpoints

    @field_validator("default", "manager", "worker", "review")
    @classmethod
    def _known_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        # ``endpoints`` is declared first, so it is in info.data once it is valid.
        endpoints: list[Endpoint] | None = info.data.get("endpoints")
        if value is None or endpoints is None:
            return value
        names = [e.name for e in endpoints]
        if value not in names:
            raise ValueError(f"no endpoint named {value!r}; configured: {', '.join(names)}")
        return value

    def names(self) -> list[str]:
        """The endpoints' names, in configuration order."""
        return [e.name for e in self.endpoints]

    def get(self, name: str) -> Endpoint:
        """The endpoint called ``name``; raises :class:`UnknownEndpoint` if there is none."""
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        raise UnknownEndpoint(name, self.names())

    @property
    def default_endpoint(self) -> Endpoint:
        """The endpoint named by ``default``, or the first one configured."""
        return self.get(self.default) if self.default else self.endpoints[0]

    def ordered_fallbacks(self, name: str) -> list[Endpoint]:
        """``name``'s endpoint first, then the others of the same or a higher tier, cheapest first.

        "Cheapest" is the sum of the input and output prices per million tokens;
        ties go to the lower tier, then to configuration order.
        """
        first = self.get(name)
        rest = [e for e in self.endpoints if e.name != name and e.tier >= first.tier]
        rest.sort(key=lambda e: (e.input_usd_per_mtok + e.output_usd_per_mtok, e.tier))
        return [first, *rest]

    @classmethod
    def parse(cls, data: object, *, source: str) -> EndpointsConfig:
        """Validate decoded configuration, raising :class:`ConfigError` naming ``source``.

        Each problem reads ``endpoints[1].base_url: <what is wrong>``. Input
        values are never echoed, so nothing secret pasted by mistake leaks.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            # Not chained: pydantic's error prints the input values, which may hold
            # a key pasted by mistake, and a traceback would carry it into the logs.
            raise ConfigError(source, [_describe(err) for err in e.errors()]) from None


def _describe(err: Any) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def default_local_config(base_url: str) -> EndpointsConfig:
    """The embedded default: only the bundled SmolLM2-135M served by llama.cpp at ``base_url``.

    ``structured_output`` is ``json_object``: llama-cpp-python's server refuses
    OpenAI's ``response_format={"type": "json_schema", ...}`` but turns
    ``{"type": "json_object", "schema": ...}`` into a grammar, so the 135M
    model's plans always parse.
    """
    local = Endpoint(
        name=LOCAL_MODEL_NAME,
        base_url=base_url,
        model=LOCAL_MODEL_ALIAS,
        kind="local",
        max_concurrency=1,  # llama.cpp's Python server runs one completion at a time
        context_window=2048,
        structured_output="json_object",
        tier=1,
        timeout_s=120.0,  # a 2-core CPU is slow; a local call costs nothing to wait for
    )
    return EndpointsConfig(endpoints=[local], default=LOCAL_MODEL_NAME)


def load_config(path: Path | None, *, env: Mapping[str, str]) -> EndpointsConfig:
    """Read and validate the endpoints file at ``path``.

    ``path=None`` means no configuration file: the embedded default, the bundled
    local model at ``env[PAYMASTER_LOCAL_MODEL_URL]`` or else
    ``http://127.0.0.1:8439/v1``; start it with
    ``agents.local_model.ensure_running(state_dir, port=DEFAULT_LOCAL_PORT)``.
    ``env`` is the environment the caller read at the edge (``os.environ``).
    Raises :class:`ConfigError` naming the file and every bad field.
    """
    if path is None:
        return default_local_config(env.get(LOCAL_URL_ENV) or DEFAULT_LOCAL_BASE_URL)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(source, [f"cannot read the file: {reason}"]) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"not valid TOML: {e}"]) from e
    return EndpointsConfig.parse(data, source=source)
