"""A site whose Butler registry is PostgreSQL (the production configuration): its setup, and a
second setup that wipes its schema. tests/test_deployments.py runs a whole three-site campaign
with every registry (and the Prefect API) on PostgreSQL."""

from conftest import drop_schemas
from lsst.daf.butler import Butler, CollectionType, Config

from drp_flows.sites.config import load_sites


def test_postgres_registry_setup_and_wipe(postgres_url, prefect_api, survey, tmp_path,
                                          one_site_file):
    postgres = postgres_url("drp_test")
    from drp_flows.flows.setup import setup_flow

    site_file = one_site_file("pg", storage=f"file://{tmp_path}/pg",
                              butler=f'{{registry: "{postgres}"}}', sky="{tracts: [1]}")
    drop_schemas(site_file)
    (row,) = setup_flow(str(site_file), str(survey))
    site = load_sites(site_file)["pg"]
    assert Config(f"{site.repo_dir}/butler.yaml")["registry", "db"] == postgres
    butler = Butler.from_config(site.repo_dir, writeable=True)
    raws = list(butler.registry.queryDatasets("raw", collections="ComCamSim/raw/all"))
    assert len(raws) == 9 * row["visits"] > 0
    butler.registry.registerCollection("ComCamSim/runs/old", CollectionType.RUN)
    # a second setup wipes the site's schema and starts clean
    setup_flow(str(site_file), str(survey))
    butler = Butler.from_config(site.repo_dir)
    assert not list(butler.registry.queryCollections("ComCamSim/runs/*"))
    assert len(list(butler.registry.queryDatasets("raw", collections="ComCamSim/raw/all"))) == len(raws)


def test_concurrent_chain_updates_lose_no_run(postgres_url, prefect_api, survey, tmp_path,
                                              one_site_file):
    """Transfers from several sites and stage flows add RUNs to one campaign chain at the
    same moment; every RUN must end up in it (a read-and-write-back of the chain lost some)."""
    from concurrent.futures import ThreadPoolExecutor

    from drp_flows.datamodel import DEFAULTS
    from drp_flows.flows.setup import setup_flow
    from drp_flows.flows.stages import chain_run

    site_file = one_site_file("pg", storage=f"file://{tmp_path}/pg",
                              butler=f'{{registry: "{postgres_url("drp_test")}"}}',
                              sky="{tracts: [1]}")
    drop_schemas(site_file)
    setup_flow(str(site_file), str(survey))
    repo = load_sites(site_file)["pg"].repo_dir
    runs = [f"ComCamSim/runs/race/step1/{i}/1" for i in range(24)]
    writer = Butler.from_config(repo, writeable=True)
    for run in runs:
        writer.registry.registerRun(run)

    def add(chunk: list[str]) -> None:
        butler = Butler.from_config(repo, writeable=True)     # one client per site process
        for run in chunk:
            chain_run(butler, "race", run)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(add, [runs[i::6] for i in range(6)]))
    chain = list(Butler.from_config(repo).registry.getCollectionChain("ComCamSim/runs/race"))
    assert sorted(chain[:-1]) == sorted(runs) and chain[-1] == DEFAULTS, chain
