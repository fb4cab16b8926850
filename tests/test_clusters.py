"""Cluster kinds: a batch on workers a real Slurm started; the HTCondor submission; addresses.

HTCondor daemons cannot be installed here (no Debian package; the wheel is bindings only), so
the HTCondor test checks the job script dask-jobqueue renders from our site keys and the exact
submit command it runs, with a stand-in `condor_submit` on PATH that records its input: the only
test double in the suite.
"""

import os
import time

import dask
import pytest
from distributed import Client

from drp_flows.engine.executor import Executor
from drp_flows.engine.register import register_outputs
from drp_flows.sites.butler import open_butler
from drp_flows.sites.clusters import executor_pool, make_cluster, running_cluster
from drp_flows.sites.config import ClusterConfig, PipelineConfig, load_sites
from drp_flows.tasks import step1
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.pipeline import LABELS


@pytest.mark.slurm
def test_slurm_site_runs_a_step1_batch(slurm, three_sites, tmp_path):
    site = load_sites(three_sites)["usdf"]
    butler = open_butler(site, writeable=True)
    visit = min(int(d["visit"]) for d in butler.registry.queryDataIds(
        ["visit"], datasets="raw", collections="ComCamSim/defaults", instrument=INSTRUMENT))
    run = "ComCamSim/runs/slurm-test/step1/one-visit/1"
    quanta, _, _ = LABELS[step1.CALIBRATE].plan(butler, site.store, run, [visit], [])
    assert len(quanta) == 9
    cfg = ClusterConfig(kind="slurm", jobs=1, cores=1, processes=1, memory="1GB", queue="debug",
                        walltime="00:10:00", log_directory=str(tmp_path / "logs"),
                        local_directory=str(tmp_path))
    with running_cluster(cfg, timeout=180) as address, Client(address) as client, \
            Executor("usdf", {"short": executor_pool("short", address, cfg)}) as executor:
        job_ids = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        assert job_ids and all(job_ids.values()), job_ids     # workers are Slurm jobs
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
        assert resources == [{"MEMORY": 10**9}], resources      # what quanta ask for
        config = {"camera": step1.camera_config(butler), **PipelineConfig().model_dump()}
        results = executor.run(step1.calibrate_image, site.store, config, quanta, "slurm",
                               memory=5 * 10**8)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    reg = register_outputs(butler, site.store, results, run)
    assert reg.datasets == 18
    # registering the same batch again (a retried registration task) is harmless
    register_outputs(butler, site.store, results, run)
    images = list(butler.registry.queryDatasets("preliminary_visit_image", collections=run))
    assert len(images) == 9


@pytest.fixture
def fake_condor(tmp_path, monkeypatch):
    """condor_submit / condor_rm stand-ins that record what they are given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "condor.log"
    (bin_dir / "condor_submit").write_text(
        f"#!/bin/sh\necho \"$0 $*\" >> {log}\ncat \"$1\" > {tmp_path}/jdl.part\n"
        f"mv {tmp_path}/jdl.part {tmp_path}/submitted.jdl\n"   # whole, or not there yet
        "echo '1 job(s) submitted to cluster 4242.'\n")
    (bin_dir / "condor_rm").write_text(f"#!/bin/sh\necho \"$0 $*\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def test_htcondor_site_submits_the_rendered_job(fake_condor):
    cfg = ClusterConfig(kind="htcondor", jobs=1, cores=2, memory="4GB", disk="10GB",
                        job_extra_directives={"+MaxRuntime": "7200"},
                        worker_extra_args=["--lifetime", "110m"])
    cluster = make_cluster(cfg)
    try:
        for _ in range(100):
            if (fake_condor / "submitted.jdl").exists():
                break
            time.sleep(0.1)
        jdl = (fake_condor / "submitted.jdl").read_text()
        assert "MY.DaskWorkerCores = 2" in jdl
        assert "MY.DaskWorkerMemory = 4000000000" in jdl
        assert "MY.DaskWorkerDisk = 10000000000" in jdl
        assert "+MaxRuntime = 7200" in jdl
        assert "--lifetime 110m" in jdl
        assert "--resources MEMORY=2000000000" in jdl   # per worker: 4 GB, 2 processes
        assert cluster.scheduler_address.split(":")[-1] in jdl      # workers call home
        assert (fake_condor / "condor.log").read_text().split()[0].endswith("condor_submit")
    finally:
        cluster.close()


def test_address_kind_attaches_to_an_existing_scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as lc:
        cfg = ClusterConfig(kind="address", address=lc.scheduler_address)
        with running_cluster(cfg) as address, Client(address) as client:
            assert address == lc.scheduler_address
            assert client.submit(sum, [1, 2]).result() == 3


def test_local_kind_passes_options_through():
    cfg = ClusterConfig(kind="local", jobs=2, threads_per_worker=1, memory_limit="500MB")
    with running_cluster(cfg) as address, Client(address) as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 2
        assert all(w["memory_limit"] == 500_000_000 for w in workers)
        assert all(w["resources"] == {"MEMORY": 500_000_000} for w in workers)
        # no statistical profiler (drp_flows/__init__.py: it can deadlock CPython 3.11)
        profiling = client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
        assert len(profiling) == 2 and not any(profiling.values()), profiling
