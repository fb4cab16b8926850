"""Campaigns whose clusters lose workers for real, as batch systems take them: a worker process
SIGKILLed on a LocalCluster, a worker's Slurm job cancelled (`scancel`, as walltime or
preemption end it), and a cluster that loses its only worker for good. Each is stage 1 of the
solo site (tract 0, ukdf's share of the test survey) run by `drp campaign`; the first two
heal and end with the same datasets and calibrations as the shared campaign's undisturbed
ukdf, the last fails inside its deadline with a clear error and `drp rescue` finishes it."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import registered, table_differences
from prefect.settings import PREFECT_API_URL

from drp_flows.datamodel import campaign_collection
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites

STAGE1 = ("preliminary_visit_image", "single_visit_star_unstandardized",
          "preliminary_visit_summary", "single_visit_star", "isolated_star",
          "isolated_star_source")
DRP = os.path.join(os.path.dirname(sys.executable), "drp")


def drp(*args: str, log: Path) -> subprocess.Popen:
    """`drp <args>` in its own session, its output in `log`."""
    return subprocess.Popen([DRP, *args], start_new_session=True, stdout=log.open("w"),
                            stderr=subprocess.STDOUT,
                            env=os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(),
                                              "DRP_PROGRESS_SECONDS": "5"})


def start(site_file: str, name: str, log: Path, command: str = "campaign") -> subprocess.Popen:
    """`drp campaign` (or `drp rescue`) of stage 1, groups of 2 visits, batches of 2."""
    return drp(command, name, "--sites", site_file, "--stage", "stage1", "--group-size", "2",
               "--batch-size", "2", log=log)


def wait_until(check, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s"
        time.sleep(0.3)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout:.0f} s:\n{log.read_text()[-3000:]}") from None


def busy(process: psutil.Process, seconds: float = 0.1) -> bool:
    """The process was on a CPU for nearly all of the last `seconds`: a quantum runs there
    and goes on for a while yet (a step-1 quantum takes about a second here)."""
    before = sum(process.cpu_times()[:2])
    time.sleep(seconds)
    return sum(process.cpu_times()[:2]) - before > 0.8 * seconds


def stage1(butler, collection: str, visits: set[int]) -> dict:
    """The stage-1 datasets of the given visits (and of tract 0), by type and data ID."""
    out = {}
    for dataset_type in STAGE1:
        for ref in butler.registry.queryDatasets(dataset_type, collections=collection,
                                                 findFirst=True):
            ids = dict(ref.dataId.required)
            if ids.get("visit", -1) in visits or ids.get("tract") == 0:
                out[(dataset_type, tuple(sorted(ids.items())))] = ref
    return out


def assert_same_as_undisturbed(site_file: str, name: str, campaign) -> None:
    """Every stage-1 dataset of the undisturbed ukdf (same raws, same tract), and the same
    calibration of every CCD (the visit summaries' rows) to 1e-9."""
    solo = open_butler(load_sites(site_file)["solo"])
    ukdf = open_butler(load_sites(campaign.site_file)["ukdf"])
    visits = {int(r.dataId["exposure"]) for r in solo.registry.queryDatasets(
        "raw", collections="ComCamSim/raw/all")}
    got = stage1(solo, campaign_collection(name), visits)
    want = stage1(ukdf, campaign_collection(campaign.name), visits)
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    diffs = [d for key, ref in got.items() if key[0] == "preliminary_visit_summary"
             for d in table_differences(key, solo.get(ref), ukdf.get(want[key]))]
    assert not diffs, "\n".join(diffs[:20])


def test_worker_sigkilled_mid_stage_heals(solo_site, campaign, tmp_path):
    """The LocalCluster's worker process is SIGKILLed once stage 1 has registered CCDs: its
    quanta are submitted again (the nanny starts a new process) and the campaign completes."""
    site_file = solo_site("local-kill", cluster="{kind: local, jobs: 1, threads_per_worker: 1}")
    log = tmp_path / "campaign.log"
    proc = start(site_file, "killed1", log)
    try:
        wait_until(lambda: registered(site_file, "killed1") >= 2, proc, log, "CCD registered")
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 1, workers
        # between two steps the worker may wait for a registration: kill it while it computes
        wait_until(lambda: busy(workers[0]), proc, log, "quantum running on the worker")
        workers[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: "died running" in log.read_text(), proc, log, "the death noticed", 120)
        noticed = time.monotonic() - killed
        assert finish(proc, log) == 0, log.read_text()[-3000:]
        print(f"SIGKILLed worker: noticed after {noticed:.1f} s, campaign done "
              f"{time.monotonic() - killed:.1f} s after the kill")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "died running" in log.read_text()          # the executor saw it and said so
    assert_same_as_undisturbed(site_file, "killed1", campaign)


@pytest.mark.slurm
def test_slurm_job_cancelled_mid_stage_heals(slurm, solo_site, campaign, tmp_path):
    """The site's only worker is a Slurm job; `scancel` ends it once stage 1 has registered
    CCDs. The cluster adapts a new job in and the campaign completes."""
    site_file = solo_site("slurm-cancel", cluster=(
        "{kind: slurm, jobs: 1, cores: 1, processes: 1, memory: 2GB, queue: debug, "
        f"walltime: '00:20:00', log_directory: {tmp_path}/logs, local_directory: {tmp_path}}}"))
    log = tmp_path / "campaign.log"
    proc = start(site_file, "cancelled1", log)

    def jobs() -> list[str]:
        out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True,
                             text=True, timeout=30).stdout
        return out.split()

    try:
        wait_until(lambda: registered(site_file, "cancelled1") >= 2, proc, log, "CCD registered")
        (job,) = jobs()
        subprocess.run(["scancel", job], check=True, timeout=30)
        cancelled = time.monotonic()
        wait_until(lambda: jobs() and jobs() != [job], proc, log, "new worker job", 180)
        replaced = time.monotonic() - cancelled
        assert finish(proc, log) == 0, log.read_text()[-3000:]
        print(f"scancelled Slurm job: a new job running after {replaced:.1f} s, campaign "
              f"done {time.monotonic() - cancelled:.1f} s after the cancel")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_same_as_undisturbed(site_file, "cancelled1", campaign)


def dask_process(*args: str, log: Path) -> subprocess.Popen:
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    return subprocess.Popen([dask, *args], start_new_session=True, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def test_cluster_lost_for_good_fails_in_deadline_then_rescue_finishes(solo_site, campaign,
                                                                      tmp_path):
    """A site on an existing scheduler whose only worker is SIGKILLed and never replaced: the
    campaign warns, fails the group inside no_worker_timeout with an error naming the site
    and what waits, and exits non-zero. With a worker back, `drp rescue` completes it."""
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = dask_process("scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--no-dashboard", "--scheduler-file", str(scheduler_file),
                             log=tmp_path / "scheduler.log")
    worker_args = ("worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                   "--no-nanny", "--no-dashboard")
    procs = [scheduler]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.2)
        address = re.search(r'"address": "([^"]+)"', scheduler_file.read_text())[1]
        worker = dask_process(*worker_args, log=tmp_path / "worker.log")
        procs.append(worker)
        site_file = solo_site("lost", cluster=(
            f"{{kind: address, address: '{address}', no_worker_warn: 5, no_worker_timeout: 20}}"))
        log = tmp_path / "campaign.log"
        proc = start(site_file, "lost1", log)
        procs.append(proc)
        wait_until(lambda: registered(site_file, "lost1") >= 2, proc, log, "CCD registered")
        os.killpg(worker.pid, signal.SIGKILL)
        lost_at = time.monotonic()
        rc = finish(proc, log)
        noticed = time.monotonic() - lost_at
        text = log.read_text()
        assert rc != 0, text[-3000:]
        assert "site solo, short pool (address" in text and "no worker for" in text, text[-3000:]
        assert re.search(r"calibrateImage.*wait", text), text[-3000:]
        assert 20 <= noticed < 20 + 60, noticed
        before = registered(site_file, "lost1")
        procs.append(dask_process(*worker_args, log=tmp_path / "worker2.log"))
        rescue = start(site_file, "lost1", tmp_path / "rescue.log", command="rescue")
        procs.append(rescue)
        rescue_start = time.monotonic()
        assert finish(rescue, tmp_path / "rescue.log") == 0, (tmp_path / "rescue.log").read_text()[-3000:]
        print(f"cluster lost for good: the group failed {noticed:.1f} s after the loss "
              f"(no_worker_timeout 20 s); drp rescue finished in "
              f"{time.monotonic() - rescue_start:.1f} s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert registered(site_file, "lost1") > before        # the rescue made what was missing
    assert_same_as_undisturbed(site_file, "lost1", campaign)
