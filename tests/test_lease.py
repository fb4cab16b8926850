"""One campaign, one runner: the lease in the campaign site's registry refuses a second
runner, naming the first, and is taken over when its holder died (a process of this host
that is gone, or a heartbeat gone stale)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from lsst.daf.butler import CollectionType

from drp_flows.engine.lease import LEASES, CampaignBusy, CampaignLease
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites

HOLD = """
import sys, time
from drp_flows.engine.lease import CampaignLease
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites
butler = open_butler(load_sites(sys.argv[1])["solo"], writeable=True)
try:
    with CampaignLease(butler, sys.argv[2], flow_run="run-" + sys.argv[3], beat=0.5):
        print("holding", flush=True)
        time.sleep(float(sys.argv[4]))
except Exception as e:
    print(type(e).__name__, e, flush=True)
"""


@pytest.fixture(scope="module")
def butler(solo_site):
    return open_butler(load_sites(solo_site("lease"))["solo"], writeable=True)


def hold(site_file: str, campaign: str, tag: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, site_file, campaign, tag, str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def test_a_second_runner_is_refused_naming_the_first(butler):
    with CampaignLease(butler, "lease1", flow_run="first-run"):
        with pytest.raises(CampaignBusy) as busy, CampaignLease(butler, "lease1"):
            pass
        assert f"being run by process {os.getpid()}" in str(busy.value)
        assert "flow run first-run" in str(busy.value)
        with CampaignLease(butler, "lease2"):      # another campaign is free
            pass
    with CampaignLease(butler, "lease1"):          # released: free again
        pass
    assert not list(butler.registry.queryCollections(LEASES + "*"))


def test_of_runners_started_at_once_one_holds_the_lease(solo_site):
    site_file = solo_site("lease")
    procs = [hold(site_file, "race", str(i), 4) for i in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sum(o.startswith("holding") for o in outs) == 1, outs
    assert sum("CampaignBusy campaign race is being run by process" in o for o in outs) == 3, outs


def test_a_dead_holders_lease_is_taken_over(solo_site, butler):
    """A holder SIGKILLed on this host is gone at once; one on another host whose heartbeat
    stopped, once it is stale."""
    proc = hold(solo_site("lease"), "killed", "k", 600)
    assert proc.stdout.readline().startswith("holding")
    with pytest.raises(CampaignBusy, match=f"process {proc.pid}"), CampaignLease(butler, "killed"):
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    with CampaignLease(butler, "killed"):
        pass
    elsewhere = {"host": "node-that-vanished", "pid": 1, "flow_run": "", "started": "",
                 "beat": time.time()}
    butler.registry.registerCollection(LEASES + "remote", CollectionType.TAGGED,
                                       doc=json.dumps(elsewhere))
    with pytest.raises(CampaignBusy, match="on node-that-vanished"), \
            CampaignLease(butler, "remote", stale=60):
        pass
    butler.registry.setCollectionDocumentation(LEASES + "remote",
                                               json.dumps(elsewhere | {"beat": time.time() - 61}))
    with CampaignLease(butler, "remote", stale=60):
        pass


def test_the_heartbeat_keeps_a_long_run_alive(butler):
    with CampaignLease(butler, "beating", beat=0.2) as lease:
        first = json.loads(butler.registry.getCollectionDocumentation(lease.name))["beat"]
        time.sleep(1.0)
        later = json.loads(butler.registry.getCollectionDocumentation(lease.name))["beat"]
    assert later > first + 0.5


def test_two_campaigns_at_once_the_second_is_refused(solo_site, tmp_path):
    """`drp campaign twice1` twice at once: the second exits 2 naming the first (which had
    processed the same CCDs alongside it); the first killed, its lease is taken over."""
    from prefect.settings import PREFECT_API_URL

    site_file = solo_site("twice")
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    drp = [os.path.join(os.path.dirname(sys.executable), "drp"), "campaign", "twice1",
           "--sites", site_file, "--stage", "stage1"]
    log = tmp_path / "first.log"
    first = subprocess.Popen(drp, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    butler = open_butler(load_sites(site_file)["solo"], writeable=True)
    try:
        deadline = time.monotonic() + 120
        while LEASES + "twice1" not in butler.registry.queryCollections(LEASES + "*"):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run took no lease in 120 s"
            time.sleep(0.2)
        second = subprocess.run(drp, capture_output=True, text=True, env=env, timeout=300)
        assert first.poll() is None, "the first ended before the second was refused"
        said = " ".join((second.stdout + second.stderr).split())
        assert second.returncode == 2, said[-3000:]
        assert f"error: campaign twice1 is being run by process {first.pid} on" in said
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    with CampaignLease(butler, "twice1"):          # its holder is dead: taken over
        pass
