"""A whole campaign under embargo: the last night of the test survey is embargoed, usdf (the
campaign site) is the embargo site. Its raws and everything made from them stay at usdf; no
file or dataset of an embargoed visit ever appears at frdf or ukdf; an attempt to send one
there is refused with an error naming the datasets and sites."""

from datetime import timedelta

import pytest
from astropy.time import Time

from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites
from drp_flows.tasks.simulate import load_survey
from drp_flows.tasks.transfer import EmbargoError

CAMPAIGN = "embargo1"


@pytest.fixture(scope="module")
def embargo_sites(prefect_api, survey, tmp_path_factory):
    """The three local sites, in their own folders, with the survey's last night embargoed."""
    from drp_flows.flows.setup import setup_flow

    _, visits = load_survey(survey)
    now = Time(visits["mjd"].max(), format="mjd", scale="tai").utc.to_datetime() + timedelta(hours=1)
    root = tmp_path_factory.mktemp("embargo")
    lines = ["campaign_site: usdf", f"embargo: {{hours: 12, now: '{now.isoformat()}'}}", "sites:"]
    for name, tracts, flags in (("usdf", "[0, 1]", "    embargo: true"), ("frdf", "[2, 3]", ""),
                                ("ukdf", "[4, 5]", "")):
        lines += [f"  {name}:", "    cluster: {kind: local, jobs: 1, threads_per_worker: 1}",
                  f"    storage: file://{root}/{name}", f"    sky: {{tracts: {tracts}}}", flags]
    site_file = root / "sites.yaml"
    site_file.write_text("\n".join(lines) + "\n")
    setup_flow(str(site_file), str(survey))
    last_night = visits["night"] == visits["night"].max()
    return str(site_file), {int(v) for v in visits["visit"][last_night]}


@pytest.fixture(scope="module")
def campaign(embargo_sites):
    from drp_flows.flows.campaign import campaign_flow

    site_file, _ = embargo_sites
    return campaign_flow(site_file, CAMPAIGN)


def test_embargoed_visits_processed_at_the_embargo_site(embargo_sites, campaign):
    site_file, embargoed = embargo_sites
    usdf = open_butler(load_sites(site_file)["usdf"])
    calibrated = {int(r.dataId["visit"]) for r in usdf.registry.queryDatasets(
        "preliminary_visit_image", collections=f"ComCamSim/runs/{CAMPAIGN}")}
    assert embargoed <= calibrated
    final = {int(r.dataId["visit"]) for r in usdf.registry.queryDatasets(
        "visit_summary", collections=f"ComCamSim/runs/{CAMPAIGN}")}
    assert embargoed <= final
    assert not [r for r in campaign["progress"] if r["failed"]], campaign["quarantined"]


def test_nothing_embargoed_lands_outside_the_embargo_site(embargo_sites, campaign):
    site_file, embargoed = embargo_sites
    sites = load_sites(site_file)
    for name in ("frdf", "ukdf"):
        site = sites[name]
        butler = open_butler(site)
        ids = {int(r.dataId[k]) for r in butler.registry.queryDatasets(..., collections=...)
               for k in ("visit", "exposure") if k in r.dataId.required}
        assert ids and not ids & embargoed, name
        files = site.store.fs.find(site.store.path(site.store.root))
        assert files and not [f for f in files if any(str(v) in f for v in embargoed)], name
    # frdf's visits did arrive there, with their calibration from usdf
    assert any(t["destination"] == "frdf" and t["files"] for t in campaign["transfers"])


def test_sending_embargoed_data_out_is_refused(embargo_sites, campaign):
    from drp_flows.flows.campaign import transfer_task

    site_file, embargoed = embargo_sites
    visit = min(embargoed)
    with pytest.raises(EmbargoError, match=rf"may not go from usdf to frdf, which is not an "
                                           rf"embargo site: preliminary_visit_image .*{visit}"):
        transfer_task.fn(site_file, CAMPAIGN, "leak", "usdf", "frdf", ["preliminary_visit_image"],
                         [visit])
