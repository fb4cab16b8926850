"""The campaign across the sites of a site file, read like its stage table.

Start each site's Dask cluster(s); stage 1 (single frames) at every site on its own sky share;
fan-in of the isolated stars and preliminary visit summaries to the campaign site; the global
photometric calibration there; fan-out of the solution, split by visit, to the sites holding
the visits; stage 2 (final visit summaries) at every site and their fan-in; the calibrated
CCDs of visits that reach onto another site's tracts to that site; stage 3 (coadds,
property maps) and the maps' fan-in; stage 4 (difference imaging, DIA association and light
curves per tract); fan-in of the DIA catalogs and moving-object linking at the campaign site; QA.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from functools import partial
from pathlib import Path

from lsst.daf.butler import ButlerUserError
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from drp_flows.datamodel import DEFAULTS, campaign_collection
from drp_flows.flows.stages import (
    STAGES,
    StepProgress,
    artifact_key,
    chain_run,
    progress_markdown,
    stage_flow,
)
from drp_flows.sites.butler import open_butler
from drp_flows.sites.clusters import running_cluster
from drp_flows.sites.config import LOCAL_SITES, load_sites
from drp_flows.tasks import step1
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.qa import checks_markdown, step1_qa, step2_qa, step3_qa, write_report
from drp_flows.tasks.qa_association import step5_qa
from drp_flows.tasks.qa_diffim import step4_qa
from drp_flows.tasks.qa_objects import object_qa
from drp_flows.tasks.qa_survey import step7_qa
from drp_flows.tasks.skymap import SKYMAP_NAME, MiniSkymap
from drp_flows.tasks.step1 import existing_collections
from drp_flows.tasks.step3 import MAP_TYPES
from drp_flows.tasks.step5 import DIA_CATALOGS
from drp_flows.tasks.transfer import Ledger, check_embargo, plan_transfer, transfer


def site_visits(site_file: str, site: str, where: str = "") -> list[int]:
    """The visits whose raws a site holds, those the data query `where` selects if given."""
    butler = open_butler(load_sites(site_file)[site])
    try:
        ids = butler.registry.queryDataIds(["visit"], datasets="raw", collections=DEFAULTS,
                                           instrument=INSTRUMENT, skymap=SKYMAP_NAME, where=where)
        return sorted({int(d["visit"]) for d in ids})
    except ButlerUserError as e:
        raise ValueError(f"data query {where!r} at site {site}: {e}") from None


def site_tracts(site_file: str, site: str, where: str = "") -> list[int]:
    """The tracts of a site's sky share; with a data query, those its selected visits reach."""
    site_cfg = load_sites(site_file)[site]
    butler = open_butler(site_cfg)
    sky = MiniSkymap(**step1.skymap_config(butler))
    tracts = [t for t in sky.tracts if site_cfg.owns_tract(t, sky.tract_center(t)[1])]
    if not where:
        return tracts
    reached = {int(d["tract"]) for d in butler.registry.queryDataIds(
        ["visit", "tract"], datasets="raw", collections=DEFAULTS, instrument=INSTRUMENT,
        skymap=SKYMAP_NAME, where=where)}
    return [t for t in tracts if t in reached]


def make_groups(ids: list[int], size: int, prefix: str = "") -> dict[str, list[int]]:
    """Groups of at most `size` of the ids in order (visit or tract ranges), named by their
    first and last id."""
    if size < 1:
        raise ValueError(f"group size {size}: must be >= 1")
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
    return {prefix + "-".join(map(str, sorted({c[0], c[-1]}))): c for c in chunks}


def latest_attempt(site_file: str, campaign: str) -> int:
    """The highest group attempt any site has run for the campaign (0 before the first)."""
    prefix = campaign_collection(campaign) + "/"
    attempts = [int(c.rsplit("/", 1)[1]) for site in load_sites(site_file).sites.values()
                for c in open_butler(site).registry.queryCollections()
                if c.startswith(prefix) and c.rsplit("/", 1)[1].isdigit()]
    return max(attempts, default=0)


@task(name="stage at site", cache_policy=NO_CACHE)
def stage_at_site(site_file: str, site: str, campaign: str, stage: str, address: str,
                  long_address: str | None, group_size: int, tracts_per_group: int,
                  batch_size: int, where: str = "", attempt: int = 1) -> list[dict]:
    """All groups of one stage at one site, scope by scope: one stage flow run per group of
    visits, per group of the site's tracts, and one for campaign-wide work."""
    progress = []
    for scope in STAGES[stage]:
        if scope == "visit":
            groups = make_groups(site_visits(site_file, site, where), group_size)
        elif scope == "tract":
            groups = make_groups(site_tracts(site_file, site, where), tracts_per_group, "tracts-")
        else:
            groups = {"global": []}
        for name, ids in groups.items():
            progress += stage_flow(site_file, site, campaign, stage, scope, name, ids, address,
                                   long_address, attempt=attempt, batch_size=batch_size)
    return progress


@task(name="transfer", cache_policy=NO_CACHE)
def transfer_task(site_file: str, campaign: str, movement: str, source: str, destination: str,
                  dataset_types: list[str], visits: list[int] | None = None,
                  ccds: list[tuple[int, int]] | None = None) -> dict:
    """One closed-loop transfer between two sites, of the given visits (default all), and of
    per-detector datasets only the given (visit, detector) `ccds` when they are given; the
    moved RUNs join the destination's campaign chain, so the next stage finds them as it
    finds its own outputs."""
    sites = load_sites(site_file)
    src, dst = sites[source], sites[destination]
    src_butler, dst_butler = open_butler(src), open_butler(dst, writeable=True)
    if ccds is not None:
        visits = sorted({int(v) for v, _ in ccds})
    where = f"visit IN ({', '.join(map(str, visits))})" if visits else ""
    items = [] if visits == [] else plan_transfer(
        src_butler, src.store, dst_butler, dst.store, dataset_types,
        existing_collections(src_butler, [campaign_collection(campaign)]), where)
    if ccds is not None:
        wanted = {(int(v), int(d)) for v, d in ccds}
        items = [i for i in items if "detector" not in i.ref.dataId.required
                 or (int(i.ref.dataId["visit"]), int(i.ref.dataId["detector"])) in wanted]
    if sites.embargo:
        check_embargo(items, sites.embargo.embargoed_exposures(src_butler), source, destination,
                      dst.embargo)
    ledger = transfer(Ledger(movement, source, destination), src_butler, src.store, dst_butler,
                      dst.store, items)
    for run in sorted({i.ref.run for i in items}):
        chain_run(dst_butler, campaign, run)
    row = asdict(ledger) | {"mb_per_s": ledger.mb_per_s}
    create_table_artifact([row | {"mb_per_s": round(ledger.mb_per_s, 2),
                                  "seconds": round(ledger.seconds, 3)}],
                          key=artifact_key(f"transfer-{campaign}-{movement}-{source}-{destination}"),
                          description=f"{campaign}: {movement}, {source} -> {destination}")
    return row


def fan_in(site_file: str, campaign: str, movement: str, dataset_types: list[str]) -> list[dict]:
    """Every other site -> the campaign site, concurrently."""
    sites = load_sites(site_file)
    futures = [transfer_task.with_options(name=f"{movement} {name}->{sites.campaign_site}").submit(
        site_file, campaign, movement, name, sites.campaign_site, dataset_types)
        for name in sites.sites if name != sites.campaign_site]
    return [f.result() for f in futures]


def fan_out(site_file: str, campaign: str, movement: str, dataset_types: list[str]) -> list[dict]:
    """The campaign site -> every other site, each getting the visits it holds."""
    sites = load_sites(site_file)
    futures = [transfer_task.with_options(name=f"{movement} {sites.campaign_site}->{name}").submit(
        site_file, campaign, movement, sites.campaign_site, name, dataset_types,
        site_visits(site_file, name))
        for name in sites.sites if name != sites.campaign_site]
    return [f.result() for f in futures]


def boundary_ccds(site_file: str, source: str) -> dict[str, list[tuple[int, int]]]:
    """The source's own calibrated CCDs on each other site's tracts (exact regions), less the
    embargoed ones for sites that are not embargo sites. A visit's home is the site of the
    tract it aims at, but its CCDs also fall on neighbouring tracts, whose coadds need them."""
    sites = load_sites(site_file)
    butler = open_butler(sites[source])
    tract_regions = {int(r.id): r.region
                     for r in butler.registry.queryDimensionRecords("tract", skymap=SKYMAP_NAME)}
    own = set(site_visits(site_file, source))
    embargoed = sites.embargo.embargoed_exposures(butler) if sites.embargo else set()
    ccds = [r for r in butler.registry.queryDimensionRecords("visit_detector_region",
                                                             instrument=INSTRUMENT)
            if int(r.visit) in own]
    out = {}
    for name, site in sites.sites.items():
        if name == source:
            continue
        regions = [tract_regions[t] for t in site_tracts(site_file, name)]
        allowed = own if site.embargo else own - embargoed
        out[name] = sorted((int(r.visit), int(r.detector)) for r in ccds if int(r.visit) in allowed
                           and any(not r.region.isDisjointFrom(t) for t in regions))
    return out


def exchange_boundaries(site_file: str, campaign: str, movement: str,
                        dataset_types: list[str]) -> list[dict]:
    """Every site -> each other site whose tracts its CCDs overlap, concurrently."""
    futures = [transfer_task.with_options(name=f"{movement} {source}->{destination}").submit(
        site_file, campaign, movement, source, destination, dataset_types, ccds=ccds)
        for source in load_sites(site_file).sites
        for destination, ccds in boundary_ccds(site_file, source).items() if ccds]
    return [f.result() for f in futures]


def at_every_site(site_file: str, campaign: str, stage: str, addresses: dict, long_addresses: dict,
                  group_size: int, tracts_per_group: int, batch_size: int, where: str,
                  attempt: int, only: str | None = None) -> list[dict]:
    """One stage at every site (or only one), the sites concurrently."""
    futures = [stage_at_site.with_options(name=f"{stage} at {name}").submit(
        site_file, name, campaign, stage, addresses[name], long_addresses.get(name), group_size,
        tracts_per_group, batch_size, where, attempt) for name in addresses if only in (None, name)]
    return [row for f in futures for row in f.result()]


def ledger_markdown(ledgers: list[dict]) -> str:
    lines = ["| movement | from | to | datasets | files copied | bundles | MB | seconds | MB/s | retries |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {g['label']} | {g['source']} | {g['destination']} | {g['datasets']} | {g['files']} | "
              f"{g['bundles']} | {g['bytes'] / 1e6:.2f} | {g['seconds']:.2f} | {g['mb_per_s']:.1f} | "
              f"{g['retries']} |"
              for g in ledgers]
    return "\n".join(lines)


@task(name="QA against truth", cache_policy=NO_CACHE)
def qa_task(site_file: str, campaign: str, survey: str) -> tuple[list[dict], str]:
    """QA of every step against truth (steps 1 and 4 over every site's outputs, steps 2, 3 and
    5 over what was gathered at the campaign site), published at the campaign site."""
    sites = load_sites(site_file)
    butlers = [open_butler(s) for s in sites.sites.values()]
    collection = campaign_collection(campaign)
    home = sites[sites.campaign_site]
    step4 = step4_qa(butlers, collection, Path(survey))
    sections = [step1_qa(butlers, collection, Path(survey)),
                step2_qa(open_butler(home), collection, Path(survey)),
                step3_qa(open_butler(home), collection, Path(survey)),
                object_qa(open_butler(home), butlers, collection, Path(survey)),
                step4, step5_qa(open_butler(home), collection, Path(survey), step4.epochs),
                step7_qa(open_butler(home), collection, Path(survey))]
    checks = [c for section in sections for c in section.checks()]
    store = home.store
    with tempfile.TemporaryDirectory() as tmp:
        write_report(sections, Path(tmp), f"Campaign {campaign}: QA against truth")
        for path in Path(tmp).iterdir():
            store.put_file(str(path), store.join("reports", campaign, "qa", path.name))
    report = store.join("reports", campaign, "qa", "qa.md")
    create_markdown_artifact(checks_markdown(checks), key=artifact_key(f"qa-{campaign}"),
                             description=f"QA of campaign {campaign}")
    return checks, report


@flow(name="drp-campaign", flow_run_name="{campaign}")
def campaign_flow(site_file: str = str(LOCAL_SITES), campaign: str = "demo",
                  where: str = "", group_size: int = 100, tracts_per_group: int = 10,
                  batch_size: int = 500, survey: str | None = None, rescue: bool = False) -> dict:
    """Run the campaign over the sites of the site file: stage 1 everywhere, fan-in, the global
    calibration at the campaign site, fan-out, stages 2-4 everywhere with their fan-ins; then QA
    against the truth of a simulated survey if one is given. Returns progress rows, transfer ledgers,
    quarantined quanta and QA.

    `where` is a Butler data query choosing the campaign's visits (e.g. "day_obs = 20251120",
    "band IN ('g', 'r')", "tract = 0"; default all); the visit steps run in groups of at most
    `group_size` visits, the tract steps in groups of at most `tracts_per_group` tracts.

    A re-run resumes in the latest attempt, skipping every finished quantum; `rescue` starts a
    new attempt of every group instead (its own RUN collections, chained in front), which runs
    only the quanta that failed or are still missing."""
    logger = get_run_logger()
    sites = load_sites(site_file)
    home = sites.campaign_site
    latest = latest_attempt(site_file, campaign)
    attempt = latest + 1 if rescue else max(latest, 1)
    for name in sites.sites:            # a bad query fails here, naming it, not in a stage
        site_visits(site_file, name, where)
    with ExitStack() as stack:
        addresses = {name: stack.enter_context(running_cluster(site.cluster))
                     for name, site in sites.sites.items()}
        long_addresses = {name: stack.enter_context(running_cluster(site.long_cluster))
                          for name, site in sites.sites.items() if site.long_cluster}
        logger.info("clusters: %s, long-quantum clusters: %s", addresses, long_addresses)
        run = partial(at_every_site, site_file, campaign, addresses=addresses,
                      long_addresses=long_addresses, group_size=group_size,
                      tracts_per_group=tracts_per_group, batch_size=batch_size, where=where,
                      attempt=attempt)
        rows = run("stage1")
        ledgers = fan_in(site_file, campaign, "isolated stars and visit summaries in",
                         ["isolated_star", "isolated_star_source", "preliminary_visit_summary"])
        rows += run("global", only=home)
        ledgers += fan_out(site_file, campaign, "global calibration out", ["fgcm_photo_calib"])
        rows += run("stage2")
        ledgers += fan_in(site_file, campaign, "final visit summaries in", ["visit_summary"])
        ledgers += exchange_boundaries(site_file, campaign, "boundary visits across",
                                       ["preliminary_visit_image", "visit_summary"])
        rows += run("stage3")
        ledgers += fan_in(site_file, campaign, "property maps in", list(MAP_TYPES))
        rows += run("stage4")
        ledgers += fan_in(site_file, campaign, "final catalogs in", ["object", *DIA_CATALOGS])
        rows += run("final", only=home)
    table = progress_markdown([StepProgress(**{k: v for k, v in r.items() if k != "percent"})
                               for r in rows])
    create_markdown_artifact(f"# Campaign {campaign}\n\n## Progress\n\n{table}\n\n"
                             f"## Transfers\n\n{ledger_markdown(ledgers)}\n",
                             key=artifact_key(f"campaign-{campaign}"),
                             description=f"progress of campaign {campaign}")
    result = {"campaign": campaign, "progress": rows, "transfers": ledgers,
              "quarantined": [f | {"step": r["step"], "site": r["site"]}
                              for r in rows for f in r["failures"]],
              "qa": [], "qa_report": None}
    if survey:
        result["qa"], result["qa_report"] = qa_task(site_file, campaign, survey)
    return result
