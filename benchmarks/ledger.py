"""Ledger throughput, reserve latency and overshoot against redis-benchmark's EVAL rate.

Run: ``python -m benchmarks.ledger [--quick] [--cluster]``. Starts its own
redis-server on a free port. The baseline is ``redis-benchmark`` running
``EVAL`` of a script making one call, on the same server in the same run: what
the server can do. The ledger's rate counts each reserve and each commit as one
operation, from 4 processes x 64 concurrent subtasks against one task tree.
Where the time goes is printed beside it: CPU time per operation of the client
processes together (``getrusage``) and of Redis (``INFO cpu``) in that run.
The ledger's clients and Redis share the machine's cores, while
``redis-benchmark``'s C clients cost it little.

With ``--cluster`` the same run measures one redis-server and then a 3-master
Redis Cluster (:class:`~orchestrator.redis_server.LocalCluster`), each against
its own baseline (on the cluster, one ``redis-benchmark`` per master at once,
their rates summed). A task lives on one slot, so both are hammered in a shape
a cluster can spread: each process works on 6 tasks of its own, 24 in all, whose
ids are picked so that each third of the slot space holds 8 of them.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import multiprocessing as mp
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from budgets import Amount, Budget, BudgetExceeded, Ledger
from budgets.keys import TaskKeys
from orchestrator.redis_server import LocalCluster, RedisServer

TASK = "bench"
RESERVE_TOKENS = 100
RESERVE_NANOS = 1_000
PROCS = 4
LOOPS = 64
#: Reservations every hammered account fits in the exhaustion run, all accounts together.
EXHAUST_FITS = 2_000
#: ``--cluster``: the tasks each process hammers, and the masters of the cluster.
TASKS_PER_PROC = 6
MASTERS = 3
EVAL_SCRIPT = "return redis.call('INCR', KEYS[1])"

#: A (task id, account path) a process hammers.
Target = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Shape:
    """What each process hammers: ``targets[p]`` are process ``p``'s accounts, its
    :data:`LOOPS` loops taking them in turn."""

    label: str
    targets: tuple[tuple[Target, ...], ...]

    @property
    def tasks(self) -> list[str]:
        """Every task id, once."""
        return sorted({task for proc in self.targets for task, _ in proc})

    @property
    def accounts(self) -> int:
        """How many accounts are hammered."""
        return sum(len(proc) for proc in self.targets)


def one_task(procs: int) -> Shape:
    """Every process on its own account of the one task ``bench`` (the default run)."""
    return Shape(
        label=f"{procs} procs x {LOOPS} tasks",
        targets=tuple(((TASK, f"root/p{p}"),) for p in range(procs)),
    )


def spread_tasks(procs: int, *, per_proc: int, parts: int) -> Shape:
    """``per_proc`` tasks of its own per process, on slots spread evenly over ``parts``
    equal ranges of the slot space (how ``redis-cli --cluster create`` splits the slots
    among ``parts`` masters), each task with one account."""
    if procs * per_proc % parts:
        raise ValueError(f"{procs} x {per_proc} tasks do not split evenly over {parts} masters")
    want = procs * per_proc // parts
    found: list[list[str]] = [[] for _ in range(parts)]
    i = 0
    while any(len(ids) < want for ids in found):
        task = f"{TASK}-{i}"
        part = key_slot(TaskKeys(task).meta.encode()) * parts // REDIS_CLUSTER_HASH_SLOTS
        if len(found[part]) < want:
            found[part].append(task)
        i += 1
    # Round robin over the ranges, so every process has tasks on every master.
    ids = [found[n % parts][n // parts] for n in range(want * parts)]
    return Shape(
        label=f"{procs} procs x {LOOPS} subtasks, {len(ids)} tasks",
        targets=tuple(
            tuple((task, f"root/p{p}") for task in ids[p * per_proc : (p + 1) * per_proc])
            for p in range(procs)
        ),
    )


@dataclass(frozen=True, slots=True)
class Figures:
    """What one run measured on one Redis (a server or a cluster)."""

    baseline_ops_s: float
    ledger_ops_s: float
    p50_reserve_ms: float
    p99_reserve_ms: float
    overshoot_tokens: int
    overshoot_nanos: int
    exhaust_granted: int
    exhaust_expected: int
    #: CPU time per operation of the throughput run: the client processes' together,
    #: and the Redis servers' (every master on a cluster) by ``INFO cpu``.
    client_cpu_us: float
    server_cpu_us: float


def _redis_benchmark() -> str:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("redis-benchmark is not on PATH; apt-get install -y redis-tools")
    return binary


def _eval_benchmark(port: int, key: str, *, requests: int) -> list[str]:
    return [_redis_benchmark(), "-p", str(port), "-c", "50", "-n", str(requests), "--csv",
            "EVAL", EVAL_SCRIPT, "1", key]  # fmt: skip


def _rps(out: str) -> float:
    # CSV: "test name","rps",...; the test name itself holds a comma.
    row = next(csv.reader([out.splitlines()[-1]]))
    return float(row[1])


def baseline(port: int, *, requests: int) -> float:
    """redis-benchmark's requests per second for EVAL of a one-call script."""
    command = _eval_benchmark(port, "bench:counter", requests=requests)
    return _rps(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def _slot_ranges(port: int) -> list[tuple[int, int, int]]:
    """(first slot, last slot, master's port) of every slot range of the cluster."""
    node = redis.Redis(port=port)
    try:
        reply = cast("list[Any]", node.cluster("slots"))
    finally:
        node.close()
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in reply]


def _key_on(port: int, ranges: Sequence[tuple[int, int, int]]) -> str:
    """A key in a slot the master on ``port`` serves."""
    mine = [(lo, hi) for lo, hi, p in ranges if p == port]
    i = 0
    while not any(lo <= key_slot(f"bench:{{m{i}}}".encode()) <= hi for lo, hi in mine):
        i += 1
    return f"bench:{{m{i}}}:counter"


def cluster_baseline(ports: Sequence[int], *, requests: int) -> float:
    """The sum of redis-benchmark's EVAL rates on every master, all run at once, each
    on a key of its own master's slots."""
    ranges = _slot_ranges(ports[0])
    keys = [_key_on(port, ranges) for port in ports]
    runs = [
        subprocess.Popen(_eval_benchmark(port, key, requests=requests), stdout=subprocess.PIPE,
                         text=True)
        for port, key in zip(ports, keys, strict=True)
    ]  # fmt: skip
    outs = [run.communicate()[0] for run in runs]
    if any(run.returncode != 0 for run in runs):
        raise SystemExit(f"redis-benchmark failed: {[run.returncode for run in runs]}")
    return sum(_rps(out) for out in outs)


async def _hammer(
    url: str, targets: Sequence[Target], until: float, used: Amount
) -> tuple[int, int]:
    ledger = Ledger.from_url(url)
    ops = refused = 0

    async def one(task: str, account: str) -> None:
        nonlocal ops, refused
        while time.monotonic() < until:
            try:
                res = await ledger.reserve(
                    task, account, tokens=RESERVE_TOKENS, nanos=RESERVE_NANOS
                )
            except BudgetExceeded:
                refused += 1
                return
            await ledger.commit(task, res.id, used=used)
            ops += 2

    await asyncio.gather(*(one(*targets[i % len(targets)]) for i in range(LOOPS)))
    await ledger.aclose()
    return ops, refused


def _cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _worker(args: tuple[str, tuple[Target, ...], float, int, int]) -> tuple[int, float]:
    """One process's operations and the CPU seconds it spent on them."""
    url, targets, start_at, seconds, used_tokens = args
    time.sleep(max(0.0, start_at - time.time()))
    cpu = _cpu_s()
    until = time.monotonic() + seconds
    used = Amount(tokens=used_tokens, nanos=used_tokens * 10)
    ops, _ = asyncio.run(_hammer(url, targets, until, used))
    return ops, _cpu_s() - cpu


def server_cpu_s(ports: Sequence[int]) -> float:
    """CPU seconds the Redis servers on ``ports`` have used, all together."""
    total = 0.0
    for port in ports:
        node = redis.Redis(port=port)
        try:
            info = node.info("cpu")
        finally:
            node.close()
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


async def _open(url: str, *, shape: Shape, per_account: Budget) -> None:
    ledger = Ledger.from_url(url)
    await ledger.redis.delete(*[k async for k in ledger.redis.scan_iter(match="pm:*")] or ["x"])
    for task in shape.tasks:
        paths = [path for proc in shape.targets for t, path in proc if t == task]
        n = len(paths)
        tokens = None if per_account.tokens is None else per_account.tokens * n
        nanos = None if per_account.nanos is None else per_account.nanos * n
        await ledger.open_task(task, Budget.from_nanos(tokens=tokens, nanos=nanos))
        for path in paths:
            await ledger.open_account(task, path, per_account)
    await ledger.aclose()


async def _overshoot(url: str, tasks: Sequence[str]) -> tuple[int, int, int]:
    ledger = Ledger.from_url(url)
    trees = [await ledger.snapshot(task) for task in tasks]
    await ledger.aclose()
    over_t = over_n = 0
    for acct in (acct for tree in trees for acct in tree.walk()):
        spent_t = acct.total_spent_tokens + acct.total_reserved_tokens
        spent_n = acct.total_spent_nanos + acct.total_reserved_nanos
        if acct.limit_tokens is not None:
            over_t = max(over_t, spent_t - acct.limit_tokens)
        if acct.limit_nanos is not None:
            over_n = max(over_n, spent_n - acct.limit_nanos)
    return over_t, over_n, sum(tree.root.total_spent_tokens for tree in trees)


def run_procs(url: str, *, shape: Shape, seconds: int, used: int) -> tuple[int, float]:
    """Every process's operations together, and the CPU seconds they spent on them."""
    ctx = mp.get_context("spawn")
    start_at = time.time() + 1.5  # let every process import and connect first
    with ctx.Pool(len(shape.targets)) as pool:
        jobs = [(url, targets, start_at, seconds, used) for targets in shape.targets]
        results = pool.map(_worker, jobs)
    return sum(ops for ops, _ in results), sum(cpu for _, cpu in results)


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


def measure(
    url: str, *, ports: Sequence[int], shape: Shape, baseline_ops_s: float, quick: bool
) -> Figures:
    """Throughput, exhaustion, overshoot and a sequential client's latency on ``url``,
    whose servers (every master on a cluster) listen on ``ports``."""
    seconds = 4 if quick else 15

    # Throughput: a budget the run cannot exhaust.
    asyncio.run(_open(url, shape=shape, per_account=Budget(tokens=10**13, usd="100000")))
    server_cpu = server_cpu_s(ports)
    ops, client_cpu = run_procs(url, shape=shape, seconds=seconds, used=80)
    server_cpu = server_cpu_s(ports) - server_cpu
    over_t, over_n, _ = asyncio.run(_overshoot(url, shape.tasks))

    # Exhaustion: the accounts fit exactly EXHAUST_FITS full reservations in all.
    fits = EXHAUST_FITS // shape.accounts
    per_account = Budget.from_nanos(tokens=fits * RESERVE_TOKENS, nanos=fits * RESERVE_NANOS)
    asyncio.run(_open(url, shape=shape, per_account=per_account))
    run_procs(url, shape=shape, seconds=30, used=RESERVE_TOKENS)
    ex_t, ex_n, spent = asyncio.run(_overshoot(url, shape.tasks))

    lat = asyncio.run(_latency(url, calls=1000 if quick else 5000))
    lat.sort()
    return Figures(
        baseline_ops_s=baseline_ops_s,
        ledger_ops_s=ops / seconds,
        p50_reserve_ms=statistics.median(lat),
        p99_reserve_ms=lat[int(len(lat) * 0.99) - 1],
        overshoot_tokens=max(0, over_t, ex_t),
        overshoot_nanos=max(0, over_n, ex_n),
        exhaust_granted=spent // RESERVE_TOKENS,
        exhaust_expected=fits * shape.accounts,
        client_cpu_us=client_cpu / ops * 1e6,
        server_cpu_us=server_cpu / ops * 1e6,
    )


def masters_of(cluster: LocalCluster, tasks: Sequence[str]) -> list[int]:
    """How many of ``tasks`` each master serves (the check that they are spread)."""
    ranges = _slot_ranges(cluster.nodes[0].port)
    ports = [m.port for m in cluster.masters()]
    counts = dict.fromkeys(ports, 0)
    for task in tasks:
        slot = key_slot(TaskKeys(task).meta.encode())
        counts[next(p for lo, hi, p in ranges if lo <= slot <= hi)] += 1
    return [counts[p] for p in ports]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _column(f: Figures) -> list[str]:
    return [
        f"{f.baseline_ops_s:,.0f} ops/s",
        f"{f.ledger_ops_s:,.0f} ops/s",
        f"{f.ledger_ops_s / f.baseline_ops_s:.2f}",
        f"{f.p50_reserve_ms:.3f} ms",
        f"{f.p99_reserve_ms:.3f} ms",
        f"{f.exhaust_granted} / {f.exhaust_expected}",
        f"{f.overshoot_tokens}, {f.overshoot_nanos}",
        f"{f.client_cpu_us:.1f} / {f.server_cpu_us:.1f} us",
    ]


def _rows(shape: Shape, *runs: Figures) -> list[list[str]]:
    """One row per measure, one column per run."""
    names = [
        "redis-benchmark EVAL (1 call, 50 clients)",
        f"ledger reserve+commit ({shape.label})",
        "ratio ledger / baseline",
        "reserve latency p50, one sequential client",
        "reserve latency p99, one sequential client",
        "exhaustion: reservations granted / fit",
        "overshoot (tokens, nanos)",
        "CPU per op: clients (all procs) / Redis",
    ]
    columns = [_column(f) for f in runs]
    return [[name, *cells] for name, *cells in zip(names, *columns, strict=True)]


def main_single(*, quick: bool) -> None:
    """One redis-server, one task: the default run."""
    shape = one_task(PROCS)
    with RedisServer() as server:
        base = baseline(server.port, requests=100_000 if quick else 400_000)
        f = measure(server.url, ports=[server.port], shape=shape, baseline_ops_s=base,
                    quick=quick)  # fmt: skip
    ratio = f.ledger_ops_s / f.baseline_ops_s
    _table(["measure", "value"], _rows(shape, f))
    print(
        f"RESULT ledger_ops_per_s={f.ledger_ops_s:.0f} baseline_eval_ops_per_s="
        f"{f.baseline_ops_s:.0f} ratio={ratio:.2f} p99_reserve_ms={f.p99_reserve_ms:.3f} "
        f"overshoot_tokens={f.overshoot_tokens} overshoot_nanos={f.overshoot_nanos} "
        f"client_cpu_us_per_op={f.client_cpu_us:.1f} server_cpu_us_per_op={f.server_cpu_us:.1f}"
    )


def main_cluster(*, quick: bool) -> None:
    """One redis-server, then a 3-master cluster, both with tasks spread over the slots."""
    shape = spread_tasks(PROCS, per_proc=TASKS_PER_PROC, parts=MASTERS)
    requests = 100_000 if quick else 400_000
    with RedisServer() as server:
        base = baseline(server.port, requests=requests)
        one = measure(server.url, ports=[server.port], shape=shape, baseline_ops_s=base,
                      quick=quick)  # fmt: skip
    with LocalCluster(masters=MASTERS) as cluster:
        spread = masters_of(cluster, shape.tasks)
        ports = [m.port for m in cluster.masters()]
        base = cluster_baseline(ports, requests=requests)
        many = measure(cluster.url, ports=ports, shape=shape, baseline_ops_s=base, quick=quick)
    scaling = many.ledger_ops_s / one.ledger_ops_s
    base_scaling = many.baseline_ops_s / one.baseline_ops_s
    rows = [
        *_rows(shape, one, many),
        ["tasks per master", "-", " / ".join(str(n) for n in spread)],
        ["scaling cluster / 1 node: ledger", "", f"{scaling:.2f}"],
        ["scaling cluster / 1 node: redis-benchmark", "", f"{base_scaling:.2f}"],
    ]
    _table(["measure", "1 node", f"cluster, {MASTERS} masters"], rows)
    over_t = max(one.overshoot_tokens, many.overshoot_tokens)
    over_n = max(one.overshoot_nanos, many.overshoot_nanos)
    print(
        f"RESULT single_baseline_eval_ops_per_s={one.baseline_ops_s:.0f} "
        f"cluster_baseline_eval_ops_per_s={many.baseline_ops_s:.0f} "
        f"single_ratio={one.ledger_ops_s / one.baseline_ops_s:.2f} "
        f"cluster_ratio={many.ledger_ops_s / many.baseline_ops_s:.2f} "
        f"single_p99_reserve_ms={one.p99_reserve_ms:.3f} "
        f"cluster_p99_reserve_ms={many.p99_reserve_ms:.3f} "
        f"overshoot_tokens={over_t} overshoot_nanos={over_n} baseline_scaling={base_scaling:.2f} "
        f"cluster_ops_per_s={many.ledger_ops_s:.0f} single_ops_per_s={one.ledger_ops_s:.0f} "
        f"scaling={scaling:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="finish well within a minute")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help=f"also run on a {MASTERS}-master Redis Cluster, tasks spread over its slots",
    )
    args = parser.parse_args()
    if args.cluster:
        main_cluster(quick=args.quick)
    else:
        main_single(quick=args.quick)


if __name__ == "__main__":
    main()
