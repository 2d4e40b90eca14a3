"""The metered client with a telemetry scope around each call (a ``ChatClient``).

Used only when telemetry is on (:meth:`orchestrator.runtime.Runtime.build`);
off, the agents call the metered client itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from agents.endpoints import EndpointsConfig
from agents.metered import CallResult, Message, MeteredClient
from budgets import Amount
from orchestrator.telemetry import CallFacts, Telemetry

#: Hosts of well-known providers, as the GenAI conventions name them.
_PROVIDERS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.mistral.ai": "mistral_ai",
    "api.groq.com": "groq",
    "api.deepseek.com": "deepseek",
    "api.x.ai": "x_ai",
    "generativelanguage.googleapis.com": "gcp.gemini",
}


def provider_of(base_url: str) -> str:
    """The ``gen_ai.provider.name`` of an endpoint: a known provider by its host, else ``openai``.

    Every endpoint speaks the OpenAI API; one served elsewhere (llama.cpp,
    vLLM, Ollama) is told apart by ``paymaster.endpoint`` and its model.
    """
    host = base_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return _PROVIDERS.get(host, "openai")


class ObservedClient:
    """The metered client, with a telemetry scope around every ``chat``.

    Fits :class:`agents.worker.ChatClient`: the agents use it exactly as they
    would the metered client, which still reserves, calls and settles.
    """

    def __init__(self, inner: MeteredClient, telemetry: Telemetry) -> None:
        self.inner = inner
        self.telemetry = telemetry

    @property
    def config(self) -> EndpointsConfig:
        """The metered client's endpoints."""
        return self.inner.config

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
        min_tokens: int | None = None,
        temperature: float | None = None,
        keep_as: str | None = None,
    ) -> CallResult:
        """:meth:`MeteredClient.chat`, observed."""
        config = self.inner.config
        ep = config.get(endpoint) if endpoint else config.default_endpoint
        facts = CallFacts(
            task_id=task_id,
            account=account,
            endpoint=ep.name,
            model=ep.model,
            provider=provider_of(ep.base_url),
            duration_s=0.0,
            outcome="ok",
        )
        if self.telemetry.detailed:
            prompt = self.inner.quote(endpoint=ep.name, messages=messages, output_tokens=0)
            facts = replace(facts, reserved_tokens=prompt.tokens + max_tokens)
        with self.telemetry.call(
            task_id=task_id,
            account=account,
            endpoint=ep.name,
            model=ep.model,
            provider=facts.provider,
            reserved_tokens=facts.reserved_tokens,
        ) as scope:
            started = time.perf_counter()
            try:
                result = await self.inner.chat(
                    task_id=task_id,
                    account=account,
                    messages=messages,
                    max_tokens=max_tokens,
                    endpoint=endpoint,
                    response_format=response_format,
                    tags=tags,
                    min_tokens=min_tokens,
                    temperature=temperature,
                    keep_as=keep_as,
                )
            except BaseException as e:
                scope.done(
                    replace(
                        facts,
                        duration_s=time.perf_counter() - started,
                        outcome="error",
                        error=type(e).__name__,
                    )
                )
                raise
            facts = replace(
                facts,
                duration_s=time.perf_counter() - started,
                endpoint=result.endpoint,  # a fallback may have answered
                model=result.model,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                cost_nanos=result.cost_nanos,
                estimated=result.estimated,
                finish_reason=result.finish_reason,
            )
            if self.telemetry.detailed:
                if facts.reserved_tokens is not None:  # the cap the call was really sent with
                    facts = replace(
                        facts,
                        reserved_tokens=facts.reserved_tokens - max_tokens + result.max_tokens,
                    )
                view = await self.inner.ledger.account(task_id, result.account or account)
                facts = replace(
                    facts,
                    remaining_tokens=view.available_tokens,
                    remaining_nanos=view.available_nanos,
                )
            scope.done(facts)
            return result

    async def kept(self, task_id: str, name: str) -> CallResult | None:
        """A reply kept with its payment (no call, so nothing observed)."""
        return await self.inner.kept(task_id, name)

    def quote(
        self, *, endpoint: str | None, messages: Sequence[Message], output_tokens: int
    ) -> Amount:
        """The metered client's quote."""
        return self.inner.quote(endpoint=endpoint, messages=messages, output_tokens=output_tokens)
