"""A site whose storage and Butler datastore are S3, on a real moto_server process."""


import pytest
from conftest import moto_server
from lsst.daf.butler import Butler

from drp_flows.sites.config import load_sites
from drp_flows.tasks.camera import INSTRUMENT

BUCKET = "rubin-cloud"


@pytest.fixture(scope="module")
def moto_endpoint(s3_credentials):
    with moto_server(BUCKET) as endpoint:
        yield endpoint


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
