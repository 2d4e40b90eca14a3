"""The one way Paymaster opens a Redis client, standalone or Redis Cluster.

``REDIS_URL`` may name a standalone server or any node of a Redis Cluster: the
first client built for a URL asks the server (``CLUSTER INFO``) and remembers
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

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from typing_extensions import TypeIs

from budgets.errors import forbidden

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
#: Attempts redis-py's cluster client makes at a command before it gives up
#: (redirections, a node it cannot reach); it makes them without waiting.
CLUSTER_ATTEMPTS = 14
#: How long a cluster command rides out a failover, by default (see ``_Cluster``).
CLUSTER_RIDE_OUT_S = 20.0
#: What a cluster command rides out: the node is unreachable, or the cluster is
#: not serving the slot yet.
_FAILOVER_ERRORS = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
)


#: What each URL answered, for the life of the process (a URL that did not answer is not kept).
_KINDS: dict[str, bool] = {}


def is_cluster(url: str) -> bool:
    """Whether the Redis at ``url`` is a cluster node (asked once per URL and process).

    It asks ``CLUSTER INFO``, which a standalone server refuses and which an ACL
    user of one tenant may send (``INFO`` is in ``@dangerous``). A server that
    cannot be asked is taken as standalone this time and asked again the next
    (it may be starting): its first command then fails as it would have.
    """
    known = _KINDS.get(url)
    if known is not None:
        return known
    probe = redis.Redis.from_url(
        url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
    )
    try:
        probe.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        answer = True
    except (rex.ConnectionError, rex.TimeoutError, OSError):
        return False
    except rex.ResponseError:  # "cluster support disabled", or a server without CLUSTER
        answer = False
    finally:
        probe.close()
    _KINDS[url] = answer
    return answer


def redact_url(url: str) -> str:
    """The URL without user name or password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Standalone(Redis):
    """redis-py's client, whose ``NOPERM`` refusals say what to check (an ACL user)."""

    #: The server's URL without credentials, for messages.
    pm_url = "redis://"

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except rex.NoPermissionError as e:
            raise forbidden(self.pm_url, e) from e


class _Cluster(RedisCluster):
    """redis-py's cluster client with two repairs (redis-py 8.1).

    - It is initialized once before its first command: commands started together
      on a fresh client otherwise race its initialization and some fail
      (``'NoneType' object has no attribute 'writelines'``).
    - Its ``NOPERM`` refusals say what to check (an ACL user), as the standalone's do.
    - It rides out a failover. redis-py retries a command that cannot reach its
      node at once, without waiting, so its attempts are spent in about a second,
      while a replica takes over after the cluster's node timeout (15 s by
      default). A command that fails so is sent again with jittered backoff (up
      to a second) until :attr:`ride_out_s` have passed since its first failure.
      Every ledger operation is idempotent, so a command cut off after it ran is
      safe to send again (redis-py's own retries do the same).
    - For commands whose keys it cannot find alone (``FCALL``, ``XREADGROUP``) it
      asks its default node, before and outside its retry loop: once that node is
      dead, every such command fails for good. Each failure therefore moves the
      default node to another master.
    """

    #: The URL without credentials, for messages.
    pm_url = "redis://"
    #: How long a command keeps trying while the cluster fails over.
    ride_out_s = CLUSTER_RIDE_OUT_S

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        first_s, failures = 0.0, 0
        while True:
            try:
                return await super().execute_command(*args, **kwargs)
            except rex.NoPermissionError as e:
                raise forbidden(self.pm_url, e) from e
            except _FAILOVER_ERRORS:
                now = time.monotonic()
                first_s = first_s or now
                failures += 1
                delay = min(1.0, 0.05 * 2 ** min(failures - 1, 5)) * random.uniform(0.5, 1.0)
                if now + delay - first_s > self.ride_out_s:
                    raise
                self.replace_default_node()
                with contextlib.suppress(*_FAILOVER_ERRORS):
                    await self.commands_parser.initialize(self.get_default_node())
                await asyncio.sleep(delay)


def redis_client(
    url: str, *, cluster: bool | None = None, ride_out_s: float | None = None, **options: Any
) -> Client:
    """A client of the Redis at ``url`` (replies decoded to ``str``).

    ``cluster`` forces the kind (default: ask the server, see :func:`is_cluster`).
    ``options`` go to each connection (timeouts, retry policy). On a cluster a
    per-connection ``retry`` policy is dropped: a command rides out a failover
    for ``ride_out_s`` (default :data:`CLUSTER_RIDE_OUT_S`) instead.
    """
    if cluster if cluster is not None else is_cluster(url):
        options.pop("retry", None)
        options.pop("retry_on_error", None)
        sharded = cast(
            "_Cluster",
            _Cluster.from_url(
                url,
                decode_responses=True,
                max_connections=CLUSTER_MAX_CONNECTIONS,
                retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), CLUSTER_ATTEMPTS),
                **options,
            ),
        )
        sharded.pm_url = redact_url(url)
        if ride_out_s is not None:
            sharded.ride_out_s = ride_out_s
        return sharded
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_TIMEOUT_S,
        decode_responses=True,
        **options,
    )
    client = cast("_Standalone", _Standalone.from_pool(pool))  # it owns the pool: closes it too
    client.pm_url = redact_url(url)
    return client


def sync_redis_client(url: str, **options: Any) -> redis.Redis | redis.RedisCluster:
    """A blocking client of the Redis at ``url`` (replies decoded), for code run in a thread
    (a metrics scrape); a cluster node gets redis-py's blocking cluster client."""
    if is_cluster(url):
        return redis.RedisCluster.from_url(url, decode_responses=True, **options)
    return redis.Redis.from_url(url, decode_responses=True, **options)


def clustered(client: Client) -> TypeIs[RedisCluster]:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)
