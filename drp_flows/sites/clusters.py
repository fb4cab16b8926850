"""Cluster kinds -> a running Dask cluster and its scheduler address.

One mechanism, one table entry per backend (as dask-jobqueue does for job schedulers):
`local` (LocalCluster), `slurm` (SLURMCluster), `htcondor` (HTCondorCluster), `address` (an
existing scheduler). Stage flows only ever receive the scheduler address, never a cluster object
(prefect-dask re-creates runners from an address; cluster objects do not survive that).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dask
from dask.utils import parse_bytes
from distributed import Client, LocalCluster
from distributed.deploy.local import nprocesses_nthreads
from distributed.worker_memory import parse_memory_limit

from drp_flows.engine.executor import MEMORY, Pool
from drp_flows.sites.config import ClusterConfig

# Our schedulers fail a worker's quanta as soon as it dies (Dask's default retries them on
# three more workers first): the executor retries them itself, and tells a death by memory
# from any other (engine/executor.py)
SCHEDULER_CONFIG = {"distributed.scheduler.allowed-failures": 0}
STALL_TIMEOUT = {"short": 2 * 3600.0, "long": 24 * 3600.0}


def worker_memory(cfg: ClusterConfig) -> int | None:
    """The memory limit of each of the cluster's workers, in bytes: what it advertises as its
    MEMORY resource and what its nanny enforces (None for kind=address: not ours to know)."""
    kwargs = cfg.backend_kwargs
    if cfg.kind == "local":
        threads = kwargs.get("threads_per_worker", 1)
        return parse_memory_limit(kwargs.get("memory_limit", "auto"), threads,
                                  logger=logging.getLogger(__name__))
    if cfg.kind == "address":
        return None
    name = cfg.kind                      # dask-jobqueue's config section: jobqueue.slurm, ...
    memory = kwargs.get("memory") or dask.config.get(f"jobqueue.{name}.memory")
    cores = kwargs.get("cores") or dask.config.get(f"jobqueue.{name}.cores")
    processes = (kwargs.get("processes") or dask.config.get(f"jobqueue.{name}.processes")
                 or nprocesses_nthreads(cores)[0])
    return parse_bytes(memory) // processes


def _resources_arg(args: list[str], memory: int) -> list[str]:
    """A worker command line that advertises MEMORY too (added to a --resources given)."""
    args = list(args)
    if "--resources" in args:
        i = args.index("--resources") + 1
        args[i] = f"{args[i]},{MEMORY}={memory}"
        return args
    return [*args, "--resources", f"{MEMORY}={memory}"]


def _local(cfg: ClusterConfig):
    kwargs = {"threads_per_worker": 1, "processes": True, "dashboard_address": ":0",
              **cfg.backend_kwargs}
    kwargs["resources"] = {**kwargs.get("resources", {}), MEMORY: worker_memory(cfg)}
    cluster = LocalCluster(n_workers=0, **kwargs)
    cluster.adapt(minimum=cfg.minimum, maximum=cfg.maximum)   # workers start in the background
    return cluster


def _jobqueue(class_name: str):
    def start(cfg: ClusterConfig):
        import dask_jobqueue

        kwargs = dict(cfg.backend_kwargs)
        kwargs["worker_extra_args"] = _resources_arg(kwargs.get("worker_extra_args", []),
                                                     worker_memory(cfg))
        cluster = getattr(dask_jobqueue, class_name)(**kwargs)
        cluster.adapt(minimum_jobs=cfg.minimum, maximum_jobs=cfg.maximum)
        return cluster
    return start


BACKENDS = {
    "local": _local,
    "slurm": _jobqueue("SLURMCluster"),
    "htcondor": _jobqueue("HTCondorCluster"),
}


def make_cluster(cfg: ClusterConfig):
    """A new cluster object for a jobqueue or local kind (not started for kind=address): its
    scheduler runs, its workers are on their way and are replaced when lost (adapt)."""
    if cfg.kind not in BACKENDS:
        raise ValueError(f"cluster kind {cfg.kind!r} has no backend to start")
    with dask.config.set(SCHEDULER_CONFIG):
        return BACKENDS[cfg.kind](cfg)


def executor_pool(name: str, address: str, cfg: ClusterConfig) -> Pool:
    """The cluster as the executor sees it: its address, its workers' memory and its
    watchdog's limits (a long pool waits longer for its quanta by default)."""
    stall = cfg.stall_timeout or STALL_TIMEOUT[name]
    return Pool(name, address, cfg.kind, worker_memory(cfg), cfg.no_worker_warn,
                cfg.no_worker_timeout, cfg.stall_warn or stall / 4, stall)


@contextlib.contextmanager
def running_clusters(configs: dict, wait_for_workers: int = 1,
                     timeout: float = 120) -> Iterator[dict]:
    """Start (or attach to) several clusters, wait for the first workers of all of them at
    once (seconds to minutes each, on a batch system or a busy machine), yield their scheduler
    addresses by the same keys, and stop them when the block ends. The schedulers are made one
    after the other: made at once, they race to import distributed's dashboard."""
    with contextlib.ExitStack() as stack:
        addresses = {}
        for key, cfg in configs.items():
            if cfg.kind == "address":
                addresses[key] = cfg.address
                continue
            cluster = make_cluster(cfg)
            stack.callback(cluster.close)
            addresses[key] = cluster.scheduler_address

        def wait(key) -> None:
            cfg = configs[key]      # local workers are all there in seconds: wait for each
            wanted = cfg.minimum if cfg.kind == "local" else min(wait_for_workers, cfg.minimum)
            if not wanted:          # a cluster that adapts up from nothing when work comes
                return
            with Client(addresses[key], set_as_default=False) as client:
                try:
                    client.wait_for_workers(wanted, timeout=timeout)
                except TimeoutError as e:
                    raise RuntimeError(
                        f"cluster {key} ({cfg.kind}): {wanted} workers did not join in {timeout:.0f} s; "
                        "the log above says why one did not start (an option the workers do "
                        "not accept, a queue that does not run the job, ...)") from e

        if wait_for_workers:
            with ThreadPoolExecutor(max(len(configs), 1)) as pool:
                list(pool.map(wait, [k for k, cfg in configs.items() if cfg.kind != "address"]))
        yield addresses


@contextlib.contextmanager
def running_cluster(cfg: ClusterConfig, wait_for_workers: int = 1,
                    timeout: float = 120) -> Iterator[str]:
    """Start (or attach to) one cluster, wait for its first workers, yield its scheduler
    address."""
    with running_clusters({"": cfg}, wait_for_workers, timeout) as addresses:
        yield addresses[""]
