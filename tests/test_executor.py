"""The executor against real faults on real local clusters: a quantum that outgrows its worker's
memory limit (the nanny kills the worker for it), a quantum that kills every worker it runs
on, a worker whose job ends, and pools that lose their workers or their progress for good."""

import logging
import os
import signal
import time

import dask
import numpy as np
import pytest

from drp_flows.engine.executor import ClusterLost, Executor, Pool, RetryPolicy
from drp_flows.engine.quanta import Quantum
from drp_flows.sites.clusters import executor_pool, running_cluster, running_clusters
from drp_flows.sites.config import ClusterConfig
from drp_flows.sites.storage import Storage

pytestmark = pytest.mark.e2e     # worker deaths and restarts: seconds each

MB = 2**20


def greedy(quantum, storage, out, config):
    """Takes `config["mb"][detector]` MB, 50 MB at a time (so the nanny sees it grow), holds it
    a moment (`config["hold"]`, 0.3 s), and writes its output; `config["kill"]` detectors
    kill their worker instead."""
    detector = quantum.data_id["detector"]
    if detector in config.get("kill", ()):
        os.kill(os.getpid(), signal.SIGKILL)
    if detector in config.get("sleep", {}):
        time.sleep(config["sleep"][detector])
    held = []
    for _ in range(config.get("mb", {}).get(detector, 0) // 50):
        held.append(np.ones(50 * MB // 8))
        time.sleep(0.1)
    time.sleep(config.get("hold", 0.3))
    out.write("thing", f"{detector} {len(held)}".encode())


def quanta(storage: Storage, n: int) -> list[Quantum]:
    return [Quantum("greedy", {"visit": 1, "detector": d},
                    outputs={"thing": storage.join("out", f"{d}.txt")}) for d in range(n)]


def by_detector(results) -> dict:
    assert len({r.data_id["detector"] for r in results}) == len(results)     # one result each
    return {r.data_id["detector"]: r for r in results}


def test_quantum_killed_by_memory_is_retried_with_more(tmp_path):
    """Short workers of 600 MB and a long one of 2 GB: the quantum that needs ~800 MB is killed
    on the short pool, retried with twice its 400 MB on the long one and succeeds; the one
    that needs ~2.5 GB is killed at every size up to the 1.6 GB maximum and quarantined with
    reason "memory"; the rest never notice."""
    short = ClusterConfig(kind="local", jobs=1, memory_limit="600MB")
    long = ClusterConfig(kind="local", jobs=1, memory_limit="2GB")
    storage = Storage(f"file://{tmp_path}")
    with running_clusters({"short": short, "long": long}) as addresses, Executor(
            "memtest", {name: executor_pool(name, addresses[name], cfg)
                        for name, cfg in (("short", short), ("long", long))},
            RetryPolicy(memory_multiplier=2, memory_maximum=1600 * 10**6)) as executor:
        results = executor.run(greedy, storage, {"mb": {0: 800, 1: 2500}}, quanta(storage, 5),
                               "mem", memory=400 * 10**6)
    got = by_detector(results)
    assert got[0].ok, got[0].error
    assert got[0].peak_rss_mb > 800             # it ran whole, on a worker with room for it
    assert not got[1].ok and got[1].reason == "memory", got[1].error
    assert "1.49 GiB requested, the maximum" in got[1].error, got[1].error
    assert all(got[d].ok for d in (2, 3, 4)), [got[d].error for d in (2, 3, 4)]


def test_quantum_that_kills_its_workers_is_quarantined(tmp_path, caplog):
    """600 tiny quanta go to Dask in clusters, a few dozen tasks. Then again with one of them
    killing its worker process each time: its cluster is submitted again quantum by quantum,
    the killer is quarantined as "killed worker" after three deaths (the nanny restarts the
    worker), and every other quantum is done."""
    cfg = ClusterConfig(kind="local", jobs=1)
    storage = Storage(f"file://{tmp_path}")
    with running_cluster(cfg) as address, caplog.at_level(logging.WARNING), \
            Executor("killtest", {"short": executor_pool("short", address, cfg)}) as executor:
        quiet = executor.session("quiet")
        quiet.add(greedy, storage, {"hold": 0}, quanta(storage, 600), memory=10**8)
        assert all(r.ok for r in by_detector(quiet.until_done()).values())
        assert quiet.tasks < 60, quiet.tasks          # not a Dask task per quantum
        run = executor.session("kill")
        run.add(greedy, storage, {"kill": [500], "hold": 0}, quanta(storage, 600), memory=10**8)
        got = by_detector(run.until_done())
    assert len(got) == 600
    assert not got[500].ok and got[500].reason == "killed worker", got[500].error
    assert "3 workers died while running it" in got[500].error
    assert all(r.ok for d, r in got.items() if d != 500), [r.error for r in got.values()
                                                           if not r.ok][:3]
    assert any("died running a cluster of" in r.message and "submitted again alone" in r.message
               for r in caplog.records), [r.message for r in caplog.records]


def test_worker_whose_job_ends_is_replaced(tmp_path):
    """The cluster's only worker (its nanny and process) goes away mid-step, as a batch job
    that hits its walltime does: the cluster adapts a new one in and the step finishes."""
    cfg = ClusterConfig(kind="local", jobs=1)
    storage = Storage(f"file://{tmp_path}")
    seen = []

    def on_result(r):
        seen.append(r)
        if len(seen) == 2:                       # the job ends
            cluster = next(iter(started.values()))
            cluster.sync(next(iter(cluster.workers.values())).close)

    from drp_flows.sites.clusters import make_cluster

    cluster = make_cluster(cfg)
    started = {"short": cluster}
    try:
        pool = executor_pool("short", cluster.scheduler_address, cfg)
        # how long a cluster keeps a lost job's place for it (15 s by default) before it adapts
        with Executor("jobtest", {"short": pool}) as executor, \
                dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"}):
            results = executor.run(greedy, storage, {"sleep": dict.fromkeys(range(8), 0.5)},
                                   quanta(storage, 8), "job", memory=10**8, on_result=on_result)
    finally:
        cluster.close()
    got = by_detector(results)
    assert len(got) == 8 and all(r.ok for r in got.values()), [r.error for r in got.values()]


@pytest.mark.parametrize("fault", ["no worker", "stall"])
def test_watchdog_fails_a_pool_that_cannot_finish(tmp_path, caplog, fault):
    """A scheduler whose workers are gone for good, or a quantum that never ends: a warning
    naming the site, pool and waiting quanta, then ClusterLost inside the deadline."""
    from distributed import LocalCluster

    storage = Storage(f"file://{tmp_path}")
    workers = 0 if fault == "no worker" else 1
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0",
                      resources={"MEMORY": 10**9}) as cluster:
        pool = Pool("short", cluster.scheduler_address, "local", 10**9, no_worker_warn=1,
                    no_worker_timeout=4, stall_warn=1, stall_timeout=4)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING), Executor("watched", {"short": pool}) as executor, \
                pytest.raises(ClusterLost) as lost:
            executor.run(greedy, storage, {"sleep": {0: 600}}, quanta(storage, 3), "w",
                         memory=10**8)
        elapsed = time.monotonic() - start
    what = "no worker for" if fault == "no worker" else "no quantum finished for"
    assert what in str(lost.value) and "site watched, short pool" in str(lost.value)
    assert "greedy(visit=1, detector=" in str(lost.value)        # what waits
    assert 4 <= elapsed < 30, elapsed
    assert any(what in r.message and "the group fails at 4 s" in r.message
               for r in caplog.records), [r.message for r in caplog.records]


def test_groups_on_one_pool_keep_each_others_priorities(tmp_path):
    """Two groups run at once on one pool (a stage's window): one has only long quanta, the
    other short ones, which come first. The long group may fill threads that would idle, but
    takes no place a waiting short quantum could have, so every short quantum starts before
    the third long one (the long ones starting first drained the cores of the scale bench)."""
    import threading

    cfg = ClusterConfig(kind="local", jobs=1, threads_per_worker=2)
    storage = Storage(f"file://{tmp_path}")
    long_quanta = [Quantum("long", {"visit": 1, "detector": d},
                           outputs={"thing": storage.join("long", f"{d}.txt")}) for d in range(6)]
    short_quanta = [Quantum("short", {"visit": 2, "detector": d},
                            outputs={"thing": storage.join("short", f"{d}.txt")})
                    for d in range(6)]
    with running_cluster(cfg) as address, \
            Executor("shared", {"short": executor_pool("short", address, cfg)}) as executor:
        slow = executor.session("slow")
        slow.add(greedy, storage, {"hold": 0.4}, long_quanta, memory=10**8, priority=-10**6)
        quick = executor.session("quick")
        quick.add(greedy, storage, {"hold": 0.1}, short_quanta, memory=10**8)
        results: dict[str, list] = {}
        threads = [threading.Thread(target=lambda r=run, k=key: results.setdefault(k, r.until_done()))
                   for key, run in (("slow", slow), ("quick", quick))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    started = {key: sorted(r.started for r in got) for key, got in results.items()}
    assert len(started["slow"]) == len(started["quick"]) == 6
    assert started["quick"][-1] < started["slow"][2], started
