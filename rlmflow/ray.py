"""Many RLM runs on a Ray cluster (the ``ray`` extra: ``pip install 'rlmflow[ray]'``).

A batch of (document, question) items runs on a pool of Ray actors. Each actor builds its
:class:`~rlmflow.RLM` once, from a picklable ``factory``, and keeps it warm: imports, model
clients, connections, the Dispatcher and whatever its sandbox keeps between runs serve every run
the actor takes. Give the factory's Dispatcher ``shared="redis://..."`` so the whole cluster stays
within the provider's limits (``docs/scaling.md``).

    batch = RayBatch(make_rlm, policy=BatchPolicy(actors=8, runs_per_actor=4), address="auto")
    async for event in batch.stream(items):
        if event.kind == "done":
            print(event.id, event.result.answer)

Documents travel once: an inline document is put into the object store by the driver once (the
same object once, however many items use it) and actors receive it from the store; a document
given by ``paths`` is read by the actor itself (a filesystem the cluster shares). Results stream
back as runs finish. A run whose actor died (a killed or crashed worker) or that failed with a
retryable error is sent again, up to ``max_attempts``; every item ends as ``done`` or ``failed``,
none is lost.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio.to_thread

from ._exceptions import ConfigurationError, ModelError, RLMError, SandboxError
from .context import load_context_files
from .sandbox.base import Context

if TYPE_CHECKING:
    from .engine import RLM, RLMResult
    from .events import RunEvent

__all__ = ["BatchEvent", "BatchItem", "BatchPolicy", "BatchResult", "RayBatch", "run_batch"]


@dataclass(frozen=True)
class BatchItem:
    """One run of a batch: a question over an inline ``context`` or over files at ``paths``."""

    id: str
    query: str
    context: Context | None = None
    paths: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if (self.context is None) == (self.paths is None):
            raise ConfigurationError(f"batch item {self.id!r}: give exactly one of context and paths")


@dataclass(frozen=True)
class BatchPolicy:
    """How a batch uses the cluster and when it tries a run again.

    - ``actors`` x ``runs_per_actor``: runs in flight (each actor is an asyncio actor);
    - ``max_attempts``: tries per item; a dead actor always counts as retryable, an error raised by
      the run only when it is an instance of ``retry_on``;
    - ``actor_options``: passed to Ray's ``.options()`` (``num_cpus``, ``resources``, ...);
    - ``run_events``: also stream each run's :mod:`rlmflow.events` back (a Ray streaming
      generator; one small object per event).
    """

    actors: int = 2
    runs_per_actor: int = 4
    max_attempts: int = 3
    retry_on: tuple[type[BaseException], ...] = (SandboxError, ModelError)
    actor_options: Mapping[str, Any] = field(default_factory=dict)
    run_events: bool = False

    def __post_init__(self) -> None:
        if self.actors < 1 or self.runs_per_actor < 1 or self.max_attempts < 1:
            raise ConfigurationError("actors, runs_per_actor and max_attempts must be >= 1")


@dataclass(frozen=True)
class BatchResult:
    """The end of one item: its ``result`` (answered) or its last ``error`` (failed)."""

    id: str
    attempts: int
    result: RLMResult | None = None
    error: RLMError | None = None
    worker: int | None = None  # the pid of the actor that finished it

    @property
    def answer(self) -> str | None:
        return self.result.answer if self.result is not None else None


@dataclass(frozen=True)
class BatchEvent:
    """Progress of a batch: ``submitted``, ``retrying`` (with why), ``done`` or ``failed``; and with
    ``BatchPolicy(run_events=True)``, ``run_event`` for each of a run's :mod:`rlmflow.events`
    (turns, cells, sub-calls), streamed from the actor as they happen."""

    kind: Literal["submitted", "retrying", "done", "failed", "run_event"]
    id: str
    attempt: int
    detail: str = ""
    outcome: BatchResult | None = None
    run_event: RunEvent | None = None  # with BatchPolicy(run_events=True): the run's own events

    @property
    def result(self) -> RLMResult | None:
        return self.outcome.result if self.outcome is not None else None


class _RLMActor:
    """The actor body: one warm RLM, many runs (concurrently, on the actor's event loop)."""

    def __init__(self, factory: Callable[[], RLM]) -> None:
        self._factory = factory
        self._rlm: RLM | None = None

    def pid(self) -> int:
        return os.getpid()

    async def run(
        self, query: str, context: Context | None, paths: Sequence[str] | None, sink: Any = None
    ) -> dict[str, Any]:
        if self._rlm is None:
            self._rlm = self._factory()
        try:
            if paths is not None:
                context = (await anyio.to_thread.run_sync(load_context_files, list(paths))).context
            assert context is not None
            return {"result": await self._rlm.run(context, query, events=sink), "pid": os.getpid()}
        except RLMError as exc:
            return {"error": exc, "pid": os.getpid()}

    async def run_streaming(
        self, query: str, context: Context | None, paths: Sequence[str] | None
    ) -> AsyncIterator[dict[str, Any]]:
        """The run's events as they happen (``{"event": ...}``), then its outcome."""
        events: asyncio.Queue[RunEvent] = asyncio.Queue()
        task = asyncio.ensure_future(self.run(query, context, paths, events.put_nowait))
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield {"event": getter.result()}
                else:
                    getter.cancel()
            yield task.result()
        finally:
            task.cancel()


def _swallow(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _relay(generator: Any, item_id: str, attempt: int, relay: asyncio.Queue[BatchEvent]) -> dict[str, Any]:
    """Pass a streaming run's events on as they come; return its outcome (the last item)."""
    last: dict[str, Any] = {}
    async for ref in generator:
        last = await ref
        if "event" in last:
            relay.put_nowait(BatchEvent("run_event", item_id, attempt, run_event=last["event"]))
    return last


#: Probes of a dead actor (with growing pauses) before it counts as gone for good.
_PROBES = 5


#: Duplicated ids a refused batch names (the count of the others is given).
_NAMED_DUPLICATES = 5


def _unique_items(items: Iterable[BatchItem]) -> list[BatchItem]:
    """``items`` as a list, or :class:`ConfigurationError` naming the first ids given twice or more.

    A batch's outcomes are told apart by id (``BatchResult.id``, ``run``'s order, the CLI's output
    lines): two items with one id would both run and be paid for, and one answer would hide the other.
    """
    items = list(items)
    counts = Counter(item.id for item in items)
    duplicated = [item_id for item_id, count in counts.items() if count > 1]
    if duplicated:
        first = duplicated[:_NAMED_DUPLICATES]
        named = ", ".join(f"{str(item_id)[:60]!r} ({counts[item_id]} items)" for item_id in first)
        more = len(duplicated) - _NAMED_DUPLICATES
        raise ConfigurationError(
            f"batch item ids must be unique (outcomes are matched to items by id); {len(duplicated)} ids are "
            f"given to more than one item: {named}" + (f" and {more} more" if more > 0 else "")
        )
    return items


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigurationError("rlmflow.ray needs Ray: pip install 'rlmflow[ray]'") from exc
    return ray


def _worker_died(exc: BaseException) -> bool:
    ray = _ray()
    return isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.WorkerCrashedError
                      | ray.exceptions.ActorUnavailableError | ray.exceptions.ObjectLostError)


class RayBatch:
    """A pool of warm RLM actors on a Ray cluster; run batches with :meth:`stream` or :meth:`run`.

    ``factory`` builds the actor's :class:`~rlmflow.RLM`; it is pickled (cloudpickle) to every
    actor, so it must not capture open clients. ``address`` is passed to ``ray.init`` when Ray is
    not initialised yet (``"auto"``, ``"ray://head:10001"``, or ``None`` for a local instance);
    ``init_options`` go to ``ray.init`` too. Close with :meth:`aclose` (or ``async with``).
    """

    def __init__(
        self,
        factory: Callable[[], RLM],
        *,
        policy: BatchPolicy | None = None,
        address: str | None = None,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.factory = factory
        self.policy = policy or BatchPolicy()
        self.address = address
        self.init_options = dict(init_options or {})
        self._actors: list[Any] = []
        self._started_ray = False

    def _start(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_options)
            self._started_ray = True
        if not self._actors:
            actor_class = ray.remote(_RLMActor)
            options = {"max_restarts": -1, "max_concurrency": self.policy.runs_per_actor,
                       **self.policy.actor_options}
            self._actors = [actor_class.options(**options).remote(self.factory) for _ in range(self.policy.actors)]

    async def pids(self) -> list[int]:
        """The process id of each actor (for operators, and for tests that kill one)."""
        await anyio.to_thread.run_sync(self._start)
        return list(await asyncio.gather(*(actor.pid.remote() for actor in self._actors)))

    async def stream(self, items: Iterable[BatchItem]) -> AsyncIterator[BatchEvent]:
        """Run every item; yield events as they happen, each item ending in ``done`` or ``failed``.

        Raises :class:`ConfigurationError` naming the ids given to more than one item, before Ray
        is touched or anything is sent: outcomes are told apart by id.
        """
        items = _unique_items(items)
        await anyio.to_thread.run_sync(self._start)
        flight = _Flight(self, _ray(), items)
        getter: asyncio.Future[BatchEvent] = asyncio.ensure_future(flight.relay.get())
        try:
            while flight.queue or flight.pending:
                if flight.all_gone():
                    for event in flight.fail_waiting():
                        yield event
                    break
                for event in flight.submit():
                    yield event
                done, _ = await asyncio.wait([*flight.pending, *flight.probes, getter],
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    getter = asyncio.ensure_future(flight.relay.get())
                while not flight.relay.empty():  # a run's events come before its outcome
                    yield flight.relay.get_nowait()
                for future in done:
                    if future in flight.probes:
                        await flight.probed(future)
                    elif future in flight.pending:  # not the relay's getter
                        yield flight.finished(future)
        finally:
            getter.cancel()
            flight.abandon()

    async def run(self, items: Iterable[BatchItem]) -> list[BatchResult]:
        """Run every item; the outcomes in input order (the ids must be unique, as for :meth:`stream`)."""
        items = _unique_items(items)
        outcomes: dict[str, BatchResult] = {}
        async for event in self.stream(items):
            if event.outcome is not None:
                outcomes[event.id] = event.outcome
        return [outcomes[item.id] for item in items]

    async def aclose(self) -> None:
        """Stop the actors (and the local Ray instance this batch started, if any)."""
        ray = _ray()
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_ray:
            await anyio.to_thread.run_sync(ray.shutdown)
            self._started_ray = False

    async def __aenter__(self) -> RayBatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Flight:
    """What one :meth:`RayBatch.stream` keeps track of: the items waiting, the runs and probes in
    flight, the load of each actor and which actors are down."""

    def __init__(self, batch: RayBatch, ray: Any, items: Iterable[BatchItem]) -> None:
        self.batch = batch
        self.ray = ray
        self.refs: dict[int, Any] = {}  # id(context) -> object ref: each document is put once
        self.queue: deque[tuple[BatchItem, int]] = deque((item, 1) for item in items)
        self.load = [0] * len(batch._actors)
        self.pending: dict[asyncio.Future[Any], tuple[BatchItem, int, int]] = {}
        # an actor whose worker died gets nothing new until it answers a probe (Ray restarts it)
        self.probes: dict[asyncio.Future[Any], int] = {}
        self.down: set[int] = set()
        self.failed_probes = [0] * len(batch._actors)
        self.relay: asyncio.Queue[BatchEvent] = asyncio.Queue()  # the runs' own events (run_events=True)

    def all_gone(self) -> bool:
        """Every actor is down for good: nothing runs, nothing is being probed."""
        return not self.pending and not self.probes and len(self.down) == len(self.batch._actors)

    def fail_waiting(self) -> Iterator[BatchEvent]:
        while self.queue:
            item, attempt = self.queue.popleft()
            gone = RLMError("no Ray actor is left to run this item")
            yield BatchEvent("failed", item.id, attempt, detail=str(gone),
                             outcome=BatchResult(item.id, attempt, error=gone))

    def submit(self) -> Iterator[BatchEvent]:
        """Send waiting items to the least loaded actors that are up and have room.

        A generator, so that each run is sent only when the reader takes the previous event.
        """
        capacity = self.batch.policy.runs_per_actor
        while self.queue:
            ready = [i for i in range(len(self.load)) if i not in self.down and self.load[i] < capacity]
            if not ready:
                break
            index = min(ready, key=self.load.__getitem__)
            item, attempt = self.queue.popleft()
            self.pending[self._send(self.batch._actors[index], item, attempt)] = (item, attempt, index)
            self.load[index] += 1
            yield BatchEvent("submitted", item.id, attempt)

    def _send(self, actor: Any, item: BatchItem, attempt: int) -> asyncio.Future[Any]:
        if self.batch.policy.run_events:
            generator = actor.run_streaming.options(num_returns="streaming").remote(
                item.query, self._document(item), item.paths)
            return asyncio.ensure_future(_relay(generator, item.id, attempt, self.relay))
        return asyncio.wrap_future(actor.run.remote(item.query, self._document(item), item.paths).future())

    def _document(self, item: BatchItem) -> Any:
        if item.context is None:
            return None
        key = id(item.context)
        if key not in self.refs:
            self.refs[key] = self.ray.put(item.context)
        return self.refs[key]

    def probe(self, index: int) -> None:
        self.probes[asyncio.wrap_future(self.batch._actors[index].pid.remote().future())] = index

    async def probed(self, future: asyncio.Future[Any]) -> None:
        """A probe answered: the actor is up again, or is probed again after a pause."""
        index = self.probes.pop(future)
        if future.exception() is None:
            self.down.discard(index)
            self.failed_probes[index] = 0
        elif self.failed_probes[index] < _PROBES:  # Ray could not restart it (yet)
            self.failed_probes[index] += 1
            await anyio.sleep(0.2 * self.failed_probes[index])
            self.probe(index)

    def finished(self, future: asyncio.Future[Any]) -> BatchEvent:
        """A run ended: ``done``, ``retrying`` (queued again) or ``failed``."""
        item, attempt, index = self.pending.pop(future)
        self.load[index] -= 1
        error: BaseException | None
        try:
            outcome = future.result()
        except Exception as exc:
            if not _worker_died(exc):
                raise
            error, retryable, pid = exc, True, None
            if index not in self.down:
                self.down.add(index)
                self.probe(index)
        else:
            error, pid = outcome.get("error"), outcome["pid"]
            retryable = isinstance(error, self.batch.policy.retry_on)
        if error is None:
            return BatchEvent("done", item.id, attempt,
                              outcome=BatchResult(item.id, attempt, result=outcome["result"], worker=pid))
        if retryable and attempt < self.batch.policy.max_attempts:
            self.queue.append((item, attempt + 1))
            return BatchEvent("retrying", item.id, attempt, detail=f"{type(error).__name__}: {error}")
        rlm_error = error if isinstance(error, RLMError) else RLMError(
            f"the Ray worker died: {type(error).__name__}: {error}")
        result = BatchResult(item.id, attempt, error=rlm_error, worker=pid)
        return BatchEvent("failed", item.id, attempt, detail=str(rlm_error), outcome=result)

    def abandon(self) -> None:
        """Cancel the probes of actors still restarting and the runs left when the reader stopped
        early; their errors (a killed actor's) must not surface later as never-retrieved exceptions."""
        for leftover in (*self.probes, *self.pending):
            leftover.cancel()
            leftover.add_done_callback(_swallow)


async def run_batch(
    factory: Callable[[], RLM],
    items: Iterable[BatchItem],
    *,
    policy: BatchPolicy | None = None,
    address: str | None = None,
) -> list[BatchResult]:
    """Run a batch on a fresh pool of actors and close it; outcomes in input order."""
    async with RayBatch(factory, policy=policy, address=address) as batch:
        return await batch.run(items)
