"""A site whose Butler registry is PostgreSQL (the production configuration)."""

import os
import subprocess

import pytest
from lsst.daf.butler import Butler, Config

from drp_flows.sites.config import load_sites

URL = os.environ.get("DRP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/drp_test")


@pytest.fixture(scope="module")
def postgres():
    ready = subprocess.run(["pg_isready", "-h", "127.0.0.1"], capture_output=True).returncode == 0
    if not ready:
        reason = "no PostgreSQL on 127.0.0.1:5432 (make test runs .ci/postgres.sh to start one)"
        if os.environ.get("DRP_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"DRP_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    return URL


def test_postgres_registry_setup_and_campaign(postgres, prefect_api, survey, tmp_path,
                                              one_site_file):
    from drp_flows.flows.campaign import campaign_flow
    from drp_flows.flows.setup import setup_flow

    site_file = one_site_file("pg", storage=f"file://{tmp_path}/pg",
                              butler=f'{{registry: "{postgres}"}}', sky="{tracts: [1]}")
    (row,) = setup_flow(str(site_file), str(survey))
    result = campaign_flow(str(site_file), "pgtest")
    assert all(r["failed"] == 0 and r["done"] == r["total"] for r in result["progress"])

    site = load_sites(site_file)["pg"]
    butler = Butler.from_config(site.repo_dir, collections="ComCamSim/runs/pgtest")
    assert Config(f"{site.repo_dir}/butler.yaml")["registry", "db"] == postgres
    assert len(list(butler.registry.queryDatasets("preliminary_visit_image"))) == 9 * row["visits"]
    # a second setup wipes the site's schema and starts clean
    setup_flow(str(site_file), str(survey))
    butler = Butler.from_config(site.repo_dir)
    assert not list(butler.registry.queryCollections("ComCamSim/runs/*"))
