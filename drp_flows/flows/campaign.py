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

import json
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from dask.utils import format_bytes
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Completed

from drp_flows.datamodel import campaign_collection, checked_name
from drp_flows.engine.dataflow import StepProgress
from drp_flows.engine.integrity import campaign_runs
from drp_flows.engine.lease import CampaignLease
from drp_flows.engine.planning import TRACT_GROUP, existing_collections, within
from drp_flows.engine.register import read_manifests
from drp_flows.engine.transfer import Ledger, check_embargo, plan_transfer, transfer
from drp_flows.flows.stages import (
    STAGES,
    artifact_key,
    chain_run,
    progress_markdown,
    read_progress,
    run_stage_groups,
    site_tracts,
    site_visits,
    stage_groups,
)
from drp_flows.sites.butler import open_butler
from drp_flows.sites.clusters import running_clusters
from drp_flows.sites.config import LOCAL_SITES, SiteConfig, load_sites
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.pipeline import LABELS
from drp_flows.tasks.skymap import SKYMAP_NAME
from drp_flows.tasks.step3 import MAP_TYPES
from drp_flows.tasks.step5 import DIA_CATALOGS
from drp_flows.validation.qa import checks_markdown, step1_qa, step2_qa, step3_qa, write_report
from drp_flows.validation.qa_association import step5_qa
from drp_flows.validation.qa_diffim import step4_qa
from drp_flows.validation.qa_objects import object_qa
from drp_flows.validation.qa_survey import step7_qa


def latest_attempt(site_file: str, campaign: str) -> int:
    """The highest group attempt any site has run for the campaign (0 before the first)."""
    prefix = campaign_collection(campaign) + "/"
    attempts = [int(c.rsplit("/", 1)[1]) for site in load_sites(site_file).sites.values()
                for c in open_butler(site).registry.queryCollections()
                if c.startswith(prefix) and c.rsplit("/", 1)[1].isdigit()]
    return max(attempts, default=0)


def await_deployment_run(flow_run_id, what: str, site: SiteConfig, poll: float = 2.0):
    """Wait for a site's deployment run to end, within bounds: the site's worker must start it
    within `deployment_start_timeout` (a worker that is down leaves it scheduled for ever) and
    it must end within `deployment_timeout`; past either it is cancelled and this fails."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    start, started = time.monotonic(), None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            now = time.monotonic()
            if started is None and run.state and not (run.state.is_scheduled()
                                                      or run.state.is_pending()):
                started = now
            late = (f"not started by the worker of pool {run.work_pool_name} in "
                    f"{site.deployment_start_timeout:.0f} s (deployment_start_timeout): is it "
                    "running?" if started is None and now - start > site.deployment_start_timeout
                    else f"not finished in {site.deployment_timeout:.0f} s (deployment_timeout)"
                    if now - start > site.deployment_timeout else "")
            if late:           # a started run's worker stops its process on Cancelling
                client.set_flow_run_state(flow_run_id, (Cancelling if started else Cancelled)(
                    message=late), force=True)
                raise TimeoutError(f"{what}: deployment {site.deployment} run {run.name} "
                                   f"({run.id}) {late}")
            time.sleep(poll)


@task(name="stage at site", cache_policy=NO_CACHE)
def stage_at_site(site_file: str, site: str, campaign: str, stage: str, address: str | None,
                  long_address: str | None, where: str, group_size: int, tracts_per_group: int,
                  batch_size: int, attempt: int, memory: dict[str, int]) -> list[dict]:
    """All groups of one stage at one site: here, on the cluster the campaign started, or,
    for a site with a deployment, by that deployment's run on the site's own worker."""
    cfg = load_sites(site_file)[site]
    if not cfg.deployment:
        return run_stage_groups(site_file, site, campaign, stage, address, long_address, where,
                                group_size, tracts_per_group, batch_size, attempt, memory)
    params = {"site_file": site_file, "site": site, "campaign": campaign, "stage": stage,
              "where": where, "group_size": group_size, "tracts_per_group": tracts_per_group,
              "batch_size": batch_size, "attempt": attempt, "memory": memory}
    # one key per campaign flow run: a retry of this task finds the run it started
    run = run_deployment(cfg.deployment, parameters=params, timeout=0,
                         idempotency_key=f"{flow_run.get_id()}-{stage}-{site}-{attempt}")
    run = await_deployment_run(run.id, f"{stage} at site {site}", cfg)
    if not (run.state and run.state.is_completed()):
        raise RuntimeError(f"{stage} at site {site}: deployment {cfg.deployment} run {run.name} "
                           f"({run.id}) ended {run.state.name if run.state else 'without a state'}"
                           "; its logs are in the Prefect UI")
    groups = [name for _, name, _ in stage_groups(site_file, site, stage, where, group_size,
                                                   tracts_per_group)]
    return read_progress(cfg, campaign, stage, groups)


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
    items = [] if visits == [] else plan_transfer(
        src_butler, src.store, dst_butler, dst.store, dataset_types,
        existing_collections(src_butler, [campaign_collection(campaign)]),
        **(within("visit", visits) if visits else {}))
    if ccds is not None:
        wanted = {(int(v), int(d)) for v, d in ccds}
        items = [i for i in items if "detector" not in i.ref.dataId.required
                 or (int(i.ref.dataId["visit"]), int(i.ref.dataId["detector"])) in wanted]
    if sites.embargo:
        check_embargo(items, sites.embargo.embargoed_exposures(src_butler), source, destination,
                      dst.embargo)
    runs = sorted({i.ref.run for i in items})
    ledger = transfer(Ledger(movement, source, destination), src_butler, src.store, dst_butler,
                      dst.store, items)
    for run in runs:
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
                  attempt: int, memory: dict[str, int], only: str | None = None) -> list[dict]:
    """One stage at every site (or only one), the sites concurrently; a site that fails (its
    cluster lost) fails the stage once the other sites have finished theirs."""
    futures = {name: stage_at_site.with_options(name=f"{stage} at {name}").submit(
        site_file, name, campaign, stage, addresses.get(name), long_addresses.get(name), where,
        group_size, tracts_per_group, batch_size, attempt, memory)
        for name in load_sites(site_file).sites if only in (None, name)}
    wait(list(futures.values()))
    failed = {name: f.state for name, f in futures.items() if not f.state.is_completed()}
    if failed:
        reasons = "; ".join(f"{name}: {state.message}" for name, state in failed.items())
        raise StageFailed(f"{stage} failed at {', '.join(failed)} ({reasons}); `drp rescue "
                          f"{campaign}` runs what is left once the cause is mended")
    return [row for f in futures.values() for row in f.result()]


class StageFailed(RuntimeError):
    """A stage that did not finish at some site: the campaign stops there."""


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
    step1 = step1_qa(butlers, collection, Path(survey))
    sections = [step1, step2_qa(open_butler(home), collection, Path(survey), step1.flux_fraction),
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


Stage = Literal["stage1", "global", "stage2", "stage3", "stage4", "final"]

# The campaign in order: each stage after the movements that bring it its inputs. The global
# and final stages run at the campaign site only.
PLAN: list[tuple[Stage, list[tuple[str, Callable, list[str]]]]] = [
    ("stage1", []),
    ("global", [("isolated stars and visit summaries in", fan_in,
                 ["isolated_star", "isolated_star_source", "preliminary_visit_summary"])]),
    ("stage2", [("global calibration out", fan_out, ["fgcm_photo_calib"])]),
    ("stage3", [("final visit summaries in", fan_in, ["visit_summary"]),
                ("boundary visits across", exchange_boundaries,
                 ["preliminary_visit_image", "visit_summary"])]),
    ("stage4", []),
    ("final", [("property maps in", fan_in, list(MAP_TYPES)),
               ("final catalogs in", fan_in, ["object", *DIA_CATALOGS])]),
]
CAMPAIGN_SITE_ONLY = {"global", "final"}


def memory_requests(site_file: str, campaign: str, percentile: float = 95,
                    margin: float = 1.25) -> dict[str, int]:
    """First memory requests per label from what an earlier campaign's quanta measured (the
    peak memory its manifests keep, at every site; a quantum whose outputs moved is counted
    once): the percentile, with a margin, in bytes."""
    peaks: dict[str, float] = {}
    for site in load_sites(site_file).sites.values():
        table = read_manifests(site.store, campaign_runs(open_butler(site), campaign))
        if len(table):
            peaks |= dict(zip(table["quantum"], table["peak_rss_mb"], strict=True))
    if not peaks:
        raise ValueError(f"campaign {campaign!r} has no kept manifests at the sites of "
                         f"{site_file}: no memory measured to start from")
    by_label: dict[str, list[float]] = {}
    for quantum, peak in peaks.items():
        by_label.setdefault(quantum.split(" ", 1)[0], []).append(peak)
    return {label: int(np.percentile(p, percentile) * margin * 2**20)
            for label, p in by_label.items()}


def carry_over(site_file: str, campaign: str, earlier: str) -> int:
    """Chain an earlier campaign's single-frame RUNs (the per-visit steps of stage 1, whose
    outputs later exposures do not change) into this campaign's chain at every site, so that
    its planners skip those quanta; returns how many RUNs were chained."""
    chain = campaign_collection(earlier)
    steps = {LABELS[label].step for label in STAGES["stage1"]["visit"]}
    chained = 0
    for site in load_sites(site_file).sites.values():
        butler = open_butler(site, writeable=True)
        for run in (butler.registry.getCollectionChain(chain)
                    if existing_collections(butler, [chain]) else []):
            step, *group = run.removeprefix(chain + "/").split("/")
            if run.startswith(chain + "/") and step in steps and not group[0].startswith(TRACT_GROUP):
                chain_run(butler, campaign, run)
                chained += 1
    return chained


@flow(name="drp-campaign", flow_run_name="{campaign}")
def campaign_flow(site_file: str = str(LOCAL_SITES), campaign: str = "demo", where: str = "",
                  stages: list[Stage] | None = None, group_size: int = 100,
                  tracts_per_group: int = 10, batch_size: int = 500, survey: str | None = None,
                  rescue: bool = False, reuse: str = "", memory_from: str = "") -> dict:
    """Run the campaign over the sites of the site file: stage 1 everywhere, fan-in, the global
    calibration at the campaign site, fan-out, stages 2-4 everywhere with their fan-ins; then QA
    against the truth of a simulated survey if one is given. Returns progress rows, transfer
    ledgers, quarantined quanta and QA, and leaves them at the campaign site (`drp report`).

    A re-run resumes in the latest attempt, skipping every finished quantum. The arguments are
    the form of the campaign deployment in the Prefect UI, so they are described for operators.

    Args:
        site_file: The site file (YAML): the sites, their clusters, storage and Butlers.
        campaign: The campaign's name; its outputs are in `ComCamSim/runs/<campaign>` at every
            site.
        where: A Butler data query choosing the visits, e.g. day_obs = 20251120,
            band IN ('g', 'r') or tract = 0 (empty: every visit).
        stages: Only these stages, each with the movements that bring its inputs (none: all).
        group_size: Visits per group at most (a group is one stage flow run at a site).
        tracts_per_group: Tracts per group at most.
        batch_size: Quanta registered together at most (every 30 s at least).
        survey: A simulated survey's folder: QA against its truth when given.
        rescue: Start a new attempt of every group (its own RUN collections, chained in
            front), which runs only the quanta that failed or are still missing.
        reuse: An earlier campaign whose single-frame outputs this one takes instead of
            redoing them (the weekly runs reuse the previous week's).
        memory_from: An earlier campaign whose measured peak memory per label (its 95th
            percentile, with a quarter more) is this one's first memory request per label,
            instead of the pipeline's.
    """
    start = time.perf_counter()
    logger = get_run_logger()
    sites = load_sites(site_file)
    checked_name("campaign", campaign)
    for kind, name in (("reused campaign", reuse), ("memory_from campaign", memory_from)):
        if name:
            checked_name(kind, name)
    home = sites.campaign_site
    for name in sites.sites:            # a bad query fails here, naming it, not in a stage
        site_visits(site_file, name, where)
    # one runner at a time: a second is refused, naming this one (engine/lease.py)
    with CampaignLease(open_butler(sites[home], writeable=True), campaign,
                       str(flow_run.id or "")):
        latest = latest_attempt(site_file, campaign)
        attempt = latest + 1 if rescue else max(latest, 1)
        sites[home].store.rm(summary_uri(sites[home], campaign))   # running: no report until done
        if reuse:
            logger.info("%d single-frame RUNs of campaign %s reused", carry_over(site_file, campaign, reuse),
                        reuse)
        memory = memory_requests(site_file, memory_from) if memory_from else {}
        if memory:
            logger.info("first memory requests from campaign %s: %s", memory_from,
                        ", ".join(f"{label} {format_bytes(b)}" for label, b in sorted(memory.items())))
        chosen = set(stages or STAGES)
        rows, ledgers = [], []
        with ExitStack() as stack:
            # a site with a deployment starts its own clusters, at the site
            here = {name: site for name, site in sites.sites.items() if not site.deployment}
            started = stack.enter_context(running_clusters(
                {(name, "short"): site.cluster for name, site in here.items()}
                | {(name, "long"): site.long_cluster for name, site in here.items() if site.long_cluster}))
            addresses = {name: address for (name, pool), address in started.items() if pool == "short"}
            long_addresses = {name: address for (name, pool), address in started.items()
                              if pool == "long"}
            logger.info("clusters: %s, long-quantum clusters: %s", addresses, long_addresses)
            for stage, movements in PLAN:
                if stage not in chosen:
                    continue
                for movement, move, dataset_types in movements:
                    ledgers += move(site_file, campaign, movement, dataset_types)
                rows += at_every_site(site_file, campaign, stage, addresses, long_addresses,
                                      group_size, tracts_per_group, batch_size, where, attempt,
                                      memory, only=home if stage in CAMPAIGN_SITE_ONLY else None)
        table = progress_markdown([StepProgress.from_row(r) for r in rows])
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
        result["seconds"] = time.perf_counter() - start
        write_summary(sites[home], result)
        return outcome(result)


def failures(result: dict) -> str:
    """What keeps a campaign that ran to its end from being whole ('' if nothing)."""
    quarantined = len(result["quarantined"])
    failed = [c["metric"] for c in result["qa"] if not c["pass"]]
    parts = ([f"{quarantined} quanta quarantined (`drp rescue {result['campaign']}` runs them "
              "again once their input is fixed)"] if quarantined else []) + (
        [f"{len(failed)} QA checks failed: {', '.join(failed)}"] if failed else [])
    return "; ".join(parts)


def outcome(result: dict):
    """A campaign flow's end: its result, in a state named 'Completed with failures' (what
    the Prefect UI and API show) when quanta were quarantined or QA failed; a stage that
    could not finish has failed the flow already."""
    problems = failures(result)
    if not problems:
        return result
    get_run_logger().warning("campaign %s: %s", result["campaign"], problems)
    return Completed(name="Completed with failures", message=problems, data=result)


def summary_uri(site: SiteConfig, campaign: str) -> str:
    return site.store.join("reports", campaign, "campaign.json")


def write_summary(site: SiteConfig, result: dict) -> None:
    """The campaign's result at the campaign site, where `drp report` reads it."""
    with site.store.open(summary_uri(site, result["campaign"]), "wb") as f:
        f.write(json.dumps(result, indent=1, default=str).encode())


def read_summary(site: SiteConfig, campaign: str) -> dict | None:
    """What a finished campaign wrote (None before it finished)."""
    uri = summary_uri(site, campaign)
    if not site.store.exists(uri):
        return None
    with site.store.open(uri) as f:
        return json.loads(f.read())
