"""The ledger's cost op by op: Redis commands, server time and client time per operation.

Run: ``python -m benchmarks.ledger_ops [--quick]``. Starts its own redis-server.
One process runs rounds of 64 operations of one kind in flight together (so they
travel as one batch, as under load): ``reserve``, then ``commit`` of those holds,
then ``reserve`` and ``release``; and, apart, one ``reserve`` at a time. For each
kind it reads ``INFO commandstats`` (reset before it): the commands the scripts
made per operation (every command but ``EVALSHA`` itself), the script's server time
per operation, and the process's CPU time per operation (the client's cost:
argument packing, reply parsing, the ledger's Python). The baseline, in the same
run, is ``EVAL`` of a one-call script: its server time per call.

It uses only the public ``Ledger`` API, so the same file measures an older
checkout (``PYTHONPATH=<checkout> python benchmarks/ledger_ops.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from budgets import Amount, Budget, Ledger
from orchestrator.redis_server import RedisServer

TASK = "ops"
BATCH = 64
SKIP = {
    "evalsha",
    "eval",
    "fcall",
    "info",
    "config|resetstat",
    "script|load",
    "function|load",
    "ping",
}


@dataclass(frozen=True, slots=True)
class Cost:
    """What one kind of operation cost, per operation."""

    name: str
    commands: float
    server_us: float
    client_us: float


async def _stats(ledger: Ledger) -> dict[str, Any]:
    info: dict[str, Any] = await ledger.redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): v for k, v in info.items()}


async def measure(ledger: Ledger, name: str, ops: int, run: Callable[[], Awaitable[int]]) -> Cost:
    """Reset the server's statistics, run ``run`` until ``ops`` operations, read the cost."""
    await ledger.redis.config_resetstat()
    cpu0 = time.process_time()
    done = 0
    while done < ops:
        done += await run()
    cpu = time.process_time() - cpu0
    stats = await _stats(ledger)
    script = stats.get("fcall") or stats.get("evalsha", {"usec": 0})
    commands = sum(int(v["calls"]) for k, v in stats.items() if k not in SKIP)
    return Cost(
        name=name,
        commands=commands / done,
        server_us=int(script["usec"]) / done,
        client_us=cpu * 1e6 / done,
    )


async def run_all(url: str, *, rounds: int) -> tuple[float, list[Cost]]:
    ledger = Ledger.from_url(url)
    await ledger.open_task(TASK, Budget(tokens=10**13, usd="100000"))
    await ledger.reserve(TASK, "root", tokens=1, nanos=1)  # load the script, warm the pool
    used = Amount(tokens=80, nanos=800)
    holds: list[Any] = []

    async def reserve_batch() -> int:
        got = await asyncio.gather(
            *(ledger.reserve(TASK, "root", tokens=100, nanos=1000) for _ in range(BATCH))
        )
        holds.extend(got)
        return BATCH

    async def commit_batch() -> int:
        batch = [holds.pop() for _ in range(BATCH)]
        await asyncio.gather(*(ledger.commit(TASK, h.id, used=used) for h in batch))
        return BATCH

    async def release_batch() -> int:
        batch = [holds.pop() for _ in range(BATCH)]
        await asyncio.gather(*(ledger.release(TASK, h.id) for h in batch))
        return BATCH

    async def reserve_one() -> int:
        holds.append(await ledger.reserve(TASK, "root", tokens=100, nanos=1000))
        return 1

    ops = rounds * BATCH
    costs = [await measure(ledger, "reserve (batched)", ops, reserve_batch)]
    costs.append(await measure(ledger, "commit (batched)", ops, commit_batch))
    await measure(ledger, "", ops, reserve_batch)
    costs.append(await measure(ledger, "release (batched)", ops, release_batch))
    costs.append(await measure(ledger, "reserve (one at a time)", ops // 4, reserve_one))

    # The baseline: EVAL of a one-call script, its server time per call.
    await ledger.redis.config_resetstat()
    script = "return redis.call('INCR', KEYS[1])"
    for _ in range(ops // 4):
        await ledger.redis.eval(script, 1, "bench:counter")
    stats = await _stats(ledger)
    base_us = int(stats["eval"]["usec"]) / int(stats["eval"]["calls"])
    await ledger.aclose()
    return base_us, costs


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, and the RESULT line last."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ledger_ops")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under 10 s)")
    args = parser.parse_args(argv)
    rounds = 20 if args.quick else 100
    with RedisServer() as server:
        base_us, costs = asyncio.run(run_all(server.url, rounds=rounds))
    print(f"{'operation':<26}{'commands/op':>12}{'server us/op':>14}{'client us/op':>14}")
    for c in costs:
        print(f"{c.name:<26}{c.commands:>12.2f}{c.server_us:>14.2f}{c.client_us:>14.1f}")
    print(f"{'EVAL one-call (baseline)':<26}{1:>12.2f}{base_us:>14.2f}{'':>14}")
    r, m = costs[0], costs[1]
    print(
        f"RESULT reserve_commands={r.commands:.2f} reserve_server_us={r.server_us:.2f} "
        f"commit_commands={m.commands:.2f} commit_server_us={m.server_us:.2f} "
        f"reserve_client_us={r.client_us:.1f} eval_baseline_us={base_us:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
