"""Redis bytes per finished task: ledger, events, records and statistics, and what retention frees.

Run: ``python -m benchmarks.memory [--quick]``. Starts its own redis-server. It
runs 1,000 tasks (200 with ``--quick``) the way a worker does, through the
public APIs: a tenant funds each task; the task opens a manager and three
subtask accounts; the manager makes one call and each subtask two (reserve,
commit with the usage, the reply kept with ``keep``, about 300 bytes); one call
in ten is released instead; each subtask's outcome is counted in the tenant's
statistics; then the task is closed and given a retention (``expire_task``).

It reports, measured in the same run: Redis's ``used_memory`` before and after,
divided by the tasks (the baseline is the empty server's), and ``MEMORY USAGE``
of every key of one task by family. Then it lets the retention run out and
measures again: what stays is one funding record per task (kept a day past the
retention, for late spend), the tenant's period hash, its capped event stream,
and the statistics cells; of these only the funding records grow with the
number of tasks, and they expire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from typing import Any

from budgets import Amount, Budget, Ledger
from budgets.keys import StatsKeys, TaskKeys, TenantKeys, tenant_scope
from budgets.stats import Observation, StatsBook
from orchestrator.redis_server import RedisServer

TENANT = "acme"
SUBTASKS = 3
CALLS_PER_SUBTASK = 2
REPLY = json.dumps({"text": "x" * 240, "finish_reason": "stop", "input_tokens": 100})
RETENTION_S = 2


async def one_task(ledger: Ledger, stats: StatsBook, task: str, i: int) -> None:
    await ledger.open_task(task, Budget(tokens=100_000, usd="0.10"), tenant=TENANT)
    await ledger.open_account(task, "root/manager", Budget(tokens=10_000, usd="0.01"))
    paths = [f"root/s{k}" for k in range(SUBTASKS)]
    for path in paths:
        await ledger.open_account(task, path, Budget(tokens=20_000, usd="0.02"))
    calls = [("root/manager", 0)] + [(p, c) for p in paths for c in range(CALLS_PER_SUBTASK)]
    for n, (path, c) in enumerate(calls):
        tags = {"endpoint": "stub", "model": "m", "kind": "remote"}
        hold = await ledger.reserve(task, path, tokens=1_000, nanos=1_000_000, tags=tags)
        if (i * len(calls) + n) % 10 == 9:
            await ledger.release(task, hold.id, reason="failed_before_send")
            continue
        name = f"{path.rsplit('/', 1)[1]}.{c + 1}"
        await ledger.commit(
            task, hold.id, used=Amount(tokens=420, nanos=300_000), tags=tags, keep=(name, REPLY)
        )
    for path in paths:
        seen = Observation(
            endpoint="stub", difficulty=2, tags=("math",), asked=1000, used=420, cut_short=False,
            nanos=600_000,
        )  # fmt: skip
        await stats.record(tenant_scope(TENANT), f"{task}:{path.replace('/', ':')}", seen)
    await ledger.close_task(task)


async def used_memory(ledger: Ledger) -> int:
    info: dict[str, Any] = await ledger.redis.info("memory")
    return int(info["used_memory"])


def family(key: str, task: str) -> str:
    tk, nk = TaskKeys(task), TenantKeys(TENANT)
    names = {
        tk.meta: "task meta",
        tk.reservations: "reservation records",
        tk.leases: "leases",
        tk.ops: "kept replies and ops",
        tk.events: "events",
        tk.accounts: "account index",
    }
    if key in names:
        return names[key]
    if key.startswith(tk.account_prefix):
        return "account hashes"
    if key.startswith(tk.base):
        return "other task keys"
    if key.startswith(nk.base + "f:") and key.endswith(":" + task):
        return "tenant funding record"
    if key.startswith(StatsKeys(tenant_scope(TENANT)).base + "seen:") and f":{task}:" in key:
        return "statistics seen-markers"
    return ""


async def per_key(ledger: Ledger, task: str) -> dict[str, int]:
    sizes: dict[str, int] = defaultdict(int)
    async for key in ledger.redis.scan_iter(match="pm:*", count=1000):
        name = family(str(key), task)
        if name:
            sizes[name] += int(await ledger.redis.memory_usage(key, samples=0) or 0)
    return dict(sizes)


async def shared_bytes(ledger: Ledger) -> dict[str, int]:
    nk, sk = TenantKeys(TENANT), StatsKeys(tenant_scope(TENANT))
    out = {}
    for name, key in [
        ("tenant events (capped)", nk.events),
        ("tenant config + periods", nk.config),
        ("statistics cells", sk.cells),
    ]:
        out[name] = int(await ledger.redis.memory_usage(key, samples=0) or 0)
    return out


async def run(url: str, *, tasks: int) -> None:
    ledger = Ledger.from_url(url)
    stats = StatsBook(ledger.redis)  # its seen-markers kept 30 days, the default
    await ledger.set_tenant(TENANT, Budget(tokens=None, usd="100000"))
    # The baseline: the server once every script is loaded and every shared key exists.
    await one_task(ledger, stats, "warmup", 0)
    await ledger.expire_task("warmup", retention_s=1)
    await asyncio.sleep(1.5)
    async for key in ledger.redis.scan_iter(match="pm:*", count=1000):
        await ledger.redis.exists(key)
    base = await used_memory(ledger)
    started = time.monotonic()
    for i in range(tasks):
        await one_task(ledger, stats, f"task{i:05d}", i)
    elapsed = time.monotonic() - started
    after = await used_memory(ledger)
    sizes = await per_key(ledger, "task00000")
    shared = await shared_bytes(ledger)
    for i in range(tasks):
        await ledger.expire_task(f"task{i:05d}", retention_s=RETENTION_S)
    await asyncio.sleep(RETENTION_S + 1.5)
    # Expired keys go when touched or by Redis's active expiry; touch them all.
    async for key in ledger.redis.scan_iter(match="pm:*", count=1000):
        await ledger.redis.exists(key)
    await asyncio.sleep(0.5)
    retained = await used_memory(ledger)
    keys_left = [str(k) async for k in ledger.redis.scan_iter(match="pm:*", count=1000)]
    funding_left = sum(1 for k in keys_left if k.startswith(TenantKeys(TENANT).base + "f:"))
    await ledger.aclose()

    per_task = (after - base) / tasks
    print(f"{tasks} tasks in {elapsed:.1f} s; used_memory {base:,} -> {after:,} bytes")
    print(f"{'what (one task, MEMORY USAGE)':<34}{'bytes':>10}")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{name:<34}{size:>10,}")
    print(f"{'sum over one task keys':<34}{sum(sizes.values()):>10,}")
    print(f"{'used_memory per task (all keys)':<34}{per_task:>10,.0f}")
    for name, size in shared.items():
        print(f"{name + ' (shared)':<34}{size:>10,}")
    print(f"after the retention: used_memory {retained:,} (baseline {base:,}); keys left:")
    funding = TenantKeys(TENANT).base + "f:"
    others = sorted(k for k in keys_left if not k.startswith(funding) and ":seen:" not in k)
    seen_left = sum(1 for k in keys_left if ":seen:" in k)
    print(f"  {funding_left} tenant funding records (kept a day past the retention),")
    print(f"  {seen_left} statistics seen-markers (kept for the statistics' retention), and")
    print("  " + ", ".join(others))
    print(
        f"RESULT tasks={tasks} bytes_per_task={per_task:.0f} "
        f"task_keys_bytes={sum(sizes.values())} retained_bytes={retained - base} "
        f"keys_left={len(keys_left)} funding_records_left={funding_left}"
    )


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table, the RESULT line last."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("--quick", action="store_true", help="200 tasks")
    args = parser.parse_args(argv)
    with RedisServer() as server:
        asyncio.run(run(server.url, tasks=200 if args.quick else 1000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
