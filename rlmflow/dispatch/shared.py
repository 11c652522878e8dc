"""Lane and budget state shared across processes, kept in Redis.

One :class:`SharedState` per process connects to Redis and serves every shared lane
(:class:`rlmflow.dispatch.redis_lane.SharedLane`) and shared budget
(:class:`rlmflow.dispatch.redis_budget.SharedBudget`) of that process::

    dispatcher = Dispatcher(shared="redis://10.0.0.5:6379/0", limits={"openai": Limits(rpm=600)})

Every replica configured with the same URL and namespace then enforces one lane: the RPM/TPM
windows, the calls in flight, the adaptive concurrency limit and provider pauses are counted in
Redis by atomic scripts (:mod:`rlmflow.dispatch.redis_scripts`).

What happens when things fail (``docs/scaling.md`` has the whole picture):

- Redis unreachable when the state connects: :class:`SharedStateUnavailableError`, before any
  call is sent.
- A process dies: its calls in flight hold *leases* that it renews every ``lease / 3`` seconds;
  the leases end ``lease`` seconds after its last renewal and the slots are free again.
- Redis lost mid-run: the process falls back to local limits of 1/N of each lane (N: the
  replicas it last saw), counting what it admitted itself in the current window, logs a warning
  and adds one to the ``rlmflow.shared.fallbacks`` counter. It never waits on Redis longer than
  ``timeout``. When Redis answers again, it writes back what it admitted meanwhile and rejoins.

The background task that renews leases, sends releases and listens for freed slots belongs to
the state: :meth:`SharedState.aclose` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio
from opentelemetry import metrics

from .._exceptions import ConfigurationError, SharedStateUnavailableError
from ..telemetry.logs import get_logger
from . import redis_scripts as scripts

__all__ = [
    "ServedLane",
    "SharedConfig",
    "SharedLostError",
    "SharedState",
    "SharedStateUnavailableError",
    "SharedStatistics",
    "redacted_url",
]

_logger = get_logger("rlmflow.dispatch.shared")

METRIC_FALLBACKS = "rlmflow.shared.fallbacks"
METRIC_REPLICAS = "rlmflow.shared.replicas"


class ServedLane(Protocol):
    """What the state needs of a lane it serves (``rlmflow.dispatch.redis_lane.SharedLane`` is one).

    A protocol rather than the class, so that this module need not import the lane that imports it.
    """

    @property
    def key(self) -> str: ...

    @property
    def replicas(self) -> int: ...

    def notify(self) -> None: ...

    def observe(self, *, limit: int, in_flight: int) -> None: ...

    async def renew(self) -> None: ...

    async def replay(self) -> None: ...


class SharedLostError(Exception):
    """Internal: a Redis call failed mid-run; the caller switches to its local fallback."""


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """Where shared state lives and how failures are bounded (the policy file's ``[shared]``).

    - ``url``: ``redis://host:port/db`` (``rediss://`` for TLS);
    - ``namespace``: prefix of every key, so several deployments can share one Redis;
    - ``lease``: seconds after which a dead process's slots and budget holds are reclaimed;
    - ``timeout``: the longest a call waits on Redis before the process falls back to local limits;
    - ``margin``: seconds added to each lane's window, so that a call admitted in one window cannot
      reach the provider inside the next one: it must exceed the worst delay between admission
      and the provider receiving the request (default: 1% of the window, at least 0.5 s, twice
      the in-memory lane's, for busy replicas that send a burst a little late).
    """

    url: str
    namespace: str = "rlmflow"
    lease: float = 30.0
    timeout: float = 1.0
    margin: float | None = None

    def __post_init__(self) -> None:
        if not self.url.lower().startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                f"shared state URL must be redis://, rediss:// or unix://, not {redacted_url(self.url)!r}"
            )
        if self.lease <= 0 or self.timeout <= 0 or (self.margin is not None and self.margin < 0):
            raise ConfigurationError("lease and timeout must be > 0, margin >= 0")

    def window_margin(self, window: float) -> float:
        return self.margin if self.margin is not None else max(window * 0.01, 0.5)


@dataclass(frozen=True, slots=True)
class SharedStatistics:
    mode: Literal["shared", "fallback", "closed"]
    replicas: int
    fallbacks: int
    releases_pending: int


class SharedState:
    """A process's connection to the shared lanes and budgets in Redis.

    Call :meth:`connect` at startup to fail early (a Dispatcher connects on its first call
    otherwise); :meth:`aclose` at shutdown. ``clock`` is the local monotonic clock (default: the
    event loop's); the windows themselves use the Redis server's clock.
    """

    def __init__(
        self,
        config: SharedConfig | str,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = SharedConfig(config) if isinstance(config, str) else config
        self.replica_id = f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self.mode: Literal["shared", "fallback", "closed"] = "shared"
        self.replicas = 1
        self.fallbacks = 0
        self.clock = clock or anyio.current_time
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scripts: dict[str, Any] = {}
        self._lanes: dict[str, ServedLane] = {}
        self._releases: list[tuple[ServedLane, list[Any]]] = []
        self._release_ready = asyncio.Event()
        self._sending = anyio.Lock()  # held while a batch of releases is on its way to Redis
        self._task: asyncio.Task[None] | None = None
        self._connect_lock = anyio.Lock()
        self._counter = 0
        self._budget_renewals: list[Callable[[], Awaitable[None]]] = []
        meter = metrics.get_meter("rlmflow", meter_provider=meter_provider)
        self._fallback_counter = meter.create_counter(
            METRIC_FALLBACKS, description="Times this process lost Redis and fell back to 1/N local limits"
        )
        meter.create_observable_gauge(
            METRIC_REPLICAS, callbacks=[self._observe_replicas], description="Replicas sharing the lanes (last seen)"
        )

    # -- keys -------------------------------------------------------------------------------------
    def lane_keys(self, key: str) -> list[str]:
        base = f"{self.config.namespace}:{{lane:{key}}}"
        return [f"{base}:win", f"{base}:amt", f"{base}:state", f"{base}:slots", f"{base}:replicas"]

    def budget_keys(self, name: str) -> list[str]:
        base = f"{self.config.namespace}:{{budget:{name}}}"
        return [f"{base}:state", f"{base}:leases", f"{base}:amt"]

    def channel(self, key: str) -> str:
        return f"{self.config.namespace}:free:{key}"

    def new_id(self) -> str:
        self._counter += 1
        return f"{self.replica_id}:{self._counter}"

    # -- lifecycle ----------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect, register the scripts and start the background task (idempotent).

        Raises :class:`SharedStateUnavailableError` when Redis does not answer within ``timeout``
        or the ``redis`` extra is not installed.
        """
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is not loop:
            # used from a new event loop (run_sync, a test): the old connection and task died with
            # the old loop, so start afresh; leases of anything it held end on their own
            _abandon(self._client)
            self._client, self._task, self._releases = None, None, []
            self._connect_lock, self._release_ready, self._sending = anyio.Lock(), asyncio.Event(), anyio.Lock()
            for lane in self._lanes.values():
                lane.notify()  # fresh wake-up events, bound to the new loop
        async with self._connect_lock:
            if self._client is not None:
                return
            if self.mode == "closed":
                raise SharedStateUnavailableError("this shared state was closed")
            try:
                import redis.asyncio as aioredis
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff
            except ImportError as exc:
                raise SharedStateUnavailableError(
                    "shared lanes need redis-py: pip install 'rlmflow[redis]'"
                ) from exc
            client = aioredis.Redis.from_url(
                self.config.url,
                socket_timeout=self.config.timeout,
                socket_connect_timeout=self.config.timeout,
                retry=Retry(NoBackoff(), 0),  # a failure means fallback now, not ten tries later
                decode_responses=True,
            )
            try:
                with anyio.fail_after(self.config.timeout * 2):
                    await client.ping()
                    replicas, _ = await client.register_script(scripts.HEARTBEAT)(
                        keys=[f"{self.config.namespace}:replicas"], args=[self.replica_id, self.presence_ttl_ms]
                    )
            except (OSError, TimeoutError, aioredis.RedisError) as exc:
                await client.aclose()
                raise SharedStateUnavailableError(
                    f"cannot reach Redis at {redacted_url(self.config.url)}: {type(exc).__name__}: {exc}"
                ) from exc
            self.replicas = int(replicas)
            self._client = client
            self._loop = loop
            for name in ("LANE_ACQUIRE", "LANE_RELEASE", "LANE_RENEW", "LANE_REPLAY", "HEARTBEAT",
                         "BUDGET_RESERVE", "BUDGET_RELEASE", "BUDGET_RENEW"):
                self._scripts[name] = client.register_script(getattr(scripts, name))
            self._task = asyncio.get_running_loop().create_task(self._pump(), name="rlmflow-shared-state")
            _logger.info("shared state connected", url=redacted_url(self.config.url), replica=self.replica_id,
                         replicas=self.replicas)

    async def aclose(self) -> None:
        """Send pending releases (best effort, bounded by ``timeout``), stop the task, disconnect.

        A batch the background task is sending is finished first: cancelling it would leave its
        slots taken in Redis until their leases end, though this process freed them.
        """
        if self._task is not None:
            if self.mode == "shared":
                with anyio.move_on_after(self.config.timeout):
                    await self._send_releases()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._client is not None:
            with anyio.move_on_after(self.config.timeout), contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
        self.mode = "closed"

    async def __aenter__(self) -> SharedState:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def register(self, lane: ServedLane) -> None:
        self._lanes[lane.key] = lane

    # -- calls --------------------------------------------------------------------------------------
    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script; a Redis failure switches to fallback and raises :class:`SharedLostError`."""
        if self._client is None or self._loop is not asyncio.get_running_loop():
            await self.connect()
        if self.mode != "shared":
            raise SharedLostError("shared state is in fallback")
        try:
            with anyio.fail_after(self.config.timeout):
                return await self._scripts[name](keys=list(keys), args=list(args))
        except Exception as exc:
            if not _is_connection_error(exc):
                raise
            self._lose(exc)
            raise SharedLostError(str(exc)) from exc

    async def run_in_background(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script with no fallback switch, for the background work this state drives (lease
        renewals, replays), which handles a Redis failure itself."""
        return await self._scripts[name](keys=list(keys), args=list(args))

    async def read_hash(self, key: str) -> dict[Any, Any]:
        """A Redis hash as it is now (empty before the state connected)."""
        return await self._client.hgetall(key) if self._client is not None else {}

    def post_release(self, lane: ServedLane, args: list[Any]) -> None:
        """Queue a lane release; the background task sends it (a release must not block)."""
        if self.mode == "shared":
            self._releases.append((lane, args))
            self._release_ready.set()

    def _lose(self, exc: BaseException) -> None:
        if self.mode != "shared":
            return
        self.mode = "fallback"
        self.fallbacks += 1
        self._releases.clear()  # their leases end on their own
        self._fallback_counter.add(1)
        _logger.warning("lost Redis: lanes fall back to local limits",
                        shares={key: f"1/{lane.replicas or self.replicas}" for key, lane in self._lanes.items()},
                        error=f"{type(exc).__name__}: {exc}")
        for lane in self._lanes.values():
            lane.notify()

    @property
    def presence_ttl_ms(self) -> int:
        """How long a replica's presence mark lasts without renewal (the lease), in milliseconds."""
        return math.ceil(self.config.lease * 1000)

    # -- background ---------------------------------------------------------------------------------
    async def _pump(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._release_loop)
            tg.start_soon(self._listen_loop)
            tg.start_soon(self._heartbeat_loop)

    async def _release_loop(self) -> None:
        while True:
            await self._release_ready.wait()
            self._release_ready.clear()
            if self.mode == "shared":
                await self._send_releases()

    async def _send_releases(self) -> None:
        async with self._sending:  # one batch at a time; aclose waits for the one in flight
            batch, self._releases = self._releases, []
            if batch and self.mode == "shared":
                await self._send_batch(batch)

    async def _send_batch(self, batch: list[tuple[ServedLane, list[Any]]]) -> None:
        try:
            with anyio.fail_after(self.config.timeout):
                async with self._client.pipeline(transaction=False) as pipe:
                    for lane, args in batch:
                        await self._scripts["LANE_RELEASE"](keys=self.lane_keys(lane.key)[:4], args=args,
                                                            client=pipe)
                    results = await pipe.execute()
        except Exception as exc:
            if not _is_connection_error(exc):
                _logger.error("shared lane release failed", error=f"{type(exc).__name__}: {exc}")
                return
            self._lose(exc)
            return
        for (lane, _), result in zip(batch, results, strict=True):
            lane.observe(limit=int(result[0]), in_flight=int(result[1]))

    async def _listen_loop(self) -> None:
        """Wake a lane's waiters when any process frees one of its slots (pub/sub)."""
        prefix = f"{self.config.namespace}:free:"
        while True:
            if self.mode != "shared":
                await anyio.sleep(self.config.lease / 6)
                continue
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(prefix + "*")
                while self.mode == "shared":
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        lane = self._lanes.get(str(message["channel"])[len(prefix):])
                        if lane is not None:
                            lane.notify()
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                self._lose(exc)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.timeout), \
                        contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _heartbeat_loop(self) -> None:
        """Renew this process's leases; count replicas; after a loss, rejoin when Redis is back."""
        while True:
            await anyio.sleep(self.config.lease / 3)
            try:
                with anyio.fail_after(self.config.timeout):
                    replicas, _ = await self._scripts["HEARTBEAT"](
                        keys=[f"{self.config.namespace}:replicas"], args=[self.replica_id, self.presence_ttl_ms]
                    )
                    if self.mode == "fallback":
                        for lane in self._lanes.values():
                            await lane.replay()
                        self.mode = "shared"
                        _logger.warning("Redis is back: lanes are shared again", replicas=int(replicas))
                        for lane in self._lanes.values():
                            lane.notify()
                    for lane in self._lanes.values():
                        await lane.renew()
                    for budget_renew in list(self._budget_renewals):
                        await budget_renew()
                self.replicas = max(1, int(replicas))
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                self._lose(exc)

    def add_renewal(self, renew: Callable[[], Awaitable[None]]) -> None:
        """Renew a shared budget's leases with every heartbeat."""
        self._budget_renewals.append(renew)

    def _observe_replicas(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(self.replicas, {"rlm.shared.mode": self.mode})]

    def statistics(self) -> SharedStatistics:
        return SharedStatistics(self.mode, self.replicas, self.fallbacks, len(self._releases))

    def __repr__(self) -> str:
        return (f"SharedState({redacted_url(self.config.url)!r}, mode={self.mode}, replicas={self.replicas}, "
                f"lanes={sorted(self._lanes)})")


def _abandon(client: Any) -> None:
    """Close the sockets of a client whose event loop is gone (nothing can be awaited on it)."""
    pool = getattr(client, "connection_pool", None)
    connections = [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]
    for connection in connections:
        transport = getattr(getattr(connection, "_writer", None), "transport", None)
        if transport is None:
            continue
        with contextlib.suppress(RuntimeError):  # the loop is closed: it cannot schedule the callback
            transport.close()
        sock = getattr(transport, "_sock", None)
        if sock is not None:
            sock.close()
            transport._sock = None
        connection._reader = connection._writer = None  # closed by hand: nothing left to warn about


def _is_connection_error(exc: BaseException) -> bool:
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - connect() already required redis
        return isinstance(exc, OSError | TimeoutError)
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError)


def redacted_url(url: str) -> str:
    """The URL without its credentials, for messages and logs (a malformed one too)."""
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = url.partition(":")[0], url.partition(":")[2]
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
