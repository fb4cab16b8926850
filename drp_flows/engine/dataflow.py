"""A group's steps, run as their data allows: a step's quanta for a visit (or a tract) are
planned and submitted as soon as the step before it has finished and registered that visit's,
not when it has finished the whole group. So `consolidateVisitSummary` of a visit starts when
its nine CCDs are done, and the cores never idle through the tail of a step.

A group's steps form a chain keyed by the group's dimension (visit or tract; none for the
campaign scope): each key passes the steps one by one. The planners are the pipeline table's,
asked for the keys that are ready, so they read what is registered as before (a rescue or a
re-run plans exactly what step-by-step execution would). With `follow_data` off a step waits
for all keys (a barrier per step, the old execution, kept to measure one against the other).
Registration stays a single writer per repository, flushed every `batch_size` results, every
FLUSH_SECONDS, or after READY_SECONDS when a key waits on it for its next step. It runs in
the group's writer thread while the group's quanta go on running (one batch at a time; the
keys it holds pass on when it has finished), so the cores never wait for the registry.

Groups of a stage run concurrently within a window (`run_window`, site key `group_window`), so
that one group's short quanta fill the cores another group's long quanta leave idle, and the
next group is planned while the last one runs.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from drp_flows.engine.executor import Executor
from drp_flows.engine.quanta import Quantum, QuantumResult, StepFunction, ordered
from drp_flows.sites.storage import Storage

FLUSH_SECONDS = 30.0   # finished quanta wait at most this long to be registered
READY_SECONDS = 0.5    # ... and at most this long when a visit or tract waits on them

Planner = Callable[[list[int]], tuple[list[Quantum], int, list[dict]]]
T = TypeVar("T")

_writers: dict[str, threading.Lock] = {}
_writers_lock = threading.Lock()


def single_writer(repository: str) -> threading.Lock:
    """The lock that keeps one writer per repository among a process's concurrent groups."""
    with _writers_lock:
        return _writers.setdefault(repository, threading.Lock())


def run_window(jobs: Iterable[Callable[[], T]], window: int) -> list[T]:
    """Run the jobs (a stage's groups) in order, at most `window` at once, each in a thread
    that carries the caller's context (so a group's Prefect flow run stays the caller's
    child); their results in the jobs' order. After a failure no job starts; those running
    finish, then the first error is raised."""
    jobs = list(jobs)
    if window <= 1:
        return [job() for job in jobs]
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    todo = list(enumerate(jobs))[::-1]
    running: dict[Future, int] = {}
    with ThreadPoolExecutor(window, thread_name_prefix="group") as pool:
        while todo or running:
            while todo and len(running) < window and not errors:
                i, job = todo.pop()
                running[pool.submit(contextvars.copy_context().run, job)] = i
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i = running.pop(future)
                try:
                    results[i] = future.result()
                except BaseException as e:  # noqa: BLE001 - raised below, once all have ended
                    errors.append(e)
    if errors:
        raise errors[0]
    return results


class QuantumBug(RuntimeError):
    """A quantum failed by an error that is not a DataError: a bug, which no CCD should be
    quarantined for; the message holds its traceback."""


@dataclass
class StepProgress:
    """What PanDA's dashboard shows per step and group."""

    site: str
    step: str
    group: str
    stage: str = ""
    total: int = 0
    done: int = 0
    failed: int = 0
    blocked: int = 0
    skipped: int = 0
    seconds: float = 0.0
    pool: str = "short"          # the cluster it ran on: short, or long (long_cluster)
    attempt: int = 1
    state: str = "waiting"       # waiting, running, done, failed, blocked, rescued
    failures: list[dict] = field(default_factory=list)
    error: str = ""              # why the group failed as a whole (a lost cluster)

    @property
    def percent(self) -> float:
        finished = self.done + self.skipped
        return 100.0 * finished / self.total if self.total else 100.0

    def row(self) -> dict:
        """What a stage flow returns, writes beside the site's repository and `drp status` reads."""
        return asdict(self) | {"percent": self.percent}

    @classmethod
    def from_row(cls, row: dict) -> StepProgress:
        return cls(**{k: v for k, v in row.items() if k != "percent"})

    def finish(self) -> None:
        """The state once the step has run: failed or blocked quanta say so first; a later
        attempt that finished what an earlier one left is a rescue."""
        self.state = ("failed" if self.failed else "blocked" if self.blocked
                      else "rescued" if self.attempt > 1 and self.done else "done")


@dataclass
class FlowStep:
    """One step of a group: how it plans (for the keys given), runs and registers."""

    progress: StepProgress
    run: StepFunction
    plan: Planner
    register: Callable[[list[QuantumResult]], None]
    memory: int
    pool: str = "short"
    cluster_by: tuple[str, ...] = ()
    priority: int = 0
    # what the group runner keeps
    remaining: dict = field(default_factory=dict)      # key -> quanta still to finish
    finished: set = field(default_factory=set)         # keys finished, not yet registered
    passed: set = field(default_factory=set)           # keys finished and registered
    planned: set = field(default_factory=set)
    results: list[QuantumResult] = field(default_factory=list)   # not yet registered
    started: float = 0.0


def priority(index: int, pool: str) -> int:
    """Short quanta of later steps first (a visit's data flows on: its consolidation as soon
    as its CCDs are done), long quanta after the short work that waits. Long quanta first
    looked right (longest processing time first), but then a long quantum takes a core as
    soon as its visit is ready, for hours, while the short quanta that make the other visits
    ready wait behind it: the cores drain one by one into long quanta and the last visits'
    long quanta start late (bench/scale.py, one pool: 1.13x the lower bound, 88% busy). A
    site with a long_cluster runs them on their own pool anyway."""
    return 10 * index - (10 ** 6 if pool == "long" else 0)


class GroupFlow:
    """Runs a group's steps on an executor, following the data."""

    def __init__(self, executor: Executor, storage: Storage, config: dict,
                 steps: list[FlowStep], key: str | None, ids: list[int], token: str,
                 batch_size: int = 500, follow_data: bool = True,
                 on_change: Callable[[], None] = lambda: None):
        self.storage, self.config, self.steps = storage, config, steps
        self.key, self.ids = key, list(ids)
        self.keys = set(ids) if key else {None}
        self.batch_size, self.follow_data, self.on_change = batch_size, follow_data, on_change
        self.index = {s.progress.step: i for i, s in enumerate(steps)}
        self.session = executor.session(token, self.on_result)
        self.unregistered = 0
        self.flushed = time.monotonic()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="register")
        self.writing: tuple[Future, list[tuple[int, set]]] | None = None  # a batch, its keys

    def run(self) -> None:
        """Plan the first step, then run until every key has passed every step. Raises
        ClusterLost as the executor does, and QuantumBug for a quantum that failed by a bug,
        after registering what had finished."""
        try:
            self.plan(0, self.keys)
            self.on_change()
            self.session.until_done(self.tick)
        finally:
            try:
                if self.writing:
                    self.writing[0].result()
                self.write(self.batch())
            finally:
                self.writer.shutdown()
                self.on_change()
        stuck = [s.progress.step for s in self.steps if s.passed != self.keys]
        if stuck:
            raise RuntimeError(f"steps {stuck} of group {self.ids[:3]}... never finished")

    def key_of(self, data_id: dict):
        return data_id[self.key] if self.key else None

    def plan(self, index: int, keys: set) -> None:
        """Plan and submit step `index` for the keys; keys it has nothing to run for pass."""
        step = self.steps[index]
        keys = keys - step.planned
        if not keys:
            return
        step.planned |= keys
        p = step.progress
        if not step.started:
            step.started, p.state = time.perf_counter(), "running"
        quanta, skipped, blocked = step.plan(sorted(keys) if self.key else self.ids)
        p.total += len(quanta) + skipped + len(blocked)
        p.skipped += skipped
        p.blocked += len(blocked)
        for q in quanta:
            k = self.key_of(q.data_id)
            step.remaining[k] = step.remaining.get(k, 0) + 1
        self.session.add(step.run, self.storage, self.config, ordered(quanta, step.cluster_by),
                         step.memory, step.pool, step.priority)
        self.passes(index, {k for k in keys if not step.remaining.get(k)})

    def passes(self, index: int, keys: set) -> None:
        """Keys done with step `index` (registered): on to the next step, now or (without
        follow_data) once every key is done with this one."""
        step = self.steps[index]
        step.passed |= keys
        if step.passed == self.keys and step.progress.state == "running":
            step.progress.seconds = time.perf_counter() - step.started
            step.progress.finish()
        if index + 1 == len(self.steps) or not keys:
            return
        if self.follow_data:
            self.plan(index + 1, keys)
        elif step.passed == self.keys:
            self.plan(index + 1, self.keys)

    def on_result(self, r: QuantumResult) -> None:
        step = self.steps[self.index[r.step]]
        p = step.progress
        if r.reason == "bug":      # not the data's fault: stop here, after registering the rest
            p.failed += 1
            raise QuantumBug(f"a bug, not bad data, failed {r.error}")
        if r.ok:
            p.done += 1
        else:
            p.failed += 1
            p.failures.append({"data_id": r.data_id, "reason": r.reason,
                               "error_class": r.error_class, "error": r.error,
                               "inputs": r.inputs.get("raw", "")})
        step.results.append(r)
        self.unregistered += 1
        k = self.key_of(r.data_id)
        step.remaining[k] -= 1
        if not step.remaining[k]:
            step.finished.add(k)

    def tick(self, idle: bool) -> None:
        """Register (and plan what that makes ready) when a batch is full, when it is old,
        when a key waits on it, or when nothing else is left to run; when nothing else is
        left, wait for the registration, so that the keys it holds pass on."""
        if self.writing and (idle or self.writing[0].done()):
            self.registered()
            idle = idle and not self.session.busy()
        if not self.unregistered or self.writing:
            return
        waited = time.monotonic() - self.flushed
        ready = any(s.finished for s in self.steps[:-1])     # keys a next step waits for
        if (idle or self.unregistered >= self.batch_size or waited > FLUSH_SECONDS
                or (ready and waited > READY_SECONDS)):
            keys = [(i, step.finished) for i, step in enumerate(self.steps) if step.finished]
            for step in self.steps:
                step.finished = set()
            context = contextvars.copy_context()     # the registration task's flow run
            self.writing = (self.writer.submit(context.run, self.write, self.batch()), keys)
            if idle:
                self.registered()

    def registered(self) -> None:
        """The batch in the writer is registered (its error raised here): its keys pass."""
        future, keys = self.writing
        self.writing = None
        future.result()
        for i, passing in keys:
            self.passes(i, passing)
        self.on_change()

    def batch(self) -> list[tuple[FlowStep, list[QuantumResult]]]:
        """The results not yet registered, by step; taken out of the steps."""
        batch = [(step, step.results) for step in self.steps if step.results]
        for step, _ in batch:
            step.results = []
        self.unregistered = 0
        self.flushed = time.monotonic()
        return batch

    def write(self, batch: list[tuple[FlowStep, list[QuantumResult]]]) -> None:
        with single_writer(self.storage.root):
            for step, results in batch:
                step.register(results)
