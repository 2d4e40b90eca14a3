"""What metering adds to a model call: ``MeteredClient.chat`` against a bare ``openai`` call.

Run: ``python -m benchmarks.call_overhead [--quick] [--profile]``. Starts its own
redis-server (the real ledger) and a zero-delay scripted model server, in this
run. Both kinds of call go to the same server and alternate in blocks, so drift
(CPU frequency, caches, the server's warm-up) falls on both alike. The metered
call counts the prompt, reserves in Redis, calls, and commits the usage: two
ledger round trips on top of the HTTP one; the same two round trips alone
(``ledger x2``: a reserve and a commit) are measured after, as the floor. The
last line reads ``RESULT metered_ms=<median> bare_ms=<median>
added_ms=<difference> ledger_pair_ms=<median>``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

import openai
from openai.types.chat import ChatCompletionMessageParam

from agents.endpoints import Endpoint, EndpointsConfig
from agents.metered import MeteredClient, RetryPolicy
from agents.stub_server import Reply, ScriptedModelServer, Usage
from budgets import Amount, Budget, Ledger
from orchestrator.redis_server import RedisServer

TASK = "bench-overhead"
MODEL = "stub-model"
SYSTEM, USER = "You are a terse assistant.", "Name three primes, comma separated."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
BARE_MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
]
MAX_TOKENS = 64
BLOCK = 25
WARMUP = 50
REPLY = Reply(text="2, 3, 5", usage=Usage(prompt_tokens=20, completion_tokens=5))

Call = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Stats:
    """Latencies of one kind of call, in milliseconds."""

    name: str
    calls: int
    median_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def of(cls, name: str, samples_s: list[float]) -> Stats:
        ms = sorted(s * 1000 for s in samples_s)
        return cls(
            name=name,
            calls=len(ms),
            median_ms=statistics.median(ms),
            p99_ms=statistics.quantiles(ms, n=100, method="inclusive")[98],
            mean_ms=statistics.fmean(ms),
        )


async def _timed(call: Call, n: int, into: list[float]) -> None:
    for _ in range(n):
        started = time.perf_counter()
        await call()
        into.append(time.perf_counter() - started)


async def alternate(metered: Call, bare: Call, *, calls: int) -> tuple[list[float], list[float]]:
    """``calls`` of each, in alternating blocks of ``BLOCK``, after a warm-up of both."""
    scratch: list[float] = []
    await _timed(metered, WARMUP, scratch)
    await _timed(bare, WARMUP, scratch)
    m: list[float] = []
    b: list[float] = []
    while len(m) < calls:
        n = min(BLOCK, calls - len(m))
        # Swap which goes first each round, so neither always follows the other.
        first, second = (m, b) if len(m) // BLOCK % 2 == 0 else (b, m)
        await _timed(metered if first is m else bare, n, first)
        await _timed(metered if second is m else bare, n, second)
    return m, b


async def run(*, calls: int, profile: bool) -> tuple[Stats, Stats, Stats]:
    """Start the servers, measure both kinds of call, and stop everything."""
    with RedisServer() as redis_server, ScriptedModelServer(default=REPLY) as model:
        ledger = Ledger.from_url(redis_server.url)
        await ledger.open_task(TASK, Budget(tokens=10**12, usd="100000"))
        endpoint = Endpoint(
            name="stub",
            base_url=model.base_url,
            model=MODEL,
            kind="remote",
            input_usd_per_mtok=Decimal("0.15"),
            output_usd_per_mtok=Decimal("0.60"),
            max_concurrency=4,
        )
        metered = MeteredClient(
            ledger=ledger,
            config=EndpointsConfig(endpoints=[endpoint]),
            env={},
            retry=RetryPolicy(attempts=1),
        )
        bare = openai.AsyncOpenAI(base_url=model.base_url, api_key="not-needed", max_retries=0)

        async def metered_call() -> object:
            return await metered.chat(
                task_id=TASK, account="root", messages=MESSAGES, max_tokens=MAX_TOKENS
            )

        async def bare_call() -> object:
            return await bare.chat.completions.create(
                model=MODEL, messages=BARE_MESSAGES, max_tokens=MAX_TOKENS
            )

        async def ledger_pair() -> object:
            # The floor: the two ledger round trips alone, with the same scripts.
            res = await ledger.reserve(TASK, "root", tokens=100, nanos=100)
            return await ledger.commit(TASK, res.id, used=Amount(tokens=25, nanos=10))

        try:
            m, b = await alternate(metered_call, bare_call, calls=calls)
            pair: list[float] = []
            await _timed(ledger_pair, WARMUP, [])
            await _timed(ledger_pair, calls, pair)
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                await _timed(metered_call, min(calls, 300), [])
                profiler.disable()
                stats = pstats.Stats(profiler).sort_stats("cumulative")
                stats.print_stats(r"budgets|agents", 40)
        finally:
            await metered.aclose()
            await bare.close()
            await ledger.aclose()
    return Stats.of("metered", m), Stats.of("bare", b), Stats.of("ledger x2", pair)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, and print the RESULT line last."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.call_overhead")
    parser.add_argument("--quick", action="store_true", help="200 calls of each (under 30 s)")
    parser.add_argument("--calls", type=int, default=None, help="calls of each kind (>= 2)")
    parser.add_argument("--profile", action="store_true", help="cProfile 300 metered calls")
    args = parser.parse_args(argv)
    calls = args.calls or (200 if args.quick else 1000)
    if calls < 2:
        parser.error("--calls must be at least 2")
    started = time.monotonic()
    metered, bare, pair = asyncio.run(run(calls=calls, profile=args.profile))
    wall_s = time.monotonic() - started
    print(f"{'call':<10}{'n':>6}{'median ms':>12}{'p99 ms':>10}{'mean ms':>10}")
    for s in (metered, bare):
        print(f"{s.name:<10}{s.calls:>6}{s.median_ms:>12.3f}{s.p99_ms:>10.3f}{s.mean_ms:>10.3f}")
    added = metered.median_ms - bare.median_ms
    print(f"{'added':<10}{'':>6}{added:>12.3f}{metered.p99_ms - bare.p99_ms:>10.3f}"
          f"{metered.mean_ms - bare.mean_ms:>10.3f}")  # fmt: skip
    print(
        f"{pair.name:<10}{pair.calls:>6}{pair.median_ms:>12.3f}{pair.p99_ms:>10.3f}{pair.mean_ms:>10.3f}"
    )
    own = added - pair.median_ms
    print(f"the metered call's own work (added - ledger x2): {own:.3f} ms median")
    print(f"wall time {wall_s:.1f} s")
    figures = f"metered_ms={metered.median_ms:.3f} bare_ms={bare.median_ms:.3f}"
    print(f"RESULT {figures} added_ms={added:.3f} ledger_pair_ms={pair.median_ms:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
