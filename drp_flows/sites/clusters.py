"""Cluster kinds -> a running Dask cluster and its scheduler address.

One mechanism, one table entry per backend (as dask-jobqueue does for job schedulers):
`local` (LocalCluster), `slurm` (SLURMCluster), `htcondor` (HTCondorCluster), `address` (an
existing scheduler). Stage flows only ever receive the scheduler address, never a cluster object
(prefect-dask re-creates runners from an address; cluster objects do not survive that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from distributed import Client, LocalCluster

from drp_flows.sites.config import ClusterConfig


def _local(cfg: ClusterConfig):
    kwargs = {"threads_per_worker": 1, "processes": True, "dashboard_address": ":0",
              **cfg.backend_kwargs}
    cluster = LocalCluster(n_workers=0, **kwargs)
    cluster.scale(cfg.jobs)          # the workers start in the background, as batch jobs do
    return cluster


def _jobqueue(class_name: str):
    def start(cfg: ClusterConfig):
        import dask_jobqueue

        cluster = getattr(dask_jobqueue, class_name)(**cfg.backend_kwargs)
        cluster.scale(jobs=cfg.jobs)
        return cluster
    return start


BACKENDS = {
    "local": _local,
    "slurm": _jobqueue("SLURMCluster"),
    "htcondor": _jobqueue("HTCondorCluster"),
}


def make_cluster(cfg: ClusterConfig):
    """A new cluster object for a jobqueue or local kind (not started for kind=address): its
    scheduler runs, its workers are on their way."""
    if cfg.kind not in BACKENDS:
        raise ValueError(f"cluster kind {cfg.kind!r} has no backend to start")
    return BACKENDS[cfg.kind](cfg)


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
            wanted = cfg.jobs if cfg.kind == "local" else min(wait_for_workers, max(cfg.jobs, 1))
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
