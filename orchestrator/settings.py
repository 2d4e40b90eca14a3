"""Settings, read once from the environment at the edge and passed down."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from budgets.keys import KeySpace, check_tenant
from budgets.policy import DEFAULT_POLICY, Target, policy_names


class Settings(BaseModel):
    """Everything a Paymaster process needs to know; nothing deeper reads ``os.environ``."""

    model_config = ConfigDict(frozen=True)

    redis_url: str | None = Field(default=None, description="REDIS_URL; None: a private Redis")
    config_path: Path | None = Field(default=None, description="PAYMASTER_CONFIG (endpoints TOML)")
    home: Path = Field(description="PAYMASTER_HOME: state of the embedded Redis and local model")
    lease_s: float = Field(default=300.0, gt=0, description="lease of one call's reservation")
    visibility_timeout_s: float = Field(default=60.0, gt=0, description="silence before takeover")
    heartbeat_s: float = Field(default=5.0, gt=0)
    max_deliveries: int = Field(default=3, ge=1, description="deliveries before dead-lettering")
    retention_s: int = Field(default=7 * 86_400, gt=0, description="how long records are kept")
    max_subtasks: int = Field(default=8, ge=1, le=64)
    max_depth: int = Field(
        default=2, ge=1, le=4, description="PAYMASTER_MAX_DEPTH: levels of managers (1: no nesting)"
    )
    review: Literal["off", "on", "auto"] = Field(
        default="auto",
        description="PAYMASTER_REVIEW: the manager reviews results (auto: difficulty 4 and up)",
    )
    max_task_chars: int = Field(default=20_000, ge=1)
    policy: str = Field(default=DEFAULT_POLICY, description="PAYMASTER_POLICY: allocation policy")
    target: str | None = Field(
        default=None,
        description="PAYMASTER_TARGET: adaptive's target, ratio:<share> or usd_per_point:<usd>",
    )
    explore: float | None = Field(
        default=None, ge=0, le=1, description="PAYMASTER_EXPLORE: adaptive's exploration share"
    )
    tenant: str | None = Field(
        default=None,
        description=(
            "PAYMASTER_TENANT: fence this process to one tenant: its keys live under "
            "pm:<tenant>: (a Redis ACL user of ~pm:<tenant>:* can run it) and its tasks are "
            "that tenant's"
        ),
    )
    stats_scope: Literal["tenant", "shared"] = Field(
        default="tenant",
        description="PAYMASTER_STATS_SCOPE: 'tenant' keeps each tenant's statistics apart",
    )

    otel: bool = Field(
        default=False,
        description="OpenTelemetry on: OTEL_EXPORTER_OTLP_ENDPOINT (or _TRACES_ENDPOINT) is set",
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in policy_names():
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(policy_names())}")
        return value

    @field_validator("tenant")
    @classmethod
    def _valid_tenant(cls, value: str | None) -> str | None:
        return None if value is None else check_tenant(value)

    def space(self) -> KeySpace:
        """Where this process's keys live: ``pm:``, or ``pm:<tenant>:`` when fenced."""
        return KeySpace(self.tenant)

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str | None) -> str | None:
        if value is not None:
            Target.parse(value)  # its ValueError says what is wrong
        return value

    def policy_target(self) -> Target | None:
        """The adaptive policy's target, parsed; ``None``: the policy's default."""
        return None if self.target is None else Target.parse(self.target)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping (the caller passes ``os.environ``)."""
        home = Path(env.get("PAYMASTER_HOME") or Path(env.get("HOME", ".")) / ".paymaster")
        values: dict[str, object] = {
            "redis_url": env.get("REDIS_URL") or None,
            "config_path": Path(env["PAYMASTER_CONFIG"]) if env.get("PAYMASTER_CONFIG") else None,
            "home": home,
        }
        numeric = {
            "PAYMASTER_LEASE_S": "lease_s",
            "PAYMASTER_VISIBILITY_TIMEOUT_S": "visibility_timeout_s",
            "PAYMASTER_HEARTBEAT_S": "heartbeat_s",
            "PAYMASTER_MAX_DELIVERIES": "max_deliveries",
            "PAYMASTER_RETENTION_S": "retention_s",
            "PAYMASTER_MAX_DEPTH": "max_depth",
            "PAYMASTER_EXPLORE": "explore",
        }
        named = {
            "PAYMASTER_POLICY": "policy",
            "PAYMASTER_STATS_SCOPE": "stats_scope",
            "PAYMASTER_REVIEW": "review",
            "PAYMASTER_TARGET": "target",
            "PAYMASTER_TENANT": "tenant",
        }
        otlp = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        values["otel"] = bool(otlp) and env.get("OTEL_SDK_DISABLED", "").lower() != "true"
        for var, field in (numeric | named).items():
            if env.get(var):
                values[field] = env[var]
        return cls.model_validate(values)
