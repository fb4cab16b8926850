"""Operations as the README gives them, for the end-to-end tests: a real `prefect server`
(SQLite or PostgreSQL), a process work pool and a worker per site, the deployments of
deployments/prefect.yaml, and `prefect deployment run` of a small three-site campaign."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from drp_flows.flows.campaign import CAMPAIGN_SITE_ONLY
from drp_flows.flows.stages import STAGES, site_tracts, site_visits
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites
from drp_flows.validation.simulate import load_survey

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("usdf", "frdf", "ukdf")
SITE_FILE = "deployments/sites.yaml"
# A small campaign every step of which runs: one band on every tract, both of its visits (a
# tract query would also take visits that graze the tracts from unprocessed ones, whose CCDs
# then have no template to be differenced against: they are blocked)
WHERE = "band IN ('g', 'i', 'y')"
ALL_STAGES = tuple(STAGES)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(env: dict, *args: str, timeout: float = 300) -> str:
    """One command line as the README gives it; its output, or a failure showing it."""
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def stop(proc: subprocess.Popen) -> None:
    """Prefect's server and workers stop on SIGINT (a worker ignores SIGTERM for a while)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def operations(tmp: Path, database_url: str | None = None, site_file: str | None = None):
    """A Prefect server with its own home (and database), the drp-<site> work pools and a
    worker on each, the deployments deployed; yields the environment the commands run in and
    a function that stops the workers (the server stays, for what reads it later).
    The pools and workers come from the README's per-site `prefect` commands, or, given the
    site file, from its one-line stand-in `drp workers --sites FILE`."""
    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(tmp / "prefect"), "DRP_DATA": str(tmp / "data"),
                        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
                        "PREFECT_WORKER_QUERY_SECONDS": "2"}    # default 10: a wait per stage
    env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    procs = []
    logs = tmp / "logs"
    logs.mkdir(parents=True)

    def stop_workers() -> None:
        for proc in procs[1:]:
            stop(proc)

    def start(name: str, *args: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=env,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    try:
        server = start("server", "prefect", "server", "start", "--host", "127.0.0.1",
                       "--port", str(port))
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{env['PREFECT_API_URL']}/health", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not answer in 3 minutes"
            time.sleep(0.5)
        if site_file:
            workers = start("workers", "drp", "workers", "--sites", site_file)
            pools = {f"drp-{site}" for site in SITES}
            while not pools <= {p["name"] for p in api(env, "POST", "/work_pools/filter", {})}:
                assert workers.poll() is None, (logs / "workers.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            for site in SITES:
                run(env, "prefect", "work-pool", "create", f"drp-{site}", "--type", "process")
                start(f"worker-{site}", "prefect", "worker", "start", "--pool", f"drp-{site}")
        run(env, "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
            "deployments/prefect.yaml")
        yield env, stop_workers
    finally:
        for proc in reversed(procs):
            stop(proc)


def api(env: dict, method: str, path: str, body: dict | None = None):
    response = requests.request(method, env["PREFECT_API_URL"] + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def flow_run_named(env: dict, name: str) -> dict:
    (flow_run,) = api(env, "POST", "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    return flow_run


def deployment_run(env: dict, deployment: str, timeout: float = 1500, **params: str) -> None:
    """`prefect deployment run <deployment> -p k=v ... --watch`: returns once the run ended."""
    args = [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    run(env, "prefect", "deployment", "run", deployment, *args, "--watch", "--watch-timeout",
        str(int(timeout)), timeout=timeout + 100)


def run_campaign(env: dict, survey: Path, site_file: str, campaign: str,
                 stages: list[str] | None = None) -> dict:
    """Set the sites up, run the campaign deployment (only the given stages, if any) and wait
    for it; its flow run."""
    run(env, "drp", "setup", str(survey), "--sites", site_file, timeout=900)
    chosen = {"stages": json.dumps(stages)} if stages else {}
    deployment_run(env, "drp-campaign/campaign", site_file=site_file, campaign=campaign,
                   where=WHERE, group_size="4", **chosen)
    return flow_run_named(env, campaign)


def check_campaign(env: dict, survey: Path, site_file: str, campaign: str, flow_run: dict,
                   stages: tuple[str, ...] = ALL_STAGES, where: str = WHERE,
                   quarantined: tuple[dict, ...] = ()) -> None:
    """What an operator checks: the run completed; every stage at every site whose entry names
    a deployment ran as a run of that deployment on the site's pool (the others inside the
    campaign's run); the Butler at every site holds every output expected of the campaign's
    data query (a calibrated CCD for each of its visits' raws but the `quarantined` ones, a
    final summary for each visit, a coadd for every patch of its tracts in each band of the
    visits aimed at them, DIA objects for each tract); the progress and transfer artifacts are
    there."""
    assert flow_run["state_type"] == "COMPLETED", flow_run["state"]
    os.environ["DRP_DATA"] = env["DRP_DATA"]          # the site file's ${DRP_DATA}
    sites = load_sites(site_file)
    expected = {(s, st) for s in sites.sites for st in stages if st not in CAMPAIGN_SITE_ONLY} | {
        (sites.campaign_site, st) for st in stages if st in CAMPAIGN_SITE_ONLY}
    deployed = {(s, st) for s, st in expected if sites[s].deployment}
    assert deployed, f"no site of {site_file} names a deployment"
    runs = api(env, "POST", "/flow_runs/filter", {"flow_runs": {"name": {"like_": f"{campaign}-"}}})
    deployments = {d["id"]: d["name"] for d in api(env, "POST", "/deployments/filter", {})}
    staged = {(r["parameters"]["site"], r["parameters"]["stage"]): r for r in runs
              if r["parameters"].get("site")}
    assert set(staged) == deployed
    for (site, _), r in staged.items():
        assert deployments[r["deployment_id"]] == site and r["work_pool_name"] == f"drp-{site}"
        assert r["state_type"] == "COMPLETED", (r["name"], r["state"])
    collection = f"ComCamSim/runs/{campaign}"
    whole = "stage4" in stages
    _, pointings = load_survey(survey)
    for name, site in sites.sites.items():
        butler = open_butler(site, collections=collection)
        visits = set(site_visits(site_file, name, where))
        assert visits, name
        images = [r for r in butler.registry.queryDatasets("preliminary_visit_image")
                  if r.dataId["visit"] in visits]
        lost = [q for q in quarantined if q["visit"] in visits]
        assert len(images) == 9 * len(visits) - len(lost), name
        if not whole:
            continue
        # its own visits' (and those of its neighbours' CCDs on its tracts)
        summaries = {r.dataId["visit"] for r in butler.registry.queryDatasets("visit_summary")}
        assert summaries >= visits, name
        if name != sites.campaign_site:     # which holds every site's, for the final catalogs
            imaged = {r.dataId["visit"] for r in
                      butler.registry.queryDatasets("preliminary_visit_image")}
            assert summaries == imaged, name     # no summary without the CCDs it came with
        tracts = site_tracts(site_file, name, where)
        coadds = {(r.dataId["tract"], r.dataId["patch"], r.dataId["band"])
                  for r in butler.registry.queryDatasets("deep_coadd")}
        for tract in tracts:
            bands = {v["band"] for v in pointings if v["tract"] == tract and v["visit"] in visits}
            assert bands and {(tract, p, b) for p in range(4) for b in bands} <= coadds, (name, tract)
        dia = {r.dataId["tract"] for r in butler.registry.queryDatasets("dia_object")}
        assert dia >= set(tracts) if name == "usdf" else dia == set(tracts), name
    if whole:
        home = open_butler(sites["usdf"], collections=collection)
        assert len(list(home.registry.queryDatasets("ss_object"))) == 1
    keys = {a["key"] for a in api(env, "POST", "/artifacts/filter", {})}
    for site, stage in expected:
        assert any(k.startswith(f"progress-{campaign}-{site}-{stage}-") for k in keys), keys
    if whole:
        assert f"transfer-{campaign}-final-catalogs-in-frdf-usdf" in keys, keys
    assert f"campaign-{campaign}" in keys
