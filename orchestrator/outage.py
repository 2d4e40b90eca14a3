"""Riding out a Redis outage: one retry policy at the client's edge, and one log of it.

A worker's Redis client retries a command that failed on a connection error
or a timeout — every command Paymaster sends is idempotent, or harmless to
repeat — with capped exponential backoff and jitter, for up to a *window*
(the visibility timeout: past it, another worker may take the delivery over
anyway once Redis is back, and the fencing token stops whichever worker lost
it). A command still failing after the window raises, and its caller decides:
the flow hands the task back to the queue, the worker's own loops back off and
try again for as long as it takes.

:class:`Outage` is what the process says about it: one warning when Redis
stops answering (``Redis unreachable (...), retrying in 0.2s``), a reminder
while it stays down, and one line when it answers again (``Redis back after
3.1s``), however many commands were waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from budgets.connection import Client, redis_client
from budgets.errors import LedgerUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What "Redis did not answer" looks like to a caller (the ledger wraps it in its own error).
UNREACHABLE: tuple[type[Exception], ...] = (
    LedgerUnavailable,
    rex.ConnectionError,
    rex.TimeoutError,
)

#: While Redis stays down, repeat the warning this often.
REMIND_EVERY_S = 30.0
#: First retry after this long; each failure doubles it, up to the cap.
FIRST_RETRY_S = 0.05
#: An attempt that failed after running this long had a working connection.
CONNECTED_S = 0.1
#: Seconds to wait for a TCP connection, and for any reply (XREADGROUP blocks for less).
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 10.0


class Outage:
    """Whether this process can reach Redis; logs once when it cannot, and once when it can again.

    Shared by every retry of the process (it survives the client's copies of
    its retry policy), so one outage is one warning however many commands
    were in flight.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.down_since: float | None = None
        self._reminded: float = 0.0
        #: Outages seen since the process started (a test reads it).
        self.count = 0

    @property
    def down(self) -> bool:
        """True from the first failure until a command succeeds again."""
        return self.down_since is not None

    def failed(self, error: BaseException, *, retry_in_s: float) -> None:
        """A command could not reach Redis and will be tried again in ``retry_in_s``."""
        now = self._clock()
        if self.down_since is None:
            self.down_since = self._reminded = now
            self.count += 1
            log.warning("Redis unreachable (%s), retrying in %.2fs", _describe(error), retry_in_s)
        elif now - self._reminded >= REMIND_EVERY_S:
            self._reminded = now
            log.warning(
                "Redis still unreachable after %.0fs (%s), retrying in %.2fs",
                now - self.down_since,
                _describe(error),
                retry_in_s,
            )

    def answered(self) -> None:
        """A command reached Redis: end the outage, if there was one."""
        if self.down_since is not None:
            log.info("Redis back after %.1fs", self._clock() - self.down_since)
            self.down_since = None


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def backoff_s(failures: int, *, cap_s: float) -> float:
    """Seconds before retry number ``failures`` (1, 2, …): doubling from 50 ms, capped, jittered."""
    top: float = min(cap_s, FIRST_RETRY_S * 2.0 ** min(failures - 1, 30))
    return top / 2 + random.uniform(0, top / 2)


class RideOut(Retry):
    """redis-py's retry policy for a worker: retry for ``window_s``, tell the :class:`Outage`.

    ``cap_s`` bounds the wait between tries, so a command notices that Redis
    is back within ``cap_s`` of it (a heartbeat must beat before the
    visibility timeout runs out).
    """

    def __init__(self, *, outage: Outage, window_s: float, cap_s: float = 1.0) -> None:
        # The retry count is only read by redis-py's metrics; the window decides.
        super().__init__(NoBackoff(), 2**31)
        self.outage = outage
        self.window_s = window_s
        self.cap_s = cap_s

    def __deepcopy__(self, memo: dict[int, Any]) -> RideOut:
        # redis-py copies the policy into every connection; the outage is one per process.
        copy = RideOut(outage=self.outage, window_s=self.window_s, cap_s=self.cap_s)
        copy._supported_errors = self._supported_errors
        return copy

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RideOut):
            return NotImplemented
        return (self.outage, self.window_s, self.cap_s) == (
            other.outage,
            other.window_s,
            other.cap_s,
        )

    __hash__ = Retry.__hash__

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        """Run ``do`` until it succeeds, or until it has failed for ``window_s`` (then raise).

        The window starts at the first failure of a run of failures. An attempt whose
        connection was closed after :data:`CONNECTED_S` had been working (a blocked
        read, say): the run starts again there, retried at once — but never past
        twice the window from the first try. A timeout always counts as a failure.
        """
        failures, first_s = 0, 0.0
        started = time.monotonic()
        while True:
            began = time.monotonic()
            try:
                result = await do()
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                now = time.monotonic()
                if (
                    now - began >= CONNECTED_S
                    and not isinstance(error, rex.TimeoutError)
                    and now - started < 2 * self.window_s
                ):
                    failures = 0
                failures += 1
                if with_failure_count:
                    await fail(error, failures)
                else:
                    await fail(error)
                if failures == 1:
                    # A connection Redis or the network closed (a restart, a proxy, an
                    # idle timeout): a new one usually works at once; no outage yet.
                    first_s = now
                    continue
                delay = backoff_s(failures - 1, cap_s=self.cap_s)
                if now + delay > first_s + self.window_s:
                    raise
                self.outage.failed(error, retry_in_s=delay)
                await asyncio.sleep(delay)
            else:
                if failures:
                    # Only a call that failed and then got through proves Redis is back:
                    # redis-py also runs this policy around steps that succeed without
                    # Redis (connecting a connection it believes connected).
                    self.outage.answered()
                return result


def riding_client(url: str, *, outage: Outage, window_s: float) -> Client:
    """A Redis client (``decode_responses``) whose commands ride out an outage of ``window_s``.

    On a Redis Cluster a command rides out a failover for the same window, above
    redis-py's own retries (see ``budgets.connection._Cluster``); the outage is
    not logged there.
    """
    retry = RideOut(outage=outage, window_s=window_s, cap_s=min(1.0, max(0.05, window_s / 10)))
    client: Client = redis_client(
        url,
        ride_out_s=window_s,
        retry=retry,
        retry_on_error=[rex.ConnectionError, rex.TimeoutError],
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=REPLY_TIMEOUT_S,
    )
    return client
