"""``paymaster serve``: a real server process over the real Redis; a real headless browser."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from typer.testing import CliRunner

from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer
from budgets import Budget
from orchestrator.api import Paymaster
from orchestrator.cli import app as cli_app
from orchestrator.records import Status
from orchestrator.redis_server import RedisServer
from tests.test_orchestrator import REPO, responder, sub, worker_text
from tests.test_orchestrator import pm as pm

__all__ = ["pm"]  # the fixture

TOKEN = "s3cret-token-0123456789"


class Served:
    """``python -m orchestrator.cli serve --port 0`` in a subprocess."""

    def __init__(self, env: Mapping[str, str], log: Path, *args: str) -> None:
        self.log = log
        self._file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve", "--port", "0", *args],
            env=dict(env),
            cwd=REPO,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 40
        while b"serving on http://" not in log.read_bytes():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the page server did not start"
            time.sleep(0.05)
        line = next(ln for ln in log.read_text().splitlines() if "serving on http://" in ln)
        self.url = line.split("serving on ", 1)[1].strip().rstrip("/")

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._file.close()


@pytest.fixture
def serve(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str, **extra_env: str) -> Served:
        s = Served({**env, **extra_env}, tmp_path / f"serve{len(started)}.log", *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One page server for the module's tests (each test's Redis is the same server, flushed)."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PAYMASTER_", "REDIS_"))}
    home = tmp_path_factory.mktemp("serve")
    env = {**keep, "REDIS_URL": redis_server.url, "PAYMASTER_HOME": str(home)}
    s = Served(env, home / "serve.log")
    yield s
    s.stop()


async def test_the_json_endpoints_return_what_the_cli_prints(
    pm: Paymaster, stub: ScriptedModelServer, served: Served
) -> None:
    stub.responder = responder([sub("a"), sub("b", "a")])
    await pm.aset_tenant("acme", Budget(tokens=1_000_000), period="month")
    rec = await pm.arun("the secret prompt", budget=Budget(tokens=20_000), tenant="acme")
    assert rec.status is Status.SUCCEEDED
    s = served
    ledger, events, page, index, stream = await asyncio.gather(
        asyncio.to_thread(s.get, f"/api/tasks/{rec.id}/ledger"),
        asyncio.to_thread(s.get, f"/api/tasks/{rec.id}/events"),
        asyncio.to_thread(s.get, f"/tasks/{rec.id}"),
        asyncio.to_thread(s.get, "/"),
        asyncio.to_thread(s.get, f"/api/tasks/{rec.id}/stream"),
    )
    assert ledger.status_code == 200
    assert ledger.json() == json.loads((await pm.aledger(rec.id)).model_dump_json())
    assert events.status_code == 200
    assert events.json() == [json.loads(e.model_dump_json()) for e in await pm.aevents(rec.id)]
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert rec.id in page.text
    assert "the secret prompt" not in page.text  # prompts only with --show-prompts
    assert index.status_code == 200
    assert rec.id in index.text
    assert "acme" in index.text
    assert "the secret prompt" not in index.text
    # A finished task's stream: every event, the tree, the status, then the end.
    assert stream.headers["content-type"].startswith("text/event-stream")
    kinds = [ln.split(": ", 1)[1] for ln in stream.text.splitlines() if ln.startswith("event: ")]
    assert kinds.count("ledger") == len(events.json())
    assert kinds[-3:] == ["tree", "task", "end"]
    task = json.loads(stream.text.split("event: task\ndata: ", 1)[1].split("\n", 1)[0])
    assert task["status"] == "succeeded"
    assert task["answer"] == rec.answer


async def test_a_key_in_an_answer_never_reaches_the_page(
    pm: Paymaster, stub: ScriptedModelServer, served: Served
) -> None:
    key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"
    stub.responder = responder([sub("a")], lambda sid, req: Reply(text=f"use {key} <b>x</b>"))
    rec = await pm.arun("leak it", budget=Budget(tokens=20_000), task_id="leaky")
    assert rec.answer is not None
    assert key in rec.answer  # the record keeps what the model said; the page does not show it
    stream = await asyncio.to_thread(served.get, "/api/tasks/leaky/stream")
    assert key not in stream.text
    task = json.loads(stream.text.split("event: task\ndata: ", 1)[1].split("\n", 1)[0])
    assert task["answer"] == "use [REDACTED] <b>x</b>"  # shown as text by the page's script


async def test_unknown_and_hostile_ids_are_404s_with_the_id_escaped(
    redis_url: str, served: Served
) -> None:
    s = served
    page = await asyncio.to_thread(s.get, "/tasks/nosuchtask")
    assert page.status_code == 404
    assert "no task &#x27;nosuchtask&#x27;" in page.text or "no task 'nosuchtask'" in page.text
    api = await asyncio.to_thread(s.get, "/api/tasks/nosuchtask/ledger")
    assert api.status_code == 404
    assert api.json() == {"error": "no task 'nosuchtask'"}
    events = await asyncio.to_thread(s.get, "/api/tasks/nosuchtask/events")
    assert events.status_code == 404
    hostile = "<script>alert(1)</script>"
    bad = await asyncio.to_thread(s.get, "/tasks/" + quote(hostile, safe=""))
    assert bad.status_code == 404
    assert "<script>alert" not in bad.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in bad.text
    bad_api = await asyncio.to_thread(s.get, "/api/tasks/%3Cb%3Ex/ledger")
    assert bad_api.status_code == 404
    assert "not a valid task id" in bad_api.json()["error"]
    # Read-only: no method but GET (and HEAD) is served.
    posted = await asyncio.to_thread(httpx.post, f"{s.url}/api/tasks/x/ledger", timeout=10)
    assert posted.status_code == 405


async def test_a_token_guards_every_route_and_is_needed_beyond_loopback(
    env: dict[str, str], serve: Callable[..., Served], pm: Paymaster
) -> None:
    queued = await pm.asubmit("the secret prompt", budget=Budget(tokens=1_000))
    # Refused before anything is served (the command itself, run in this process).
    runner = CliRunner()
    open_ = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--port", "0"], env=env)
    short = runner.invoke(cli_app, ["serve", "--port", "0", "--token", "short"], env=env)
    assert open_.exit_code == 2, open_.output
    assert "needs a token" in open_.output
    assert short.exit_code == 2, short.output
    assert "too short" in short.output
    s = await asyncio.to_thread(serve, "--token", TOKEN, "--show-prompts")
    for path in ("/", "/tasks/x", "/api/tasks/x/ledger", "/static/page.js"):
        denied = await asyncio.to_thread(s.get, path)
        assert denied.status_code == 401, path
        wrong = await asyncio.to_thread(s.get, path + "?token=nope")
        assert wrong.status_code == 401, path
    ok = await asyncio.to_thread(s.get, f"/?token={TOKEN}")
    assert ok.status_code == 200
    assert f'href="/tasks/{queued.id}?token={TOKEN}"' in ok.text  # links keep the token
    assert "the secret prompt" in ok.text  # --show-prompts
    page = await asyncio.to_thread(s.get, f"/tasks/{queued.id}?token={TOKEN}")
    assert "the secret prompt" in page.text
    bearer = await asyncio.to_thread(
        s.get, "/api/tasks/nosuch/ledger", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert bearer.status_code == 404  # past the gate


def _browser() -> Any:
    """A headless Chromium under Selenium, or a skip saying what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "no Chromium or chromedriver (Debian: apt-get install -y chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


async def test_the_page_fills_live_in_a_real_browser(
    pm: Paymaster, stub: ScriptedModelServer, served: Served, tmp_path: Path
) -> None:
    browser = await asyncio.to_thread(_browser)

    def worker(sid: str, req: RecordedRequest) -> Reply:
        return Reply(text=worker_text(sid), delay_s=2.0 if sid == "b" else 0.0)

    stub.responder = responder([sub("a"), sub("b", "a")], worker)
    s = served
    task_id = "livepage"
    run = asyncio.create_task(pm.arun("watch me", budget=Budget(tokens=20_000), task_id=task_id))
    try:

        def spent_of(account: str) -> int:
            found = browser.execute_script(
                "var r = document.querySelector('[data-account=\"' + arguments[0] + '\"] .bar');"
                "return r ? parseInt(r.dataset.spent, 10) : -1;",
                account,
            )
            return int(found)

        def status() -> str:
            return str(browser.find_element("id", "status").text)

        await wait_for_open(pm, task_id)
        await asyncio.to_thread(browser.get, f"{s.url}/tasks/{task_id}")
        # a's bar fills while b's slow call is still out: the task is not final yet.
        await poll(lambda: spent_of("root/a.1.1") > 0, "a's bar to fill")
        assert status() == "running"
        assert not run.done()
        await poll(lambda: status() == "succeeded", "the status to turn final", timeout=30)
        rec = await run
        tree = await pm.aledger(task_id)
        assert spent_of("root/a.1.1") == tree.account("root/a.1.1").spent_tokens
        assert spent_of("root") == tree.root.total_spent_tokens
        answer = str(browser.find_element("id", "answer").text)
        assert answer == (rec.answer or "").strip()
        lines = browser.find_elements("css selector", "#events li")
        assert len(lines) == len(await pm.aevents(task_id))
        shot = tmp_path / "ledger-page.png"
        await asyncio.to_thread(browser.save_screenshot, str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("PAYMASTER_UPDATE_SCREENSHOTS") == "1":  # docs/ledger-page.png
            shutil.copyfile(shot, REPO / "docs" / "ledger-page.png")
    finally:
        await asyncio.to_thread(browser.quit)
        if not run.done():
            run.cancel()


async def wait_for_open(pm: Paymaster, task_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await pm.arecord(task_id)
            return
        except Exception:
            assert time.monotonic() < deadline, "the task was never created"
            await asyncio.sleep(0.02)


async def poll(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_redis_down_is_exit_4_at_start_and_503_while_serving(
    env: dict[str, str], tmp_path: Path
) -> None:
    from starlette.testclient import TestClient

    from orchestrator.redis_server import free_port
    from orchestrator.serve import ServeSettings, build_app

    down = f"redis://127.0.0.1:{free_port()}/0"
    done = CliRunner().invoke(cli_app, ["serve", "--port", "0"], env={**env, "REDIS_URL": down})
    assert done.exit_code == 4, done.output
    assert "Redis" in done.output
    with TestClient(build_app(ServeSettings(redis_url=down))) as client:
        api = client.get("/api/tasks/t1/ledger")
        page = client.get("/tasks/t1")
    assert api.status_code == 503
    assert api.json() == {"error": "the ledger's Redis is unreachable; try again shortly"}
    assert page.status_code == 503
    assert "unreachable" in page.text
