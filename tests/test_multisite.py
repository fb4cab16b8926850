"""Results do not depend on the site that produced them, nor on how the steps were ordered:
the test survey run here as one site (SQLite, in this process, one group at a time, each step
waiting for the whole group: `group_window: 1`, `follow_data: false`) gives the same calibrations and final
catalogs as the shared three-site campaign (tests/conftest.py: by `prefect deployment run`,
registries on PostgreSQL, ukdf on S3 through its own moto_server, usdf the embargo site with
the survey's last visits under embargo, groups of at most 5 visits, two at a time, each visit's
next step started as soon as its data is there), the same raw truncated in both."""

import numpy as np
import pytest
from conftest import CAMPAIGN, corrupt_raw, last_visits_embargo, table_differences, write_site_file

from drp_flows.datamodel import campaign_collection
from drp_flows.engine.register import read_manifests
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites


@pytest.fixture(scope="module")
def runs(campaign, survey, tmp_path_factory):
    """The shared campaign and the same campaign on one site; their site files and results.

    The embargo covers the survey's last two visits, which aim at usdf's tracts: embargoed
    visits aimed at another site's tracts stay out of that site's coadds by design (see
    test_embargo), so only here do the results not depend on the sites."""
    from drp_flows.flows.campaign import campaign_flow
    from drp_flows.flows.setup import setup_flow

    root = tmp_path_factory.mktemp("one-site")
    one = write_site_file(root / "one.yaml", "solo", {     # both cores: two worker processes
        "solo": {"storage": f"file://{root}/solo", "embargo": "true", "follow_data": "false",
                 "group_window": "1"}},
        last_visits_embargo(survey),
        cluster="{kind: local, jobs: 2, threads_per_worker: 1}")
    setup_flow(one, str(survey))
    corrupt_raw(load_sites(one)["solo"], campaign.corrupt["visit"], campaign.corrupt["detector"])
    results = {one: campaign_flow(one, campaign.name), campaign.site_file: campaign.result}
    return one, campaign.site_file, results


def datasets(site_file: str, dataset_type: str) -> dict:
    """Every dataset of a type at the campaign site, by data ID."""
    sites = load_sites(site_file)
    butler = open_butler(sites[sites.campaign_site], collections=campaign_collection(CAMPAIGN))
    return {tuple(sorted(r.dataId.required.items())): butler.get(r)
            for r in butler.registry.queryDatasets(dataset_type, findFirst=True)}


def map_differences(key, a, b) -> list[str]:
    pa, pb = a.valid_pixels, b.valid_pixels
    if not np.array_equal(pa, pb):
        return [f"{key}: {len(pa)} valid pixels vs {len(pb)}"]
    if not np.allclose(a[pa], b[pb], rtol=1e-9, atol=0):
        return [f"{key}: largest difference {np.max(np.abs(a[pa] - b[pb])):.3g}"]
    return []


def test_both_campaigns_ran_everything_but_the_same_ccd(runs, campaign):
    one, three, results = runs
    for site_file in (one, three):
        result = results[site_file]
        assert [(q["step"], q["data_id"]) for q in result["quarantined"]] == [
            ("calibrateImage", {k: campaign.corrupt[k] for k in ("visit", "detector")})]
        assert not [r for r in result["progress"] if r["blocked"]]
    moved = [t for t in results[three]["transfers"] if t["label"] == "boundary visits across"]
    assert moved and all(t["files"] == t["datasets"] > 0 for t in moved)
    assert {t["source"] for t in results[three]["transfers"]} == {"usdf", "frdf", "ukdf"}


@pytest.mark.parametrize("dataset_type", [
    "fgcm_photo_calib", "visit_summary", "isolated_star", "isolated_star_source", "object",
    "dia_source", "dia_object", "dia_object_forced_source", "ss_object"])
def test_same_catalogs_and_calibrations(runs, dataset_type):
    """The same to 1e-9; the DIA tables to float32's 1e-6: the two campaigns' difference
    images differ by one float32 rounding in a third of the CCDs (templates, visit images and
    calibrations bit-identical; the cause is not found), and a DIA object's chi2 probability
    carries it (4e-9 apart)."""
    one, three, _ = runs
    a, b = datasets(one, dataset_type), datasets(three, dataset_type)
    assert a and set(a) == set(b), dataset_type
    precision = 1e-6 if dataset_type.startswith("dia_") else 1e-9
    diffs = [d for key in a for d in table_differences(key, a[key], b[key], precision)]
    assert not diffs, "\n".join(diffs[:40])


@pytest.mark.parametrize("statistic", ["n_exposure_consolidated_map_sum",
                                       "psf_size_consolidated_map_weighted_mean"])
def test_same_survey_maps(runs, statistic):
    one, three, _ = runs
    a, b = datasets(one, f"deep_coadd_{statistic}"), datasets(three, f"deep_coadd_{statistic}")
    assert a and set(a) == set(b)
    diffs = [d for key in a for d in map_differences(key, a[key], b[key])]
    assert not diffs, "\n".join(diffs)


def early_starts(site_file: str, later: str, earlier: str) -> int:
    """Quanta of the step `later` that started before the last quantum of `earlier` in the
    same group had ended (their manifests' worker clocks), at every site. A group's RUNs are
    <campaign>/<step>/<group>/<attempt>: the two steps may write different ones."""
    count = 0
    chain = campaign_collection(CAMPAIGN)
    for site in load_sites(site_file).sites.values():
        by_group: dict[str, list[str]] = {}
        for run in open_butler(site).registry.getCollectionChain(chain):
            if run.startswith(chain + "/"):
                by_group.setdefault(run.split("/")[-2], []).append(run)
        for runs in by_group.values():
            rows = read_manifests(site.store, runs)
            steps = np.array([q.split(" ")[0] for q in rows["quantum"]]) if len(rows) else []
            if len(rows) and (steps == earlier).any():
                last_end = rows["ended"][steps == earlier].max()
                count += int((rows["started"][steps == later] < last_end).sum())
    return count


def test_steps_follow_the_data_unless_told_not_to(runs):
    """The three sites consolidate a visit as soon as its CCDs are calibrated, before the
    group's last CCD is (so the comparisons above show that following the data changes no
    result); the one site, told not to, never starts a consolidation before its group's last
    calibration has ended."""
    one, three, _ = runs
    assert early_starts(three, "consolidateVisitSummary", "calibrateImage") > 0
    assert early_starts(three, "consolidateDiaSourceTable", "subtractImages") > 0
    assert early_starts(one, "consolidateVisitSummary", "calibrateImage") == 0
    assert early_starts(one, "consolidateDiaSourceTable", "subtractImages") == 0
