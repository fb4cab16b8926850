"""The campaign: stage 1 at every site at once, each on its own sky share, then QA.

Reads like the campaign's stage table: start each site's Dask cluster, split each site's
visits into groups, run the stage flow for every group, report. Stages 2-4 and the transfers
between sites slot in after stage 1 (see ARCHITECTURE.md, the six data movements).
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from drp_flows.datamodel import DEFAULTS, campaign_collection
from drp_flows.flows.stages import StepProgress, artifact_key, progress_markdown, stage_flow
from drp_flows.sites.butler import open_butler
from drp_flows.sites.clusters import running_cluster
from drp_flows.sites.config import LOCAL_SITES, load_sites
from drp_flows.tasks import step1
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.qa import step1_qa, write_report
from drp_flows.tasks.skymap import MiniSkymap


def site_visits(site_file: str, site: str) -> list[int]:
    """The visits whose raws a site holds."""
    butler = open_butler(load_sites(site_file)[site])
    ids = butler.registry.queryDataIds(["visit"], datasets="raw", collections=DEFAULTS,
                                       instrument=INSTRUMENT)
    return sorted({int(d["visit"]) for d in ids})


def make_groups(visits: list[int], group_size: int) -> dict[str, list[int]]:
    """Visit-range groups of at most group_size visits, named by their first and last visit."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: must be >= 1")
    chunks = [visits[i:i + group_size] for i in range(0, len(visits), group_size)]
    return {f"{c[0]}-{c[-1]}": c for c in chunks}


def site_tracts(site_file: str, site: str) -> list[int]:
    """The tracts of a site's sky share."""
    site_cfg = load_sites(site_file)[site]
    sky = MiniSkymap(**step1.skymap_config(open_butler(site_cfg)))
    return [t for t in sky.tracts if site_cfg.owns_tract(t, sky.tract_center(t)[1])]


@task(name="stage at site", cache_policy=NO_CACHE)
def stage_at_site(site_file: str, site: str, campaign: str, address: str, stage: str,
                  group_size: int, batch_size: int) -> list[dict]:
    """All groups of one stage at one site: one stage flow run per group of visits, then one
    for the site's tracts (steps that need every visit of a tract)."""
    groups = make_groups(site_visits(site_file, site), group_size)
    progress = []
    for name, visits in groups.items():
        progress += stage_flow(site_file, site, campaign, name, visits, address, stage=stage,
                               batch_size=batch_size)
    tracts = site_tracts(site_file, site)
    if tracts:
        progress += stage_flow(site_file, site, campaign, "tracts-" + "-".join(map(str, tracts)),
                               [], address, stage=stage, batch_size=batch_size, tracts=tracts)
    return progress


@task(name="QA against truth", cache_policy=NO_CACHE)
def qa_task(site_file: str, campaign: str, survey: str) -> tuple[list[dict], str]:
    """Step-1 QA over every site's outputs, published at the campaign site."""
    sites = load_sites(site_file)
    butlers = [open_butler(s) for s in sites.sites.values()]
    qa = step1_qa(butlers, campaign_collection(campaign), Path(survey))
    store = sites[sites.campaign_site].store
    with tempfile.TemporaryDirectory() as tmp:
        write_report(qa, Path(tmp), f"Campaign {campaign}: step 1 QA against truth")
        for path in Path(tmp).iterdir():
            store.put_file(str(path), store.join("reports", campaign, "qa", path.name))
    report = store.join("reports", campaign, "qa", "qa.md")
    create_markdown_artifact(_qa_markdown(qa.checks()),
                             key=artifact_key(f"qa-{campaign}"), description=f"QA of campaign {campaign}")
    return qa.checks(), report


def _qa_markdown(checks: list[dict]) -> str:
    lines = ["| metric | value | target | result |", "|---|---:|---|---|"]
    lines += [f"| {c['metric']} | {c['value']:.2f} {c['unit']} | {c['target']} | "
              f"{'PASS' if c['pass'] else 'FAIL'} |" for c in checks]
    return "\n".join(lines)


@flow(name="drp-campaign", flow_run_name="{campaign}")
def campaign_flow(site_file: str = str(LOCAL_SITES), campaign: str = "demo",
                  group_size: int = 100, batch_size: int = 500,
                  survey: str | None = None) -> dict:
    """Run stage 1 at every site of the site file concurrently, then QA against the truth of
    a simulated survey if one is given. Returns progress rows, quarantined quanta and QA."""
    logger = get_run_logger()
    sites = load_sites(site_file)
    with ExitStack() as stack:
        addresses = {name: stack.enter_context(running_cluster(site.cluster))
                     for name, site in sites.sites.items()}
        logger.info("clusters: %s", addresses)
        futures = {name: stage_at_site.with_options(name=f"stage1 at {name}").submit(
            site_file, name, campaign, addresses[name], "stage1", group_size, batch_size)
            for name in sites.sites}
        rows = [row for f in futures.values() for row in f.result()]
    table = progress_markdown([StepProgress(**{k: v for k, v in r.items() if k != "percent"})
                               for r in rows])
    create_markdown_artifact(f"# Campaign {campaign}\n\n{table}\n", key=artifact_key(f"campaign-{campaign}"),
                             description=f"progress of campaign {campaign}")
    result = {"campaign": campaign, "progress": rows,
              "quarantined": [f | {"step": r["step"], "site": r["site"]}
                              for r in rows for f in r["failures"]],
              "qa": [], "qa_report": None}
    if survey:
        result["qa"], result["qa_report"] = qa_task(site_file, campaign, survey)
    return result
