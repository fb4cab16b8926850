"""Shared fixtures: a Prefect API for the session, a small simulated survey, three local sites."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

import drp_flows  # noqa: F401  (offline Prefect defaults before Prefect is imported)
from drp_flows.sites.config import load_sites
from drp_flows.tasks.simulate import SurveyConfig, load_survey, simulate_survey

# Small but real: 384 px CCDs, two nights of two rounds: each tract seen in two bands, twice
# each (24 visits, 216 CCDs, all bands over the six tracts). Three asteroids a tract: two
# nights cannot make them linkable, so the demo's density would only crowd the small CCDs.
TEST_SURVEY = SurveyConfig(ccd_size=384, nights=2, rounds_per_night=2, n_bias=3, n_dark=2,
                           n_flat=2, asteroids_per_tract=3)
CAMPAIGN = "test1"                  # the shared three-site campaign
CAMPAIGN_GROUPS = {"group_size": 5, "tracts_per_group": 1}
UKDF_BUCKET = "ukdf-drp"


# Tests that need any of these are end to end (`make test` only; `make test-fast` leaves them out)
E2E_FIXTURES = {"prefect_api", "three_sites", "campaign", "sqlite_ops", "postgres_ops",
                "postgres_url", "slurm"}


def pytest_configure(config):
    home = Path(os.environ.setdefault("PREFECT_HOME",
                                      str(Path(config.rootpath) / "build" / "prefect-test")))
    home.mkdir(parents=True, exist_ok=True)


def pytest_collection_modifyitems(items):
    for item in items:
        if E2E_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def prefect_api():
    """One ephemeral Prefect API (SQLite) for all tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def survey(tmp_path_factory) -> Path:
    return simulate_survey(TEST_SURVEY, tmp_path_factory.mktemp("survey"))


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def write_site_file(path: Path, campaign_site: str, sites: dict[str, dict[str, str]],
                    embargo: str = "") -> str:
    """A site file: each site a LocalCluster of one single-threaded worker and the given keys
    (YAML values); `embargo` the embargo period's YAML mapping, if any."""
    lines = [f"campaign_site: {campaign_site}"] + ([f"embargo: {embargo}"] if embargo else [])
    lines.append("sites:")
    for name, keys in sites.items():
        lines += [f"  {name}:", "    cluster: {kind: local, jobs: 1, threads_per_worker: 1}"]
        lines += [f"    {k}: {v}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def last_visits_embargo(survey: Path) -> str:
    """An embargo period that covers the survey's last two visits (they began less than an hour
    before its `now`), which aim at tracts 4 and 5."""
    from astropy.time import Time

    _, visits = load_survey(survey)
    visits.sort("mjd")
    assert set(visits["tract"][-2:]) == {4, 5}
    last = Time(visits["mjd"][-1], format="mjd", scale="tai").utc.to_datetime()
    return f"{{hours: 1, now: '{(last + timedelta(minutes=57)).isoformat()}'}}"


def corrupt_raw(site, visit: int | None = None, detector: int | None = None) -> dict:
    """Truncate a raw in a site's datastore (the fifth in order, or that of the given CCD):
    that CCD must be quarantined and the rest go on. Returns its CCD, path and original bytes."""
    from drp_flows.sites.butler import open_butler

    butler = open_butler(site)
    refs = sorted(butler.registry.queryDatasets("raw", collections="ComCamSim/raw/all"),
                  key=lambda r: (r.dataId["exposure"], r.dataId["detector"]))
    ref = refs[4] if visit is None else next(
        r for r in refs if (r.dataId["exposure"], r.dataId["detector"]) == (visit, detector))
    path = butler.getURI(ref).ospath
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])
    return {"visit": int(ref.dataId["exposure"]), "detector": int(ref.dataId["detector"]),
            "path": path, "original": data}


@pytest.fixture(scope="session")
def moto_endpoint(s3_credentials):
    """One moto_server for the session, with ukdf's bucket."""
    with moto_server(UKDF_BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def three_sites(prefect_api, survey, moto_endpoint, tmp_path_factory) -> str:
    """The three sites of the shared campaign, set up from the test survey: usdf, the campaign
    and embargo site, tracts 4 and 5, with a cluster of its own for long quanta; frdf, tracts 1
    to 3; ukdf, tract 0, whose storage and Butler datastore are on S3 (a moto_server, whose
    every request costs this machine's CPU: one tract keeps the site as quick as the others).
    The survey's last two visits are under embargo."""
    from drp_flows.flows.setup import setup_flow

    root = tmp_path_factory.mktemp("sites")
    site_file = write_site_file(root / "sites.yaml", "usdf", {
        "usdf": {"long_cluster": "{kind: local, jobs: 1, threads_per_worker: 1}",
                 "storage": f"file://{root}/usdf", "embargo": "true", "sky": "{tracts: [4, 5]}"},
        "frdf": {"storage": f"file://{root}/frdf", "sky": "{tracts: [1, 2, 3]}"},
        "ukdf": {"storage": f"s3://{UKDF_BUCKET}/drp", "butler": f"{{repo: {root}/ukdf-repo}}",
                 "storage_options": f'{{endpoint_url: "{moto_endpoint}"}}',
                 "sky": "{tracts: [0]}"},
    }, embargo=last_visits_embargo(survey))
    setup_flow(site_file, str(survey))
    return site_file


@dataclass
class Campaign:
    """The shared campaign: its name, site file, what `campaign_flow` returned, the CCD whose
    raw was truncated at frdf before it ran, and the embargoed visits."""

    name: str
    site_file: str
    result: dict
    corrupt: dict
    embargoed: set[int]


@pytest.fixture(scope="session")
def campaign(three_sites, survey) -> Campaign:
    """One whole three-site campaign with QA against truth, shared by every test that only reads
    its results: visit groups of at most 5 visits (each site's 8 in two), a tract a group,
    and one truncated raw at frdf."""
    from drp_flows.flows.campaign import campaign_flow
    from drp_flows.sites.butler import open_butler

    sites = load_sites(three_sites)
    corrupt = corrupt_raw(sites["frdf"])
    result = campaign_flow(three_sites, CAMPAIGN, survey=str(survey), **CAMPAIGN_GROUPS)
    embargoed = sites.embargo.embargoed_exposures(open_butler(sites["usdf"]))
    return Campaign(CAMPAIGN, three_sites, result, corrupt, embargoed)


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a database on the PostgreSQL server `make test` starts (.ci/postgres.sh)."""
    ready = subprocess.run(["pg_isready", "-h", "127.0.0.1"], capture_output=True).returncode == 0
    if not ready:
        reason = "no PostgreSQL on 127.0.0.1:5432 (make test runs .ci/postgres.sh to start one)"
        if os.environ.get("DRP_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"DRP_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    server = os.environ.get("DRP_TEST_POSTGRES_SERVER", "postgresql://postgres@127.0.0.1:5432")
    return lambda database: f"{server}/{database}"


def have(command: str) -> bool:
    return shutil.which(command) is not None


@pytest.fixture
def one_site_file(tmp_path):
    """Write a site file with one site `name` on a LocalCluster; keys are YAML values."""
    def write(name: str, **keys: str) -> str:
        return write_site_file(tmp_path / f"{name}-sites.yaml", name, {name: keys})
    return write


@contextmanager
def moto_server(*buckets: str):
    """A real moto_server process (an S3 endpoint of its own) with the given buckets."""
    import boto3
    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120          # a busy machine starts it slowly
    try:
        while True:
            try:
                requests.get(endpoint, timeout=10)
                break
            except requests.RequestException:  # refused while starting, or slow to answer
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def s3_credentials(monkeypatch_session):
    """moto accepts any keys; s3fs, boto3 and lsst.resources read them from the environment."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch_session.setenv(key, value)
