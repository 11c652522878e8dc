"""Adaptive concurrency that tells load-related throttling from random refusals.

One :class:`AdaptiveLimit` per lane holds the number of calls it may have in flight. Its rules
(``docs/policies.md`` explains them with plots from ``benchmarks/fanout.py``):

- **Slow start.** The limit starts at ``initial`` and grows by one for each success while the
  lane is busy (at least half the limit in flight within the last round trips), which doubles
  it every round trip, up to ``maximum``. A load-related throttle ends slow start; the limit
  then grows by one per round trip (``1/limit`` per success). Four round trips without a cut
  resume slow start, up to just below the level that failed (as TCP's ``ssthresh``; lifted
  once the floor below passes that level by two, beyond the noise of counting); above it the
  limit grows by one per round trip and the probing backoff below applies.
- **Fast start, before the first success.** Until a call of the lane succeeds, the round trip
  that clocks slow start is unknown (a success takes a whole round trip), but a refusal from a
  rate or concurrency limit comes back in milliseconds. So during that first round trip the
  limit is clocked by *time without a load-related refusal*: each ``fast_start_doubling / 4``
  seconds the limit has been full, it grows by ``2**(1/4)`` (at least one), doubling every
  ``fast_start_doubling`` seconds (20 ms: 8 -> 256 in 100 ms, half a 200 ms round trip; a
  client with no CPU cost ends 1,000 calls at a capacity of 256 in 0.91 s, 1.14x what the
  capacity allows, and 0.86 s at 10 ms, but a 10 ms doubling once let 8.8% of requests be refused
  over a hidden cap of 32 in ``benchmarks/fanout.py``, and gained nothing measurable there). A
  step is taken only once the lane has filled the limit it has (an idle lane does not grow),
  and one step per fill, so a client that lags grows slower, never in a burst. The first
  success ends the fast phase (the round-trip clock below takes over), and so does the first
  load-related refusal. A refusal that may be random only delays the next step (the lane must
  fill again and stay full a step's time), so growth stalls while refusals keep coming back and
  goes on when they are scattered: ending the phase at any refusal left a lane under 20% random
  refusals at about 10 for a whole round trip and cost regime (a) a fifth of its time. Over a
  hidden cap the overshoot is what the steps send before the run of refusals above it is read
  (one or two steps when the client keeps up). A load-related
  refusal before any success cuts to just below the level of the first call of its run (the
  calls below it are still out, unrefused), not by ``backoff_ratio``, and the first probe above
  it waits 4 round trips (the background rate has no data yet). The fast phase does not
  come back after a lane pause: the reopening window of a spent quota must not be met by a
  burst.
- **Which refusals are load-related.** A refusal the provider marks as a spent quota
  (``exhausted``) always is. Otherwise two tests look at the calls sent recently, counting a
  call still in flight as not refused (a refusal comes back in milliseconds, a success only
  after a whole round trip, so judging by what has come back would make any refusal look
  like a trend):

  1. *Above the floor.* Among the calls sent within the last round trip at a level above the
     floor (below), are there more refusals than random refusals at the background rate could
     explain (binomial tail under ``false_alarm``)? The background rate is measured on calls
     sent at or below the floor. Random refusals hit every level alike; a hidden concurrency
     cap refuses exactly the calls above it.
  2. *A run.* Is the refused call part of ``k`` calls refused in a row in send order, ``k``
     being the shortest run random refusals at the background rate would make with
     probability under ``false_alarm`` (at least 2)? When a quota window is full every call is
     refused, and every refused slot is refilled at once and refused again.
- **Multiplicative decrease, once per round trip.** A load-related refusal multiplies the
  limit by ``backoff_ratio`` only when the refused call was sent after the previous decrease
  (as TCP cuts its window once per window). The cut never goes below the floor, what the
  provider just showed it serves at once: the successes of the last round trip times the
  shortest round trip seen (Little's law on the provider's service time; the client's own
  delays would inflate a count of calls in flight), capped by the highest in-flight level
  that succeeded within two round trips.
- **Refused slots are held.** The slot of a load-related refusal stays taken for one round
  trip instead of being refilled at once: a refusal takes milliseconds, so refilling it would
  turn an overload into a storm of refusals (TCP is clocked by acknowledgements for the same
  reason).
- **Probing backoff.** After a decrease, the level that failed is probed again after one round
  trip, then 2, 4, ... up to ``max_probe_wait`` round trips while probes keep failing there, so
  a hidden concurrency cap costs a handful of refusals a minute instead of one per round trip.
- **Lane pause.** The quota itself is spent when the provider says so (``exhausted``), when a
  load-related refusal hits a call sent two or more below the floor (a level the provider
  surely serves), or when refusals have gone on for a whole round trip without a single
  success: a full RPM or TPM window refuses every call, whatever the concurrency.
  :meth:`on_refusal` then returns ``pause=True`` and the lane stops sending until the
  ``retry-after``. The cuts of that episode are undone (the quota,
  not the concurrency, was the problem), and after the pause the lane resumes with one call
  and slow-starts back to where it was, so the reopening window is not met by a burst.
  Refusals of calls sent before the pause change nothing more, and the time paused does not
  age the probing backoff or the last cut: what the lane knew of a hidden cap survives it.

Every state change is one method here (``on_send``, ``on_success``, ``on_refusal``,
``on_resume``), so a shared backend can hold the same state elsewhere.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AdaptiveLimit", "ConcurrencyStatistics", "RefusalVerdict", "SendStamp"]

_FAST_STEPS = 4  # fast-start steps per doubling: a step of 2**(1/4) (19%) bounds the overshoot of one step


@dataclass(slots=True)
class SendStamp:
    """When and at what in-flight level (counting itself) a call was sent, and how it ended."""

    seq: int
    level: int
    at: float
    above_floor: bool = False
    well_below_floor: bool = False  # two or more under the floor: surely a level the provider serves
    refused: bool = False
    refused_at: float = math.inf


@dataclass(frozen=True, slots=True)
class RefusalVerdict:
    """How the lane reads a refusal: ``load_related`` (limit cut) and ``pause`` (quota spent)."""

    load_related: bool
    decreased: bool
    pause: bool


@dataclass(frozen=True, slots=True)
class ConcurrencyStatistics:
    limit: int
    maximum: int
    lowest: int
    decreases: int
    slow_start: bool = True
    refusal_rate: float = 0.0
    pauses: int = 0


class AdaptiveLimit:
    """The current concurrency limit of a lane, adjusted by outcomes (see the module docstring).

    ``clock`` returns seconds (the event loop's clock in a lane; a fake in tests).
    """

    def __init__(
        self,
        maximum: int,
        *,
        initial: int | None = None,
        backoff_ratio: float = 0.7,
        false_alarm: float = 0.001,
        max_probe_wait: int = 64,
        fast_start_doubling: float = 0.02,
        clock: Callable[[], float],
    ) -> None:
        if maximum < 1:
            raise ValueError("maximum must be >= 1")
        if not 0 < backoff_ratio < 1:
            raise ValueError("backoff_ratio must be in (0, 1)")
        if not 0 < false_alarm < 1:
            raise ValueError("false_alarm must be in (0, 1)")
        self.maximum = maximum
        self.backoff_ratio = backoff_ratio
        self.false_alarm = false_alarm
        self.max_probe_wait = max_probe_wait
        if fast_start_doubling < 0:
            raise ValueError("fast_start_doubling must be >= 0 (0: no fast start)")
        self.fast_start_doubling = fast_start_doubling
        self._fast = fast_start_doubling > 0  # before the first success and load-related refusal
        self._fast_full_at: float | None = None  # when the lane last filled its limit in the fast phase
        self._clock = clock
        self._limit = float(min(maximum, initial or min(8, maximum)))
        self._lowest = int(self._limit)
        self._decreases = 0
        self._pauses = 0
        self._paused_at = -math.inf
        self._paused_at_seq = -1
        self._pause_started: float | None = None  # set by a pause this limit decided, until resumed
        self._slow_start = True
        self._ssthresh = float(maximum)  # slow start stops here: below the level that failed last
        self._seq = 0
        self._decreased_at_seq = -1  # calls sent before this seq cannot cause another cut
        self._decreased_at = -math.inf
        self._limit_before_cuts = self._limit  # restored when a pause shows the quota was the cause
        self._probe_before_cuts: tuple[int | None, int, float, float] = (None, 0, -math.inf, float(maximum))
        self._sends: deque[SendStamp] = deque(maxlen=4 * maximum + 64)  # the latest calls sent
        # background refusal rate (calls at or below the floor), with a prior of 2 in 10
        self._outcomes = 10.0
        self._refusals = 2.0
        self._srtt: float | None = None
        self._successes: deque[tuple[float, int]] = deque()  # (completed at, level); levels decrease
        self._recent_refusals: deque[SendStamp] = deque()  # in the order they came back
        self._peak_level, self._peak_at = 0, -math.inf  # the most calls in flight lately
        self._refused_since: float | None = None  # the first refusal since the last success
        self._served: deque[float] = deque()  # when recent successes came back
        self._min_rtt = math.inf
        self._holds: deque[float] = deque()  # when each held slot frees
        self._probe_level: int | None = None  # the level that failed last
        self._probe_failures = 0
        self._probe_after = -math.inf
        # (time, limit) at each change, for plots; bounded so a long-lived lane does not grow it forever
        self.history: deque[tuple[float, int]] = deque(maxlen=10_000)

    # -- reading ------------------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        """Calls the lane may have in flight now, not counting slots held by refusals."""
        now = self._clock()
        self._grow_fast(now)
        limit = int(self._limit)
        if self._probe_level is not None and limit >= self._probe_level and now < self._probe_after:
            limit = self._probe_level - 1
        return max(1, min(self.maximum, limit))

    @property
    def level(self) -> int:
        """The limit as last set, without the probe's temporary cap: needs no clock, so gauges
        can read it from any thread, with or without a running event loop."""
        return max(1, min(self.maximum, int(self._limit)))

    def held(self) -> int:
        """Slots held by recent load-related refusals (they count as in flight)."""
        now = self._clock()
        while self._holds and self._holds[0] <= now:
            self._holds.popleft()
        return len(self._holds)

    def available(self, in_flight: int) -> bool:
        """Whether one more call may be sent with ``in_flight`` calls out."""
        return in_flight + self.held() < self.limit

    @property
    def round_trip(self) -> float:
        """Smoothed duration of a successful call (0.2 s before the first one)."""
        return max(self._srtt, 1e-3) if self._srtt is not None else 0.2

    def next_change_in(self) -> float:
        """Seconds until time alone raises what :meth:`available` allows (inf: only outcomes will)."""
        now = self._clock()
        waits = [math.inf]
        if self.held():
            waits.append(self._holds[0] - now)
        if self._probe_level is not None and int(self._limit) >= self._probe_level and now < self._probe_after:
            waits.append(self._probe_after - now)
        if self._fast and self._fast_full_at is not None:
            waits.append(self._fast_full_at + self._fast_step - now)
        return max(0.0, min(waits))

    def probe_due_in(self) -> float:
        """Seconds until the level that failed last may be tried again (0: it may now)."""
        return max(0.0, self._probe_after - self._clock()) if self._probe_level is not None else 0.0

    def floor(self) -> int:
        """What recent success shows the provider serves at once: the successes of the last round
        trip times the shortest round trip (Little's law, with the provider's own service time, so
        a slow client does not inflate it), and no more than the highest level that succeeded."""
        now = self._clock()
        self._forget_old_successes(now)
        if not self._successes:
            return 1
        while self._served and now - self._served[0] > self.round_trip:
            self._served.popleft()
        served = math.ceil(len(self._served) * self._min_rtt / self.round_trip)
        return max(1, min(self._successes[0][1], served))

    def refusal_rate(self) -> float:
        """The background refusal rate, of calls at or below the floor: refusals not judged
        load-related, a run of refusals counted once."""
        return self._refusals / self._outcomes

    def run_length(self) -> int:
        """Refusals in a row that random refusals at the background rate would rarely produce."""
        rate = min(max(self.refusal_rate(), 1e-6), 0.9)
        return max(2, math.ceil(math.log(self.false_alarm) / math.log(rate)))

    # -- transitions --------------------------------------------------------------------------------
    def on_send(self, in_flight: int) -> SendStamp:
        """A call is sent with ``in_flight`` calls (itself included) out."""
        self._seq += 1
        now = self._clock()
        if in_flight >= self._peak_level or now - self._peak_at > self.round_trip:
            self._peak_level, self._peak_at = in_flight, now
        floor = self.floor()
        stamp = SendStamp(self._seq, in_flight, now, above_floor=in_flight > floor,
                          well_below_floor=in_flight <= floor - 2)
        self._sends.append(stamp)
        if self._fast and self._fast_full_at is None and in_flight + len(self._holds) >= int(self._limit):
            self._fast_full_at = now  # the limit is full: the next fast-start step is due one step from now
        return stamp

    def on_success(self, stamp: SendStamp) -> None:
        now = self._clock()
        if not stamp.above_floor:
            self._count_outcome(refused=False)
        rtt = now - stamp.at
        self._fast = False  # the round trip is known now: slow start below clocks the growth
        self._refused_since = None
        self._served.append(now)
        self._min_rtt = min(self._min_rtt, max(rtt, 1e-4))
        self._srtt = rtt if self._srtt is None else 0.875 * self._srtt + 0.125 * rtt
        level = self._served_level(stamp)
        self._remember_success(now, level)
        if self._probe_level is not None and level >= self._probe_level and self.floor() >= self._probe_level + 2:
            # the provider now serves the level that failed (by Little's law, which a slow client
            # does not inflate): the cut was a fluke, or its capacity grew
            self._probe_level, self._probe_failures, self._ssthresh = None, 0, float(self.maximum)
        if self._holds:
            self._holds.popleft()  # a success clocks one held slot back in
        if now - self._peak_at > 2 * self.round_trip or self._peak_level * 2 < self._limit:
            return  # the lane was not busy: this success says nothing about a higher limit
        if not self._slow_start and now - self._decreased_at > 4 * self.round_trip:
            self._slow_start = True  # quiet for a while: the cut was a fluke or the provider grew
        if self._slow_start and self._limit < self._ssthresh:
            grown = min(self._limit + 1, self._ssthresh)
        else:
            grown = self._limit + 1 / max(1.0, self._limit)
        if self._probe_level is not None and now < self._probe_after:
            grown = min(grown, float(self._probe_level))  # wait at the failed level until the probe is due
        self._set_limit(max(self._limit, grown))

    def on_refusal(self, stamp: SendStamp, *, exhausted: bool = False) -> RefusalVerdict:
        """A call was refused for rate or quota; ``exhausted``: the provider said the quota is spent."""
        now = self._clock()
        stamp.refused, stamp.refused_at = True, now
        self._recent_refusals.append(stamp)
        if stamp.seq <= self._paused_at_seq:
            # sent before the lane paused for a spent quota, refused for the same reason: the
            # pause has read that episode, and cutting or probing again would forget the cap
            # that was known before it (a cap of 16 cost 49 refusals instead of ~20 that way)
            return RefusalVerdict(True, False, False)
        k = self.run_length()
        first, last = self._run_through(stamp)
        run = last - first + 1
        load_related = exhausted or run >= k or (stamp.above_floor and self._excess_above_floor())
        if run == 1 and not load_related and not stamp.above_floor:
            self._count_outcome(refused=True)  # the background rate counts a run once, not per member
        if self._refused_since is None:
            self._refused_since = now
        # refused at a level the provider just served, or nothing but refusals for a round trip on
        # a busy lane: the quota (an RPM or TPM window), not concurrency, refuses every call
        pause = exhausted or (load_related and (stamp.well_below_floor or now - self._refused_since >= self.round_trip))
        decreased = False
        if load_related:
            self._fast = False  # a limit answered before a success: no more growth by time alone
        else:
            self._fast_full_at = None  # a refusal that may be random: the next step waits a fresh fill
        if pause:
            self._pause()
        elif load_related:
            self._holds.append(now + self.round_trip)
            if stamp.seq > self._decreased_at_seq:
                decreased = True
                below_run = None
                if self._srtt is None and self._sends and first >= self._sends[0].seq:
                    # no success yet, so no floor: the calls sent before the run are still out
                    # unrefused, so the level just below the run's first call is the provider's cap
                    below_run = self._sends[first - self._sends[0].seq].level - 1
                self._decrease(stamp, to=below_run)
        return RefusalVerdict(load_related, decreased, pause)

    def on_resume(self) -> None:
        """The lane reopens after a pause: one call first, then slow start back to the old limit
        (and not past a level that failed for concurrency)."""
        self._slow_start = True
        if self._probe_level is not None:
            self._ssthresh = min(self._ssthresh, float(self._probe_level - 1))
        if self._pause_started is not None:
            # time paused taught nothing about concurrency: the probing backoff and the age of
            # the last cut resume where they were (else a long quota pause restarts the probes of
            # a known cap at one round trip, and they fail all over again)
            paused_for = max(0.0, self._clock() - self._pause_started)
            self._decreased_at += paused_for
            self._probe_after += paused_for
            self._pause_started = None
        self._successes.clear()
        self._served.clear()
        self._holds.clear()
        self._decreased_at_seq = self._seq
        self._refused_since = None
        self._set_limit(1.0)

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def _fast_step(self) -> float:
        return self.fast_start_doubling / _FAST_STEPS

    def _grow_fast(self, now: float) -> None:
        """One fast-start step, if the limit has been full for a step's time (see the module docstring)."""
        if not self._fast or self._fast_full_at is None or now - self._fast_full_at < self._fast_step:
            return
        self._fast_full_at = None  # the next step waits until the lane fills the new room
        grown = self._limit * 2 ** (1 / _FAST_STEPS)
        if abs(grown - round(grown)) < 1e-6:
            grown = round(grown)  # four steps make an exact doubling, not 15.999...
        self._set_limit(max(self._limit + 1, grown))
        if self._limit >= self.maximum:
            self._fast = False

    def _run_through(self, stamp: SendStamp) -> tuple[int, int]:
        """First and last seq of the run of refused calls, in send order, that ``stamp`` belongs to."""
        sends = self._sends
        if not sends or not sends[0].seq <= stamp.seq <= sends[-1].seq:
            return stamp.seq, stamp.seq
        index = stamp.seq - sends[0].seq  # seqs in the deque are consecutive
        first = last = index
        while first > 0 and sends[first - 1].refused:
            first -= 1
        while last + 1 < len(sends) and sends[last + 1].refused:
            last += 1
        return sends[first].seq, sends[last].seq

    def _served_level(self, stamp: SendStamp) -> int:
        """The level of a successful call as the provider saw it: calls refused before it was sent
        but whose refusal had not come back yet were counted in its level, though not being served."""
        horizon = self._clock() - 2 * self.round_trip
        while self._recent_refusals and self._recent_refusals[0].refused_at < horizon:
            self._recent_refusals.popleft()
        phantom = 0
        for refused in reversed(self._recent_refusals):
            if refused.refused_at <= stamp.at:
                break
            phantom += refused.seq < stamp.seq
        return max(1, stamp.level - phantom)

    def _excess_above_floor(self) -> bool:
        """Whether recent calls above the floor were refused beyond what the background rate explains."""
        since = self._clock() - self.round_trip
        sent = refused = 0
        for stamp in reversed(self._sends):
            if stamp.at < since:
                break
            if stamp.above_floor:
                sent += 1
                refused += stamp.refused
        return refused >= 2 and _binomial_tail(refused, sent, self.refusal_rate()) < self.false_alarm

    def _decrease(self, stamp: SendStamp, *, to: int | None = None) -> None:
        now = self._clock()
        if now - self._decreased_at > 4 * self.round_trip:
            # a new episode of cuts begins: remember what to restore if it turns out to be the quota
            self._limit_before_cuts = self._limit
            self._probe_before_cuts = (self._probe_level, self._probe_failures, self._probe_after, self._ssthresh)
        if (
            self._probe_level is not None
            and stamp.level >= self._probe_level - 1
            and now - self._decreased_at < (self.max_probe_wait + 8) * self.round_trip
        ):
            self._probe_failures += 1  # the level that failed last failed again
        else:
            # a cap found in the first round trip is known exactly, and the background rate has no
            # data yet to tell a failed probe from noise: the first probe waits 4 round trips
            self._probe_failures = 2 if to is not None else 0
        self._decreases += 1
        self._decreased_at_seq = self._seq
        self._decreased_at = now
        self._slow_start = False
        self._probe_level = max(2, min(stamp.level, int(self._limit), to + 1 if to is not None else self.maximum))
        self._ssthresh = float(self._probe_level - 1)
        wait = min(2**self._probe_failures, self.max_probe_wait)
        self._probe_after = now + wait * self.round_trip
        if to is not None:
            self._set_limit(min(self._limit, max(1.0, float(to))))
        else:
            self._set_limit(max(float(self.floor()), math.floor(self._limit * self.backoff_ratio), 1.0))

    def _pause(self) -> None:
        if self._pauses and self._clock() < self._paused_at + self.round_trip:
            return  # the same pause, seen by another refused call
        self._pauses += 1
        self._paused_at = self._pause_started = self._clock()
        self._paused_at_seq = self._seq  # the calls out now belong to this episode
        if self._clock() - self._decreased_at <= 4 * self.round_trip:
            # undo this episode's cuts, and what they taught about concurrency: the quota refused
            self._set_limit(max(self._limit, self._limit_before_cuts))
            self._probe_level, self._probe_failures, self._probe_after, ssthresh = self._probe_before_cuts
        else:
            ssthresh = self._ssthresh
        # slow start back to where the lane was, but not past a level that failed for concurrency
        self._ssthresh = max(1.0, min(self._limit, ssthresh))

    def _set_limit(self, value: float) -> None:
        value = min(float(self.maximum), max(1.0, value))
        changed = int(value) != int(self._limit)
        self._limit = value
        if changed:
            self._lowest = min(self._lowest, int(value))
            self.history.append((self._clock(), int(value)))

    def _count_outcome(self, *, refused: bool) -> None:
        # an exponentially weighted rate over about the last 500 outcomes
        self._outcomes = self._outcomes * 0.998 + 1
        self._refusals = self._refusals * 0.998 + (1 if refused else 0)

    def _remember_success(self, now: float, level: int) -> None:
        # a monotonic deque: each entry is newer and lower than the ones before it
        while self._successes and self._successes[-1][1] <= level:
            self._successes.pop()
        self._successes.append((now, level))
        self._forget_old_successes(now)

    def _forget_old_successes(self, now: float) -> None:
        horizon = 2 * self.round_trip
        while self._successes and now - self._successes[0][0] > horizon:
            self._successes.popleft()

    def statistics(self) -> ConcurrencyStatistics:
        return ConcurrencyStatistics(
            self.limit, self.maximum, self._lowest, self._decreases, self._slow_start, self.refusal_rate(),
            self._pauses,
        )

    def __repr__(self) -> str:
        return f"AdaptiveLimit(limit={self.limit}, maximum={self.maximum}, decreases={self._decreases})"


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    p = min(p, 1.0)
    term = math.comb(n, k) * p**k * (1 - p) ** (n - k)
    total = 0.0
    for i in range(k, n + 1):
        total += term
        if term < total * 1e-12:
            break
        term *= (n - i) / (i + 1) * p / (1 - p) if p < 1 else 0.0
    return min(1.0, total)
