"""Ledger throughput, reserve latency and overshoot against redis-benchmark's EVAL rate.

Run: ``python -m benchmarks.ledger [--quick]``. Starts its own redis-server on
a free port. The baseline is ``redis-benchmark`` running ``EVAL`` of a script
making one call, on the same server in the same run: what the server can do.
The ledger's rate counts each reserve and each commit as one operation, from
4 processes x 64 concurrent subtasks against one task tree.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import multiprocessing as mp
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass

from budgets import Amount, Budget, BudgetExceeded, Ledger
from orchestrator.redis_server import RedisServer

TASK = "bench"
RESERVE_TOKENS = 100
RESERVE_NANOS = 1_000


@dataclass(frozen=True, slots=True)
class Figures:
    baseline_ops_s: float
    ledger_ops_s: float
    p50_reserve_ms: float
    p99_reserve_ms: float
    overshoot_tokens: int
    overshoot_nanos: int
    exhaust_granted: int
    exhaust_expected: int


def baseline(port: int, *, requests: int) -> float:
    """redis-benchmark's requests per second for EVAL of a one-call script."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("redis-benchmark is not on PATH; apt-get install -y redis-tools")
    out = subprocess.run(
        [binary, "-p", str(port), "-c", "50", "-n", str(requests), "--csv",
         "EVAL", "return redis.call('INCR', KEYS[1])", "1", "bench:counter"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    # CSV: "test name","rps",...; the test name itself holds a comma.
    row = next(csv.reader([out.splitlines()[-1]]))
    return float(row[1])


async def _hammer(url: str, proc: int, tasks: int, until: float, used: Amount) -> tuple[int, int]:
    ledger = Ledger.from_url(url)
    ops = refused = 0

    async def one(account: str) -> None:
        nonlocal ops, refused
        while time.monotonic() < until:
            try:
                res = await ledger.reserve(
                    TASK, account, tokens=RESERVE_TOKENS, nanos=RESERVE_NANOS
                )
            except BudgetExceeded:
                refused += 1
                return
            await ledger.commit(TASK, res.id, used=used)
            ops += 2

    await asyncio.gather(*(one(f"root/p{proc}") for _ in range(tasks)))
    await ledger.aclose()
    return ops, refused


def _worker(args: tuple[str, int, int, float, int, int]) -> tuple[int, int]:
    url, proc, tasks, start_at, seconds, used_tokens = args
    time.sleep(max(0.0, start_at - time.time()))
    until = time.monotonic() + seconds
    used = Amount(tokens=used_tokens, nanos=used_tokens * 10)
    return asyncio.run(_hammer(url, proc, tasks, until, used))


async def _open(url: str, *, procs: int, per_proc: Budget) -> None:
    ledger = Ledger.from_url(url)
    await ledger.redis.delete(*[k async for k in ledger.redis.scan_iter(match="pm:*")] or ["x"])
    tokens = None if per_proc.tokens is None else per_proc.tokens * procs
    nanos = None if per_proc.nanos is None else per_proc.nanos * procs
    await ledger.open_task(TASK, Budget.from_nanos(tokens=tokens, nanos=nanos))
    for p in range(procs):
        await ledger.open_account(TASK, f"root/p{p}", per_proc)
    await ledger.aclose()


async def _overshoot(url: str) -> tuple[int, int, int]:
    ledger = Ledger.from_url(url)
    tree = await ledger.snapshot(TASK)
    await ledger.aclose()
    over_t = over_n = 0
    for acct in tree.walk():
        spent_t = acct.total_spent_tokens + acct.total_reserved_tokens
        spent_n = acct.total_spent_nanos + acct.total_reserved_nanos
        if acct.limit_tokens is not None:
            over_t = max(over_t, spent_t - acct.limit_tokens)
        if acct.limit_nanos is not None:
            over_n = max(over_n, spent_n - acct.limit_nanos)
    return over_t, over_n, tree.root.total_spent_tokens


def run_procs(url: str, *, procs: int, tasks: int, seconds: int, used: int) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    start_at = time.time() + 1.5  # let every process import and connect first
    with ctx.Pool(procs) as pool:
        jobs = [(url, p, tasks, start_at, seconds, used) for p in range(procs)]
        results = pool.map(_worker, jobs)
    return sum(ops for ops, _ in results), float(seconds)


async def _latency(url: str, *, calls: int) -> list[float]:
    ledger = Ledger.from_url(url)
    await ledger.open_task("lat", Budget(tokens=10**12, usd="1000"))
    samples = []
    for i in range(calls + 200):
        t0 = time.perf_counter()
        res = await ledger.reserve("lat", "root", tokens=10, nanos=10)
        elapsed = time.perf_counter() - t0
        await ledger.commit("lat", res.id, used=Amount(tokens=5, nanos=5))
        if i >= 200:  # warm-up: connections, script cache
            samples.append(elapsed * 1000)
    await ledger.aclose()
    return samples


def measure(*, quick: bool) -> Figures:
    procs, tasks = 4, 64
    seconds = 4 if quick else 15
    with RedisServer() as server:
        base = baseline(server.port, requests=100_000 if quick else 400_000)

        # Throughput: a budget the run cannot exhaust.
        asyncio.run(_open(server.url, procs=procs, per_proc=Budget(tokens=10**13, usd="100000")))
        ops, secs = run_procs(server.url, procs=procs, tasks=tasks, seconds=seconds, used=80)
        over_t, over_n, _ = asyncio.run(_overshoot(server.url))

        # Exhaustion: each process's account fits exactly 500 full reservations.
        fits = 500
        per_proc = Budget.from_nanos(tokens=fits * RESERVE_TOKENS, nanos=fits * RESERVE_NANOS)
        asyncio.run(_open(server.url, procs=procs, per_proc=per_proc))
        run_procs(server.url, procs=procs, tasks=tasks, seconds=30, used=RESERVE_TOKENS)
        ex_t, ex_n, spent = asyncio.run(_overshoot(server.url))

        lat = asyncio.run(_latency(server.url, calls=1000 if quick else 5000))
    lat.sort()
    return Figures(
        baseline_ops_s=base,
        ledger_ops_s=ops / secs,
        p50_reserve_ms=statistics.median(lat),
        p99_reserve_ms=lat[int(len(lat) * 0.99) - 1],
        overshoot_tokens=max(0, over_t, ex_t),
        overshoot_nanos=max(0, over_n, ex_n),
        exhaust_granted=spent // RESERVE_TOKENS,
        exhaust_expected=fits * procs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="finish within 30 s")
    args = parser.parse_args()
    f = measure(quick=args.quick)
    ratio = f.ledger_ops_s / f.baseline_ops_s
    rows = [
        ("redis-benchmark EVAL (1 call, 50 clients)", f"{f.baseline_ops_s:,.0f} ops/s"),
        ("ledger reserve+commit (4 procs x 64 tasks)", f"{f.ledger_ops_s:,.0f} ops/s"),
        ("ratio ledger / baseline", f"{ratio:.2f}"),
        ("reserve latency p50, one sequential client", f"{f.p50_reserve_ms:.3f} ms"),
        ("reserve latency p99, one sequential client", f"{f.p99_reserve_ms:.3f} ms"),
        ("exhaustion: reservations granted / fit", f"{f.exhaust_granted} / {f.exhaust_expected}"),
        ("overshoot (tokens, nanos)", f"{f.overshoot_tokens}, {f.overshoot_nanos}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  value")
    print(f"{'-' * width}  {'-' * 20}")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print(
        f"RESULT ledger_ops_per_s={f.ledger_ops_s:.0f} baseline_eval_ops_per_s="
        f"{f.baseline_ops_s:.0f} ratio={ratio:.2f} p99_reserve_ms={f.p99_reserve_ms:.3f} "
        f"overshoot_tokens={f.overshoot_tokens} overshoot_nanos={f.overshoot_nanos}"
    )


if __name__ == "__main__":
    main()
