"""What the ledger shows: a task's account tree and its audit events (pydantic, JSON-ready)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from budgets.money import UNLIMITED, nanos_to_usd


class ReservationView(BaseModel):
    """One open reservation: what it holds and until when."""

    model_config = ConfigDict(frozen=True)

    id: str
    account: str
    tokens: int
    nanos: int
    deadline_ms: int
    tags: dict[str, str] = Field(default_factory=dict)


class ReservationState(StrEnum):
    """Where a reservation is: ``held`` -> ``committed`` | ``released`` | ``expired``.

    An expired reservation may still be committed (late); the others are final.
    ``waiting`` (for held money to settle) -> ``held``, or the record is deleted.
    """

    WAITING = "waiting"
    HELD = "held"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


class ReservationRecord(BaseModel):
    """A reservation's one record: its hold, its state, and what its commit recorded."""

    model_config = ConfigDict(frozen=True)

    id: str
    account: str
    state: ReservationState
    tokens: int
    nanos: int
    deadline_ms: int
    used_tokens: int
    used_nanos: int
    overrun_tokens: int
    overrun_nanos: int
    late: bool
    estimated: bool
    tags: dict[str, str] = Field(default_factory=dict)

    def view(self) -> ReservationView:
        """The record as an open reservation of a snapshot."""
        return ReservationView(
            id=self.id,
            account=self.account,
            tokens=self.tokens,
            nanos=self.nanos,
            deadline_ms=self.deadline_ms,
            tags=self.tags,
        )


def reservation_from_record(rid: str, packed: str) -> ReservationRecord:
    """Read a record written by ``save_res`` in ``budgets/lua/_prelude.lua``."""
    state, account, t, n, deadline, ut, un, ot, on, flags, tags = packed.split("|", 10)
    return ReservationRecord(
        id=rid,
        account=account,
        state=ReservationState(state),
        tokens=int(t),
        nanos=int(n),
        deadline_ms=int(deadline),
        used_tokens=int(ut),
        used_nanos=int(un),
        overrun_tokens=int(ot),
        overrun_nanos=int(on),
        late=flags[:1] == "1",
        estimated=flags[1:2] == "1",
        tags=parse_tags(tags),
    )


class AccountView(BaseModel):
    """One account of a task's tree.

    ``spent_*`` is this account's own calls; ``total_spent_*`` adds every
    descendant, open or closed, exactly once. Limits and ``available_*`` are
    ``None`` where the account is unlimited.
    """

    model_config = ConfigDict(frozen=True)

    path: str
    parent: str | None
    closed: bool
    limit_tokens: int | None
    limit_nanos: int | None
    reserved_tokens: int
    reserved_nanos: int
    spent_tokens: int
    spent_nanos: int
    carved_tokens: int = Field(description="limits of open children, carved out of this one")
    carved_nanos: int
    closed_children_spent_tokens: int
    closed_children_spent_nanos: int
    overrun_tokens: int
    overrun_nanos: int
    estimated_commits: int
    late_commits: int
    open_reservations: int
    open_children: int
    waiting_reservations: int = Field(default=0, description="reserves waiting for held money")
    reservations: list[ReservationView] = Field(default_factory=list)
    children: list[AccountView] = Field(default_factory=list)

    def _room(
        self, limit: int | None, reserved: int, spent: int, carved: int, sunk: int
    ) -> int | None:
        if limit is None:
            return None
        return limit - reserved - spent - carved - sunk

    @property
    def room_tokens(self) -> int | None:
        """Raw tokens left (negative only after an overrun); ``None`` if unlimited."""
        return self._room(
            self.limit_tokens,
            self.reserved_tokens,
            self.spent_tokens,
            self.carved_tokens,
            self.closed_children_spent_tokens,
        )

    @property
    def room_nanos(self) -> int | None:
        """Raw nano-dollars left (negative only after an overrun); ``None`` if unlimited."""
        return self._room(
            self.limit_nanos,
            self.reserved_nanos,
            self.spent_nanos,
            self.carved_nanos,
            self.closed_children_spent_nanos,
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def available_tokens(self) -> int | None:
        """Tokens this account can still reserve or carve (0 once closed)."""
        room = self.room_tokens
        return None if room is None else 0 if self.closed else max(0, room)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def available_nanos(self) -> int | None:
        """Nano-dollars this account can still reserve or carve (0 once closed)."""
        room = self.room_nanos
        return None if room is None else 0 if self.closed else max(0, room)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_spent_tokens(self) -> int:
        """Tokens spent by this account and all its descendants."""
        return self.spent_tokens + sum(c.total_spent_tokens for c in self.children)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_spent_nanos(self) -> int:
        """Nano-dollars spent by this account and all its descendants."""
        return self.spent_nanos + sum(c.total_spent_nanos for c in self.children)

    @property
    def total_spent_usd(self) -> Decimal:
        """Dollars spent by this account and all its descendants."""
        return nanos_to_usd(self.total_spent_nanos)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_reserved_tokens(self) -> int:
        """Tokens held by open reservations here and below."""
        return self.reserved_tokens + sum(c.total_reserved_tokens for c in self.children)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_reserved_nanos(self) -> int:
        """Nano-dollars held by open reservations here and below."""
        return self.reserved_nanos + sum(c.total_reserved_nanos for c in self.children)

    def walk(self) -> Iterator[AccountView]:
        """This account and every descendant, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


class TaskTree(BaseModel):
    """A snapshot of one task's accounts, read in one round trip."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    tenant: str | None
    status: str
    created_ms: int
    root: AccountView

    def walk(self) -> Iterator[AccountView]:
        """Every account of the task, depth first from the root."""
        return self.root.walk()

    def account(self, path: str) -> AccountView:
        """The account at ``path``; ``KeyError`` if there is none."""
        for acct in self.walk():
            if acct.path == path:
                return acct
        raise KeyError(path)


class LedgerEvent(BaseModel):
    """One entry of a task's audit stream."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="the Redis stream id; its first part is the time in ms")
    op: str
    account: str
    tokens: int
    nanos: int
    op_id: str
    tags: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, str] = Field(default_factory=dict)

    @property
    def ts_ms(self) -> int:
        """When the event was written, by the Redis clock."""
        return int(self.id.split("-", 1)[0])


def _int(fields: Mapping[str, str], name: str) -> int:
    return int(fields.get(name) or 0)


def _limit(fields: Mapping[str, str], name: str) -> int | None:
    value = _int(fields, name)
    return None if value == UNLIMITED else value


def parse_tags(raw: str | None) -> dict[str, str]:
    """Tags are stored as a JSON object of strings; anything else reads as no tags."""
    if not raw:
        return {}
    try:
        data: Any = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def account_from_hash(
    path: str, fields: Mapping[str, str], reservations: list[ReservationView]
) -> AccountView:
    """Build an account view (without children) from its Redis hash."""
    parent = fields.get("parent") or None
    return AccountView(
        path=path,
        parent=parent,
        closed=fields.get("closed") == "1",
        limit_tokens=_limit(fields, "lt"),
        limit_nanos=_limit(fields, "ln"),
        reserved_tokens=_int(fields, "rt"),
        reserved_nanos=_int(fields, "rn"),
        spent_tokens=_int(fields, "st"),
        spent_nanos=_int(fields, "sn"),
        carved_tokens=_int(fields, "at"),
        carved_nanos=_int(fields, "an"),
        closed_children_spent_tokens=_int(fields, "ct"),
        closed_children_spent_nanos=_int(fields, "cn"),
        overrun_tokens=_int(fields, "ot"),
        overrun_nanos=_int(fields, "on"),
        estimated_commits=_int(fields, "nest"),
        late_commits=_int(fields, "nlate"),
        open_reservations=_int(fields, "nres"),
        open_children=_int(fields, "nkids"),
        waiting_reservations=_int(fields, "nwait"),
        reservations=reservations,
    )


def assemble(flat: dict[str, AccountView]) -> AccountView:
    """Link flat account views into a tree and return its root."""
    kids: dict[str, list[str]] = {}
    for path, acct in flat.items():
        if acct.parent is not None:
            kids.setdefault(acct.parent, []).append(path)

    def build(path: str) -> AccountView:
        children = [build(p) for p in sorted(kids.get(path, []))]
        return flat[path].model_copy(update={"children": children})

    return build("root")
