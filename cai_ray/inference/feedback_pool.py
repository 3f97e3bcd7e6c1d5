"""FeedbackPool: N FeedbackWorker actors behind a driver-side dispatcher.

Batches go to the least-loaded live worker, at most ``max_in_flight_per_worker`` per worker (backpressure),
every wait has a deadline, and the batches of a worker that died (Ray restarts it) are retried
``max_retries`` times elsewhere. Results are keyed by batch, so no item is lost or returned twice. A restarted
worker comes back with its initial weights; the one way to give it the current ones is the ``on_restart``
hook (set by :class:`cai_ray.pipelines.roles.Roles`, which pushes through :class:`cai_ray.sync.WeightSync`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cai_ray.config import ClusterConfig, FeedbackConfig
from cai_ray.types import (ComparisonRequest, DirectScore, Judgement, JudgeRequest, PreferenceLabel, Prompt,
                           RejectedItem, RevisionBatch, ScoreRequest)

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_PROBE_INTERVAL_S = 0.5  # how often a restarting worker is asked whether it is back


class FeedbackPool:
    """N FeedbackWorker actors behind a driver-side dispatcher (the pool itself is not an actor).

    Items are cut into ``feedback.batch_size`` batches. A batch goes to the least-loaded usable worker
    that has fewer than ``max_in_flight_per_worker`` calls on it; otherwise the pool waits
    (backpressure). When a worker dies, its in-flight batches are resubmitted (preferably elsewhere) up
    to ``max_retries`` times, then returned as item errors; the dead worker gets no new batches until
    Ray has restarted it (a probe call answers) and the ``on_restart`` hook, if set, has given it the current
    weights (the only way a restarted worker gets them).
    After ``max_restarts`` deaths a worker is dropped. A batch waits at most ``cluster.step_timeout_s``, a
    restarting worker ``cluster.startup_timeout_s``.

    A batch that misses its deadline is retried, but ``ray.cancel`` does not stop an actor call, so the late
    call keeps its slot until it really ends; one still running a whole step deadline later means a stuck
    engine, and the pool kills that worker so Ray restarts it.
    """

    def __init__(self, workers: Sequence[Any], feedback: FeedbackConfig, cluster: ClusterConfig, *,
                 placement_group: Any = None) -> None:
        self.workers = list(workers)
        self._cfg = feedback
        self._step, self._startup = cluster.step, cluster.startup
        self._pg = placement_group
        self._load = [0] * len(self.workers)  # calls on each worker, late ones included
        self._late = _LateCalls(self._load)  # calls past their deadline that may still run
        self._deaths = [0] * len(self.workers)
        self._death_seq = [-1] * len(self.workers)  # submit counter at the last death seen per worker
        self._seq = 0
        self._probes: dict[int, _Probe] = {}  # workers that died and are not yet known to be back
        # Set by a controller that syncs weights itself (cai_ray.sync.WeightSync): called with the index of
        # a worker Ray restarted, before that worker gets new batches; it must load the current weights.
        self.on_restart: Callable[[int], None] | None = None
        self.counters = {"batches": 0, "retried_batches": 0, "failed_batches": 0, "worker_deaths": 0,
                         "timeouts": 0}

    # ------------------------------------------------------------------------------------ verbs
    def critique_and_revise(self, prompts: Sequence[Prompt]) -> RevisionBatch:
        """SL-CAI chains for ``prompts`` (see :meth:`FeedbackWorker.critique_and_revise`)."""
        parts = self._map(list(prompts), lambda w, batch: w.critique_and_revise.remote(batch),
                          lambda batch, why: RevisionBatch((), tuple(RejectedItem(p.id, why) for p in batch)))
        return RevisionBatch(chains=tuple(c for part in parts for c in part.chains),
                             rejected=tuple(r for part in parts for r in part.rejected))

    def label_pairs(self, requests: Sequence[ComparisonRequest]) -> list[PreferenceLabel]:
        """Preference labels aligned with ``requests`` (see :meth:`FeedbackWorker.label_pairs`)."""
        mode = self._cfg.label_mode
        parts = self._map(list(requests), lambda w, batch: w.label_pairs.remote(batch),
                          lambda batch, why: [PreferenceLabel(r.pair_id, 0.5, (), (), (), mode, error=why)
                                              for r in batch])
        return [label for part in parts for label in part]

    def direct_scores(self, requests: Sequence[ScoreRequest]) -> list[DirectScore]:
        """Direct scores aligned with ``requests`` (see :meth:`FeedbackWorker.direct_scores`)."""
        parts = self._map(list(requests), lambda w, batch: w.direct_scores.remote(batch),
                          lambda batch, why: [DirectScore(r.item_id, 0.0, (), error=why) for r in batch])
        return [score for part in parts for score in part]

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """Yes/no judgements aligned with ``requests`` (see :meth:`FeedbackWorker.judge`)."""
        parts = self._map(list(requests), lambda w, batch: w.judge.remote(batch),
                          lambda batch, why: [Judgement(r.item_id, 0.5, error=why) for r in batch])
        return [judgement for part in parts for judgement in part]

    def shutdown(self) -> None:
        """Kill the workers and release their placement group."""
        from cai_ray.launcher import stop_actors

        stop_actors(self.workers, self._pg)
        self._late.calls.clear()

    # ------------------------------------------------------------------------------ dispatch
    def _map(self, items: list[T], call: Callable[[Any, list[T]], Any], failed: Callable[[list[T], str], R]) -> list[R]:
        """Run ``call(worker, batch)`` over all batches of ``items``; results in input order.

        Restarting workers are probed along the way.
        """
        import ray

        run = _Run([items[i:i + self._cfg.batch_size] for i in range(0, len(items), self._cfg.batch_size)],
                   failed, self._cfg.max_retries, self.counters)
        in_flight: dict[Any, tuple[int, int, float, int]] = {}  # ref -> (worker, batch, deadline, seq)
        while run.queue or in_flight:
            self._late.reap(self._worker_died)
            self._dispatch(run, call, in_flight)
            if run.queue and not in_flight and not self._probes and not self._late.calls:
                run.fail_queued(f"all {len(self.workers)} feedback workers are gone "
                                f"(feedback.max_restarts={self._cfg.max_restarts})")
                break
            self._launch_probes()
            probe_refs = {p.ref: w for w, p in self._probes.items() if p.ref is not None}
            deadline = min([d for _, _, d, _ in in_flight.values()]
                           + [p.deadline if p.ref is not None else p.retry_at for p in self._probes.values()]
                           + [late.kill_at for late in self._late.calls.values()], default=0.0)
            timeout = max(0.0, deadline - time.monotonic())
            waitable = [*in_flight, *probe_refs, *self._late.calls]
            ready = ray.wait(waitable, num_returns=1, timeout=timeout)[0] if waitable else []
            if not waitable:  # only restarting workers, none with a probe out: wait for the next probe time
                time.sleep(timeout)
            for ref in ready:
                if ref in probe_refs:
                    self._probe_done(probe_refs[ref], ref)
                elif ref in in_flight:
                    self._collect(ref, in_flight.pop(ref), run)
            self._late.reap(self._worker_died, ready)
            self._expire(in_flight, run)
        return run.ordered()

    def _dispatch(self, run: _Run, call: Callable[[Any, list[Any]], Any],
                  in_flight: dict[Any, tuple[int, int, float, int]]) -> None:
        """Send queued batches to workers with a free slot."""
        while run.queue:
            w = self._pick(avoid=run.last_worker[run.queue[0]])
            if w is None:
                return
            b = run.queue.popleft()
            self._seq += 1
            in_flight[call(self.workers[w], run.batches[b])] = (w, b, time.monotonic() + self._step.seconds,
                                                                self._seq)
            self._load[w] += 1
            run.last_worker[b] = w

    def _collect(self, ref: Any, entry: tuple[int, int, float, int], run: _Run) -> None:
        """Record the outcome of a finished call."""
        import ray

        w, b, _, seq = entry
        self._load[w] -= 1
        try:
            run.results[b] = ray.get(ref, timeout=self._step.seconds)
        except ray.exceptions.RayActorError as err:
            self._worker_died(w, seq)
            run.retry_or_fail(b, f"feedback worker {w} died ({type(err).__name__})")
        except ray.exceptions.RayTaskError as err:  # a bug in the worker: deterministic, so no retry
            run.fail(b, f"feedback worker {w} failed: {err.cause!r}")
        except Exception as err:  # noqa: BLE001 - lost object, cancelled, ...: worth one more try
            run.retry_or_fail(b, f"feedback worker {w}: {type(err).__name__}: {err}")

    def _expire(self, in_flight: dict[Any, tuple[int, int, float, int]], run: _Run) -> None:
        """Retry calls past their deadline (they stay late, holding their slot); kill stuck workers and probes."""
        import ray

        now = time.monotonic()
        for ref, (w, b, deadline_b, seq) in list(in_flight.items()):
            if deadline_b <= now:
                del in_flight[ref]
                self.counters["timeouts"] += 1
                # Ray 2.60 runs a cancelled actor call anyway (even one still queued); its ref resolves when it
                # ends, and that is when the slot is freed. Its answer is dropped.
                ray.cancel(ref)
                self._late.calls[ref] = _Late(w, seq, kill_at=now + self._step.seconds)
                run.retry_or_fail(b, f"feedback worker {w}: no answer within {self._step}")
        for w in self._late.overdue(now, restart_s=self._startup.seconds):
            log.warning("feedback worker %d still runs a call %s past its deadline; restarting it", w, self._step)
            ray.kill(self.workers[w], no_restart=False)  # its calls now end with RayActorError
        for w, probe in list(self._probes.items()):
            if probe.deadline <= now:
                del self._probes[w]
                if probe.ref is not None:
                    ray.cancel(probe.ref)
                log.warning("feedback worker %d did not come back within %s; the pool stops using it",
                            w, self._startup)
                self._deaths[w] = self._cfg.max_restarts + 1

    def _pick(self, *, avoid: int | None) -> int | None:
        """The least-loaded usable worker with room, preferring one other than ``avoid`` (a retry's last worker)."""
        cap = self._cfg.max_in_flight_per_worker
        free = [w for w in range(len(self.workers))
                if self._deaths[w] <= self._cfg.max_restarts and w not in self._probes and self._load[w] < cap]
        if not free:
            return None
        preferred = [w for w in free if w != avoid] or free
        return min(preferred, key=lambda w: (self._load[w], w))

    def _worker_died(self, w: int, seq: int) -> None:
        """Count a death once (all batches in flight at that moment fail together) and start probing."""
        if seq <= self._death_seq[w]:
            return  # submitted before the death already counted
        self._death_seq[w] = self._seq
        self._deaths[w] += 1
        self.counters["worker_deaths"] += 1
        if self._deaths[w] > self._cfg.max_restarts:
            log.warning("feedback worker %d died %d times; the pool stops using it", w, self._deaths[w])
            self._probes.pop(w, None)
            return
        self._probes[w] = _Probe(deadline=time.monotonic() + self._startup.seconds)

    def _launch_probes(self) -> None:
        """Send the due probes (a cheap call that answers once Ray has restarted the actor)."""
        now = time.monotonic()
        for w, probe in self._probes.items():
            if probe.ref is None and probe.retry_at <= now:
                probe.ref = self.workers[w].weight_version.remote()

    def _probe_done(self, w: int, ref: Any) -> None:
        """A probe answered: the worker is back (``on_restart`` gives it current weights), restarting, or lost."""
        import ray

        probe = self._probes[w]
        try:
            ray.get(ref, timeout=self._startup.seconds)
        except ray.exceptions.ActorUnavailableError:  # still restarting: ask again shortly
            probe.ref, probe.retry_at = None, time.monotonic() + _PROBE_INTERVAL_S
            return
        except ray.exceptions.RayActorError:  # died again while restarting
            del self._probes[w]
            self._worker_died(w, self._seq + 1)
            return
        except Exception as err:  # noqa: BLE001 - any other failure: do not use a worker in an unknown state
            log.warning("feedback worker %d did not recover (%s); the pool stops using it", w, err)
            self._deaths[w] = self._cfg.max_restarts + 1
        else:
            if self.on_restart is not None:
                try:
                    self.on_restart(w)
                except Exception as err:  # noqa: BLE001 - a worker that cannot get current weights is not used
                    log.warning("feedback worker %d could not reload weights (%s); the pool stops using it", w, err)
                    self._deaths[w] = self._cfg.max_restarts + 1
        del self._probes[w]


@dataclass
class _Run:
    """The batches of one :meth:`FeedbackPool._map` call: what is queued, done, and how often each failed."""

    batches: list[list[Any]]
    failed: Callable[[list[Any], str], Any]  # the item-error result of a batch that gave up
    max_retries: int
    counters: dict[str, int]  # the pool's counters
    results: dict[int, Any] = field(default_factory=dict)
    queue: deque[int] = field(default_factory=deque)
    failures: list[int] = field(default_factory=list)
    last_worker: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queue.extend(range(len(self.batches)))
        self.failures = [0] * len(self.batches)
        self.last_worker = [None] * len(self.batches)
        self.counters["batches"] += len(self.batches)

    def retry_or_fail(self, b: int, why: str) -> None:
        """Queue batch ``b`` again (first: it has waited longest), or give up after ``max_retries``."""
        self.failures[b] += 1
        if self.failures[b] <= self.max_retries:
            self.counters["retried_batches"] += 1
            self.queue.appendleft(b)
        else:
            self.fail(b, f"{why}; gave up after {self.failures[b]} attempts")

    def fail(self, b: int, why: str) -> None:
        """Batch ``b`` ends as item errors."""
        self.counters["failed_batches"] += 1
        self.results[b] = self.failed(self.batches[b], why)

    def fail_queued(self, why: str) -> None:
        """Every queued batch ends as item errors."""
        while self.queue:
            self.fail(self.queue.popleft(), why)

    def ordered(self) -> list[Any]:
        """Results in batch order."""
        return [self.results[b] for b in range(len(self.batches))]


class _LateCalls:
    """Calls past their deadline that may still run: each keeps its worker's slot in ``load`` until it ends.

    (``ray.cancel`` does not stop an actor call: measured on Ray 2.60, even a still-queued one runs, and its
    ref resolves only when the call ends.)
    """

    def __init__(self, load: list[int]) -> None:
        self.load = load  # the pool's per-worker call counts (shared)
        self.calls: dict[Any, _Late] = {}

    def reap(self, on_death: Callable[[int, int], None], ready: Sequence[Any] | None = None) -> None:
        """Free the slots of late calls that have ended (of ``ready``, or any); one ended by its actor's death
        is reported as ``on_death(worker, seq)``."""
        import ray

        if ready is None:
            ready = ray.wait(list(self.calls), num_returns=len(self.calls), timeout=0)[0] if self.calls else []
        for ref in [r for r in ready if r in self.calls]:
            late = self.calls.pop(ref)
            self.load[late.worker] -= 1
            died = late.killed  # a killed call may still end as "cancelled"
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                died = True
            except Exception:  # noqa: BLE001, S110 - cancelled or failed: its batch was already retried
                pass
            if died:
                on_death(late.worker, late.seq)

    def overdue(self, now: float, *, restart_s: float) -> list[int]:
        """Workers to restart: a late call of theirs still runs at its ``kill_at``.

        A call still not ended ``restart_s`` after its worker was killed is given up on (its slot freed).
        """
        stuck = []
        for ref, late in list(self.calls.items()):
            if late.kill_at > now:
                continue
            if late.killed:
                del self.calls[ref]
                self.load[late.worker] -= 1
            else:
                late.killed, late.kill_at = True, now + restart_s
                stuck.append(late.worker)
        return sorted(set(stuck))


@dataclass
class _Late:
    """A call past its deadline that may still run on its worker: it holds the worker's slot until it ends."""

    worker: int
    seq: int
    kill_at: float  # still running then: the worker is stuck and is restarted (after that: given up on)
    killed: bool = False


@dataclass
class _Probe:
    """A worker that died: when to give up on it, and the probe call out (None while waiting to retry)."""

    deadline: float
    ref: Any = None
    retry_at: float = 0.0
