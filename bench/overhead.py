"""Orchestration overhead per quantum: the batching engine vs one Prefect task per quantum vs
plain `client.map`, on a no-op quantum and on a fixed-cost one, at 100, 1,000 and 10,000.

"Overhead" is the time above plain `client.map` of the same quanta (Dask's own ~1-2 ms per
task is in every column). The engine's figure includes everything a campaign pays: the
executor's window of futures, one Prefect task per step and one per registered batch, the
quantum wrapper (manifest, checksum of a 64-byte output written
to storage) and bulk registration of every output in a real Butler (SQLite).
Prints ms per quantum and the ratios.
Run: make bench (or python bench/overhead.py [--sizes 100 1000]).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster
from lsst.daf.butler import Butler, DatasetType
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from drp_flows.engine.executor import Executor, Pool
from drp_flows.engine.quanta import Quantum
from drp_flows.engine.register import register_outputs
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import INSTRUMENT

FIXED_COST_S = 0.02
BATCH = 1000
PREFECT_PER_QUANTUM_MAX = 1000   # beyond this the anti-pattern is projected, not run


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def bench_quantum(quantum, storage, out, config):
    """The quantum under test: optional fixed CPU cost, one tiny output."""
    if config["cost"]:
        spin(config["cost"])
    out.write("bench_output", b"x" * 64)


def plain(i: int, cost: float) -> int:
    if cost:
        spin(cost)
    return i


@task(cache_policy=NO_CACHE)
def prefect_quantum(i: int, cost: float) -> int:
    return plain(i, cost)


def make_butler(root: Path, dataset_types: tuple[str, ...] = ("bench_output",),
                detectors: int = 10**4, config: str | None = None) -> Butler:
    """A plain repo (SQLite unless `config` names a registry), what the engine pays at every
    site: one instrument with `detectors` detectors, and dataset types on them."""
    Butler.makeRepo(str(root), config=config)
    butler = Butler.from_config(str(root), writeable=True)
    butler.registry.insertDimensionData("instrument", {"name": INSTRUMENT, "detector_max": 10**7})
    butler.registry.insertDimensionData(
        "detector", *[{"instrument": INSTRUMENT, "id": i, "full_name": str(i)}
                      for i in range(detectors)])
    for name in dataset_types:
        butler.registry.registerDatasetType(DatasetType(name, ("instrument", "detector"),
                                                        "StructuredDataDict",
                                                        universe=butler.dimensions))
    return butler


def engine(pool: Pool, butler: Butler, storage: Storage, n: int, cost: float) -> float:
    """One Prefect task drives the step through the executor, registering every BATCH results
    in a Prefect task of their own, as a stage flow does."""
    run = f"bench/{n}/{cost}/{time.time_ns()}"
    quanta = [Quantum("bench", {"detector": i}, outputs={
        "bench_output": storage.join("repo", run, f"{i}.yaml")}) for i in range(n)]

    @task(cache_policy=NO_CACHE)
    def register_task(results):
        register_outputs(butler, storage, results, run)

    @task(cache_policy=NO_CACHE)
    def step_task():
        batch = []

        def on_result(r):
            batch.append(r)
            if len(batch) == BATCH:
                register_task(list(batch))
                batch.clear()

        with Executor("bench", {"short": pool}) as executor:
            executor.run(bench_quantum, storage, {"cost": cost}, quanta, run, 10**8,
                         on_result=on_result)
        if batch:
            register_task(batch)

    @flow
    def engine_flow():
        step_task()

    start = time.perf_counter()
    engine_flow()
    elapsed = time.perf_counter() - start
    assert len(list(butler.registry.queryDatasets("bench_output", collections=run))) == n
    return elapsed


def plain_map(client: Client, n: int, cost: float) -> float:
    start = time.perf_counter()
    client.gather(client.map(plain, range(n), cost=cost, pure=False))
    return time.perf_counter() - start


def prefect_per_quantum(address: str, n: int, cost: float) -> float:
    @flow(task_runner=DaskTaskRunner(address=address))
    def per_quantum_flow():
        futures = [prefect_quantum.submit(i, cost) for i in range(n)]
        return [f.result() for f in futures]

    start = time.perf_counter()
    per_quantum_flow()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=180), \
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        storage = Storage(f"file://{tmp}")
        butler = make_butler(Path(tmp) / "repo")
        rows = []
        for cost in (0.0, FIXED_COST_S):
            for n in args.sizes:
                t_plain = plain_map(client, n, cost)
                t_engine = engine(Pool("short", cluster.scheduler_address), butler, storage, n,
                                  cost)
                if n <= PREFECT_PER_QUANTUM_MAX:
                    t_prefect, how = prefect_per_quantum(cluster.scheduler_address, n, cost), "run"
                else:   # project from the largest measured size: per-quantum cost is flat or worse
                    ref = next(r for r in reversed(rows) if r["cost"] == cost and r["how"] == "run")
                    t_prefect, how = ref["prefect"] / ref["n"] * n, "projected"
                rows.append({"cost": cost, "n": n, "plain": t_plain, "engine": t_engine,
                             "prefect": t_prefect, "how": how})
                over_engine = (t_engine - t_plain) / n * 1e3
                over_prefect = (t_prefect - t_plain) / n * 1e3
                print(f"quantum={'no-op' if not cost else f'{cost * 1e3:.0f} ms'} n={n:>6}: "
                      f"plain map {t_plain / n * 1e3:7.2f} ms/q | engine+registration "
                      f"{t_engine / n * 1e3:7.2f} ms/q (overhead {over_engine:6.2f}) | "
                      f"Prefect task per quantum {t_prefect / n * 1e3:8.2f} ms/q "
                      f"(overhead {over_prefect:7.2f}, {how}) | Prefect per quantum / engine: "
                      f"total {t_prefect / t_engine:5.1f}x, overhead "
                      f"{over_prefect / max(over_engine, 1e-9):5.1f}x", flush=True)


if __name__ == "__main__":
    main()
