"""Shared fixtures: a Prefect API for the session, a small simulated survey, three local sites."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import drp_flows  # noqa: F401  (offline Prefect defaults before Prefect is imported)
from drp_flows.tasks.simulate import SurveyConfig, simulate_survey

# Small but real: 384 px CCDs, two nights of two rounds: each tract seen in two bands, twice
# each (24 visits, 216 CCDs, all bands over the six tracts). Three asteroids a tract: two
# nights cannot make them linkable, so the demo's density would only crowd the small CCDs.
TEST_SURVEY = SurveyConfig(ccd_size=384, nights=2, rounds_per_night=2, n_bias=3, n_dark=2,
                           n_flat=2, asteroids_per_tract=3)


def pytest_configure(config):
    home = Path(os.environ.setdefault("PREFECT_HOME",
                                      str(Path(config.rootpath) / "build" / "prefect-test")))
    home.mkdir(parents=True, exist_ok=True)


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
def data_dir(tmp_path_factory, monkeypatch_session) -> Path:
    path = tmp_path_factory.mktemp("sites")
    monkeypatch_session.setenv("DRP_DATA", str(path))
    return path


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def local_sites(prefect_api, survey, data_dir) -> str:
    """The embedded default (usdf, frdf, ukdf) set up from the test survey."""
    from drp_flows.flows.setup import setup_flow
    from drp_flows.sites.config import LOCAL_SITES

    setup_flow(str(LOCAL_SITES), str(survey))
    return str(LOCAL_SITES)


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
        lines = [f"campaign_site: {name}", "sites:", f"  {name}:",
                 "    cluster: {kind: local, jobs: 1}"] + [f"    {k}: {v}" for k, v in keys.items()]
        path = tmp_path / f"{name}-sites.yaml"
        path.write_text("\n".join(lines) + "\n")
        return str(path)
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


@pytest.fixture(scope="session")
def sqlite_ops(survey, tmp_path_factory):
    """A real `prefect server` (SQLite) with a pool and worker per site and the deployments,
    after `prefect deployment run drp-campaign/campaign` of a small campaign `ops1`: its
    environment and the campaign's flow run (tests/test_deployments.py, tests/test_ui.py)."""
    from prefect_ops import SITE_FILE, operations, run_campaign

    with operations(tmp_path_factory.mktemp("ops")) as env:
        yield env, run_campaign(env, survey, SITE_FILE, "ops1")
