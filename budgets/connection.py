"""The one way Paymaster opens a Redis client, standalone or Redis Cluster.

``REDIS_URL`` may name a standalone server or any node of a Redis Cluster: the
first client built for a URL asks the server (``INFO cluster``) and remembers
the answer, so nothing else needs setting. A cluster gets redis-py's
:class:`~redis.asyncio.cluster.RedisCluster`, which routes each command to the
master of its key's slot and follows the cluster when slots move or a replica
is promoted.

A standalone server gets a pool that waits for a free connection: redis-py's
default pool refuses a command outright (``MaxConnectionsError``) once 100
connections are checked out, which a worker running several tasks, each with
several subtasks closing, saving and counting at once, reaches easily. A
blocking pool makes such a command wait for a connection instead, up to
``POOL_TIMEOUT_S``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, TypeAlias

import redis
from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from typing_extensions import TypeIs

log = logging.getLogger(__name__)

#: A client of either kind; both speak every command Paymaster sends.
Client: TypeAlias = Redis | RedisCluster

#: Connections one standalone client opens at most; further commands wait for one.
MAX_CONNECTIONS = 64
#: Connections a cluster client opens at most per node. redis-py's cluster pool
#: refuses a command past it instead of waiting, so it is set well above what a
#: process keeps in flight.
CLUSTER_MAX_CONNECTIONS = 1024
#: How long a command waits for a free connection before it fails.
POOL_TIMEOUT_S = 20.0
#: How long asking a server whether it is a cluster node may take.
PROBE_TIMEOUT_S = 2.0
#: Attempts a cluster client makes at a command while the cluster fails over
#: (redirections, a dead master, its replica being promoted), with jittered
#: backoff up to a second between them: about ten seconds in all.
CLUSTER_ATTEMPTS = 14


@functools.lru_cache(maxsize=64)
def is_cluster(url: str) -> bool:
    """Whether the Redis at ``url`` is a cluster node (asked once per URL and process).

    A server that cannot be asked is taken as standalone: its first command then
    fails as it would have, with the same error.
    """
    probe = redis.Redis.from_url(
        url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
    )
    try:
        enabled = probe.info("cluster").get("cluster_enabled", 0)
    except (rex.ConnectionError, rex.TimeoutError, OSError):
        is_cluster.cache_clear()  # ask again next time: the server may be starting
        return False
    except rex.ResponseError:  # a server or proxy without INFO sections
        return False
    finally:
        probe.close()
    return bool(int(enabled))


class _Cluster(RedisCluster):
    """redis-py's cluster client, initialized once before its first command runs,
    routing ``FCALL`` by its own keys.

    Left to itself, commands started together on a fresh client race its
    initialization and some fail (``'NoneType' object has no attribute
    'writelines'``, redis-py 8.1); waiting for it first costs nothing after.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # redis-py reads EVAL's keys from its arguments but asks a node for
        # FCALL's (COMMAND GETKEYS with every argument, twice per call, on the
        # default node): two more round trips per script call, a lone reserve
        # taking twice as long, and one node parsing every task's batch. FCALL's
        # keys follow its numkeys as EVAL's do.
        if command.upper() in ("FCALL", "FCALL_RO") and len(args) >= 2 and int(args[1]) > 0:
            slots = {self.keyslot(key) for key in args[2 : 2 + int(args[1])]}
            if len(slots) == 1:
                return slots.pop()
        slot: int = await super()._determine_slot(command, *args)
        return slot


def redis_client(url: str, *, cluster: bool | None = None, **options: Any) -> Client:
    """A client of the Redis at ``url`` (replies decoded to ``str``).

    ``cluster`` forces the kind (default: ask the server, see :func:`is_cluster`).
    ``options`` go to each connection (timeouts, retry policy); on a cluster, a
    ``retry`` policy of redis-py's per-connection kind is replaced by the
    cluster's own (:data:`CLUSTER_ATTEMPTS`), which is what rides out a failover.
    """
    if cluster if cluster is not None else is_cluster(url):
        options.pop("retry", None)
        options.pop("retry_on_error", None)
        return _Cluster.from_url(
            url,
            decode_responses=True,
            max_connections=CLUSTER_MAX_CONNECTIONS,
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), CLUSTER_ATTEMPTS),
            **options,
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_TIMEOUT_S,
        decode_responses=True,
        **options,
    )
    return Redis.from_pool(pool)  # the client owns the pool: closing one closes both


def sync_redis_client(url: str, **options: Any) -> redis.Redis | redis.RedisCluster:
    """A blocking client of the Redis at ``url`` (replies decoded), for code run in a thread
    (a metrics scrape); a cluster node gets redis-py's blocking cluster client."""
    if is_cluster(url):
        return redis.RedisCluster.from_url(url, decode_responses=True, **options)
    return redis.Redis.from_url(url, decode_responses=True, **options)


def clustered(client: Client) -> TypeIs[RedisCluster]:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)
