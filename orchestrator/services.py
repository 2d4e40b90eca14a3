"""The background services Paymaster starts on its own: which run, and stopping them.

Two can outlive the command that started them, each recorded in a state file
under ``PAYMASTER_HOME``: the private Redis (``redis.json``, see
:mod:`orchestrator.embedded`) and the bundled local model's server
(``local-model.json``, see :mod:`agents.local_model`). A service counts as
running only while its recorded pid is still that server on that port, and
only then is it ever signalled: a pid handed to another process since is left
alone.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agents import local_model
from agents.processes import Recorded
from orchestrator import embedded


class ServiceName(StrEnum):
    """The background services Paymaster may start."""

    REDIS = "redis"
    LOCAL_MODEL = "local-model"


class StopOutcome(StrEnum):
    """What stopping one service did."""

    STOPPED = "stopped"  # it was ours and running; it is gone now
    STALE = "stale"  # a record whose process is gone or not ours; the record was removed
    NOT_RECORDED = "not-recorded"  # nothing to do


class ServiceStatus(BaseModel):
    """One background service as ``paymaster services`` shows it."""

    model_config = ConfigDict(frozen=True)

    name: ServiceName
    pid: int | None
    port: int | None
    url: str | None
    running: bool
    state_file: Path


class StopReport(BaseModel):
    """What ``paymaster services stop`` did to one service."""

    model_config = ConfigDict(frozen=True)

    service: ServiceStatus
    outcome: StopOutcome


def _status(
    name: ServiceName, recorded: Recorded | None, *, url: str | None, running: bool, state: Path
) -> ServiceStatus:
    return ServiceStatus(
        name=name,
        pid=recorded.pid if recorded else None,
        port=recorded.port if recorded else None,
        url=url,
        running=running,
        state_file=state,
    )


def redis_status(home: Path) -> ServiceStatus:
    """The private Redis under ``home``."""
    rec = embedded.recorded_redis(home)
    running = rec is not None and embedded.is_our_redis(rec.pid, port=rec.port)
    url = embedded.redis_url(rec.port) if rec else None
    state = home / embedded.STATE_FILE
    return _status(ServiceName.REDIS, rec, url=url, running=running, state=state)


def local_model_status(home: Path) -> ServiceStatus:
    """The bundled local model's server under ``home``."""
    rec = local_model.recorded_server(home)
    running = rec is not None and local_model.is_our_server(rec.pid, port=rec.port)
    url = local_model.local_url(rec.port) if rec else None
    state = home / local_model.STATE_FILE
    return _status(ServiceName.LOCAL_MODEL, rec, url=url, running=running, state=state)


def list_services(home: Path) -> list[ServiceStatus]:
    """Every background service under ``home``, recorded or not, running or not."""
    return [redis_status(home), local_model_status(home)]


def stop_services(home: Path, *, grace_s: float = 10.0) -> list[StopReport]:
    """Stop every background service of ours under ``home`` and remove their records.

    Each gets SIGTERM, then SIGKILL after ``grace_s``. Stopping what is not
    running is not an error: its report says ``not-recorded`` or ``stale``.
    """
    reports = []
    for status, stop in (
        (redis_status(home), embedded.stop_redis),
        (local_model_status(home), local_model.stop_recorded),
    ):
        had_record = status.state_file.exists()
        if stop(home, grace_s=grace_s):
            outcome = StopOutcome.STOPPED
        elif had_record:
            outcome = StopOutcome.STALE
        else:
            outcome = StopOutcome.NOT_RECORDED
        reports.append(StopReport(service=status, outcome=outcome))
    return reports
