"""The executor: quanta on a site's Dask clusters (its pools), with every wait bounded.

Quanta go to the scheduler through a window of about two Dask tasks per worker thread, not
all at once, so that a lost worker takes little work with it and a long step never sits whole
in the scheduler. A task is one quantum, or a cluster of a step's quanta that are tiny (a
cluster holds about CLUSTER_SECONDS of their measured mean duration, at most MAX_CLUSTER):
Dask spends a few milliseconds on every task, which tiny quanta would otherwise pay each.
Quanta of several steps can wait at once (engine/dataflow.py adds a step's quanta
while the step before it still runs): the window takes the highest priority first (a short
quantum of a later step; engine/dataflow.py's `priority`), and in the order given within
one priority. Each quantum asks for its
memory as the Dask resource MEMORY that the workers advertise (sites/clusters.py), on the pool
of its label's class (short or long), or on the other pool when only that one has workers big
enough.

What goes wrong in production, and what happens here:
- a cluster fails in any way (its worker died, an error after its retries): its quanta are
  submitted again one by one, so whatever happens next is blamed on one quantum;
- a worker dies under a quantum (walltime, preemption, a killed process): our schedulers fail
  its quanta at once (allowed-failures 0) and the quantum is submitted again; one that was
  running each time `max_worker_deaths` workers died is quarantined as "killed worker";
- the nanny killed the worker for memory (its "worker-restart-memory" event): the quanta that
  were running there are submitted again with their request times `memory_multiplier` (BPS's
  memoryMultiplier), on a pool whose workers have that much, and are quarantined with reason
  "memory" once the request has reached `memory_maximum` or fits no worker;
- a pool with no worker for `no_worker_timeout` s, or with no finished quantum for
  `stall_timeout` s while quanta wait: a warning naming the site, pool and waiting quanta
  first, then ClusterLost, which fails the group (`drp rescue` runs what is left).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from dask.utils import format_bytes
from distributed import Client, Future
from distributed.scheduler import KilledWorker

from drp_flows.engine.quanta import (
    BUNDLE,
    Quantum,
    QuantumResult,
    StepFunction,
    ZipBundle,
    execute_quantum,
)
from drp_flows.sites.storage import Storage

MEMORY = "MEMORY"             # the Dask resource every worker we start advertises, in bytes
MEMORY_EVENTS = "worker-restart-memory"   # the topic of the nanny's memory kills
STARTED_EVENTS = "drp-quantum-started"    # where a quantum submitted again started
VERDICT_SECONDS = 3.0         # how long a killed worker's quanta wait for its nanny's event
POLL_SECONDS = 1.0            # how often the watchdog asks a pool for its workers
WARN_AGAIN_SECONDS = 300.0    # a watchdog warning is repeated at most this often
RESULT_TIMEOUT = 120.0        # a finished quantum's result that cannot be fetched is lost
CLUSTER_SECONDS = 0.5         # the work a cluster of tiny quanta holds, by their mean duration
MAX_CLUSTER = 64              # ... and at most this many quanta


def run_cluster(fn: Callable[[Quantum], QuantumResult], quanta: list[Quantum]) -> list[QuantumResult]:
    """A Dask task: the quanta one after the other on one worker thread; the small outputs of
    a cluster of several go into one zip, written when the last has run (engine/quanta.py
    ZipBundle)."""
    if len(quanta) == 1:
        return [fn(quanta[0])]
    bundle = ZipBundle()
    token = BUNDLE.set(bundle)
    try:
        results = [fn(q) for q in quanta]
    finally:
        BUNDLE.reset(token)
    return bundle.write(results)


def execute_again(step: StepFunction, storage: Storage, config: dict,
                  quantum: Quantum) -> QuantumResult:
    """A quantum submitted again after a worker died under it: it tells the scheduler where it
    starts, and waits for the answer, so that if it kills this worker too the death is
    blamed on it and on no quantum that was only queued beside it."""
    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    sync(worker.loop, worker.scheduler.log_event, topic=STARTED_EVENTS,
         msg={"key": worker.get_current_task(), "worker": worker.address})
    return execute_quantum(step, storage, config, quantum)


class _Share:
    """A pool's window as every run of this process sees it. The concurrent groups of a stage
    each run their own quanta, on the same workers: one window for all of them, and a place
    in it goes to the run whose best waiting quantum comes first (a short quantum of one
    group before a long one of another), so that priorities hold across groups as within
    one."""

    def __init__(self):
        self.lock = threading.Lock()
        self.flying = 0                                # Dask tasks of every run in flight
        self.heads: dict[int, tuple] = {}              # run -> rank of its best waiting quantum

    def wait(self, run: int, head: tuple | None) -> None:
        """A run's best waiting quantum (None: it waits for nothing on this pool)."""
        with self.lock:
            if head is None:
                self.heads.pop(run, None)
            else:
                self.heads[run] = head

    def take(self, run: int, head: tuple | None, window: int) -> tuple[int, tuple | None]:
        """Places free in the window, and the best rank of the other runs' waiting quanta."""
        self.wait(run, head)
        with self.lock:
            others = min((r for k, r in self.heads.items() if k != run), default=None)
            return window - self.flying, others

    def add(self, n: int) -> None:
        with self.lock:
            self.flying += n


_shares: dict[str, _Share] = {}
_shares_lock = threading.Lock()


def shared_window(address: str) -> _Share:
    with _shares_lock:
        return _shares.setdefault(address, _Share())


class ClusterLost(RuntimeError):
    """A pool without workers, or without progress, past its deadline: the group fails."""


@dataclass(frozen=True)
class Pool:
    """One of a site's clusters as the executor sees it."""

    name: str                          # short | long
    address: str
    kind: str = "local"
    worker_memory: int | None = None   # bytes each worker advertises (None: nothing known)
    no_worker_warn: float = 60.0
    no_worker_timeout: float = 3600.0
    stall_warn: float = 1800.0
    stall_timeout: float = 7200.0

    def fits(self, memory: int) -> bool:
        return self.worker_memory is None or memory <= self.worker_memory


@dataclass(frozen=True)
class RetryPolicy:
    memory_multiplier: float = 2.0
    memory_maximum: int | None = None  # None: the largest worker of any pool
    max_worker_deaths: int = 3
    retries: int = 2                   # Dask's own retries of transient errors


@dataclass
class _Attempt:
    """A quantum's state across its submissions."""

    quantum: Quantum
    memory: int
    fns: tuple[Callable, Callable]     # its step on a worker: first run, run again
    priority: int = 0
    pool: str = ""
    tries: int = 0
    deaths: int = 0


@dataclass
class _Watch:
    """What the watchdog knows of one pool."""

    pool: Pool
    threads: int = 0
    seen_workers: float = 0.0      # when the pool last had a worker
    progress: float = 0.0          # when a quantum last finished there (or the wait began)
    warned: float = 0.0
    polled: float = 0.0


class Executor:
    """Runs quanta on a site's pools; one per stage flow, so that clients are opened once."""

    def __init__(self, site: str, pools: dict[str, Pool], policy: RetryPolicy = RetryPolicy(),
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        if not pools:
            raise ValueError(f"site {site}: no cluster to run quanta on")
        self.site, self.pools, self.policy = site, pools, policy
        self.log = logger or logging.getLogger(__name__)
        self._clients: dict[str, Client] = {}
        largest = max((p.worker_memory for p in pools.values() if p.worker_memory), default=None)
        self.memory_maximum = policy.memory_maximum or largest

    def client(self, pool: str) -> Client:
        if pool not in self._clients:
            self._clients[pool] = Client(self.pools[pool].address, set_as_default=False,
                                         timeout=60)
        return self._clients[pool]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def place(self, memory: int, preferred: str) -> str | None:
        """The pool a quantum of this memory runs on: its class's pool if it has one big
        enough, else the pool with the largest workers that fits, else None."""
        order = [preferred] if preferred in self.pools else []
        order += sorted((p for p in self.pools if p not in order),
                        key=lambda p: -(self.pools[p].worker_memory or 0))
        return next((p for p in order if self.pools[p].fits(memory)), None)

    def session(self, token: str,
                on_result: Callable[[QuantumResult], None] | None = None) -> QuantumRun:
        """A run to which quanta can be added while it runs (`QuantumRun.add`); `token` makes
        its Dask keys unique."""
        return QuantumRun(self, token, on_result)

    def run(self, step: StepFunction, storage: Storage, config: dict, quanta: Iterable[Quantum],
            token: str, memory: int, pool: str = "short",
            on_result: Callable[[QuantumResult], None] | None = None) -> list[QuantumResult]:
        """Run the quanta of one step (in the order given) and return one result per quantum,
        in completion order; `on_result` sees each as it arrives. Raises ClusterLost past a
        watchdog deadline (what had finished was passed to `on_result` first)."""
        results: list[QuantumResult] = []

        def keep(result: QuantumResult) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        run = self.session(token, keep)
        run.add(step, storage, config, quanta, memory, pool)
        run.until_done()
        return results


class QuantumRun:
    """Quanta on a site's pools: the window, the futures in flight and the watchdog."""

    def __init__(self, executor: Executor, token: str,
                 on_result: Callable[[QuantumResult], None] | None):
        self.ex, self.token, self.on_result = executor, token, on_result
        self.results: list[QuantumResult] = []
        # per pool, a heap of (rank, order, attempt): a quantum submitted again first, then
        # by priority, then in the order added
        self.pending: dict[str, list] = {name: [] for name in executor.pools}
        self.order = itertools.count()
        self.in_flight: dict[Future, list[_Attempt]] = {}     # a task: one quantum or a cluster
        self.done: queue.SimpleQueue[Future] = queue.SimpleQueue()  # filled by Dask's threads
        self.deciding: list[tuple[_Attempt, KilledWorker, float]] = []
        self.watch = {name: _Watch(p) for name, p in executor.pools.items()}
        self.durations: dict[str, list[float]] = {}   # step -> [seconds, quanta] of those done
        self.tasks = 0                                   # Dask tasks submitted

    # -- the loop ---------------------------------------------------------------------------

    def add(self, step: StepFunction, storage: Storage, config: dict, quanta: Iterable[Quantum],
            memory: int, pool: str = "short", priority: int = 0) -> None:
        """Quanta of one step to run, each asking for `memory` bytes on the `pool` of its
        class (or the pool that fits)."""
        fns = (partial(execute_quantum, step, storage, config),
               partial(execute_again, step, storage, config))
        for q in quanta:
            self.queue(_Attempt(q, memory, fns, priority), pool)
        for name, waiting in self.pending.items():     # the other runs know it waits now
            if waiting:
                self.share(name).wait(id(self), waiting[0][0])

    def share(self, pool: str) -> _Share:
        """The window of a pool, shared with the process's other runs on its cluster."""
        return shared_window(self.ex.pools[pool].address)

    def busy(self) -> bool:
        return bool(any(self.pending.values()) or self.in_flight or self.deciding)

    def until_done(self, tick: Callable[[bool], None] | None = None) -> list[QuantumResult]:
        """Run until no quantum waits, runs or awaits a verdict; the results, unless an
        `on_result` took each as it came. `tick(idle)` is called at
        every turn of the loop (at least every half second while quanta run, `idle` when none
        is left): it may add quanta, and the run ends only when it added none while idle."""
        now = time.monotonic()
        for w in self.watch.values():
            w.seen_workers = w.progress = now
        try:
            while True:
                if tick:
                    tick(not self.busy())
                if not self.busy():
                    break
                self.check_pools()
                self.refill()
                try:
                    finished = [self.done.get(timeout=0.5)]
                except queue.Empty:
                    finished = []
                while not self.done.empty():
                    finished.append(self.done.get())
                fetched = self.fetch(finished)
                for future in finished:
                    cluster = self.in_flight.pop(future)
                    self.share(cluster[0].pool).add(-1)
                    self.collect(future, cluster, fetched.get(future))
                self.decide()
        finally:
            for future, cluster in self.in_flight.items():
                future.cancel()
                self.share(cluster[0].pool).add(-1)
            self.in_flight.clear()
            for pool in self.pending:
                self.share(pool).wait(id(self), None)
        return self.results

    def finish(self, result: QuantumResult) -> None:
        if result.ok:
            total = self.durations.setdefault(result.step, [0.0, 0])
            total[0] += result.seconds
            total[1] += 1
        if self.on_result:       # whoever watches keeps what it needs (a group: a batch)
            self.on_result(result)
        else:
            self.results.append(result)

    def fail(self, attempt: _Attempt, reason: str, error_class: str, message: str) -> None:
        q = attempt.quantum
        self.finish(QuantumResult(q.step, q.data_id, "failed", error_class=error_class,
                                  error=f"{q}: {message}", reason=reason, inputs=q.inputs))

    # -- submitting -------------------------------------------------------------------------

    def queue(self, attempt: _Attempt, preferred: str, first: bool = False) -> None:
        """Wait for a pool with workers big enough (quarantined if no pool has them); a
        quantum submitted again goes first."""
        attempt.pool = self.ex.place(attempt.memory, preferred) or ""
        if not attempt.pool:
            self.fail(attempt, "memory", "MemoryError", self.no_room(attempt.memory))
            return
        rank = (0, 0) if first else (1, -attempt.priority)
        heapq.heappush(self.pending[attempt.pool], (rank, next(self.order), attempt))

    def cluster_size(self, step: str, share: int) -> int:
        """How many quanta of `step` one task takes: one until some have finished, then about
        CLUSTER_SECONDS of their mean duration, never more than the pool's waiting quanta
        per place in its window (`share`), so that every worker still gets some."""
        seconds, done = self.durations.get(step, (0.0, 0))
        if not done:
            return 1
        size = MAX_CLUSTER if seconds == 0 else int(CLUSTER_SECONDS * done / seconds)
        return max(1, min(size, MAX_CLUSTER, share))

    def refill(self) -> None:
        """Submit waiting quanta, in their order, while their pool's window (shared with the
        process's other runs on it) has room and no other run waits with a better quantum;
        a quantum submitted again goes alone."""
        for pool, waiting in self.pending.items():
            window = 2 * max(self.watch[pool].threads, 1)
            shared = self.share(pool)
            room, others = shared.take(id(self), waiting[0][0] if waiting else None, window)
            share = len(waiting) // window
            by_kind: dict[tuple, list[list[_Attempt]]] = {}
            sizes: dict[str, int] = {}
            # another run's better quantum waits: leave it the places, unless fewer tasks are
            # in flight than the pool has threads (none idles for a run busy planning)
            while waiting and (others is None or waiting[0][0] <= others or 2 * room > window):
                attempt = waiting[0][-1]
                again = attempt.tries > 0
                step = attempt.quantum.step
                if step not in sizes:
                    sizes[step] = self.cluster_size(step, share)
                clusters = by_kind.setdefault(
                    (attempt.fns[again], attempt.memory, attempt.priority), [])
                if clusters and len(clusters[-1]) < (1 if again else sizes[step]):
                    clusters[-1].append(attempt)
                elif room > 0:
                    clusters.append([attempt])
                    room -= 1
                else:
                    break
                heapq.heappop(waiting)
                attempt.tries += 1
            for (fn, memory, priority), clusters in by_kind.items():
                resources = {MEMORY: memory} if self.ex.pools[pool].worker_memory else None
                futures = self.ex.client(pool).map(
                    partial(run_cluster, fn), [[a.quantum for a in c] for c in clusters],
                    pure=False, priority=priority, resources=resources,
                    retries=self.ex.policy.retries,
                    key=[f"{c[0].quantum.key}-{self.token}-{c[0].tries}-{len(c)}"
                         for c in clusters])
                shared.add(len(clusters))
                for future, cluster in zip(futures, clusters, strict=True):
                    self.in_flight[future] = cluster
                    future.add_done_callback(self.done.put)
                self.tasks += len(clusters)

    def no_room(self, memory: int) -> str:
        sizes = ", ".join(f"{name} {format_bytes(p.worker_memory) if p.worker_memory else '?'}"
                          for name, p in self.ex.pools.items())
        return (f"needs {format_bytes(memory)} of memory, more than any worker of site "
                f"{self.ex.site} has (workers: {sizes})")

    # -- results ----------------------------------------------------------------------------

    def fetch(self, futures: list[Future]) -> dict[Future, list[QuantumResult]]:
        """The results of the finished tasks, one round trip per pool (Client.gather, with
        the bound its public form lacks); none when that fails, and collect fetches each."""
        by_pool: dict[str, list[Future]] = {}
        for future in futures:
            if future.status == "finished":
                by_pool.setdefault(self.in_flight[future][0].pool, []).append(future)
        fetched = {}
        for pool, batch in by_pool.items():
            client = self.ex.client(pool)
            try:
                values = client.sync(client._gather, batch, errors="raise", direct=None,
                                     local_worker=None, callback_timeout=RESULT_TIMEOUT)
            except Exception:      # noqa: BLE001 - a worker left with some of them
                continue
            fetched.update(zip(batch, values, strict=True))
        return fetched

    def collect(self, future: Future, cluster: list[_Attempt],
                results: list[QuantumResult] | None = None) -> None:
        self.watch[cluster[0].pool].progress = time.monotonic()
        if future.status == "finished":
            try:
                if results is None:
                    results = future.result(timeout=RESULT_TIMEOUT)
            except Exception:           # its worker left with the results: run them again
                for attempt in cluster:
                    self.queue(attempt, attempt.pool, first=True)
                return
            finally:
                future.release()
            for result in results:
                self.finish(result)
            return
        exc = future.exception(timeout=RESULT_TIMEOUT) if future.status == "error" else None
        future.release()
        if len(cluster) > 1:
            self.split(cluster, exc)
            return
        attempt = cluster[0]
        if isinstance(exc, KilledWorker):
            self.deciding.append((attempt, exc, time.monotonic()))
        elif exc is None:               # cancelled under us (the scheduler restarted)
            self.queue(attempt, attempt.pool, first=True)
        else:
            retries = self.ex.policy.retries
            self.fail(attempt, "transient", type(exc).__name__, f"{exc} (after {retries} retries)")

    def split(self, cluster: list[_Attempt], exc: BaseException | None) -> None:
        """A cluster that failed (or was cancelled under us): its quanta again, one by one."""
        if exc is not None:
            where = (f"worker {exc.last_worker.address} died running"
                     if isinstance(exc, KilledWorker) else f"{type(exc).__name__} in")
            self.ex.log.warning("site %s: %s a cluster of %d quanta (the first %s); each "
                                "submitted again alone", self.ex.site, where, len(cluster),
                                cluster[0].quantum)
        for attempt in cluster:
            self.queue(attempt, attempt.pool, first=True)

    def decide(self) -> None:
        """Quanta whose worker died: by memory (the nanny said so), or by anything else once
        the nanny had time to say so. Of a worker's quanta, those that were running there die
        with it (the worker's last heartbeat names them, and a quantum submitted again says
        where it started); the others were only queued there and are submitted again. When
        nothing names one of them (it started after the last heartbeat), all are taken to
        have run."""
        if not self.deciding:
            return
        memory_kills, started = set(), {}
        for pool in {a.pool for a, _, _ in self.deciding}:
            client = self.ex.client(pool)
            memory_kills |= {msg.get("worker") for _, msg in client.get_events(MEMORY_EVENTS)}
            for _, msg in client.get_events(STARTED_EVENTS):
                started.setdefault(msg["worker"], set()).add(msg["key"])
        lost: dict[str, set[str]] = {}         # our quanta each dead worker took with it
        said: dict[str, set[str]] = {}         # what it said ran there (may be stale)
        for _, exc, _ in self.deciding:
            worker = exc.last_worker.address
            lost.setdefault(worker, set()).add(str(exc.task))
            said.setdefault(worker, set(started.get(worker, ()))).update(exc.last_worker.executing)
        running = {worker: keys & said[worker] for worker, keys in lost.items()}
        now = time.monotonic()
        undecided = []
        for attempt, exc, since in self.deciding:
            worker = exc.last_worker.address
            by_memory = worker in memory_kills
            if not by_memory and now - since < VERDICT_SECONDS:
                undecided.append((attempt, exc, since))
                continue
            key = str(exc.task)
            would_say = attempt.tries > 1       # had it started, it would have said so
            if key in running[worker] or not (running[worker] or would_say):
                if by_memory:
                    self.more_memory(attempt, worker)
                else:
                    self.died(attempt, worker)
            else:
                self.queue(attempt, attempt.pool, first=True)
        self.deciding = undecided

    def died(self, attempt: _Attempt, worker: str) -> None:
        attempt.deaths += 1
        if attempt.deaths >= self.ex.policy.max_worker_deaths:
            self.fail(attempt, "killed worker", "KilledWorker",
                      f"{attempt.deaths} workers died while running it (the last {worker}, "
                      f"site {self.ex.site})")
            return
        self.ex.log.warning("site %s: worker %s died running %s; submitted again",
                         self.ex.site, worker, attempt.quantum)
        self.queue(attempt, attempt.pool, first=True)

    def more_memory(self, attempt: _Attempt, worker: str) -> None:
        """BPS's memoryMultiplier: the request times the multiplier, up to the maximum."""
        maximum = self.ex.memory_maximum
        old = attempt.memory
        if maximum is not None and old >= maximum:
            self.fail(attempt, "memory", "MemoryError",
                      f"killed by the memory limit of worker {worker} with {format_bytes(old)} "
                      f"requested, the maximum (request_memory_max) of site {self.ex.site}")
            return
        new = int(old * self.ex.policy.memory_multiplier)
        attempt.memory = min(new, maximum) if maximum is not None else new
        pool = self.ex.place(attempt.memory, attempt.pool)
        if pool is None:
            self.fail(attempt, "memory", "MemoryError",
                      f"killed by the memory limit of worker {worker} with {format_bytes(old)} "
                      f"requested; {self.no_room(attempt.memory)}")
            return
        self.ex.log.warning("site %s: %s killed worker %s by its memory (%s requested); "
                         "retried with %s on the %s pool", self.ex.site, attempt.quantum, worker,
                         format_bytes(old), format_bytes(attempt.memory), pool)
        self.queue(attempt, pool, first=True)

    # -- the watchdog -----------------------------------------------------------------------

    def check_pools(self) -> None:
        """Warn, then fail, for a pool with quanta to run and no worker or no progress."""
        now = time.monotonic()
        for name, w in self.watch.items():
            flying = sum(len(c) for c in self.in_flight.values() if c[0].pool == name)
            waiting = len(self.pending[name])
            if not (flying or waiting) or now - w.polled < POLL_SECONDS:
                if not (flying or waiting):
                    w.seen_workers = w.progress = now
                continue
            w.polled = now
            try:
                w.threads = sum(self.ex.client(name).nthreads(callback_timeout=30).values())
            except Exception:      # the scheduler does not answer: as good as no worker
                w.threads = 0
            if w.threads:
                w.seen_workers = now
            if not flying:
                w.progress = now
            p = w.pool
            idle, stalled = now - w.seen_workers, now - w.progress
            where = f"site {self.ex.site}, {name} pool ({p.kind}, {p.address})"
            if idle > p.no_worker_timeout:
                raise ClusterLost(f"{where}: no worker for {idle:.0f} s (no_worker_timeout "
                                  f"{p.no_worker_timeout:.0f} s); "
                                  f"{self.describe(name, flying, waiting)}")
            if stalled > p.stall_timeout:
                raise ClusterLost(f"{where}: no quantum finished for {stalled:.0f} s "
                                  f"(stall_timeout {p.stall_timeout:.0f} s); "
                                  f"{self.describe(name, flying, waiting)}")
            warn = ((idle > p.no_worker_warn and f"no worker for {idle:.0f} s, the group fails "
                     f"at {p.no_worker_timeout:.0f} s") or
                    (stalled > p.stall_warn and f"no quantum finished for {stalled:.0f} s, the "
                     f"group fails at {p.stall_timeout:.0f} s"))
            if not warn:
                w.warned = 0.0
            elif not w.warned or now - w.warned > WARN_AGAIN_SECONDS:
                w.warned = now
                self.ex.log.warning("%s: %s; %s", where, warn, self.describe(name, flying, waiting))

    def describe(self, pool: str, flying: int, waiting: int) -> str:
        """What waits on a pool: how many quanta of which steps, and the first of them."""
        attempts = [a for c in self.in_flight.values() for a in c if a.pool == pool]
        attempts += [entry[-1] for entry in heapq.nsmallest(100, self.pending[pool])]
        steps = sorted({a.quantum.step for a in attempts})
        first = attempts[0].quantum if attempts else ""
        return (f"{flying} quanta of {', '.join(steps)} submitted and {waiting} waiting "
                f"(the first {first})")
