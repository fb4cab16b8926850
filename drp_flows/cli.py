"""The `drp` command line: simulate a survey, set up the sites, run a campaign, or all three."""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table as RichTable

from drp_flows.sites.config import LOCAL_SITES, CampaignSites, load_sites

app = typer.Typer(help="Multi-site Data Release Processing on Prefect and Dask.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
# a wide table when piped to a file or CI log, the terminal's width otherwise
console = Console(width=None if sys.stdout.isatty() else 140)
# exit codes: 0 the campaign is whole; 1 an error (a bug, or a stage that could not finish:
# its traceback); 2 bad input (a name, query or site file); 3 quanta were quarantined; 4 QA
# failed (and nothing was quarantined); 5 `drp verify` found damaged products
BAD_INPUT, QUARANTINED, QA_FAILED, DAMAGED = 2, 3, 4, 5
POLL_SECONDS = 2.0    # how often live bars re-read the sites' progress files
# how often a plain progress line is printed when stdout is no terminal
PLAIN_SECONDS = float(os.environ.get("DRP_PROGRESS_SECONDS", "20"))


@contextmanager
def heartbeat(describe: Callable[[], str]):
    """While the block runs with stdout not a terminal (a log file, CI), print a plain line
    `describe()` every PLAIN_SECONDS (env DRP_PROGRESS_SECONDS), so that the log shows that
    the command is alive and where it stands; in a terminal, the bars say it."""
    if console.is_terminal:
        yield
        return
    import threading

    start = time.monotonic()
    stop = threading.Event()

    def beat():
        while not stop.wait(PLAIN_SECONDS):
            minutes, seconds = divmod(int(time.monotonic() - start), 60)
            try:
                line = describe()
            except Exception as e:         # a progress file caught half-written: say so, go on
                line = f"progress not readable ({type(e).__name__}: {e})"
            print(f"[{minutes}m{seconds:02d}s] {line}", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def progress_line(rows: list[dict]) -> str:
    """Per site, its latest stage: each step running there (or the last one run) with its
    quanta finished of its total, and how many of the stage's failed, e.g. `usdf stage1
    calibrateImage 45/72 consolidateVisitSummary 3/8, 0 failed`. Steps follow the data, so
    several run at once; each is counted over the stage's groups."""
    from drp_flows.flows.stages import STAGES

    order = list(STAGES)
    latest: dict[str, str] = {}
    for r in rows:
        if r["site"] not in latest or order.index(r["stage"]) > order.index(latest[r["site"]]):
            latest[r["site"]] = r["stage"]
    parts = []
    for site, stage in latest.items():
        mine = [r for r in rows if r["site"] == site and r["stage"] == stage]
        started = [r for r in mine if r["state"] != "waiting"]
        running = [r["step"] for r in started if r["state"] == "running"]
        shown = running or [(started or mine)[-1]["step"]]
        steps = []
        for step in dict.fromkeys(r["step"] for r in mine if r["step"] in shown):
            of = [r for r in mine if r["step"] == step]
            steps.append(f"{step} {sum(r['done'] + r['skipped'] for r in of)}/"
                         f"{sum(r['total'] for r in of)}")
        parts.append(f"{site} {stage} {' '.join(steps)}, {sum(r['failed'] for r in mine)} failed")
    return "progress: " + ("; ".join(parts) if parts else "starting (no stage has begun)")


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """A typer callback: the value as `check` accepts it, else a usage error (exit 2)."""
    from drp_flows.errors import InputError

    def callback(value: str) -> str:
        try:
            return check(value) if value else value
        except InputError as e:
            raise typer.BadParameter(str(e)) from None
    return callback


def _campaign_name(value: str) -> str:
    from drp_flows.datamodel import checked_name

    return checked_name("campaign", value)


def _data_query(value: str) -> str:
    from drp_flows.engine.planning import checked_query

    return checked_query(value)


CampaignName = Annotated[str, typer.Argument(
    metavar="NAME", help="the campaign's name (letters, digits, _.-)",
    callback=_checked(_campaign_name))]
DataQuery = Annotated[str, typer.Option(help="Butler data query choosing the visits",
                                        callback=_checked(_data_query))]


def _data_dir(data: Path | None) -> Path:
    """Where the embedded default keeps its sites; exported for ${DRP_DATA} in local.yaml."""
    path = (data or Path(os.environ.get("DRP_DATA", "data"))).resolve()
    os.environ["DRP_DATA"] = str(path)
    return path


@app.command()
def simulate(out: Path = typer.Argument(..., help="directory for raws, calibs, refcat, truth"),
             ccd_size: int = 1024, nights: int = 3, rounds_per_night: int = 3, seed: int = 42,
             sky: Annotated[str, typer.Option(
                 help="moffat (Moffat stars at pixel centres) or galsim (GalSim PSFs varying "
                      "over the field, pixel-integrated, and galaxies)")] = "moffat"):
    """Simulate a mini-ComCam survey (deterministic from the seed)."""
    from drp_flows.validation.simulate import SurveyConfig, simulate_survey

    try:
        cfg = SurveyConfig(seed=seed, ccd_size=ccd_size, nights=nights,
                           rounds_per_night=rounds_per_night, sky=sky)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    done = [0, 0]

    def update(finished: int, total: int) -> None:
        done[:] = finished, total
        bar.update(job, completed=finished, total=total)

    with Progress(console=console) as bar, heartbeat(lambda: f"simulating CCDs {done[0]}/{done[1]}"):
        job = bar.add_task("simulating CCDs", total=None)
        simulate_survey(cfg, out, progress=update)
    console.print(f"survey written to {out}")


@app.command()
def setup(survey: Path, sites: Path = LOCAL_SITES, data: Path | None = None,
          force: Annotated[bool, typer.Option(
              help="wipe each site's repository directory, datastore and registry schema even "
                   "when an earlier drp setup did not make them for that site")] = False):
    """Wipe and create every site's Butler and load its share of the survey. Only what an
    earlier `drp setup` made for the same site is wiped, unless --force."""
    from drp_flows.flows.setup import setup_flow
    from drp_flows.sites.butler import check_wipeable

    _data_dir(data)
    cfg = load_sites(sites)
    for site in cfg.sites.values():       # refused before a Prefect server is started
        check_wipeable(site, force)
    names = ", ".join(cfg.sites)
    with heartbeat(lambda: f"setting up the Butlers of {names}"):
        rows = setup_flow(str(sites), str(survey.resolve()), force=force)
    for row in rows:
        console.print(f"{row['site']}: {row['visits']} visits, {row['raws']} raws in {row['repo']}")


@app.command()
def campaign(name: CampaignName, sites: Path = LOCAL_SITES, survey: Path | None = None,
             data: Path | None = None, where: DataQuery = "",
             group_size: Annotated[int, typer.Option(help="visits per group at most")] = 100,
             tracts_per_group: Annotated[int, typer.Option(help="tracts per group at most")] = 10,
             batch_size: int = 500, rescue: bool = False,
             stage: Annotated[list[str] | None, typer.Option(
                 help="only this stage (stage1, global, stage2, stage3, stage4, final), "
                      "with the movements that bring its inputs; repeat for more")] = None,
             memory_from: Annotated[str, typer.Option(
                 help="an earlier campaign whose measured peak memory per label starts "
                      "this one's memory requests")] = ""):
    """Run a campaign over the sites (QA against truth when --survey is given); a re-run
    resumes it, skipping every finished quantum. In a terminal, a bar per site and stage
    follows the quanta as they finish. Exits 3 when a quantum was quarantined, 4 when QA
    failed, 2 on bad input."""
    from drp_flows.flows.campaign import campaign_flow, failures

    _data_dir(data)
    start = time.perf_counter()
    with live_progress(load_sites(sites), name):
        result = campaign_flow(str(sites), name, where=where, stages=stage or None,
                               group_size=group_size, tracts_per_group=tracts_per_group,
                               batch_size=batch_size,
                               survey=str(survey.resolve()) if survey else None, rescue=rescue,
                               memory_from=memory_from)
    print_summary(result, time.perf_counter() - start)
    problems = failures(result)
    if problems:
        # the rest of the campaign went on, but a script or scheduler must see it is not whole
        console.print(f"[red]campaign {name} is not whole[/]: {problems}", highlight=False)
        raise typer.Exit(QUARANTINED if result["quarantined"] else QA_FAILED)


@app.command("rescue")
def rescue_command(name: CampaignName, sites: Path = LOCAL_SITES, survey: Path | None = None,
                   data: Path | None = None, where: DataQuery = "", group_size: int = 100,
                   tracts_per_group: int = 10, batch_size: int = 500,
                   stage: Annotated[list[str] | None, typer.Option(
                       help="only this stage; repeat for more")] = None):
    """Re-run only the failed or missing quanta of a campaign, as a new attempt of its groups
    (new RUN collections chained in front of the old)."""
    campaign(name, sites, survey, data, where, group_size, tracts_per_group, batch_size,
             rescue=True, stage=stage)


@app.command()
def status(name: CampaignName, sites: Path = LOCAL_SITES, data: Path | None = None,
           watch: Annotated[bool, typer.Option(help="bars per site and stage until the "
                                                    "campaign ends (Ctrl-C stops watching)")] = False):
    """Where a campaign stands, from what its stage flows record at every site as they run."""
    from drp_flows.flows.campaign import read_summary

    _data_dir(data)
    cfg = load_sites(sites)
    if watch:
        with suppress(KeyboardInterrupt), live_progress(cfg, name, force=True):
            while read_summary(cfg[cfg.campaign_site], name) is None:
                time.sleep(POLL_SECONDS)
    rows = progress_rows(cfg, name)
    if not rows:
        console.print(f"no progress recorded for campaign {name!r} at the sites of {sites}")
        raise typer.Exit(1)
    console.print(progress_table(rows, f"campaign {name}"))
    for state in ("failed", "blocked", "running"):
        groups = sorted({(r["site"], r["step"], r["group"]) for r in rows if r["state"] == state})
        if groups:
            console.print(f"{state}: " + ", ".join(f"{s} {st} {g}" for s, st, g in groups))


@app.command()
def verify(name: CampaignName, sites: Path = LOCAL_SITES, data: Path | None = None,
           site: Annotated[str | None, typer.Option(help="only this site")] = None,
           fraction: Annotated[float, typer.Option(
               help="a random sample of this fraction of the products")] = 1.0,
           seed: int = 0,
           repair: Annotated[bool, typer.Option(
               help="unregister and delete the damaged, so that `drp campaign NAME` (or "
                    "rescue) makes or transfers them again")] = False):
    """Re-read a campaign's products at every site and compare each with the size and sha256
    recorded when it was written (a transferred copy too). Exits 5 naming every damaged one.
    Zips that no record names (a failed registration's, over an hour old) are listed, and
    deleted with --repair."""
    from drp_flows.engine.integrity import verify_campaign

    _data_dir(data)
    cfg = load_sites(sites)
    if site is not None and site not in cfg.sites:
        raise typer.BadParameter(f"site {site!r} is not one of {sorted(cfg.sites)}")
    found = verify_campaign(cfg, name, site, fraction, seed, repair)
    for verification in found.values():
        for d in verification.damaged:
            console.print(f"[red]damaged[/] {d}", highlight=False, soft_wrap=True)
    for where, verification in found.items():
        console.print(f"{where}: {verification.checked} products checked, "
                      f"{len(verification.damaged)} damaged"
                      + (f", {verification.repaired} unregistered" if verification.repaired else "")
                      + (f", {len(verification.orphans)} orphan zips"
                         + (" deleted" if repair else " (--repair deletes them)")
                         if verification.orphans else ""))
    if not any(v.checked for v in found.values()):
        console.print(f"campaign {name!r} has no recorded products at the sites of {sites}")
        raise typer.Exit(1)
    if any(v.damaged for v in found.values()):
        if repair:
            console.print(f"`drp campaign {name}` (or `drp rescue {name}`) makes or transfers "
                          "them again")
        raise typer.Exit(DAMAGED)


@app.command()
def report(name: CampaignName, sites: Path = LOCAL_SITES, data: Path | None = None):
    """A finished campaign's report, as its campaign site keeps it.

    Progress per site, step and group, the transfers, the quarantined quanta, and QA against
    truth with where its plots are."""
    from drp_flows.flows.campaign import read_summary

    _data_dir(data)
    cfg = load_sites(sites)
    result = read_summary(cfg[cfg.campaign_site], name)
    if result is None:
        console.print(f"campaign {name!r} has no report at {cfg.campaign_site} (the campaign site "
                      f"of {sites}): it has not finished; `drp status {name}` shows where it stands")
        raise typer.Exit(1)
    print_summary(result, result["seconds"])


@app.command()
def workers(sites: Path = Path("deployments/sites.yaml"),
            prefect_file: Path = Path("deployments/prefect.yaml"), data: Path | None = None):
    """Start a Prefect worker for every work pool the deployments need, here, until Ctrl-C.

    Every pool the prefect file names is created (a process pool) if missing, so that
    `prefect deploy --all` finds them; workers run on the pools of the site deployments the
    site file names and of the deployments that are no site's (the campaign, the weekly):
    what each site runs on its own submit host, for all sites on one machine. A site without
    a deployment runs its stages inside the campaign's flow run."""
    import subprocess

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    _data_dir(data)              # the workers' flow runs read the site file with it
    deployments = [d for d in yaml.safe_load(prefect_file.read_text())["deployments"]
                   if d.get("work_pool")]
    pools = {d["name"]: d["work_pool"]["name"] for d in deployments}
    wanted = {d["name"]: pools[d["name"]] for d in deployments
              if not d.get("entrypoint", "").endswith(":site_stage_flow")}
    for site_name, site in load_sites(sites).sites.items():
        if site.deployment:
            deployment = site.deployment.split("/")[1]
            if deployment not in pools:
                console.print(f"site {site_name}: deployment {site.deployment!r} has no work pool "
                              f"in {prefect_file}")
                raise typer.Exit(2)
            wanted[site_name] = pools[deployment]
    pools_used = sorted(set(wanted.values()))
    with get_client(sync_client=True) as client:
        for pool in sorted(set(pools.values())):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                console.print(f"work pool {pool} created (process)")
    prefect = Path(sys.executable).with_name("prefect")
    procs = [subprocess.Popen([str(prefect), "worker", "start", "--pool", pool])
             for pool in pools_used]
    console.print("workers: " + ", ".join(f"{s} on {p}" for s, p in wanted.items()))
    try:
        for proc in procs:
            proc.wait()
    except KeyboardInterrupt:      # the workers got the same Ctrl-C: give them time to stop
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@app.command()
def demo(data: Path | None = None, ccd_size: int = 1024, nights: int = 3,
         rounds_per_night: int = 3, name: str = "demo", force: bool = False,
         sky: Annotated[str, typer.Option(help="moffat or galsim (drp simulate --sky)")] = "moffat"):
    """Simulate a survey, set up three sites on this machine, run the campaign, report QA."""
    data = _data_dir(data)
    survey = data / "survey"
    simulate(survey, ccd_size=ccd_size, nights=nights, rounds_per_night=rounds_per_night, seed=42,
             sky=sky)
    setup(survey, LOCAL_SITES, data, force)
    campaign(name, LOCAL_SITES, survey, data)
    console.print(f"\nInspect with Rubin's tools, e.g.\n  butler query-datasets {data}/usdf/repo "
                  f"visit_summary --collections ComCamSim/runs/{name}")


def progress_rows(sites: CampaignSites, name: str) -> list[dict]:
    from drp_flows.flows.stages import read_progress

    return [r for site in sites.sites.values() for r in read_progress(site, name)]


@contextmanager
def live_progress(sites: CampaignSites, name: str, force: bool = False):
    """A bar per site and stage, from the progress files the stage flows write, refreshed
    while the block runs: in a terminal only (or `force`), with Prefect's console log lines
    printed above the bars instead of through them. Elsewhere, a plain progress line."""
    if not (force or console.is_terminal):
        with heartbeat(lambda: progress_line(progress_rows(sites, name))):
            yield
        return
    import logging
    import threading

    from prefect.logging.handlers import PrefectConsoleHandler

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[step]}"), TimeElapsedColumn(),
                    console=Console(markup=False, highlight=False), refresh_per_second=2)
    handlers = {h for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                for h in getattr(logger, "handlers", []) if isinstance(h, PrefectConsoleHandler)}
    consoles = {h: h.console for h in handlers}
    stop = threading.Event()

    def refresh():
        """Read the rows until the block ends, and once more after (the final state)."""
        tasks = {}
        while True:
            stages = defaultdict(lambda: {"total": 0, "finished": 0, "step": ""})
            for r in progress_rows(sites, name):
                s = stages[f"{r['site']} {r['stage']}"]
                s["total"] += r["total"]
                s["finished"] += r["done"] + r["skipped"] + r["failed"] + r["blocked"]
                if r["state"] == "running":
                    s["step"] = r["step"]
            for key, s in stages.items():
                if key not in tasks:
                    tasks[key] = bars.add_task(key, total=None, step="")
                bars.update(tasks[key], total=s["total"] or None, completed=s["finished"],
                            step=s["step"])
            if stop.is_set():
                return
            stop.wait(POLL_SECONDS)

    thread = threading.Thread(target=refresh, daemon=True)
    with bars:
        for h in handlers:
            h.console = bars.console
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            for h, c in consoles.items():
                h.console = c


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


def main() -> None:
    """`drp`: a user's mistake (InputError: a site file, a name, a data query) is one line
    naming it and exit code 2; anything else keeps its traceback."""
    from drp_flows.errors import InputError

    try:
        app()
    except InputError as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(BAD_INPUT)


if __name__ == "__main__":
    main()
