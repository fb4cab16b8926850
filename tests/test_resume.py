"""An interrupted campaign resumes without recomputing: `drp campaign` is killed (SIGKILL, with
its Dask workers) once stage 1 has registered some of its CCDs; the re-run of stage 1 skips
exactly those and finishes the rest. Until the kill, its log (stdout, not a terminal) had a
plain progress line at the interval it was given."""

import os
import re
import signal
import subprocess
import sys
import time

from conftest import registered
from prefect.settings import PREFECT_API_URL

from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites

CAMPAIGN = "interrupted1"


def calibrated(site_file: str) -> int:
    return registered(site_file, CAMPAIGN)


def test_killed_campaign_resumes_without_recomputing(solo_site, tmp_path):
    from drp_flows.flows.campaign import campaign_flow

    site_file = solo_site("resume")
    total = len(list(open_butler(load_sites(site_file)["solo"]).registry.queryDatasets(
        "raw", collections="ComCamSim/raw/all")))
    drp = os.path.join(os.path.dirname(sys.executable), "drp")
    log = tmp_path / "campaign.log"
    proc = subprocess.Popen([drp, "campaign", CAMPAIGN, "--sites", site_file, "--group-size", "2",
                             "--batch-size", "3"], start_new_session=True,
                            env=os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(),
                                              "DRP_PROGRESS_SECONDS": "1"},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while calibrated(site_file) < 3:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "stage 1 registered nothing in 10 minutes"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = calibrated(site_file)
    assert 3 <= before < total, "the kill came after stage 1: nothing left to resume"
    beats = re.findall(r"^\[(\d+)m(\d\d)s\] (.*)$", log.read_text(), re.MULTILINE)
    seconds = [60 * int(m) + int(s) for m, s, _ in beats]
    assert beats and max(b - a for a, b in zip([0, *seconds], seconds, strict=False)) <= 10, beats
    shown = [re.fullmatch(r"progress: solo stage1 calibrateImage (\d+)/(\d+), 0 failed", line)
             for _, _, line in beats]
    assert any(shown), beats
    assert all(int(m[1]) <= int(m[2]) <= total for m in shown if m), beats

    result = campaign_flow(site_file, CAMPAIGN, stages=["stage1"], group_size=2, batch_size=3)
    calib = [r for r in result["progress"] if r["step"] == "calibrateImage"]
    assert sum(r["skipped"] for r in calib) == before
    assert sum(r["done"] for r in calib) == total - before
    assert calibrated(site_file) == total          # each CCD once: nothing made twice
    assert not result["quarantined"], result["quarantined"][:3]
    assert all(r["done"] + r["skipped"] == r["total"] for r in result["progress"])
