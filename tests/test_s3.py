"""A site whose storage and Butler datastore are S3, on a real moto_server process."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from lsst.daf.butler import Butler

from drp_flows.sites.config import load_sites
from drp_flows.tasks.camera import INSTRUMENT

BUCKET = "rubin-cloud"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint(monkeypatch_session):
    port = _free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120          # a busy machine starts it slowly
    while True:
        try:
            requests.get(endpoint, timeout=10)
            break
        except requests.RequestException:      # refused while starting, or slow to answer
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch_session.setenv(key, value)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    proc.terminate()
    proc.wait(10)


def test_s3_site_setup_and_campaign(prefect_api, survey, moto_endpoint, one_site_file, tmp_path):
    from drp_flows.flows.campaign import campaign_flow
    from drp_flows.flows.setup import setup_flow

    s3_site_file = one_site_file("cloud", storage=f"s3://{BUCKET}/drp",
                                 storage_options=f'{{endpoint_url: "{moto_endpoint}"}}',
                                 butler=f"{{repo: {tmp_path / 'repo'}}}", sky="{tracts: [0]}")
    (row,) = setup_flow(s3_site_file, str(survey))
    assert row["raws"] == 9 * row["visits"] and row["visits"] >= 1
    result = campaign_flow(s3_site_file, "s3test")
    errors = "\n".join(f["error"] for f in result["quarantined"])
    assert all(r["failed"] == 0 and r["done"] == r["total"] for r in result["progress"]), errors

    site = load_sites(s3_site_file)["cloud"]
    site.store.butler_uri()          # this process's lsst.resources profile for the endpoint
    butler = Butler.from_config(site.repo_dir, collections="ComCamSim/runs/s3test")
    refs = list(butler.registry.queryDatasets("preliminary_visit_image"))
    assert len(refs) == 9 * row["visits"]
    uri = butler.getURI(refs[0])
    assert uri.scheme == "s3" and BUCKET in str(uri)
    assert butler.get(refs[0])["IMAGE"].data.shape == (384, 384)
    raw_uri = butler.getURI("raw", instrument=INSTRUMENT, exposure=refs[0].dataId["visit"],
                            detector=0, collections="ComCamSim/raw/all")
    assert raw_uri.scheme == "s3"
    # the bytes are in the bucket, beside the site's other files
    keys = site.store.fs.find(f"{BUCKET}/drp/repo/ComCamSim/runs/s3test")
    assert sum("preliminary_visit_image" in k for k in keys) == 9 * row["visits"]
