"""Cluster kinds -> a running Dask cluster and its scheduler address.

One mechanism, one table entry per backend (as dask-jobqueue does for job schedulers):
`local` (LocalCluster), `slurm` (SLURMCluster), `htcondor` (HTCondorCluster), `address` (an
existing scheduler). Stage flows only ever receive the scheduler address, never a cluster object
(prefect-dask re-creates runners from an address; cluster objects do not survive that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed import Client, LocalCluster

from drp_flows.sites.config import ClusterConfig


def _local(cfg: ClusterConfig):
    kwargs = {"n_workers": cfg.jobs, "threads_per_worker": 1, "processes": True,
              "dashboard_address": ":0", **cfg.backend_kwargs}
    return LocalCluster(**kwargs)


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
    """A new cluster object for a jobqueue or local kind (not started for kind=address)."""
    if cfg.kind not in BACKENDS:
        raise ValueError(f"cluster kind {cfg.kind!r} has no backend to start")
    return BACKENDS[cfg.kind](cfg)


@contextlib.contextmanager
def running_cluster(cfg: ClusterConfig, wait_for_workers: int = 1,
                    timeout: float = 120) -> Iterator[str]:
    """Start (or attach to) a cluster, wait for its first workers, yield the scheduler address."""
    if cfg.kind == "address":
        yield cfg.address
        return
    cluster = make_cluster(cfg)
    try:
        if wait_for_workers:
            with Client(cluster.scheduler_address) as client:
                client.wait_for_workers(min(wait_for_workers, max(cfg.jobs, 1)), timeout=timeout)
        yield cluster.scheduler_address
    finally:
        cluster.close()
