"""``paymaster serve``: a read-only web page per task, its ledger live from the event stream.

Routes (every one ``GET``; there is no write action):

- ``/`` — recent tasks, grouped by tenant;
- ``/tasks/{id}`` — the task's status and answer, its account tree with limit,
  reserved and spent bars, and its event stream appended live;
- ``/api/tasks/{id}/ledger`` — what ``paymaster ledger ID --json`` prints;
- ``/api/tasks/{id}/events`` — what ``paymaster events ID --json`` prints, as one list;
- ``/api/tasks/{id}/stream`` — server-sent events: each ledger event as it is
  written, the tree and the status after each batch, ``end`` once the task is final.

Bound to 127.0.0.1 by default. A token (``--token``, or ``PAYMASTER_SERVE_TOKEN``)
is then optional, and required to listen anywhere else; with one, every request
carries it (``?token=`` or ``Authorization: Bearer``). Task text (the prompt) is
shown only with ``--show-prompts``; answers and notes pass through the same
credential redaction as the logs, and every value reaches the page as text
(escaped on the server, ``textContent`` in the browser), never as markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.exceptions
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agents.redact import redact
from budgets import Ledger, LedgerEvent
from budgets.errors import InvalidName, UnknownTask
from budgets.keys import SHARED_SPACE, KeySpace, check_task_id
from orchestrator.page_assets import SCRIPT, STYLE
from orchestrator.records import Records, TaskRecord

#: How many tasks the index lists per tenant, and how many task records it looks at.
INDEX_PER_TENANT = 50
INDEX_SCAN_MAX = 5_000
#: How often the stream looks for new events while the task runs.
POLL_S = 0.25
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """What the page server needs: where the ledger is, who may look, what it shows."""

    redis_url: str
    token: str | None = None
    show_prompts: bool = False
    poll_s: float = POLL_S
    #: Whose ledgers: every unfenced one, or one tenant's (``PAYMASTER_TENANT``).
    space: KeySpace = SHARED_SPACE


def needs_token(host: str) -> bool:
    """Anything but loopback must be protected by a token."""
    return host not in LOOPBACK


_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _page(
    title: str, body: str, *, status: int = 200, data: dict[str, str] | None = None
) -> HTMLResponse:
    attrs = "".join(f' data-{k}="{html.escape(v, quote=True)}"' for k, v in (data or {}).items())
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title>"
        '<link rel=stylesheet href="/static/page.css"></head>'
        f"<body{attrs}>{body}"
        '<script src="/static/page.js"></script></body></html>'
    )
    return HTMLResponse(doc, status_code=status, headers=_HEADERS)


def _error_page(status: int, message: str) -> HTMLResponse:
    return _page(
        f"{status} — Paymaster",
        f"<main><h1>{status}</h1><p id=error>{html.escape(message)}</p>"
        '<p><a href="/">all tasks</a></p></main>',
        status=status,
    )


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_HEADERS)


def _event_json(ev: LedgerEvent) -> dict[str, Any]:
    data = ev.model_dump()
    data["extra"] = {k: redact(v) for k, v in ev.extra.items()}
    return data


class PageApp:
    """The Starlette app and the Redis reads behind it."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._ledger: Ledger | None = None
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/tasks/{task_id:path}", self.task_page),
                Route("/api/tasks/{task_id}/ledger", self.api_ledger),
                Route("/api/tasks/{task_id}/events", self.api_events),
                Route("/api/tasks/{task_id}/stream", self.api_stream),
                Route("/static/page.js", self.script),
                Route("/static/page.css", self.style),
            ],
            lifespan=self._lifespan,
            exception_handlers={
                redis.exceptions.ConnectionError: self._unreachable,
                redis.exceptions.TimeoutError: self._unreachable,
            },
        )
        self.app.add_middleware(_TokenGate, token=settings.token)

    async def _unreachable(self, request: Request, exc: Exception) -> Response:
        """Redis down: 503, a page or a JSON error, never a traceback."""
        message = "the ledger's Redis is unreachable; try again shortly"
        if request.url.path.startswith("/api/"):
            return _json_error(503, message)
        return _error_page(503, message)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._ledger = Ledger.from_url(self.settings.redis_url, space=self.settings.space)
        try:
            yield
        finally:
            await self._ledger.aclose()

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "the app's lifespan opens the ledger"
        return self._ledger

    async def _record(self, raw_id: str) -> TaskRecord | str:
        """The task's record, or why there is none (a message for a 404)."""
        try:
            task_id = check_task_id(raw_id)
        except InvalidName:
            return f"no task {raw_id!r}: not a valid task id"
        record = await Records(self.ledger.redis, space=self.ledger.space).get(task_id)
        return record if record is not None else f"no task {task_id!r}"

    # -- pages ---------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        """Recent tasks per tenant, newest first (the task records Redis still holds)."""
        rows = await self._recent()
        by_tenant: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_tenant.setdefault(row["tenant"], []).append(row)
        parts = ["<main><h1>Paymaster — recent tasks</h1>"]
        if not rows:
            parts.append("<p>No tasks yet.</p>")
        token = self._token_query(request)
        for tenant in sorted(by_tenant):
            name = tenant or "(no tenant)"
            parts.append(f"<h2>{html.escape(name)}</h2><table class=tasks><tr>")
            parts.append("<th>task</th><th>status</th><th>created</th><th>spent</th>")
            if self.settings.show_prompts:
                parts.append("<th>task text</th>")
            parts.append("</tr>")
            for row in by_tenant[tenant][:INDEX_PER_TENANT]:
                tid = html.escape(row["id"])
                link = f'<a href="/tasks/{tid}{token}">{tid}</a>'
                cells = [link, html.escape(row["status"]), row["created"], row["spent"]]
                if self.settings.show_prompts:
                    cells.append(html.escape(row["task"][:200]))
                parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            parts.append("</table>")
        parts.append("</main>")
        return _page("Paymaster", "".join(parts))

    async def _recent(self) -> list[dict[str, str]]:
        redis = self.ledger.redis
        keys: list[str] = []
        space = self.ledger.space
        async for key in redis.scan_iter(match=space.task_pattern, count=500):
            keys.append(str(key))
            if len(keys) >= INDEX_SCAN_MAX:
                break
        pipe = redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, "status", "tenant", "created_s", "spent", "task")
        rows = []
        for key, values in zip(keys, await pipe.execute(), strict=True):
            status, tenant, created, spent, task = cast("list[str | None]", values)
            task_id = space.task_id_of(key)
            if status is None or created is None or task_id is None:
                continue
            tokens = json.loads(spent)["tokens"] if spent else None
            rows.append(
                {
                    "id": task_id,
                    "status": status,
                    "tenant": tenant or "",
                    "created_s": created,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(created))),
                    "spent": "-" if tokens is None else f"{tokens:,} tokens",
                    "task": task or "",
                }
            )
        rows.sort(key=lambda r: -float(r["created_s"]))
        return rows

    async def task_page(self, request: Request) -> Response:
        """One task: status, answer, the account tree, the event stream (filled live)."""
        found = await self._record(request.path_params["task_id"])
        if isinstance(found, str):
            return _error_page(404, found)
        tid = html.escape(found.id)
        prompt = ""
        if self.settings.show_prompts:
            prompt = f"<h2>Task</h2><pre id=prompt>{html.escape(found.task)}</pre>"
        body = (
            f'<main><p><a href="/{self._token_query(request)}">all tasks</a></p>'
            f"<h1>Task <code>{tid}</code></h1>"
            f"<p>status: <strong id=status>{html.escape(found.status.value)}</strong>"
            f" <span id=spent></span></p>{prompt}"
            "<h2>Answer</h2><pre id=answer></pre>"
            "<h2>Accounts</h2><div id=tree></div>"
            "<h2>Events</h2><ol id=events></ol></main>"
        )
        data = {"task": found.id, "token": self.settings.token or ""}
        return _page(f"Task {found.id} — Paymaster", body, data=data)

    def _token_query(self, request: Request) -> str:
        return f"?token={html.escape(self.settings.token)}" if self.settings.token else ""

    # -- JSON ----------------------------------------------------------------------------

    async def api_ledger(self, request: Request) -> Response:
        """What ``paymaster ledger ID --json`` prints."""
        found = await self._record(request.path_params["task_id"])
        if isinstance(found, str):
            return _json_error(404, found)
        try:
            tree = await self.ledger.snapshot(found.id)
        except UnknownTask:
            return _json_error(404, f"task {found.id!r} has no ledger (expired or never opened)")
        return Response(tree.model_dump_json(), media_type="application/json", headers=_HEADERS)

    async def api_events(self, request: Request) -> Response:
        """What ``paymaster events ID --json`` prints, one list."""
        found = await self._record(request.path_params["task_id"])
        if isinstance(found, str):
            return _json_error(404, found)
        events = await self.ledger.events(found.id)
        return JSONResponse([_event_json(e) for e in events], headers=_HEADERS)

    async def api_stream(self, request: Request) -> Response:
        """Server-sent events: ``ledger`` per event, ``tree`` and ``task`` per batch, ``end``."""
        found = await self._record(request.path_params["task_id"])
        if isinstance(found, str):
            return _json_error(404, found)
        headers = {**_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(
            self._stream(found.id, request.is_disconnected),
            media_type="text/event-stream",
            headers=headers,
        )

    async def _stream(
        self, task_id: str, disconnected: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[str]:
        records = Records(self.ledger.redis, space=self.ledger.space)
        after, first = "-", True
        while True:
            events = await self.ledger.events(task_id, after=after)
            record = await records.get(task_id)
            for ev in events:
                after = ev.id
                yield _sse("ledger", _event_json(ev))
            if events or first:
                first = False
                if await self.ledger.redis.exists(self.ledger.space.task(task_id).accounts):
                    tree = await self.ledger.snapshot(task_id)
                    yield f"event: tree\ndata: {tree.model_dump_json()}\n\n"
            if record is not None:
                yield _sse("task", self._task_json(record))
            if record is None or record.status.final:
                yield _sse("end", {})
                return
            if await disconnected():
                return
            await asyncio.sleep(self.settings.poll_s)

    def _task_json(self, record: TaskRecord) -> dict[str, Any]:
        return {
            "id": record.id,
            "status": record.status.value,
            "final": record.status.final,
            "answer": redact(record.answer) if record.answer else None,
            "error": redact(record.error) if record.error else None,
            "spent": record.spent.model_dump() if record.spent else None,
        }

    # -- static --------------------------------------------------------------------------

    async def script(self, request: Request) -> Response:
        """The page's script: renders the stream with ``textContent`` only."""
        return Response(SCRIPT, media_type="text/javascript", headers=_HEADERS)

    async def style(self, request: Request) -> Response:
        """The page's style sheet."""
        return Response(STYLE, media_type="text/css", headers=_HEADERS)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class _TokenGate:
    """With a token configured, every request must carry it (query or bearer header)."""

    def __init__(self, app: Any, *, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if hmac.compare_digest(given.encode(), self.token.encode()):
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/api/"):
            response: Response = _json_error(401, "a token is required: ?token= or Bearer")
        else:
            response = _error_page(401, "a token is required: add ?token=… to the address")
        await response(scope, receive, send)


def build_app(settings: ServeSettings) -> Starlette:
    """The page server's ASGI app."""
    return PageApp(settings).app
