"""Stage flows: one run per (site, group), running the stage's steps as their data allows.

Each step is planned against the site Butler for the visits (or tracts) the step before it has
finished (engine/dataflow.py), its quanta run on the site's Dask clusters, and their outputs
are registered a batch at a time, one Prefect task per batch. Each group attempt writes its
own RUN collection per step, chained in front of the campaign collection, so a rescue or a
re-run only does what is missing.
"""

from __future__ import annotations

import json
import re
import uuid
from functools import partial

from dask.utils import parse_bytes
from lsst.daf.butler import Butler, ButlerUserError, CollectionType
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from drp_flows.datamodel import DEFAULTS, campaign_collection, group_run
from drp_flows.engine.dataflow import (
    FlowStep,
    GroupFlow,
    StepProgress,
    priority,
    run_window,
    single_writer,
)
from drp_flows.engine.executor import ClusterLost, Executor, RetryPolicy
from drp_flows.engine.pipeline import SCOPES
from drp_flows.engine.planning import TRACT_GROUP, checked_query, make_groups
from drp_flows.engine.quanta import QuantumResult
from drp_flows.engine.register import Registration, register_outputs
from drp_flows.errors import InputError
from drp_flows.sites.butler import open_butler
from drp_flows.sites.clusters import executor_pool, running_clusters
from drp_flows.sites.config import SiteConfig, load_sites
from drp_flows.sites.storage import Storage
from drp_flows.tasks import step1
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.pipeline import LABELS, STAGES
from drp_flows.tasks.skymap import SKYMAP_NAME, MiniSkymap


@task(name="register outputs", cache_policy=NO_CACHE)
def register_task(butler: Butler, storage: Storage, results: list[QuantumResult],
                  run: str) -> Registration:
    """Bulk registration of a batch of results; runs in the flow thread, the single writer."""
    return register_outputs(butler, storage, results, run)


def register_batch(butler: Butler, storage: Storage, run: str,
                   results: list[QuantumResult]) -> Registration:
    """The registration task of a batch, its results quoted: Prefect would otherwise walk
    every field of every result looking for futures, which costs more than the ingest."""
    return register_task(butler, storage, quote(results), run)


def plan_for(plan, butler: Butler, storage: Storage, run: str, done_in: list[str],
             ids: list[int]):
    """A label's planner, for the ids of its group that are ready."""
    return plan(butler, storage, run, ids, done_in)


def site_visits(site_file: str, site: str, where: str = "") -> list[int]:
    """The visits whose raws a site holds, those the data query `where` selects if given.
    Three queries that stay fast at survey scale: the exposures with raws, their visits, and
    the visits the query selects (a visit query joined to the raws themselves takes seconds
    per thousand visits)."""
    butler = open_butler(load_sites(site_file)[site])
    registry = butler.registry
    exposures = {int(d["exposure"]) for d in registry.queryDataIds(
        ["exposure"], datasets="raw", collections=DEFAULTS, instrument=INSTRUMENT)}
    held = {int(r.visit) for r in registry.queryDimensionRecords("visit_definition",
                                                                 instrument=INSTRUMENT)
            if int(r.exposure) in exposures}
    if not where:
        return sorted(held)
    checked_query(where)
    try:
        chosen = {int(d["visit"]) for d in registry.queryDataIds(
            ["visit"], instrument=INSTRUMENT, skymap=SKYMAP_NAME, where=where)}
    except ButlerUserError as e:
        raise InputError(f"data query {where!r} at site {site}: {e}") from None
    return sorted(held & chosen)


def site_tracts(site_file: str, site: str, where: str = "") -> list[int]:
    """The tracts of a site's sky share; with a data query, those its selected visits reach."""
    site_cfg = load_sites(site_file)[site]
    butler = open_butler(site_cfg)
    sky = MiniSkymap(**step1.skymap_config(butler))
    tracts = [t for t in sky.tracts if site_cfg.owns_tract(t, sky.tract_center(t)[1])]
    if not where:
        return tracts
    visits = set(site_visits(site_file, site, where))
    reached = {int(d["tract"]) for d in butler.registry.queryDataIds(
        ["visit", "tract"], instrument=INSTRUMENT, skymap=SKYMAP_NAME, where=where)
        if int(d["visit"]) in visits}
    return [t for t in tracts if t in reached]


def stage_groups(site_file: str, site: str, stage: str, where: str, group_size: int,
                 tracts_per_group: int) -> list[tuple[str, str, list[int]]]:
    """(scope, group name, ids) of every group of one stage at one site, scope by scope:
    visit ranges, ranges of the site's tracts, or the one campaign-wide group."""
    groups = []
    for scope in STAGES[stage]:
        if scope == "visit":
            named = make_groups(site_visits(site_file, site, where), group_size)
        elif scope == "tract":
            named = make_groups(site_tracts(site_file, site, where), tracts_per_group, TRACT_GROUP)
        else:
            named = {"global": []}
        groups += [(scope, name, ids) for name, ids in named.items()]
    return groups


def chain_run(butler: Butler, campaign: str, run: str) -> None:
    """Put a group attempt's RUN in front of the campaign's chain (created if new, ending with
    the defaults). Transfers from several sites and stage flows add to one chain at once, so
    the chain is changed under the registry's lock on it, never read and written back."""
    chain = campaign_collection(campaign)
    if butler.registry.registerCollection(chain, CollectionType.CHAINED):
        butler.collections.extend_chain(chain, DEFAULTS)
    if run not in butler.registry.getCollectionChain(chain):
        butler.collections.prepend_chain(chain, run)


def write_progress(site: SiteConfig, campaign: str, stage: str, group: str,
                   progress: list[StepProgress]) -> None:
    """The group's rows as `drp status` reads them, rewritten as each step starts and ends."""
    rows = [p.row() for p in progress]
    with site.store.open(site.store.join("reports", campaign, "progress", f"{stage}-{group}.json"),
                         "wb") as f:
        f.write(json.dumps(rows, indent=1).encode())


def read_progress(site: SiteConfig, campaign: str, stage: str | None = None,
                  groups: list[str] | None = None) -> list[dict]:
    """The rows written at a site for a campaign (latest write of each group), of every stage
    and group or only of the given stage's given groups."""
    folder = site.store.path(site.store.join("reports", campaign, "progress"))
    names = ["*"] if groups is None else [f"{stage}-{g}" for g in groups]
    paths = sorted({p for name in names for p in site.store.fs.glob(f"{folder}/{name}.json")})
    rows = []
    for path in paths:
        with site.store.fs.open(path, "rb") as f:
            rows += json.loads(f.read())
    return rows


def quarantine(site: SiteConfig, campaign: str, stage: str, group: str, progress: list[StepProgress]) -> str:
    """Record failed quanta (the quarantined CCDs) beside the site's repository."""
    failures = [f | {"step": p.step} for p in progress for f in p.failures]
    uri = site.store.join("reports", campaign, f"quarantine-{stage}-{group}.json")
    with site.store.open(uri, "wb") as f:
        f.write(json.dumps(failures, indent=1, default=str).encode())
    return uri


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower())


def progress_markdown(rows: list[StepProgress]) -> str:
    lines = ["| site | step | group | attempt | state | total | done | skipped | failed | blocked | % "
             "| seconds |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in rows:
        lines.append(f"| {p.site} | {p.step} | {p.group} | {p.attempt} | {p.state} | {p.total} | "
                     f"{p.done} | {p.skipped} | {p.failed} | {p.blocked} | {p.percent:.0f} | "
                     f"{p.seconds:.1f} |")
    return "\n".join(lines)


@flow(name="drp-stage", flow_run_name="{site}-{stage}-{group}")
def stage_flow(site_file: str, site: str, campaign: str, stage: str, scope: str, group: str,
               ids: list[int], address: str, long_address: str | None = None, attempt: int = 1,
               batch_size: int = 500, memory: dict[str, int] | None = None) -> list[dict]:
    """Run one stage's labels of one scope for one group at one site: `ids` are the group's
    visits or tracts (nothing for the campaign scope). Long quanta go to `long_address`, and
    so do quanta that need more memory than the short pool's workers have. `memory` is the
    first memory request per label, in bytes (default: the pipeline table's)."""
    logger = get_run_logger()
    sites = load_sites(site_file)
    site_cfg = sites[site]
    butler = open_butler(site_cfg, writeable=True)
    config = {"camera": step1.camera_config(butler), "skymap": step1.skymap_config(butler),
              **sites.pipeline.model_dump()}
    done_in = [campaign_collection(campaign)]
    progress = [StepProgress(site, label, group, stage, attempt=attempt)
                for label in STAGES[stage][scope]]
    write_progress(site_cfg, campaign, stage, group, progress)
    pools = {"short": executor_pool("short", address, site_cfg.cluster)}
    if long_address:
        pools["long"] = executor_pool("long", long_address, site_cfg.long_cluster)
    policy = RetryPolicy(site_cfg.memory_multiplier,
                         parse_bytes(site_cfg.request_memory_max) if site_cfg.request_memory_max
                         else None, site_cfg.max_worker_deaths)
    finished = [0]

    def on_change() -> None:
        """The group's rows rewritten, and its Prefect artifact once a step has finished."""
        write_progress(site_cfg, campaign, stage, group, progress)
        done = sum(p.state not in ("waiting", "running") for p in progress)
        if done > finished[0]:
            finished[0] = done
            create_markdown_artifact(progress_markdown(progress),
                                     key=artifact_key(f"progress-{campaign}-{site}-{stage}-{group}"),
                                     description=f"{campaign}: {stage} at {site}, group {group}")

    steps = []
    for index, p in enumerate(progress):
        spec = LABELS[p.step]
        run = group_run(campaign, spec.step, group, attempt)
        with single_writer(site_cfg.store.root):
            butler.registry.registerRun(run)
            chain_run(butler, campaign, run)
        p.pool = spec.pool if spec.pool in pools else "short"
        steps.append(FlowStep(
            p, spec.run, partial(plan_for, spec.plan, butler, site_cfg.store, run, done_in),
            partial(register_batch, butler, site_cfg.store, run),
            (memory or {}).get(p.step, parse_bytes(spec.memory)), spec.pool, spec.cluster_by,
            priority(index, spec.pool)))
    with Executor(site, pools, policy, logger) as executor:
        try:
            GroupFlow(executor, site_cfg.store, config, steps, SCOPES[scope], ids,
                      uuid.uuid4().hex[:8], batch_size, site_cfg.follow_data, on_change).run()
        except ClusterLost as e:
            for p in progress:
                if p.state == "running":
                    p.state, p.error = "failed", str(e)
            write_progress(site_cfg, campaign, stage, group, progress)
            quarantine(site_cfg, campaign, stage, group, progress)
            raise
    report = quarantine(site_cfg, campaign, stage, group, progress)
    failed = sum(p.failed for p in progress)
    if failed:
        logger.warning("site %s group %s: %d quanta failed, quarantined in %s",
                       site, group, failed, report)
    return [p.row() for p in progress]


def run_stage_groups(site_file: str, site: str, campaign: str, stage: str, address: str,
                     long_address: str | None, where: str, group_size: int,
                     tracts_per_group: int, batch_size: int, attempt: int,
                     memory: dict[str, int] | None = None) -> list[dict]:
    """One stage flow run per group of the stage at one site: a scope's groups (in order)
    at most the site's `group_window` at once, a scope after the one before it (the tract
    groups of stage 1 need all its visit groups)."""
    window = load_sites(site_file)[site].group_window
    groups = stage_groups(site_file, site, stage, where, group_size, tracts_per_group)
    rows = []
    for scope in STAGES[stage]:
        for group_rows in run_window([
                partial(stage_flow, site_file, site, campaign, stage, scope, name, ids,
                        address, long_address, attempt=attempt, batch_size=batch_size,
                        memory=memory)
                for s, name, ids in groups if s == scope], window):
            rows += group_rows
    return rows


def needs_long_cluster(stage: str) -> bool:
    return any(LABELS[label].pool == "long" for labels in STAGES[stage].values()
               for label in labels)


@flow(name="drp-site-stage", flow_run_name="{campaign}-{stage}-{site}")
def site_stage_flow(site_file: str, site: str, campaign: str, stage: str, where: str = "",
                    group_size: int = 100, tracts_per_group: int = 10, batch_size: int = 500,
                    attempt: int = 1, memory: dict[str, int] | None = None) -> list[dict]:
    """One stage of a campaign at one site, as the site's own deployment: run by the worker
    of the site's work pool, at the site, it starts the site's cluster there (and its
    long-quantum cluster if the stage has long quanta), runs every group and stops them.

    Args:
        site_file: The site file (YAML) of the campaign.
        site: The site whose stage this is (its worker runs it).
        campaign: The campaign's name.
        stage: The stage: stage1, global, stage2, stage3, stage4 or final.
        where: The campaign's Butler data query (empty: every visit).
        group_size: Visits per group at most.
        tracts_per_group: Tracts per group at most.
        batch_size: Quanta registered together at most.
        attempt: The group attempt (a rescue is a new one).
        memory: The first memory request per label, in bytes (default: the pipeline's).
    """
    cfg = load_sites(site_file)[site]
    clusters = {"short": cfg.cluster} | (
        {"long": cfg.long_cluster} if cfg.long_cluster and needs_long_cluster(stage) else {})
    with running_clusters(clusters) as started:
        return run_stage_groups(site_file, site, campaign, stage, started["short"],
                                started.get("long"), where, group_size, tracts_per_group,
                                batch_size, attempt, memory)
