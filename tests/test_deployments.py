"""Operations end to end, with the README's commands (tests/prefect_ops.py): a real `prefect
server`, a process work pool and a worker per site, the deployments of
deployments/prefect.yaml; `prefect deployment run 'drp-campaign/campaign'` of a small
three-site campaign whose every stage runs as a run of its site's deployment on its site's
worker, with the Prefect API on SQLite and again with it and the Butler registries on
PostgreSQL; the weekly deployment's schedule, and two weekly runs a week apart."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from astropy.time import Time
from lsst.daf.butler import Config

from drp_flows.flows.stages import read_progress, site_visits
from drp_flows.flows.weekly import released_query, weekly_name
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites
from drp_flows.tasks.simulate import FIRST_NIGHT_MJD
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


@pytest.mark.timeout(1800)
def test_deployment_run_completes_three_site_campaign(sqlite_ops):
    env, flow_run = sqlite_ops
    check_campaign(env, SITE_FILE, "ops1", flow_run)


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
    reuses every single frame of the first instead of redoing it."""
    env, _ = sqlite_ops
    monkeypatch.setenv("DRP_DATA", env["DRP_DATA"])
    site_file = tmp_path / "sites.yaml"
    site_file.write_text((ROOT / SITE_FILE).read_text() + "embargo: {hours: 24}\n")
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


@pytest.fixture(scope="module")
def postgres_ops(postgres_url, survey, tmp_path_factory):
    """The same operations with the Prefect API database and every site's Butler registry on
    PostgreSQL (a fresh database for the server; a schema per site in drp_test), the pools
    and workers started by `drp workers`."""
    database = "drp_prefect_ops"
    for sql in (f"DROP DATABASE IF EXISTS {database} WITH (FORCE)", f"CREATE DATABASE {database}"):
        subprocess.run(["psql", postgres_url("postgres"), "-qc", sql], check=True)
    tmp = tmp_path_factory.mktemp("ops-pg")
    sites = yaml.safe_load((ROOT / SITE_FILE).read_text())
    for site in sites["sites"].values():
        site["butler"] = {"registry": postgres_url("drp_test")}
    site_file = tmp / "sites.yaml"
    site_file.write_text(yaml.safe_dump(sites))
    server_db = postgres_url(database).replace("postgresql://", "postgresql+asyncpg://")
    with operations(tmp, database_url=server_db, site_file=str(site_file)) as env:
        yield env, str(site_file), run_campaign(env, survey, str(site_file), "ops2"), database


@pytest.mark.timeout(1800)
def test_postgres_deployment_run_completes_three_site_campaign(postgres_ops, postgres_url):
    env, site_file, flow_run, database = postgres_ops
    check_campaign(env, site_file, "ops2", flow_run)
    # and it was PostgreSQL underneath: the server's flow runs, every site's registry
    count = subprocess.run(["psql", postgres_url(database), "-tAc",
                            "SELECT count(*) FROM flow_run WHERE name LIKE 'ops2%'"],
                           check=True, capture_output=True, text=True).stdout
    assert int(count) > len(SITES) * 4
    for site in load_sites(site_file, DRP_DATA=env["DRP_DATA"]).sites.values():
        assert Config(f"{site.repo_dir}/butler.yaml")["registry", "db"] == postgres_url("drp_test")
