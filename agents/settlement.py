"""How each outcome of a model call is paid: one table, by whether the server could have billed it.

Every attempt of a metered call ends in exactly one :class:`Outcome`, decided
by :func:`classify` from what ended it (a reply, or an exception) and how far
the request got (:class:`Progress`). :data:`RULES` says how it is paid and
whether it may be retried:

========================  ===============  =========================================  =========
outcome                   could it bill?   paid                                       retried
========================  ===============  =========================================  =========
``reply``                 yes              usage; the reservation, estimated, if the  —
                                           reply carries no usable usage
``bad_reply``             yes              usage if reported, else the reservation,   no
                          (it answered)    estimated (not JSON, wrong shape, no
                                           choices, an error event in a stream)
``stream_cut``            yes              usage if reported, else the reservation,   no
                                           estimated (dropped or stalled after
                                           chunks arrived)
``read_timeout``          yes              the reservation, estimated                 yes
``connection_lost``       yes              the reservation, estimated (sent, then     yes
                                           the connection failed before a reply)
``cancelled_after_send``  yes              the reservation, estimated; the            no
                                           ``CancelledError`` is re-raised
``failed_after_send``     yes              the reservation, estimated; the error      no
                                           is re-raised
``retryable_status``      no               released (429, 5xx)                        yes
``refused_status``        no               released (any other 4xx)                   no
``not_connected``         no               released (refused, connect or pool         yes
                                           timeout: nothing left the machine)
``cancelled_before_send`` no               released; re-raised                        no
``failed_before_send``    no               released; re-raised (a missing API key)    no
``ledger_refused``        no               nothing was held (``BudgetExceeded``)      no
========================  ===============  =========================================  =========

"Sent" means the first byte of the request headers went out on a connection,
as the HTTP layer reports it through :class:`Progress` (a connect timeout is
told apart from a read timeout by its cause, ``httpx2.ConnectTimeout``). The
metered call settles every attempt once, in one ``finally``, by this table.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

import httpx
import httpx2
import openai

from agents.errors import ModelCallFailed
from agents.redact import short
from agents.replies import BadReply, Usage
from budgets import BudgetExceeded


class Outcome(StrEnum):
    """How one attempt of a model call ended; each is one row of :data:`RULES`."""

    REPLY = "reply"
    BAD_REPLY = "bad_reply"
    STREAM_CUT = "stream_cut"
    READ_TIMEOUT = "read_timeout"
    CONNECTION_LOST = "connection_lost"
    CANCELLED_AFTER_SEND = "cancelled_after_send"
    FAILED_AFTER_SEND = "failed_after_send"
    RETRYABLE_STATUS = "retryable_status"
    REFUSED_STATUS = "refused_status"
    NOT_CONNECTED = "not_connected"
    CANCELLED_BEFORE_SEND = "cancelled_before_send"
    FAILED_BEFORE_SEND = "failed_before_send"
    LEDGER_REFUSED = "ledger_refused"


class Pay(StrEnum):
    """What the ledger does with an attempt's reservation."""

    USAGE = "usage"  # commit the reported usage
    RESERVATION = "reservation"  # commit the whole reservation, flagged estimated
    RELEASE = "release"  # drop it unspent
    NOTHING = "nothing"  # nothing was held


@dataclass(frozen=True, slots=True)
class Rule:
    """How one outcome is paid: ``billable`` (could the server have billed it?) and ``retry``."""

    billable: bool
    retry: bool
    held: bool = True

    def pay(self, usage: Usage | None) -> Pay:
        """What to do with the reservation, given the usage reported (if any)."""
        if not self.held:
            return Pay.NOTHING
        if not self.billable:
            return Pay.RELEASE
        return Pay.RESERVATION if usage is None else Pay.USAGE


RULES: Final = MappingProxyType(
    {
        Outcome.REPLY: Rule(billable=True, retry=False),
        Outcome.BAD_REPLY: Rule(billable=True, retry=False),
        Outcome.STREAM_CUT: Rule(billable=True, retry=False),
        Outcome.READ_TIMEOUT: Rule(billable=True, retry=True),
        Outcome.CONNECTION_LOST: Rule(billable=True, retry=True),
        Outcome.CANCELLED_AFTER_SEND: Rule(billable=True, retry=False),
        Outcome.FAILED_AFTER_SEND: Rule(billable=True, retry=False),
        Outcome.RETRYABLE_STATUS: Rule(billable=False, retry=True),
        Outcome.REFUSED_STATUS: Rule(billable=False, retry=False),
        Outcome.NOT_CONNECTED: Rule(billable=False, retry=True),
        Outcome.CANCELLED_BEFORE_SEND: Rule(billable=False, retry=False),
        Outcome.FAILED_BEFORE_SEND: Rule(billable=False, retry=False),
        Outcome.LEDGER_REFUSED: Rule(billable=False, retry=False, held=False),
    }
)
"""The one settlement table; see the module docstring."""


@dataclass(slots=True)
class Progress:
    """How far one attempt got, recorded as it goes (the HTTP layer sets ``sent``).

    ``traced`` says the HTTP layer reports sending at all; without it a request
    that was handed to the client counts as sent (the safe side: charged).
    """

    requested: bool = False
    traced: bool = False
    sent: bool = False
    chunks: int = 0
    usage: Usage | None = None

    @property
    def may_have_sent(self) -> bool:
        """True once any byte of the request may have left the machine."""
        return self.sent or (self.requested and not self.traced)


# Failures of the connect phase: no byte of the request left the machine.
_NEVER_SENT: Final = (
    httpx2.ConnectError,
    httpx2.ConnectTimeout,
    httpx2.PoolTimeout,
    httpx2.UnsupportedProtocol,
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)
_TIMEOUTS: Final = (httpx2.TimeoutException, httpx.TimeoutException)


def classify(error: BaseException | None, *, progress: Progress) -> Outcome:
    """The outcome of an attempt that ended with ``error`` (``None``: a usable reply)."""
    sent = progress.may_have_sent
    match error:
        case None:
            return Outcome.REPLY
        case asyncio.CancelledError():
            return Outcome.CANCELLED_AFTER_SEND if sent else Outcome.CANCELLED_BEFORE_SEND
        case BudgetExceeded():  # only the reserve raises it, before anything is sent
            return Outcome.LEDGER_REFUSED
        case BadReply() | json.JSONDecodeError() | openai.APIResponseValidationError():
            return Outcome.BAD_REPLY
        case openai.APIStatusError(status_code=status):
            retryable = status == 429 or status >= 500
            return Outcome.RETRYABLE_STATUS if retryable else Outcome.REFUSED_STATUS
        case openai.APIConnectionError() | httpx2.TransportError() | httpx.TransportError():
            cause = error.__cause__ if isinstance(error, openai.APIConnectionError) else error
            if isinstance(cause, _NEVER_SENT) or not sent:
                return Outcome.NOT_CONNECTED
            if progress.chunks:
                return Outcome.STREAM_CUT
            timed_out = isinstance(error, openai.APITimeoutError) or isinstance(cause, _TIMEOUTS)
            return Outcome.READ_TIMEOUT if timed_out else Outcome.CONNECTION_LOST
        case openai.APIError():  # an error event inside a streamed 200 reply
            return Outcome.BAD_REPLY
        case _:
            return Outcome.FAILED_AFTER_SEND if sent else Outcome.FAILED_BEFORE_SEND


_RAISED_AS_IS: Final = frozenset(
    {
        Outcome.REPLY,
        Outcome.CANCELLED_AFTER_SEND,
        Outcome.CANCELLED_BEFORE_SEND,
        Outcome.FAILED_AFTER_SEND,
        Outcome.FAILED_BEFORE_SEND,
        Outcome.LEDGER_REFUSED,
    }
)


def failure(
    outcome: Outcome, error: BaseException, *, endpoint: str, progress: Progress
) -> ModelCallFailed | None:
    """The typed error an outcome raises, or ``None`` where ``error`` is re-raised as it is.

    Its ``transient`` is the rule's ``retry``; its reason is short and redacted.
    """
    if outcome in _RAISED_AS_IS:
        return None
    status = error.status_code if isinstance(error, openai.APIStatusError) else None
    return ModelCallFailed(
        endpoint,
        _reason(outcome, error, progress=progress),
        transient=RULES[outcome].retry,
        status=status,
        retry_after_s=_retry_after_s(error),
    )


def _reason(outcome: Outcome, error: BaseException, *, progress: Progress) -> str:
    cause = error.__cause__ if isinstance(error, openai.APIConnectionError) else error
    what = type(cause or error).__name__
    match outcome:
        case Outcome.BAD_REPLY if isinstance(error, BadReply):
            return error.reason
        case Outcome.BAD_REPLY if isinstance(error, openai.APIResponseValidationError | ValueError):
            return "the reply was not valid JSON"
        case Outcome.BAD_REPLY if isinstance(error, openai.APIError):
            return f"the reply reported an error: {short(error.message, limit=120)}"
        case Outcome.STREAM_CUT:
            return f"the stream was cut off after {progress.chunks} chunks ({what})"
        case Outcome.READ_TIMEOUT:
            return f"no reply before the timeout ({what})"
        case Outcome.CONNECTION_LOST:
            return f"the connection failed after the request was sent ({what})"
        case Outcome.NOT_CONNECTED:
            return f"could not connect ({what})"
        case Outcome.RETRYABLE_STATUS | Outcome.REFUSED_STATUS if isinstance(
            error, openai.APIStatusError
        ):
            said = _provider_message(error.body)
            return (
                f"HTTP {error.status_code}: {short(said, limit=120)}"
                if said
                else (f"HTTP {error.status_code}")
            )
        case _:
            return what


def _provider_message(body: object) -> str:
    # openai hands over the body's "error" object; some servers nest it once more.
    if isinstance(body, dict):
        inner = body.get("error")
        nested = inner.get("message") if isinstance(inner, dict) else inner
        message = body.get("message") or nested
        return message if isinstance(message, str) else ""
    return ""


def _retry_after_s(error: BaseException) -> float | None:
    if not isinstance(error, openai.APIStatusError):
        return None
    raw = error.response.headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None
