"""The `drp` command line: simulate a survey, set up the sites, run a campaign, or all three."""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table as RichTable

from drp_flows.sites.config import LOCAL_SITES

app = typer.Typer(help="Multi-site Data Release Processing on Prefect and Dask.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
# a wide table when piped to a file or CI log, the terminal's width otherwise
console = Console(width=None if sys.stdout.isatty() else 140)


def _data_dir(data: Path | None) -> Path:
    """Where the embedded default keeps its sites; exported for ${DRP_DATA} in local.yaml."""
    path = (data or Path(os.environ.get("DRP_DATA", "data"))).resolve()
    os.environ["DRP_DATA"] = str(path)
    return path


@app.command()
def simulate(out: Path = typer.Argument(..., help="directory for raws, calibs, refcat, truth"),
             ccd_size: int = 512, nights: int = 3, rounds_per_night: int = 3, seed: int = 42):
    """Simulate a mini-ComCam survey (deterministic from the seed)."""
    from drp_flows.tasks.simulate import SurveyConfig, simulate_survey

    cfg = SurveyConfig(seed=seed, ccd_size=ccd_size, nights=nights,
                       rounds_per_night=rounds_per_night)
    with Progress(console=console) as bar:
        job = bar.add_task("simulating CCDs", total=None)
        simulate_survey(cfg, out, progress=lambda done, total: bar.update(job, completed=done,
                                                                           total=total))
    console.print(f"survey written to {out}")


@app.command()
def setup(survey: Path, sites: Path = LOCAL_SITES, data: Path | None = None):
    """Wipe and create every site's Butler and load its share of the survey."""
    from drp_flows.flows.setup import setup_flow

    _data_dir(data)
    for row in setup_flow(str(sites), str(survey.resolve())):
        console.print(f"{row['site']}: {row['visits']} visits, {row['raws']} raws in {row['repo']}")


@app.command()
def campaign(name: str, sites: Path = LOCAL_SITES, survey: Path | None = None,
             data: Path | None = None,
             where: Annotated[str, typer.Option(help="Butler data query choosing the visits")] = "",
             group_size: Annotated[int, typer.Option(help="visits per group at most")] = 100,
             tracts_per_group: Annotated[int, typer.Option(help="tracts per group at most")] = 10,
             batch_size: int = 500, rescue: bool = False):
    """Run a campaign over the sites (QA against truth when --survey is given); a re-run
    resumes it, skipping every finished quantum."""
    from drp_flows.flows.campaign import campaign_flow

    _data_dir(data)
    start = time.perf_counter()
    result = campaign_flow(str(sites), name, where=where, group_size=group_size,
                           tracts_per_group=tracts_per_group, batch_size=batch_size,
                           survey=str(survey.resolve()) if survey else None, rescue=rescue)
    print_summary(result, time.perf_counter() - start)


@app.command("rescue")
def rescue_command(name: str, sites: Path = LOCAL_SITES, survey: Path | None = None,
                   data: Path | None = None, where: str = "", group_size: int = 100,
                   tracts_per_group: int = 10, batch_size: int = 500):
    """Re-run only the failed or missing quanta of a campaign, as a new attempt of its groups
    (new RUN collections chained in front of the old)."""
    campaign(name, sites, survey, data, where, group_size, tracts_per_group, batch_size,
             rescue=True)


@app.command()
def status(name: str, sites: Path = LOCAL_SITES, data: Path | None = None):
    """Where a campaign stands, from what its stage flows record at every site as they run."""
    from drp_flows.flows.stages import read_progress
    from drp_flows.sites.config import load_sites

    _data_dir(data)
    rows = [r for site in load_sites(sites).sites.values() for r in read_progress(site, name)]
    if not rows:
        console.print(f"no progress recorded for campaign {name!r} at the sites of {sites}")
        raise typer.Exit(1)
    console.print(progress_table(rows, f"campaign {name}"))
    for state in ("failed", "blocked", "running"):
        groups = sorted({(r["site"], r["step"], r["group"]) for r in rows if r["state"] == state})
        if groups:
            console.print(f"{state}: " + ", ".join(f"{s} {st} {g}" for s, st, g in groups))


@app.command()
def demo(data: Path | None = None, ccd_size: int = 512, nights: int = 3,
         rounds_per_night: int = 3, name: str = "demo"):
    """Simulate a survey, set up three sites on this machine, run the campaign, report QA."""
    data = _data_dir(data)
    survey = data / "survey"
    simulate(survey, ccd_size=ccd_size, nights=nights, rounds_per_night=rounds_per_night, seed=42)
    setup(survey, LOCAL_SITES, data)
    campaign(name, LOCAL_SITES, survey, data)
    console.print(f"\nInspect with Rubin's tools, e.g.\n  butler query-datasets {data}/usdf/repo "
                  f"visit_summary --collections ComCamSim/runs/{name}")


def progress_table(rows: list[dict], title: str) -> RichTable:
    """PanDA's dashboard as a table: per site, step and group attempt, quanta and state."""
    table = RichTable(title=title)
    for col in ("site", "step", "group", "attempt", "state", "total", "done", "skipped", "failed",
                "blocked", "%", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["site"], r["step"], r["group"], str(r["attempt"]), r["state"],
                      str(r["total"]), str(r["done"]), str(r["skipped"]), str(r["failed"]),
                      str(r["blocked"]), f"{r['percent']:.0f}", f"{r['seconds']:.1f}")
    return table


def print_summary(result: dict, wall: float) -> None:
    per_site = defaultdict(lambda: defaultdict(int))
    for r in result["progress"]:
        for k in ("total", "done", "failed", "seconds"):
            per_site[r["site"]][k] += r[k]
    console.print(progress_table(result["progress"], f"campaign {result['campaign']} ({wall:.0f} s)"))
    for site, s in per_site.items():
        console.print(f"{site}: {s['total']} quanta, {s['done']} done, {s['failed']} failed, "
                      f"{s['seconds']:.0f} s")
    if result.get("transfers"):
        moves = RichTable(title="transfers (closed loop: copied, ingested, verified)")
        for col in ("movement", "from", "to", "datasets", "copied", "bundles", "MB", "seconds", "MB/s"):
            moves.add_column(col)
        for t in result["transfers"]:
            moves.add_row(t["label"], t["source"], t["destination"], str(t["datasets"]),
                          str(t["files"]), str(t["bundles"]), f"{t['bytes'] / 1e6:.2f}",
                          f"{t['seconds']:.2f}", f"{t['mb_per_s']:.1f}")
        console.print(moves)
    for f in result.get("quarantined", []):
        console.print(f"[yellow]quarantined[/] {f['step']} {f['data_id']}: {f['error']}")
    if result.get("qa_report"):
        for c in result["qa"]:
            mark = "[green]PASS[/]" if c["pass"] else "[red]FAIL[/]"
            console.print(f"{mark} {c['metric']}: {c['value']:.2f} {c['unit']} ({c['target']})")
        console.print(f"QA report: {result['qa_report']}")


if __name__ == "__main__":
    app()
