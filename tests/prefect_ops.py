"""Operations as the README gives them, for the end-to-end tests: a real `prefect server`
(SQLite or PostgreSQL), a process work pool and a worker per site, the deployments of
deployments/prefect.yaml, and `prefect deployment run` of a small three-site campaign."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("usdf", "frdf", "ukdf")
SITE_FILE = "deployments/sites.yaml"
WHERE = "tract IN (0, 2, 4)"        # a small campaign: one tract a site and the visits on it


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
    worker on each, the deployments deployed; yields the environment the commands run in.
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
        yield env
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


def run_campaign(env: dict, survey: Path, site_file: str, campaign: str) -> dict:
    """Set the sites up, run the campaign deployment and wait for it; its flow run."""
    run(env, "drp", "setup", str(survey), "--sites", site_file, timeout=900)
    deployment_run(env, "drp-campaign/campaign", site_file=site_file, campaign=campaign,
                   where=WHERE, group_size="4")
    return flow_run_named(env, campaign)


def check_campaign(env: dict, site_file: str, campaign: str, flow_run: dict) -> None:
    """What an operator checks: the run completed; every stage at every site ran as a run of
    the site's deployment on its pool; the Butler at every site holds the outputs; the
    progress and transfer artifacts are there."""
    assert flow_run["state_type"] == "COMPLETED", flow_run["state"]
    runs = api(env, "POST", "/flow_runs/filter", {"flow_runs": {"name": {"like_": f"{campaign}-"}}})
    deployments = {d["id"]: d["name"] for d in api(env, "POST", "/deployments/filter", {})}
    staged = {(r["parameters"]["site"], r["parameters"]["stage"]): r for r in runs
              if r["parameters"].get("site")}
    expected = {(s, st) for s in SITES for st in ("stage1", "stage2", "stage3", "stage4")} | {
        ("usdf", "global"), ("usdf", "final")}
    assert set(staged) == expected
    for (site, _), r in staged.items():
        assert deployments[r["deployment_id"]] == site and r["work_pool_name"] == f"drp-{site}"
        assert r["state_type"] == "COMPLETED", (r["name"], r["state"])
    sites = load_sites(site_file, DRP_DATA=env["DRP_DATA"])
    collection = f"ComCamSim/runs/{campaign}"
    for name, site in sites.sites.items():
        butler = open_butler(site)
        for dataset_type in ("preliminary_visit_image", "visit_summary", "deep_coadd",
                             "dia_object"):
            assert list(butler.registry.queryDatasets(dataset_type, collections=collection)), \
                (name, dataset_type)
    home = open_butler(sites["usdf"])
    assert list(home.registry.queryDatasets("ss_object", collections=collection))
    keys = {a["key"] for a in api(env, "POST", "/artifacts/filter", {})}
    for site in SITES:
        assert any(k.startswith(f"progress-{campaign}-{site}-stage4-") for k in keys), keys
    assert f"transfer-{campaign}-final-catalogs-in-frdf-usdf" in keys, keys
    assert f"campaign-{campaign}" in keys
