"""The weekly cumulative campaign, as Rubin's weekly `w_YYYY_WW` runs: every week (the
deployment's schedule: Mondays 06:00 UTC) all good exposures to date, in a campaign named
after the ISO week of the run's scheduled time.

Good exposures are those that began before the run's time less the embargo period (released
ones), so an exposure that arrived, or left embargo, since last week is picked up this week.
The week's campaign reuses the previous weekly's single-frame outputs instead of redoing them;
the steps that pool visits (association, calibration, coadds, DIA) run again on everything.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from prefect import flow
from prefect.runtime import flow_run

from drp_flows.datamodel import CAMPAIGNS
from drp_flows.engine.planning import all_of
from drp_flows.flows.campaign import Stage, campaign_flow, outcome
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import LOCAL_SITES, load_sites


def weekly_name(when: datetime) -> str:
    """w_YYYY_WW of the ISO week holding `when` (in UTC)."""
    year, week, _ = when.astimezone(UTC).isocalendar()
    return f"w_{year}_{week:02d}"


def released_query(site_file: str, as_of: datetime) -> str:
    """The data query for the visits that began before `as_of` less the embargo period."""
    sites = load_sites(site_file)
    cutoff = as_of - timedelta(hours=sites.embargo.hours) if sites.embargo else as_of
    return f"visit.timespan.begin < T'{cutoff.astimezone(UTC):%Y-%m-%dT%H:%M:%S}/utc'"


def previous_weekly(site_file: str, name: str) -> str:
    """The latest weekly campaign before `name` at the campaign site ('' if none)."""
    sites = load_sites(site_file)
    butler = open_butler(sites[sites.campaign_site])
    pattern = re.compile(re.escape(CAMPAIGNS) + r"(w_\d{4}_\d{2})")
    weeks = [m.group(1) for c in butler.registry.queryCollections(CAMPAIGNS + "w_*")
             if (m := pattern.fullmatch(c))]
    return max((w for w in weeks if w < name), default="")


def _as_of(as_of: datetime | str | None) -> datetime:
    """The given time (naive: UTC), or the flow run's scheduled start."""
    when = as_of or flow_run.scheduled_start_time or datetime.now(UTC)
    if isinstance(when, str):           # a run name is made from the parameters as sent
        when = datetime.fromisoformat(when)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _run_name() -> str:
    return "weekly-" + weekly_name(_as_of(flow_run.parameters.get("as_of")))


@flow(name="drp-weekly", flow_run_name=_run_name)
def weekly_flow(site_file: str = str(LOCAL_SITES), as_of: datetime | None = None, where: str = "",
                stages: list[Stage] | None = None, group_size: int = 100,
                tracts_per_group: int = 10, batch_size: int = 500,
                survey: str | None = None) -> dict:
    """This week's cumulative campaign w_YYYY_WW: the released visits that began before
    `as_of`, and of those only what `where` selects if given; the previous weekly's
    single-frame outputs are reused.

    Args:
        site_file: The site file (YAML): the sites, their clusters, storage and Butlers.
        as_of: The run's time (default: its scheduled time); names the week, and exposures
            that began before it less the embargo period are released.
        where: A Butler data query narrowing the released visits (empty: all of them).
        stages: Only these stages, each with the movements that bring its inputs (none: all).
        group_size: Visits per group at most.
        tracts_per_group: Tracts per group at most.
        batch_size: Quanta per batch.
        survey: A simulated survey's folder: QA against its truth when given.
    """
    when = _as_of(as_of)
    name = weekly_name(when)
    query = all_of(released_query(site_file, when), where)
    return outcome(campaign_flow(site_file, name, where=query, stages=stages,
                                 group_size=group_size, tracts_per_group=tracts_per_group,
                                 batch_size=batch_size, survey=survey,
                                 reuse=previous_weekly(site_file, name)))
