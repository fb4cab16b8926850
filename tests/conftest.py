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

import numpy as np
import pytest
import yaml

import drp_flows  # noqa: F401  (offline Prefect defaults before Prefect is imported)
from drp_flows.sites.config import load_sites
from drp_flows.validation.simulate import SurveyConfig, load_survey, simulate_survey

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
                "postgres_url", "slurm", "solo_site"}


def pytest_configure(config):
    home = Path(os.environ.setdefault("PREFECT_HOME",
                                      str(Path(config.rootpath) / "build" / "prefect-test")))
    home.mkdir(parents=True, exist_ok=True)


def pytest_collection_modifyitems(items):
    for item in items:
        if E2E_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)
    # what re-runs or rescues the shared campaign runs after every test that reads it
    items.sort(key=lambda item: item.get_closest_marker("changes_campaign") is not None)


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
                    embargo: str = "", cluster: str = "{kind: local, jobs: 1, threads_per_worker: 1}"
                    ) -> str:
    """A site file: each site the given cluster (a LocalCluster of one single-threaded worker
    process) and keys (YAML values); `embargo` the embargo period's YAML mapping, if any."""
    lines = [f"campaign_site: {campaign_site}"] + ([f"embargo: {embargo}"] if embargo else [])
    lines.append("sites:")
    for name, keys in sites.items():
        lines += [f"  {name}:", f"    cluster: {cluster}"]
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


def postgres_server() -> str | None:
    """The PostgreSQL server `make test` starts (.ci/postgres.sh), or None if there is none
    (a failure where DRP_REQUIRE_POSTGRES=1)."""
    if subprocess.run(["pg_isready", "-h", "127.0.0.1"], capture_output=True).returncode == 0:
        return os.environ.get("DRP_TEST_POSTGRES_SERVER", "postgresql://postgres@127.0.0.1:5432")
    if os.environ.get("DRP_REQUIRE_POSTGRES") == "1":
        pytest.fail("DRP_REQUIRE_POSTGRES=1 but no PostgreSQL on 127.0.0.1:5432 (make test runs "
                    ".ci/postgres.sh to start one)")
    return None


def drop_schemas(site_file: str) -> None:
    """Drop the registry schemas of a site file's PostgreSQL sites: the test database is the
    tests' own, and a schema an earlier test or run left under the same site name is not one
    `drp setup` made for this test's site (it would refuse to wipe it)."""
    import sqlalchemy

    for site in load_sites(site_file).sites.values():
        url = site.butler.registry
        if url and url.startswith("postgresql"):
            engine = sqlalchemy.create_engine(url)
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "drp_{site.name}" CASCADE'))
            engine.dispose()


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a database on the PostgreSQL server `make test` starts (.ci/postgres.sh)."""
    server = postgres_server()
    if server is None:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (make test runs .ci/postgres.sh to start one)")
    return lambda database: f"{server}/{database}"


THREADS = "{kind: local, jobs: 1, threads_per_worker: 1, processes: false}"


@pytest.fixture(scope="session")
def three_sites(prefect_api, survey, moto_endpoint, tmp_path_factory) -> str:
    """The three sites of the shared campaign, in production form, set up from the test survey:
    frdf runs its stages as its own deployment on its own work pool, usdf and ukdf inside the
    campaign's flow run (each deployment run is a new process, ~30 s of imports and start on
    this machine, and every site's own deployments run in the README's stage-1 campaign of
    test_deployments), each on a cluster of threads; every registry on PostgreSQL where the
    machine has it (a schema per site), SQLite otherwise. usdf is the campaign and embargo
    site, tracts 4 and 5, with a cluster of its own for long quanta; frdf has tracts 1 to 3;
    ukdf tract 0, its storage and Butler datastore on S3 (a moto_server, whose every request
    costs this machine's CPU: one tract keeps the site as quick as the others). The survey's
    last two visits are under embargo."""
    from drp_flows.flows.setup import setup_flow

    root = tmp_path_factory.mktemp("sites")
    server = postgres_server()
    registry = {"butler": f'{{registry: "{server}/drp_test"}}'} if server else {}
    site_file = write_site_file(root / "sites.yaml", "usdf", {
        "usdf": {"long_cluster": THREADS,
                 "storage": f"file://{root}/usdf", "embargo": "true", "sky": "{tracts: [4, 5]}",
                 **registry},
        "frdf": {"deployment": "drp-site-stage/frdf", "storage": f"file://{root}/frdf",
                 "sky": "{tracts: [1, 2, 3]}", **registry},
        "ukdf": {"storage": f"s3://{UKDF_BUCKET}/drp",
                 "butler": f"{{repo: {root}/ukdf-repo"
                           + (f', registry: "{server}/drp_test"}}' if server else "}"),
                 "storage_options": f'{{endpoint_url: "{moto_endpoint}"}}',
                 "sky": "{tracts: [0]}"},
    }, embargo=last_visits_embargo(survey), cluster=THREADS)
    drop_schemas(site_file)
    setup_flow(site_file, str(survey))
    return site_file


def in_process(site_file: str) -> str:
    """The same sites without their deployments: a campaign run here runs their stages in its
    own process (as `drp campaign` on one machine does)."""
    sites = yaml.safe_load(Path(site_file).read_text())
    for site in sites["sites"].values():
        site.pop("deployment", None)
    path = Path(site_file).with_name("in-process.yaml")
    path.write_text(yaml.safe_dump(sites))
    return str(path)


@dataclass
class Campaign:
    """The shared campaign: its name and site files (with the sites' deployments and without),
    what the campaign left at its campaign site (`drp report` reads it), the CCD whose raw was
    truncated at frdf before it ran, the embargoed visits, and the operations it ran in: their
    environment (the Prefect server) and its flow run."""

    name: str
    site_file: str
    in_process: str
    result: dict
    corrupt: dict
    embargoed: set[int]
    env: dict
    flow_run: dict


@pytest.fixture(scope="session")
def campaign(three_sites, survey, tmp_path_factory) -> Campaign:
    """One whole three-site campaign with QA against truth, shared by every test that only reads
    its results, run as operators run it: a `prefect server` (PostgreSQL where the machine has
    it), the sites' work pools and workers by `drp workers`, the deployments deployed and
    `prefect deployment run drp-campaign/campaign`. Visit groups of at most 5 visits, a tract a
    group, and one truncated raw at frdf."""
    from drp_flows.flows.campaign import read_summary
    from drp_flows.sites.butler import open_butler
    from prefect_ops import deployment_run, flow_run_named, operations

    sites = load_sites(three_sites)
    corrupt = corrupt_raw(sites["frdf"])
    embargoed = sites.embargo.embargoed_exposures(open_butler(sites["usdf"]))
    server = postgres_server()
    database = None
    if server:
        database = f"{server}/drp_prefect_campaign"
        for sql in ("DROP DATABASE IF EXISTS drp_prefect_campaign WITH (FORCE)",
                    "CREATE DATABASE drp_prefect_campaign"):
            subprocess.run(["psql", f"{server}/postgres", "-qc", sql], check=True)
        database = database.replace("postgresql://", "postgresql+asyncpg://")
    with operations(tmp_path_factory.mktemp("operations"), database_url=database,
                    site_file=three_sites) as (env, stop_workers):
        deployment_run(env, "drp-campaign/campaign", site_file=three_sites, campaign=CAMPAIGN,
                       survey=str(survey), **{k: str(v) for k, v in CAMPAIGN_GROUPS.items()})
        stop_workers()                # idle, they would poll the server for the whole session
        result = read_summary(sites[sites.campaign_site], CAMPAIGN)
        yield Campaign(CAMPAIGN, three_sites, in_process(three_sites), result, corrupt,
                       embargoed, env, flow_run_named(env, CAMPAIGN))


def slurm_available() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture
def slurm():
    """The single-node Slurm `make test` starts (.ci/slurm.sh); skipped where there is none
    (a failure where DRP_REQUIRE_SLURM=1)."""
    if not slurm_available():
        reason = "no running Slurm (make test provisions one when run as root on Debian)"
        if os.environ.get("DRP_REQUIRE_SLURM") == "1":
            pytest.fail(f"DRP_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def have(command: str) -> bool:
    return shutil.which(command) is not None


@pytest.fixture(scope="session")
def solo_site(prefect_api, survey, tmp_path_factory):
    """One site set up once from the test survey with ukdf's share of the sky (tract 0), for
    the campaigns that run stage 1 alone: `solo_site(name, cluster)` writes a site file for
    it with the given cluster (YAML) and keys. Each test runs campaigns of its own names."""
    from drp_flows.flows.setup import setup_flow

    root = tmp_path_factory.mktemp("solo")

    def site_file(name: str, cluster: str = "{kind: local, jobs: 1, threads_per_worker: 1}",
                  **keys: str) -> str:
        return write_site_file(root / f"{name}.yaml", "solo", {
            "solo": {"storage": f"file://{root}/solo", "sky": "{tracts: [0]}", **keys}},
            cluster=cluster)

    setup_flow(site_file("setup"), str(survey))
    return site_file


def registered(site_file: str, campaign: str, dataset_type: str = "preliminary_visit_image") -> int:
    """Datasets of a type registered at the site file's campaign site for a campaign (every
    RUN of its chain, not find-first)."""
    from drp_flows.datamodel import campaign_collection
    from drp_flows.engine.planning import existing_collections
    from drp_flows.sites.butler import open_butler

    sites = load_sites(site_file)
    butler = open_butler(sites[sites.campaign_site])
    collections = existing_collections(butler, [campaign_collection(campaign)])
    return len(list(butler.registry.queryDatasets(dataset_type, collections=collections))
               ) if collections else 0


def table_differences(key, a, b, precision: float = 1e-9) -> list[str]:
    """Where two tables differ: row counts, floats beyond `precision` of the value or of the
    column's largest value, anything else. The column's scale, because a value that is a
    small difference of large ones (a DIA flux on a star, a chi2 probability in the tail)
    carries the rounding of its terms: seen once in CI, the shared campaign's DIA fluxes
    differed from the one-site run's by 3e-6 nJy (1e-9 of the tract's largest flux) while
    calexps, templates and difference images were bit-identical in a local rerun."""
    if len(a) != len(b):
        return [f"{key}: {len(a)} rows vs {len(b)}"]
    out = []
    for col in a.colnames:
        x, y = np.asarray(a[col]), np.asarray(b[col])
        if x.dtype.kind == "f":
            scale = np.nanmax(np.abs(x), initial=0.0)
            if not np.allclose(x, y, rtol=precision, atol=precision * scale, equal_nan=True):
                out.append(f"{key} {col}: largest difference {np.nanmax(np.abs(x - y)):.3g}")
        elif not np.array_equal(x, y):
            out.append(f"{key} {col}: {np.sum(x != y)} values differ")
    return out


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


FAKE_SECRETS = {"AWS_ACCESS_KEY_ID": "DRPFAKEKEYID4Q7Z9W", "AWS_SECRET_ACCESS_KEY":
                "drp-fake-secret-kV83nQ1x", "PGPASSWORD": "drp-fake-pgpass-Ht52mZ0r"}


@pytest.fixture(scope="session")
def s3_credentials(monkeypatch_session):
    """moto accepts any keys; s3fs, boto3 and lsst.resources read them from the environment.
    They, and a PostgreSQL password (the test server trusts local connections and never asks
    for it), are recognisable fakes: test_campaign.py looks for them in every file and log."""
    for key, value in {"AWS_DEFAULT_REGION": "us-east-1", **FAKE_SECRETS}.items():
        monkeypatch_session.setenv(key, value)
