"""Operations end to end, with the README's commands (tests/prefect_ops.py): a real `prefect
server`, a process work pool and a worker per site, the deployments of
deployments/prefect.yaml; `prefect deployment run 'drp-campaign/campaign'` of a small
three-site campaign whose every stage runs as a run of its site's deployment on its site's
worker (stage 1 of it here; the whole campaign runs in tests/test_production.py); the weekly
deployment's schedule, and two weekly runs a week apart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from astropy.time import Time
from conftest import in_process

from drp_flows.flows.stages import read_progress, site_visits
from drp_flows.flows.weekly import released_query, weekly_name
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites
from drp_flows.validation.simulate import FIRST_NIGHT_MJD
from prefect_ops import (
    ROOT,
    SITE_FILE,
    SITES,
    WHERE,
    api,
    check_campaign,
    deployment_run,
    flow_run_named,
    operations,
    run_campaign,
)


@pytest.fixture(scope="module")
def sqlite_ops(survey, tmp_path_factory):
    """The README's operations: a real `prefect server` (SQLite), a pool and worker per site
    made with `prefect` commands, the deployments, and `prefect deployment run
    drp-campaign/campaign` of stage 1 of a small campaign `ops1`: its environment and the
    campaign's flow run."""
    with operations(tmp_path_factory.mktemp("ops")) as (env, _):
        yield env, run_campaign(env, survey, SITE_FILE, "ops1", stages=["stage1"])


@pytest.mark.timeout(1800)
def test_deployment_run_completes_stage1_of_three_site_campaign(sqlite_ops, survey):
    env, flow_run = sqlite_ops
    check_campaign(env, survey, SITE_FILE, "ops1", flow_run, stages=("stage1",))


def test_weekly_deployment_is_scheduled_mondays_0600_utc(sqlite_ops):
    """The server's scheduler has put the weekly runs on the next Mondays at 06:00 UTC, a week
    apart, each with the deployment's site file and no `as_of` (the run takes its own time)."""
    env, _ = sqlite_ops
    (weekly,) = [d for d in api(env, "POST", "/deployments/filter", {}) if d["name"] == "weekly"]
    (schedule,) = weekly["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 6 * * 1"
    assert schedule["schedule"]["timezone"] == "UTC"
    runs = api(env, "POST", "/flow_runs/filter", {
        "deployments": {"id": {"any_": [weekly["id"]]}}, "flow_runs": {"state": {"type": {
            "any_": ["SCHEDULED"]}}}, "sort": "EXPECTED_START_TIME_ASC"})
    times = [datetime.fromisoformat(r["expected_start_time"]) for r in runs]
    assert len(times) >= 3, runs
    created = datetime.fromisoformat(weekly["created"])
    monday = (created + timedelta(days=(7 - created.weekday()) % 7)).replace(
        hour=6, minute=0, second=0, microsecond=0)
    first = monday if monday > created else monday + timedelta(days=7)
    assert times == [first + timedelta(weeks=k) for k in range(len(times))], (created, times)
    assert all(r["auto_scheduled"] and r["parameters"] == {"site_file": SITE_FILE} for r in runs)
    weeks = [weekly_name(t) for t in times]
    assert len(set(weeks)) == len(weeks), weeks     # one campaign w_YYYY_WW a run


def calibrated(site, campaign: str) -> dict:
    """A campaign's calibrateImage quanta at a site: done, skipped (found done), failed."""
    rows = [r for r in read_progress(site, campaign, "stage1") if r["step"] == "calibrateImage"]
    return {k: sum(r[k] for r in rows) for k in ("done", "skipped", "failed")}


@pytest.mark.timeout(1800)
def test_weekly_runs_take_released_exposures_and_redo_nothing(sqlite_ops, tmp_path, monkeypatch):
    """Two weekly runs of stage 1, a week apart, with a 24-hour embargo: the first has the
    first night only (the second is under embargo), the second takes the second night too and
    reuses every single frame of the first instead of redoing it. The sites run inside the
    weekly's flow run (their deployments ran in the stage-1 campaign above)."""
    env, _ = sqlite_ops
    monkeypatch.setenv("DRP_DATA", env["DRP_DATA"])
    with_deployments = tmp_path / "sites.yaml"
    with_deployments.write_text((ROOT / SITE_FILE).read_text() + "embargo: {hours: 24}\n")
    site_file = in_process(str(with_deployments))
    night2 = Time(FIRST_NIGHT_MJD + 1, format="mjd").to_datetime(timezone=UTC)
    week1 = night2 + timedelta(hours=24)      # the second night still under embargo
    week2 = week1 + timedelta(weeks=1)
    for as_of in (week1, week2):
        deployment_run(env, "drp-weekly/weekly", timeout=1200, site_file=str(site_file),
                       as_of=as_of.isoformat(), where=WHERE, stages='["stage1"]')
        assert flow_run_named(env, f"weekly-{weekly_name(as_of)}")["state_type"] == "COMPLETED"
    first, second = weekly_name(week1), weekly_name(week2)
    assert (first, second) == ("w_2025_47", "w_2025_48")
    sites = load_sites(site_file)
    for site in SITES:
        released = [set(site_visits(str(site_file), site, f"{released_query(str(site_file), t)} "
                                                         f"AND ({WHERE})")) for t in (week1, week2)]
        assert released[0] and released[0] < released[1], (site, released)
        assert calibrated(sites[site], first) == {"done": 9 * len(released[0]), "skipped": 0,
                                                  "failed": 0}, site
        assert calibrated(sites[site], second) == {"done": 9 * len(released[1] - released[0]),
                                                   "skipped": 9 * len(released[0]), "failed": 0}, site
        butler = open_butler(sites[site])
        images = {int(r.dataId["visit"]) for r in butler.registry.queryDatasets(
            "preliminary_visit_image", collections=f"ComCamSim/runs/{second}")}
        assert images == released[1], site
