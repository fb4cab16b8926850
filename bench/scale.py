"""Scale: synthetic quanta shaped like a campaign, through the real executor, data flow
(engine/dataflow.py: steps following the data, groups in a window), bulk registration in a
Prefect task per batch and a real Butler, on a LocalCluster whose single-thread workers sleep,
so that 64 (or more) cores are emulated on this machine's two.

The workload is the seeds' shape, time-scaled by `--unit` seconds: per visit of a stage's
groups, nine `short` quanta (one per CCD, about 1 unit, 30% lognormal spread: step 1 and 4's
~2-minute quanta), one `gather` (0.25 unit, after its nine: consolidateVisitSummary), and
for every `--long-every`-th visit one `long` quantum of 100 units after that (the 12-hour
quanta of steps 2 and 3). The planners are synthetic (they know the shape; bench/planning.py
measures the real ones at survey scale). Three ways of running the same stage, in one run:
- step by step: one group after the other, each step waiting for the whole group (as before);
- data flow: a visit's next step as soon as its own quanta are registered, one group at a time;
- data flow with a window of `--window` groups at once.
For each: makespan, its lower bound (the larger of total work / cores and the critical path,
from the quanta's measured durations), utilisation (busy worker-seconds over cores x the time
from the first start to the last end).

Then the orchestration throughput: `--zero` zero-length quanta through the same path, in
groups of `--group-visits` visits run two at a time and batches of 1,000, with the flow
process's peak resident memory above what it held before (bounded by the window, not by the
campaign: `--zero 1000000` is the million-quantum run), and registration's own rate
(datasets/s). `--postgres URL` runs that on a PostgreSQL registry too.
JSON in build/bench/scale.json.
Run: python bench/scale.py [--cores 64 --groups 4 --visits 32 --unit 0.6 --zero 20000].
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

from distributed import LocalCluster
from lsst.daf.butler import Butler, Config
from overhead import make_butler
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from drp_flows.engine.dataflow import FlowStep, GroupFlow, StepProgress, priority, run_window
from drp_flows.engine.executor import Executor, Pool
from drp_flows.engine.quanta import Quantum, QuantumResult, peak_memory_mb, reset_peak_memory
from drp_flows.engine.register import register_outputs
from drp_flows.sites.storage import Storage

CCDS = 9
UNITS = {"short": 1.0, "gather": 0.25, "long": 100.0}
TYPES = tuple(f"scale_{step}" for step in UNITS)


def seconds_of(step: str, visit: int, detector: int, unit: float) -> float:
    """A quantum's duration: its step's units, short ones spread lognormally, fixed by the
    data ID so that every way of running sees the same work."""
    if unit == 0:
        return 0.0
    spread = random.Random(f"{step}-{visit}-{detector}").lognormvariate(0, 0.3) \
        if step == "short" else 1.0
    return unit * UNITS[step] * spread / math.exp(0.3 ** 2 / 2)   # mean of the spread: 1


def sleep_quantum(quantum: Quantum, storage: Storage, out, config: dict) -> None:
    time.sleep(seconds_of(quantum.step, quantum.data_id["visit"],
                          quantum.data_id.get("detector", 0), config["unit"]))
    out.write(f"scale_{quantum.step}", b"", {"detector": quantum.data_id["code"]})


def planner(step: str, storage: Storage, run: str, long_every: int):
    """The synthetic planner of one step, for the visits given."""
    def plan(visits: list[int]):
        if step == "short":
            ids = [{"visit": v, "detector": d, "code": v * CCDS + d}
                   for v in visits for d in range(CCDS)]
        else:
            ids = [{"visit": v, "code": v} for v in visits
                   if step == "gather" or v % long_every == 0]
        return [Quantum(step, i, outputs={f"scale_{step}": storage.join(
            "repo", run, f"{step}-{i['code']}.yaml")}) for i in ids], 0, []
    return plan


def run_stage(pool: Pool, butler: Butler, storage: Storage, groups: list[list[int]],
              unit: float, long_every: int, follow_data: bool, window: int,
              steps: tuple[str, ...] = tuple(UNITS), keep: bool = True
              ) -> tuple[list[QuantumResult] | int, list]:
    """The stage's groups, as stage flows run them; every result (or, not `keep`ing them,
    how many), and every registration."""
    results: list[QuantumResult] = []
    registrations = []
    count = [0]
    tag = uuid.uuid4().hex[:6]

    @task(cache_policy=NO_CACHE)
    def register_task(batch: list[QuantumResult], run: str) -> None:
        registrations.append(register_outputs(butler, storage, batch, run))
        count[0] += len(batch)
        if keep:
            results.extend(batch)

    def register(batch: list[QuantumResult], run: str) -> None:
        register_task(quote(batch), run)      # as flows/stages.py: Prefect does not walk it

    def group(index: int, visits: list[int]) -> None:
        flow_steps = []
        for i, step in enumerate(steps):
            run = f"scale/{tag}/{step}/{index}"
            pool_name = "long" if step == "long" else "short"
            flow_steps.append(FlowStep(
                StepProgress("bench", step, str(index)), sleep_quantum,
                planner(step, storage, run, long_every), partial(register, run=run),
                10**8, pool_name, ("visit",), priority(i, pool_name)))
        with Executor("bench", {"short": pool}) as executor:
            GroupFlow(executor, storage, {"unit": unit}, flow_steps, "visit", visits,
                      f"{tag}{index}", 1000, follow_data).run()

    @flow(name="bench-scale")
    def stage():
        run_window([partial(group, i, g) for i, g in enumerate(groups)], window)

    stage()
    return (results if keep else count[0]), registrations


def figures(results: list[QuantumResult], cores: int) -> dict:
    """Makespan, its lower bound and utilisation, from the quanta's worker clocks."""
    start = min(r.started for r in results)
    end = max(r.ended for r in results)
    work = sum(r.seconds for r in results)
    chain: dict[int, dict[str, float]] = {}
    for r in results:
        steps = chain.setdefault(r.data_id["visit"], {})
        steps[r.step] = max(steps.get(r.step, 0.0), r.seconds)
    critical = max(sum(s.values()) for s in chain.values())
    bound = max(work / cores, critical)
    return {"quanta": len(results), "makespan s": end - start, "lower bound s": bound,
            "work / cores s": work / cores, "critical path s": critical,
            "makespan / bound": (end - start) / bound,
            "utilisation": work / (cores * (end - start))}


def throughput(pool: Pool, butler: Butler, storage: Storage, n: int, group: int) -> dict:
    """Zero-length quanta, one step, in groups of `group` visits two at a time (as a stage
    runs them: what is in flight stays bounded by the window, however large the campaign):
    what the orchestrator sustains, and its memory."""
    visits = list(range(n // CCDS))
    groups = [visits[i:i + group] for i in range(0, len(visits), group)]
    reset_peak_memory()
    before = peak_memory_mb()
    start = time.perf_counter()
    results, registrations = run_stage(pool, butler, storage, groups, 0.0, 1, True, 2,
                                       steps=("short",), keep=False)
    seconds = time.perf_counter() - start
    registered = sum(r.datasets for r in registrations)
    assert registered == results == CCDS * len(visits), (registered, results)
    return {"quanta": results, "groups": len(groups), "seconds": seconds,
            "quanta/s": results / seconds, "peak RSS above start MB": peak_memory_mb() - before,
            "registration datasets/s": registered / sum(r.seconds for r in registrations)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cores", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2,
                        help="processes sharing the emulated cores (each process costs real CPU "
                             "even idle: 8 of them take a real core of this machine's two)")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--visits", type=int, default=32, help="per group")
    parser.add_argument("--long-every", type=int, default=2)
    parser.add_argument("--unit", type=float, default=0.6,
                        help="seconds per unit of work (0: the throughput runs alone)")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--zero", type=int, default=20_000, help="zero-length quanta")
    parser.add_argument("--group-visits", type=int, default=2_000,
                        help="visits (of 9 quanta) per group of the throughput run")
    parser.add_argument("--postgres", help="a PostgreSQL URL for the throughput run too")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    out: dict = {"args": vars(args)}
    groups = [list(range(g * args.visits, (g + 1) * args.visits)) for g in range(args.groups)]
    detectors = max(CCDS * args.groups * args.visits, args.zero) + CCDS
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=180), \
            LocalCluster(n_workers=args.workers, threads_per_worker=args.cores // args.workers,
                         dashboard_address=":0") as cluster:
        storage = Storage(f"file://{tmp}")
        pool = Pool("short", cluster.scheduler_address)
        butler = make_butler(Path(tmp) / "repo", TYPES, detectors)
        modes = (("step by step", False, 1), ("data flow", True, 1),
                 (f"data flow, window {args.window}", True, args.window))
        for name, follow, window in modes if args.unit else ():
            results, _ = run_stage(pool, butler, storage, groups, args.unit, args.long_every,
                                   follow, window)
            out[name] = row = figures(results, args.cores)
            print(f"{name:>24}: {row['quanta']} quanta, makespan {row['makespan s']:7.1f} s, "
                  f"lower bound {row['lower bound s']:6.1f} s (work/cores "
                  f"{row['work / cores s']:.1f}, critical path {row['critical path s']:.1f}), "
                  f"makespan/bound {row['makespan / bound']:.2f}, utilisation "
                  f"{100 * row['utilisation']:.1f}%", flush=True)
        registries = {"SQLite": (butler, storage)}
        if args.postgres:
            config = Config({"registry": {"db": args.postgres,
                                          "namespace": f"bench_scale_{uuid.uuid4().hex[:8]}"}})
            registries["PostgreSQL"] = (make_butler(Path(tmp) / "pg" / "repo", TYPES, detectors,
                                                    config), Storage(f"file://{tmp}/pg"))
        for name, (repo, root) in registries.items():
            out[f"throughput {name}"] = row = throughput(pool, repo, root, args.zero,
                                                         args.group_visits)
            print(f"{'throughput ' + name:>24}: {row['quanta']} zero-length quanta "
                  f"({row['groups']} groups, 2 at a time) in "
                  f"{row['seconds']:.1f} s = {row['quanta/s']:.0f} quanta/s, registration "
                  f"{row['registration datasets/s']:.0f} datasets/s, flow process peak RSS "
                  f"+{row['peak RSS above start MB']:.0f} MB", flush=True)
    Path("build/bench").mkdir(parents=True, exist_ok=True)
    Path("build/bench/scale.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
