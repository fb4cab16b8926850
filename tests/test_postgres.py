"""A site whose Butler registry is PostgreSQL (the production configuration)."""

from lsst.daf.butler import Butler, Config

from drp_flows.sites.config import load_sites


def test_postgres_registry_setup_and_campaign(postgres_url, prefect_api, survey, tmp_path,
                                              one_site_file):
    postgres = postgres_url("drp_test")
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
