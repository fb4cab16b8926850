"""The production configuration end to end: the shared campaign (tests/conftest.py) ran as
operators run it, with the Prefect server's database and every site's Butler registry on
PostgreSQL, the work pools and workers started by `drp workers`, the deployments deployed, and
`prefect deployment run drp-campaign/campaign`: frdf's stages ran as runs of its own
deployment on its own worker, the other sites' inside the campaign's flow run. Then the
Prefect UI as an operator sees that campaign: headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) on its flow run page: the flow run graph, the Artifacts
tab with the campaign's artifact, that artifact rendered (progress and transfers), a
transfer's and a stage's own artifacts rendered as tables, and the campaign deployment's Run
form. The screenshots go to $DRP_SCREENSHOTS when set (the README's come from there)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from lsst.daf.butler import Config

from drp_flows.flows.campaign import CAMPAIGN_SITE_ONLY
from drp_flows.flows.stages import STAGES, read_progress
from drp_flows.sites.config import load_sites
from prefect_ops import SITES, api, check_campaign


@pytest.mark.timeout(1800)
def test_deployment_run_completed_the_whole_campaign(campaign, survey):
    check_campaign(campaign.env, survey, campaign.site_file, campaign.name, campaign.flow_run,
                   where="", quarantined=[campaign.corrupt])


def test_it_was_postgresql_underneath(campaign, postgres_url):
    """The server's flow runs and every site's registry are in PostgreSQL."""
    names = subprocess.run(["psql", postgres_url("drp_prefect_campaign"), "-tAc",
                            f"SELECT name FROM flow_run WHERE name LIKE '{campaign.name}%'"],
                           check=True, capture_output=True, text=True).stdout.split()
    # the campaign's run and frdf's stage runs (tests/conftest.py: frdf's deployment)
    assert sorted(names) == sorted([campaign.name] + [f"{campaign.name}-{stage}-frdf" for stage in
                                                      STAGES if stage not in CAMPAIGN_SITE_ONLY])
    for site in load_sites(campaign.site_file).sites.values():
        assert Config(f"{site.repo_dir}/butler.yaml")["registry", "db"] == postgres_url("drp_test")


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "no chromium and chromium-driver here (make test installs them: .ci/chromium.sh)"
        if os.environ.get("DRP_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"DRP_REQUIRE_CHROMIUM=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # as root, offline: no sandbox, and no background connections the closed network refuses
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--window-size=1600,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    path = Path(os.environ.get("DRP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ui_url(env: dict) -> str:
    """The UI is served where the API is, without its /api."""
    return env["PREFECT_API_URL"].removesuffix("/api")


def wait_for(driver, xpath: str, timeout: float = 90):
    """The element once it is visible: the UI renders after its API calls return."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(seen.visibility_of_element_located((By.XPATH, xpath)))


def rendered_table(driver) -> list[list[str]]:
    """The rows of the tables the page renders (header cells included)."""
    from selenium.webdriver.common.by import By

    return [[cell.text for cell in row.find_elements(By.XPATH, "./th|./td")]
            for row in driver.find_elements(By.XPATH, "//table//tr")]


def open_artifact(browser, env: dict, key: str) -> None:
    """From the artifact's key page (its versions), the latest version's page."""
    ui = ui_url(env)
    (latest,) = api(env, "POST", "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [key]}}})
    browser.get(f"{ui}/artifacts/key/{key}")
    wait_for(browser, f"//a[normalize-space()='{latest['latest_id'][:8]}']").click()
    wait_for(browser, "//table")


def test_campaign_run_page_shows_graph_and_artifacts(campaign, browser, screenshots):
    env, site_file, flow_run = campaign.env, campaign.site_file, campaign.flow_run
    ui = ui_url(env)
    name = flow_run["name"]

    # the flow run page: name, state (the truncated raw's CCD was quarantined: "Completed
    # with failures") and the graph of the stages at every site and the transfers between them
    browser.get(f"{ui}/runs/flow-run/{flow_run['id']}")
    wait_for(browser, f"//*[normalize-space()='{name}']")
    wait_for(browser, "//*[normalize-space()='Completed with failures']")
    wait_for(browser, "//canvas")
    browser.save_screenshot(str(screenshots / "flow-run-graph.png"))

    # the Artifacts tab: the campaign's own artifact (progress and transfers) as a card
    wait_for(browser, "//li[@id='artifacts']").click()
    card = wait_for(browser, f"//*[contains(@class, 'artifact-card')][.//*[normalize-space()="
                             f"'campaign-{name}']]")
    browser.save_screenshot(str(screenshots / "flow-run-artifacts.png"))

    # the card opens it rendered: a progress row per site, step and group; the transfers
    card.click()
    transfers = wait_for(browser, "//h2[normalize-space()='Transfers']")
    rows = rendered_table(browser)
    browser.save_screenshot(str(screenshots / "campaign-artifact.png"))
    browser.execute_script("arguments[0].scrollIntoView()", transfers)
    browser.save_screenshot(str(screenshots / "campaign-transfers.png"))
    header = rows[0]
    assert header[:5] == ["site", "step", "group", "attempt", "state"], header
    progress = [dict(zip(header, r, strict=True)) for r in rows[1:] if len(r) == len(header)]
    assert {(r["site"], r["step"]) for r in progress} >= {
        (s, "calibrateImage") for s in SITES} | {("usdf", "fgcmFitCycle")}
    # what the sites recorded, every group done but the one with the truncated raw, whose CCD
    # failed and was quarantined
    recorded = [r for site in load_sites(site_file).sites.values()
                for r in read_progress(site, name)]
    assert sorted((r["site"], r["step"], r["group"], r["attempt"], r["state"], r["total"], r["done"])
                  for r in progress) == sorted((r["site"], r["step"], r["group"], str(r["attempt"]),
                                                r["state"], str(r["total"]), str(r["done"]))
                                               for r in recorded)
    failed = [r for r in progress if r["state"] != "done"]
    assert [(r["site"], r["step"], r["state"], r["failed"]) for r in failed] == [
        ("frdf", "calibrateImage", "failed", "1")], failed
    assert all(r["blocked"] == "0" for r in progress), progress
    assert ["final catalogs in", "frdf", "usdf"] in [r[:3] for r in rows], rows

    # a transfer's own table artifact (its transfer task's)
    open_artifact(browser, env, f"transfer-{name}-final-catalogs-in-frdf-usdf")
    header, row = rendered_table(browser)[:2]
    table = dict(zip(header, row, strict=True))
    assert table["source"] == "frdf" and table["destination"] == "usdf", table
    assert int(table["datasets"]) > 0 and int(table["bytes"]) > 0, table
    browser.save_screenshot(str(screenshots / "transfer-artifact.png"))

    # a stage's progress artifact, made at the site by the site's worker
    keys = sorted({a["key"] for a in api(env, "POST", "/artifacts/filter", {"artifacts": {"key": {
        "like_": f"progress-{name}-frdf-stage4-tracts-"}}})})
    assert keys == [f"progress-{name}-frdf-stage4-tracts-{t}" for t in (1, 2, 3)], keys
    open_artifact(browser, env, keys[0])
    steps = {r[1] for r in rendered_table(browser)[1:]}
    assert {"drpAssociation", "drpDiaCalculation"} <= steps, steps


def test_campaign_deployment_form_is_typed_and_described(campaign, browser, screenshots):
    """The campaign deployment's Run form, as an operator starts a campaign from the UI: a
    field per parameter, each with its description, typed from the flow's signature."""
    env = campaign.env
    ui = ui_url(env)
    (deployment,) = [d for d in api(env, "POST", "/deployments/filter", {})
                     if d["name"] == "campaign"]
    schema = deployment["parameter_openapi_schema"]["properties"]
    assert schema["stages"]["anyOf"][0]["items"]["enum"] == [
        "stage1", "global", "stage2", "stage3", "stage4", "final"]
    assert schema["group_size"]["type"] == "integer" and schema["rescue"]["type"] == "boolean"
    browser.get(f"{ui}/deployments/deployment/{deployment['id']}/run")
    for name in ("site_file", "campaign", "where", "stages", "group_size", "rescue"):
        wait_for(browser, f"//*[starts-with(normalize-space(), '{name} (Optional)')]")
        shown = schema[name]["description"].replace("`", "")     # markdown: code spans
        wait_for(browser, f"//*[normalize-space()={xpath_string(shown)}]")
    browser.save_screenshot(str(screenshots / "campaign-run-form.png"))


def xpath_string(text: str) -> str:
    """An XPath string literal of any text (as the page shows it: one line)."""
    parts = " ".join(text.split()).split("'")
    return "concat('" + "', \"'\", '".join(parts) + "', '')"


def test_a_stage_no_worker_starts_fails_in_its_deadline(campaign):
    """A site's stage as its deployment's run while the site's worker is down (the shared
    campaign's workers are stopped): the campaign's wait gives up after
    deployment_start_timeout, names the pool, and cancels the run."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from drp_flows.flows.campaign import await_deployment_run
    from prefect_ops import run

    out = run(campaign.env, "prefect", "deployment", "run", "drp-site-stage/frdf",
              "-p", f"site_file={campaign.site_file}", "-p", "site=frdf",
              "-p", "campaign=nobody-home", "-p", "stage=stage1")
    flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    frdf = load_sites(campaign.site_file)["frdf"].model_copy(
        update={"deployment_start_timeout": 3.0})
    with temporary_settings({PREFECT_API_URL: campaign.env["PREFECT_API_URL"]}), \
            pytest.raises(TimeoutError, match="not started by the worker of pool drp-frdf in 3 s"):
        await_deployment_run(flow_run_id, "stage1 at site frdf", frdf, poll=0.5)
    state = api(campaign.env, "GET", f"/flow_runs/{flow_run_id}")["state"]
    assert state["type"] == "CANCELLED" and "deployment_start_timeout" in state["message"]
