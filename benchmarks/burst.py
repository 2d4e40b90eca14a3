"""Budget utilization under a burst: how many calls a budget that fits exactly 100 admits.

Run: ``python -m benchmarks.burst [--quick]``. Starts its own redis-server and the
scripted model server (``agents/stub_server.py``) in this run. Each variant opens
a fresh task with $0.10 and fires 500 metered calls from 4 processes x 32
concurrent coroutines at the server, which bills every call exactly 100 prompt
and 20 completion tokens (its own count of the prompt's words and of the
reply's) at $5 / $25 per million: $0.001, so the budget fits
exactly 100. A call is *allowed* when it was reserved and sent; the rest are
refused (``BudgetExceeded``).

Baselines in the same run: the ledger called directly (reserve exactly the bill,
commit it), and the metered call refusing at once instead of waiting for held
money (the behaviour before admission waited). Variants of the waiting call:
usage reported; 30% of replies without usage (charged their reservation); and
streaming. The last line is ``RESULT allowed=… fit=… utilization=…
overshoot_nanos=… calls_per_s=…`` for the usage-reported variant.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

from agents.endpoints import Endpoint, EndpointsConfig
from agents.metered import MeteredClient, RetryPolicy
from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer
from budgets import Amount, Budget, BudgetExceeded, Ledger
from orchestrator.redis_server import RedisServer

PROCS, CONCURRENCY, CALLS = 4, 32, 500
BUDGET_USD = "0.10"
PROMPT_TOKENS, COMPLETION_TOKENS = 100, 20
PRICE_IN, PRICE_OUT = Decimal("5"), Decimal("25")
#: What the server bills one call, in nano-dollars: 100 x $5/M + 20 x $25/M = $0.001.
BILL_NANOS = 1_000_000
FIT = 100
MAX_TOKENS = 32
SYSTEM = "You answer in exactly twenty words, no more and no fewer, plainly."
USER = " ".join(f"word{i}" for i in range(PROMPT_TOKENS - 8 - len(SYSTEM.split())))
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
TEXT = " ".join(f"w{i}" for i in range(COMPLETION_TOKENS))


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of running the burst."""

    name: str
    direct: bool = False
    wait_s: float = 5.0
    stream: bool = False
    no_usage_share: float = 0.0


VARIANTS = [
    Variant("direct ledger (baseline)", direct=True),
    Variant("metered, refused at once (baseline)", wait_s=0.0),
    Variant("metered, waits; usage reported"),
    Variant("metered, waits; 30% without usage", no_usage_share=0.3),
    Variant("metered, waits; streaming", stream=True),
]


@dataclass(frozen=True, slots=True)
class Figures:
    """What one variant admitted, sent and spent."""

    variant: str
    allowed: int
    refused: int
    sent: int
    spent_nanos: int
    overshoot_nanos: int
    wall_s: float

    @property
    def calls_per_s(self) -> float:
        return (self.allowed + self.refused) / self.wall_s

    @property
    def utilization(self) -> float:
        return self.allowed / FIT


def _endpoint(base_url: str) -> Endpoint:
    return Endpoint(
        name="stub",
        base_url=base_url,
        model="stub-model",
        kind="remote",
        input_usd_per_mtok=PRICE_IN,
        output_usd_per_mtok=PRICE_OUT,
        max_concurrency=CONCURRENCY,
        timeout_s=30.0,
    )


async def _direct(url: str, task: str, calls: int) -> tuple[int, int]:
    ledger = Ledger.from_url(url)
    todo = list(range(calls))
    allowed = refused = 0

    async def loop() -> None:
        nonlocal allowed, refused
        while todo:
            todo.pop()
            try:
                res = await ledger.reserve(task, "root", tokens=0, nanos=BILL_NANOS)
            except BudgetExceeded:
                refused += 1
                continue
            await ledger.commit(task, res.id, used=Amount(tokens=0, nanos=BILL_NANOS))
            allowed += 1

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    await ledger.aclose()
    return allowed, refused


async def _metered(url: str, base_url: str, task: str, calls: int, v: Variant) -> tuple[int, int]:
    ledger = Ledger.from_url(url)
    client = MeteredClient(
        ledger=ledger,
        config=EndpointsConfig(endpoints=[_endpoint(base_url)]),
        env={},
        retry=RetryPolicy(attempts=1),
        admission_wait_s=v.wait_s,
    )
    todo = list(range(calls))
    allowed = refused = 0

    async def loop() -> None:
        nonlocal allowed, refused
        while todo:
            todo.pop()
            try:
                await client.chat(
                    task_id=task,
                    account="root",
                    messages=MESSAGES,
                    max_tokens=MAX_TOKENS,
                    # Never fewer than the reply's words: every call sent costs the same.
                    min_tokens=COMPLETION_TOKENS,
                    stream=v.stream,
                )
            except BudgetExceeded:
                refused += 1
                continue
            allowed += 1

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    await client.aclose()
    await ledger.aclose()
    return allowed, refused


def _worker(args: tuple[str, str, str, int, Variant, float]) -> tuple[int, int]:
    url, base_url, task, calls, v, start_at = args
    time.sleep(max(0.0, start_at - time.time()))
    if v.direct:
        return asyncio.run(_direct(url, task, calls))
    return asyncio.run(_metered(url, base_url, task, calls, v))


def _ready(_: int) -> int:
    # Unpickling this function imports the benchmark (openai included) in the worker.
    return 0


class _Billing:
    """The server's replies: the fixed bill, and no usage on a share of them."""

    def __init__(self) -> None:
        self.share = 0.0
        self._lock = threading.Lock()
        self._n = 0

    def __call__(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self._n += 1
            n = self._n
        # Every tenth reply in a fixed pattern: exactly share x 10 of each ten without usage.
        if n % 10 < round(self.share * 10):
            return Reply(text=TEXT, usage=None)
        return Reply(text=TEXT)  # usage counted by the server: 100 prompt, 20 completion


async def _open(url: str, task: str) -> None:
    ledger = Ledger.from_url(url)
    await ledger.open_task(task, Budget(tokens=None, usd=BUDGET_USD))
    await ledger.aclose()


async def _books(url: str, task: str) -> tuple[int, int]:
    ledger = Ledger.from_url(url)
    tree = await ledger.snapshot(task)
    await ledger.aclose()
    root = tree.root
    spent = root.total_spent_nanos
    limit = root.limit_nanos or 0
    return spent, max(0, spent + root.total_reserved_nanos - limit)


def run_variant(
    pool: mp.pool.Pool, url: str, model: ScriptedModelServer, billing: _Billing, v: Variant, i: int
) -> Figures:
    """One burst on a fresh task; the ledger's books read back at the end."""
    task = f"burst{i}"
    asyncio.run(_open(url, task))
    billing.share = v.no_usage_share
    model.clear()
    start_at = time.time() + 1.0  # every process imported and connected before the burst
    shares = [CALLS // PROCS + (1 if p < CALLS % PROCS else 0) for p in range(PROCS)]
    jobs = [(url, model.base_url, task, n, v, start_at) for n in shares]
    results = pool.map(_worker, jobs)
    wall_s = time.time() - start_at
    spent, over = asyncio.run(_books(url, task))
    sent = sum(1 for r in model.requests if r.path == "/v1/chat/completions")
    return Figures(
        variant=v.name,
        allowed=sum(a for a, _ in results),
        refused=sum(r for _, r in results),
        sent=sent,
        spent_nanos=spent,
        overshoot_nanos=over,
        wall_s=wall_s,
    )


def main(argv: list[str] | None = None) -> int:
    """Run every variant in one run, print the table, and the RESULT line last."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.burst")
    parser.add_argument("--quick", action="store_true", help="the same burst (it is short)")
    parser.parse_args(argv)
    billing = _Billing()
    rows: list[Figures] = []
    with RedisServer() as redis_server, ScriptedModelServer() as model:
        model.responder = billing
        with mp.get_context("spawn").Pool(PROCS) as pool:
            pool.map(_ready, range(PROCS))
            for i, v in enumerate(VARIANTS):
                rows.append(run_variant(pool, redis_server.url, model, billing, v, i))
    head = f"{'variant':<38}{'allowed':>8}{'fit':>5}{'util':>6}{'sent':>6}"
    print(f"{head}{'spent $':>10}{'overshoot':>10}{'calls/s':>9}")
    for f in rows:
        spent = Decimal(f.spent_nanos) / 10**9
        print(
            f"{f.variant:<38}{f.allowed:>8}{FIT:>5}{f.utilization:>6.2f}{f.sent:>6}"
            f"{spent:>10.6f}{f.overshoot_nanos:>10}{f.calls_per_s:>9.0f}"
        )
    best = rows[2]
    print(
        f"RESULT allowed={best.allowed} fit={FIT} utilization={best.utilization:.2f} "
        f"overshoot_nanos={best.overshoot_nanos} calls_per_s={best.calls_per_s:.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
