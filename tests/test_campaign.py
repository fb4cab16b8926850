"""The campaign on the three local sites, through Prefect, against the real Butler: stage 1
everywhere, fan-in, global calibration at usdf, fan-out, stages 2-4 everywhere with their
fan-ins, DIA objects, moving objects at usdf, QA."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import CAMPAIGN, CAMPAIGN_GROUPS, FAKE_SECRETS, postgres_server
from scipy.stats import poisson

from drp_flows.errors import InputError
from drp_flows.flows.stages import site_tracts, site_visits
from drp_flows.sites.butler import open_butler, open_dataset_file
from drp_flows.sites.config import load_sites
from drp_flows.tasks.camera import INSTRUMENT, PIXEL_SCALE
from drp_flows.tasks.diffim import measurable
from drp_flows.tasks.images import Exposure
from drp_flows.validation.simulate import load_survey

GROUPS = CAMPAIGN_GROUPS  # visit groups of at most 5 visits: each site's 8 in two


@pytest.fixture(scope="module")
def result(campaign):
    return campaign.result


@pytest.fixture(scope="module")
def sites_file(campaign):
    return campaign.site_file


@pytest.fixture(scope="module")
def corrupt(campaign):
    return campaign.corrupt


def test_every_site_ran_its_share(result, sites_file):
    sites = load_sites(sites_file)
    steps = {(r["site"], r["step"]) for r in result["progress"]}
    assert steps == {(s, st) for s in sites.sites for st in (
        "calibrateImage", "consolidateVisitSummary", "isolatedStarAssociation",
        "updateVisitSummary", "assembleCoadd", "healSparsePropertyMaps", "writeObjectTable",
        "consolidateObjectTable", "subtractImages", "consolidateDiaSourceTable", "drpAssociation",
        "drpDiaCalculation")} | {
            ("usdf", "fgcmFitCycle"), ("usdf", "fgcmOutputProducts"),
            ("usdf", "linkSolarSystemObjects"), ("usdf", "consolidateHealSparsePropertyMaps"),
            ("usdf", "plotPropertyMapSurvey")}
    for name, site in sites.sites.items():
        butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
        raws = list(butler.registry.queryDatasets("raw", collections="ComCamSim/raw/all"))
        images = list(butler.registry.queryDatasets("preliminary_visit_image"))
        visits = {r.dataId["exposure"] for r in raws}
        expected = 9 * len(visits) - (1 if name == "frdf" else 0)
        # each site calibrated the visits aimed at its own tracts; it also holds the CCDs of
        # its neighbours' visits that reach onto its tracts, and no more
        assert len([r for r in images if r.dataId["visit"] in visits]) == expected
        tracts = {int(t) for t in site.sky.tracts}
        for ref in images:
            if ref.dataId["visit"] not in visits:
                reached = butler.registry.queryDataIds(["tract"], dataId=ref.dataId,
                                                       skymap="mini_skymap")
                assert {int(d["tract"]) for d in reached} & tracts, ref.dataId
        summaries = {r.dataId["visit"] for r in butler.registry.queryDatasets("preliminary_visit_summary")}
        # the campaign site also holds every other site's (fanned in for the global calibration)
        assert summaries >= visits if name == "usdf" else summaries == visits


def test_groups_of_visit_ranges_and_tracts(result, sites_file):
    """Visit steps ran in groups of at most 5 visits, tract steps one tract a group;
    each group attempt has its own RUN in the campaign's chain."""
    from drp_flows.datamodel import group_run
    from drp_flows.flows.stages import site_visits

    sites = load_sites(sites_file)
    for name, site in sites.sites.items():
        rows = [r for r in result["progress"] if r["site"] == name]
        calibrate = [r for r in rows if r["step"] == "calibrateImage"]
        visits = len(site_visits(sites_file, name))          # 4 a tract
        assert visits == 4 * len(site.sky.tracts)
        assert len(calibrate) == -(-visits // 5) and sum(r["total"] for r in calibrate) == 9 * visits
        assert all(r["total"] <= 9 * GROUPS["group_size"] for r in calibrate)
        coadds = sorted(r["group"] for r in rows if r["step"] == "assembleCoadd")
        assert coadds == [f"tracts-{t}" for t in site.sky.tracts]
        chain = open_butler(site).registry.getCollectionChain(f"ComCamSim/runs/{CAMPAIGN}")
        for r in calibrate:
            assert group_run(CAMPAIGN, "step1", r["group"], 1) in chain


def test_data_query_chooses_visits_and_tracts(three_sites, survey):
    _, visits = load_survey(survey)
    first = visits[visits["night"] == 0]
    day_obs = int(first["visit"][0]) // 100000
    assert site_visits(three_sites, "frdf", f"day_obs = {day_obs}") == sorted(
        int(v["visit"]) for v in first if v["tract"] in (1, 2, 3))
    assert site_tracts(three_sites, "usdf", "tract = 5") == [5]
    assert site_tracts(three_sites, "usdf", f"day_obs = {day_obs}") == [4, 5]
    with pytest.raises(InputError, match="data query 'band =': End of input reached"):
        site_visits(three_sites, "usdf", "band =")
    with pytest.raises(InputError, match="data query 'nosuch = 3' at site usdf"):
        site_visits(three_sites, "usdf", "nosuch = 3")


def test_outputs_readable_with_the_butler(result, sites_file):
    site = load_sites(sites_file)["usdf"]
    butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
    own = set(site_visits(sites_file, "usdf"))       # not a neighbour's boundary CCD
    ref = next(r for r in butler.registry.queryDatasets("preliminary_visit_image")
               if r.dataId["visit"] in own)
    hdul = butler.get(ref)
    assert isinstance(hdul, fits.HDUList) and hdul["IMAGE"].data.shape == (384, 384)
    summary = butler.get("preliminary_visit_summary", instrument=INSTRUMENT,
                         visit=ref.dataId["visit"])
    assert len(summary) == 9 and (summary["m5"] > 20).all()
    stars = butler.get("single_visit_star", instrument=INSTRUMENT, visit=ref.dataId["visit"])
    assert set(stars["detector"]) == set(range(9))


def test_visit_psf_pools_the_detectors(result, sites_file, survey):
    """consolidateVisitSummary gives a visit's detectors their pooled PSF size (the simulated
    seeing is one per visit), closer to the truth than each detector's own, and moves the
    fluxes and preliminary zeropoints with it."""
    _, visits = load_survey(survey)
    seeing = dict(zip(visits["visit"], visits["seeing"], strict=True))
    butler = open_butler(load_sites(sites_file)["usdf"],
                                collections=f"ComCamSim/runs/{CAMPAIGN}")
    refs = list(butler.registry.queryDatasets("preliminary_visit_summary"))
    summaries = [butler.get(r) for r in refs]
    pooled = [t for t in summaries if len(set(t["psf_fwhm"])) == 1 and (t["psf_flux_scale"] != 1).any()]
    assert len(pooled) >= 0.8 * len(summaries)
    true = np.concatenate([np.full(len(t), seeing[t["visit"][0]]) for t in pooled])
    err_visit = np.concatenate([t["psf_fwhm"] for t in pooled]) / true - 1
    err_detector = np.concatenate([t["psf_fwhm_detector"] for t in pooled]) / true - 1
    assert np.sqrt(np.mean(err_visit ** 2)) < 0.7 * np.sqrt(np.mean(err_detector ** 2))
    # a visit of usdf's own (the summaries of the others' came in for the global calibration)
    own = set(site_visits(sites_file, "usdf"))
    mine = next(t for t in pooled if t["visit"][0] in own)
    stars = butler.get("single_visit_star", instrument=INSTRUMENT, visit=mine["visit"][0])
    row = mine[0]
    det = stars["detector"] == row["detector"]
    # fluxes and zeropoint moved together: the preliminary magnitudes are unchanged
    assert np.allclose(row["zero_point"] - 2.5 * np.log10(stars["psf_flux"][det]), stars["mag"][det],
                       atol=1e-6, equal_nan=True)


def test_corrupt_raw_quarantined_rest_processed(result, corrupt, sites_file):
    assert len(result["quarantined"]) == 1
    f = result["quarantined"][0]
    assert f["site"] == "frdf" and f["step"] == "calibrateImage"
    assert f["data_id"] == {"visit": corrupt["visit"], "detector": corrupt["detector"]}
    assert f"corrupt input file://{corrupt['path']}: " in f["error"]
    assert f["reason"] == "corrupt input" and f["error_class"] == "CorruptInput"
    frdf = [r for r in result["progress"] if r["site"] == "frdf"]
    calib = next(r for r in frdf if r["step"] == "calibrateImage")
    assert calib["failed"] == 1 and calib["done"] == calib["total"] - 1
    # the visit with the bad CCD is still consolidated, from its 8 good detectors
    site = load_sites(sites_file)["frdf"]
    butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
    summary = butler.get("preliminary_visit_summary", instrument=INSTRUMENT, visit=corrupt["visit"])
    assert len(summary) == 8 and corrupt["detector"] not in summary["detector"]
    report = site.store.join("reports", CAMPAIGN)
    files = site.store.fs.glob(site.store.path(report) + "/quarantine-*.json")
    listed = [json.loads(site.store.fs.cat(p)) for p in files]
    assert any(e["data_id"]["detector"] == corrupt["detector"] for lst in listed for e in lst)


def test_memory_requests_from_the_measured_peaks(result, sites_file):
    """The next campaign's first memory requests: per label, the 95th percentile of the peaks
    its quanta measured (one per quantum, at every site) and a quarter more."""
    from drp_flows.datamodel import campaign_collection
    from drp_flows.engine.register import read_manifests
    from drp_flows.flows.campaign import memory_requests

    requests = memory_requests(sites_file, CAMPAIGN)
    ran = {r["step"] for r in result["progress"] if r["done"]}
    assert set(requests) == ran
    peaks: dict[str, dict[str, float]] = {}
    for site in load_sites(sites_file).sites.values():
        butler = open_butler(site)
        runs = butler.registry.getCollectionChain(campaign_collection(CAMPAIGN))
        for row in read_manifests(site.store, [r for r in runs if CAMPAIGN in r]):
            label = row["quantum"].split(" ")[0]
            peaks.setdefault(label, {})[row["quantum"]] = row["peak_rss_mb"]
    for label, by_quantum in peaks.items():
        mb = np.percentile(list(by_quantum.values()), 95) * 1.25
        assert requests[label] == pytest.approx(mb * 2**20, rel=1e-6), label
        assert 50 * 2**20 < requests[label] < 24 * 2**30, (label, requests[label])


def qa_numbers(campaign) -> dict:
    """The QA report's numbers by section, as the campaign left them at its campaign site."""
    sites = load_sites(campaign.site_file)
    home = sites[sites.campaign_site]
    with home.store.open(home.store.join("reports", campaign.name, "qa", "qa.json")) as f:
        return json.loads(f.read())


def test_qa_against_truth(campaign, survey):
    """The QA numbers (qa.json at the campaign site) against the targets, and against what the
    truth allows."""
    from astropy.table import Table

    result, qa = campaign.result, qa_numbers(campaign)
    assert [c for section in qa.values() for c in section["checks"]] == result["qa"]
    checks = {c["metric"]: c for c in result["qa"]}
    assert checks["single-frame WCS vs truth (bright stars, rms)"]["pass"], checks
    assert checks["single-frame zeropoint vs truth (rms)"]["pass"], checks
    step1 = qa["step 1: single-frame calibration"]
    assert step1["n_ccd"] == 9 * 24 - 1                # every CCD but the quarantined one
    assert step1["am1"]["annulus_arcmin"] < 5 and step1["am1"]["am1_mas"] <= 10, step1["am1"]
    # the global calibration keeps zeropoints as close to the truth as single frames do (here
    # two repeats per star and band give it little to gain; the demo's report shows the gain,
    # and the fit is tested on its own in test_global_calib), and reaches the SRD
    # repeatability in every band observed
    step2 = qa["step 2: global photometric calibration"]
    assert step2["zp_rms_mmag"] <= 1.05 * step2["single_frame_zp_rms_mmag"], step2
    assert len(step2["pa1"]) >= 4
    for band, p in step2["pa1"].items():
        assert p["pa1_mmag"] <= (5.0 if band in "gri" else 7.5), (band, p)
    assert checks["final visit summaries at the campaign site"]["pass"], checks
    maps = [c for c in result["qa"] if c["metric"].startswith(("n_exposure", "exposure-time"))]
    assert len(maps) == 2 and all(c["pass"] for c in maps), maps
    step4 = qa["step 4: difference imaging"]
    completeness, _, pulls = [c for c in result["qa"]
                              if c["metric"].startswith(("DIA", "difference flux"))]
    assert completeness["pass"] and pulls["pass"], (completeness, pulls)
    # the few false positives theory expects on these small CCDs (1.7) make the 2x ratio a
    # coin toss (a perfect pipeline exceeds it 9% of the time): the count must be within
    # Poisson noise (99.9%) of twice the theory; the demo's report holds the ratio itself
    assert step4["fp_expected"] > 0
    assert step4["n_fp"] <= poisson.ppf(0.999, 2 * step4["fp_expected"]), step4
    # two nights: no asteroid can be findable on three, so linking has no check here (the
    # linker is tested on its own in test_association.py; the demo's report has the check).
    # At most one detectable variable missed of the few here (8: the one missed is a u-band
    # change at S/N 11 that DIA did not detect, which leaves it one reliable detection); the
    # detectable ones are truth variables, and not all of them (some are too faint)
    step5 = qa["step 5: DIA objects, light curves and moving objects"]
    stars = Table.read(survey / "truth" / "stars.parquet")
    n_detectable, n_recovered = step5["n_detectable"], step5["n_recovered"]
    assert 2 <= n_detectable < int((stars["var_amplitude"] > 0).sum()), step5
    assert n_recovered >= min(0.95 * n_detectable, n_detectable - 1), step5
    assert step5["n_false_flags"] <= 0.01 * step5["n_not_variable"], step5
    assert step5["n_findable"] == 0 and step5["n_dia_objects"] > 0, step5
    # coadd detection reaches the depth that the property maps predict: to 0.1 mag in gri, and
    # within 0.2 mag in the bands with few stars and visits here (u: -0.12 in this campaign);
    # the coadd's PSF, made from its inputs, puts bright stars at their true flux (within 1%),
    # and neighbours fitted together leave errors that describe the scatter (pulls 1 +- 0.15)
    objects = qa["step 3: coadd objects"]["per_band"]
    assert len(objects) >= 4, objects
    for band, p in objects.items():
        offset = p["completeness50_offset_mag"]
        assert abs(offset) <= (0.1 if band in "gri" else 0.2), (band, p)
        assert abs(p["flux_scale_mmag"]) <= 10 and 0.85 <= p["pull_std"] <= 1.15, (band, p)
    survey_maps = [c for c in result["qa"] if c["metric"].startswith("survey")]
    assert len(survey_maps) == 2 and all(c["pass"] for c in survey_maps), survey_maps
    assert result["qa_report"].endswith("qa.md")


def test_report_of_the_finished_campaign(result, sites_file):
    """`drp report` reads what the campaign left at its campaign site: the same progress,
    transfers, quarantined CCD and QA as the run returned."""
    from typer.testing import CliRunner

    from drp_flows.cli import app

    out = CliRunner().invoke(app, ["report", CAMPAIGN, "--sites", sites_file])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())       # long lines wrap at the console's width
    for check in result["qa"]:
        assert " ".join(check["metric"].split()) in text
    assert f"QA report: {result['qa_report']}" in text
    assert "boundary visits across" in text and "fgcmFitCycle" in text
    (bad,) = result["quarantined"]
    assert f"quarantined calibrateImage {bad['data_id']}" in text
    none = CliRunner().invoke(app, ["report", "no-such-campaign", "--sites", sites_file])
    assert none.exit_code == 1 and "has not finished" in " ".join(none.output.split())


def test_global_calibration_moved_and_applied(result, sites_file):
    """The fit ran once, at usdf, on every site's stars; each site got the calibrations of its
    own visits, applied them, and sent the final summaries back; every transfer verified."""
    sites = load_sites(sites_file)
    fit = [r for r in result["progress"] if r["step"] == "fgcmFitCycle"]
    assert len(fit) == 1 and fit[0]["done"] == 1 and fit[0]["pool"] == "long"
    assert {r["pool"] for r in result["progress"]
            if r["step"] not in ("fgcmFitCycle", "assembleCoadd", "drpDiaCalculation")} == {"short"}
    moved = {(t["label"], t["source"], t["destination"]): t for t in result["transfers"]}
    boundary = [k for k in moved if k[0] == "boundary visits across"]
    assert len(moved) - len(boundary) == 10   # five fan-ins from two sites, one fan-out to two
    assert boundary                           # the CCDs of visits reaching a neighbour's tracts
    for t in moved.values():
        assert t["datasets"] == t["files"] > 0 and t["bytes"] > 0
    home = open_butler(sites["usdf"], collections=f"ComCamSim/runs/{CAMPAIGN}")
    tracts = {r.dataId["tract"] for r in home.registry.queryDatasets("isolated_star_source")}
    assert tracts == set(range(6))
    zeropoints = home.get("fgcm_zeropoints", instrument=INSTRUMENT)
    for name, site in sites.sites.items():
        butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
        visits = {r.dataId["exposure"] for r in butler.registry.queryDatasets(
            "raw", collections="ComCamSim/raw/all")}
        calibs = {r.dataId["visit"] for r in butler.registry.queryDatasets("fgcm_photo_calib")}
        assert calibs == visits if name != "usdf" else calibs >= visits
        for visit in sorted(visits)[:2]:
            summary = butler.get("visit_summary", instrument=INSTRUMENT, visit=visit)
            expected = zeropoints[zeropoints["visit"] == visit]
            assert list(summary["zero_point"]) == list(expected["zero_point"])
            stars = butler.get("recalibrated_star", instrument=INSTRUMENT, visit=visit)
            det = stars["detector"] == summary["detector"][0]
            calibrated = stars["mag"][det] + 2.5 * np.log10(stars["psf_flux"][det])
            assert abs(calibrated - summary["zero_point"][0]).max() < 1e-9


@pytest.mark.changes_campaign
def test_rerun_skips_finished_quanta(campaign):
    """`drp campaign` again: everything finished is skipped, the quarantined CCD is tried
    again, fails again, and the command exits 3 saying so."""
    from typer.testing import CliRunner

    from drp_flows.cli import app
    from drp_flows.flows.campaign import read_summary

    options = [f"--{k.replace('_', '-')}={v}" for k, v in GROUPS.items()]
    out = CliRunner().invoke(app, ["campaign", CAMPAIGN, "--sites", campaign.in_process, *options])
    assert out.exit_code == 3, out.output
    assert f"campaign {CAMPAIGN} is not whole: 1 quanta quarantined (`drp rescue {CAMPAIGN}`" \
        in " ".join(out.output.split())
    sites = load_sites(campaign.in_process)
    again = read_summary(sites[sites.campaign_site], CAMPAIGN)
    assert all(t["datasets"] == 0 for t in again["transfers"])   # everything already there
    retried = [r for r in again["progress"] if r["failed"]]
    # only the quarantined CCD is tried again (and fails again)
    assert [(r["site"], r["step"], r["failed"], r["done"]) for r in retried] == [
        ("frdf", "calibrateImage", 1, 0)]
    for row in again["progress"]:
        if row not in retried:
            assert row["done"] == 0 and row["skipped"] == row["total"]


def test_isolated_stars_per_tract_against_truth(result, sites_file, survey):
    """Each site associates the stars of its own tracts; every association is one true star."""
    from astropy.table import Table
    from scipy.spatial import cKDTree

    from drp_flows.tasks.isolated_stars import chord, unit_vectors

    truth = Table.read(survey / "truth" / "stars.parquet")
    tree = cKDTree(unit_vectors(np.asarray(truth["ra"]), np.asarray(truth["dec"])))
    rows = [r for r in result["progress"] if r["step"] == "isolatedStarAssociation"]
    assert {r["site"] for r in rows} == {"usdf", "frdf", "ukdf"}
    assert all(r["done"] == r["total"] == 1 for r in rows) and len(rows) == 6   # a tract a group
    repeated = 0
    for site in load_sites(sites_file).sites.values():
        butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
        # its own tracts (the campaign site also holds the others', fanned in for step 2)
        refs = [r for r in butler.registry.queryDatasets("isolated_star")
                if r.dataId["tract"] in site.sky.tracts]
        assert sorted(r.dataId["tract"] for r in refs) == sorted(site.sky.tracts)
        for ref in refs:
            stars = butler.get(ref)
            sources = butler.get("isolated_star_source", dataId=ref.dataId)
            assert len(stars) > 50
            # each star is one true star (within 0.3": 3 sigma at S/N 10), isolated from others
            dist, idx = tree.query(unit_vectors(np.asarray(stars["ra"]), np.asarray(stars["dec"])))
            assert np.mean(dist < chord(0.3)) > 0.97
            # every observation of a star lies on that star (purity of the association)
            sdist, sidx = tree.query(unit_vectors(np.asarray(sources["ra"]),
                                                  np.asarray(sources["dec"])))
            assert np.mean(sidx == idx[np.asarray(sources["isolated_star_id"])]) > 0.99
            repeated += int((stars["nsource"] >= 2).sum())
    assert repeated > 100          # stars seen on more than one visit: what step 2 fits


def test_coadds_against_truth(result, sites_file, survey):
    """Every site coadds its own tracts, every patch and band it observed; bright isolated
    stars have their true AB flux (nJy) in the coadd."""
    import sep
    from astropy.table import Table
    from scipy.spatial import cKDTree

    from drp_flows.tasks.skymap import header_wcs
    from drp_flows.validation.simulate import star_mags

    truth = Table.read(survey / "truth" / "stars.parquet")
    truth = truth[truth["var_amplitude"] == 0]
    rows = [r for r in result["progress"] if r["step"] == "assembleCoadd"]
    assert all(r["done"] == r["total"] > 0 and r["failed"] == 0 for r in rows)
    ratios = []
    for site in load_sites(sites_file).sites.values():
        butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
        refs = list(butler.registry.queryDatasets("deep_coadd"))
        assert {r.dataId["tract"] for r in refs} == set(site.sky.tracts)
        assert {r.dataId["patch"] for r in refs} == {0, 1, 2, 3}
        for ref in refs:
            template = butler.get("template_coadd", dataId=ref.dataId)[0].header
            assert 1 <= len(template["VISITS"].split()) and template["NINPUTS"] >= 1
            hdul = butler.get(ref)
            assert hdul[0].header["NINPUTS"] >= template["NINPUTS"]
            image = np.ascontiguousarray(hdul["IMAGE"].data, dtype=float)
            wcs = header_wcs(hdul["IMAGE"].header)
            mags = star_mags(truth, ref.dataId["band"], 0.0)
            x, y = wcs.all_world2pix(truth["ra"], truth["dec"], 0)
            ny, nx = image.shape
            near = cKDTree(np.column_stack([x, y])).query_ball_point(np.column_stack([x, y]), 40)
            bright = np.flatnonzero((mags < 20) & (x > 40) & (x < nx - 40) & (y > 40) & (y < ny - 40))
            alone = [i for i in bright if all(mags[j] > mags[i] + 5 for j in near[i] if j != i)]
            alone = [i for i in alone if hdul["MASK"].data[int(y[i]), int(x[i])] == 0]
            flux, _, _ = sep.sum_circle(image, x[alone], y[alone], 15.0)
            ratios += list(flux / 10 ** (0.4 * (31.4 - mags[alone])))
    assert len(ratios) > 20
    assert abs(np.median(ratios) - 1) < 0.02, np.median(ratios)


def test_difference_images_never_use_their_own_visit(result, sites_file):
    """Step 4 ran at every site on its own visits; each difference image names its template's
    visits, which never include its own, and its DIA sources are in the Butler beside it."""
    rows = [r for r in result["progress"] if r["step"] == "subtractImages"]
    assert rows and all(r["failed"] == 0 and r["done"] > 0 for r in rows), rows
    for name, site in load_sites(sites_file).sites.items():
        butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
        refs = list(butler.registry.queryDatasets("difference_image"))
        assert len(refs) == sum(r["done"] for r in rows if r["site"] == name) > 9
        for ref in refs:
            with open_dataset_file(butler, ref) as f:
                header = fits.getheader(f, 0)
            assert str(ref.dataId["visit"]) not in header["TMPLVIS"].split()
            assert "NOTEMPL" in header or header["KSTARS"] >= 3 and header["BUNIT"] == "nJy"
            sources = butler.get("dia_source_detector", dataId=ref.dataId)
            assert set(sources["visit"]) <= {ref.dataId["visit"]}
            assert set(sources.colnames) >= {"ra", "dec", "psf_flux", "psf_flux_err", "is_negative",
                                             "is_dipole"}


def test_dia_objects_per_tract_with_light_curves(result, sites_file):
    """Each site associated the DIA sources of its own tracts; every object has forced
    photometry on every difference image measuring it, and the campaign site holds every
    tract's catalogs and the moving-object link."""
    sites = load_sites(sites_file)
    for name, site in sites.sites.items():
        butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
        tracts = {r.dataId["tract"] for r in butler.registry.queryDatasets("dia_object")}
        assert tracts == (set(range(6)) if name == sites.campaign_site else set(site.sky.tracts))
        for tract in site.sky.tracts:
            sources = butler.get("dia_source", skymap="mini_skymap", tract=tract)
            objects = butler.get("dia_object", skymap="mini_skymap", tract=tract)
            forced = butler.get("dia_object_forced_source", skymap="mini_skymap", tract=tract)
            assert len(objects) == len(set(sources["dia_object_id"])) > 0
            n = np.bincount(np.searchsorted(objects["dia_object_id"], sources["dia_object_id"]),
                            minlength=len(objects))
            assert list(n) == list(objects["n_dia_sources"])
            # a source's own epoch is among its object's forced measurements wherever the
            # difference image can measure it (away from edges and masked pixels)
            measured = set(zip(forced["dia_object_id"], forced["visit"], strict=True))
            for s in sources[:15]:
                diff = Exposure.from_hdulist(butler.get("difference_image", visit=s["visit"],
                                                        detector=s["detector"], instrument=INSTRUMENT))
                obj = objects[objects["dia_object_id"] == s["dia_object_id"]][0]
                x, y = diff.wcs.all_world2pix([obj["ra"]], [obj["dec"]], 0)
                fwhm = diff.metadata["PSF_FWHM"] / PIXEL_SCALE
                assert ((s["dia_object_id"], s["visit"]) in measured) == measurable(diff, x, y, fwhm)[0]
        visits = {r.dataId["visit"] for r in butler.registry.queryDatasets("dia_source_visit")}
        assert visits == {r.dataId["visit"] for r in butler.registry.queryDatasets("dia_source_detector")}
    home = open_butler(sites[sites.campaign_site],
                              collections=f"ComCamSim/runs/{CAMPAIGN}")
    ss_object = home.get("ss_object", instrument="ComCamSim")
    assert set(ss_object.colnames) >= {"ss_object_id", "ra", "dec", "rate_ra", "rate_dec", "n_nights"}


def test_objects_per_patch_and_tract_archived(result, sites_file):
    """Every site measures objects on its own coadds, per patch and per tract, in every band it
    coadded; a band is left out of a patch only when its coadd there is too small to measure (a
    neighbour's visit grazing the patch). The tract tables reach the campaign site with the
    final catalogs."""
    from drp_flows.tasks.images import bit

    sites = load_sites(sites_file)
    home = open_butler(sites["usdf"], collections=f"ComCamSim/runs/{CAMPAIGN}")
    archived = {r.dataId["tract"] for r in home.registry.queryDatasets("object")}
    too_small = re.compile(r"coadd has \d+ covered pixels|coadd has no blank sky|"
                           r"only \d+ unblended stars to measure the PSF")
    for site in sites.sites.values():
        butler = open_butler(site, collections=f"ComCamSim/runs/{CAMPAIGN}")
        patches = {(r.dataId["tract"], r.dataId["patch"])
                   for r in butler.registry.queryDatasets("object_patch")}
        assert patches == {(t, p) for t in site.sky.tracts for p in range(4)}
        for tract in site.sky.tracts:
            objects = butler.get("object", skymap="mini_skymap", tract=tract)
            coadds = [r.dataId["band"] for r in butler.registry.queryDatasets(
                "deep_coadd", skymap="mini_skymap", tract=tract)]
            assert len(objects) > 100 and len(set(objects["object_id"])) == len(objects)
            assert set(objects["patch"]) == {0, 1, 2, 3} and (objects["tract"] == tract).all()
            for band in set(coadds):
                if coadds.count(band) == 4:   # forced photometry over the band's whole tract
                    assert objects[f"{band}_detected"].any()
                    assert np.isfinite(objects[f"{band}_psf_flux"]).mean() > 0.8
            for patch in range(4):
                meta = butler.get("object_patch", skymap="mini_skymap", tract=tract,
                                  patch=patch).meta
                for band in {k.split("_")[0] for k in meta if k.endswith("_skipped")}:
                    mask = butler.get("deep_coadd", skymap="mini_skymap", tract=tract,
                                      patch=patch, band=band)["MASK"].data
                    covered = np.mean((mask & bit("NO_DATA")) == 0)
                    why = meta[f"{band}_skipped"]
                    print(f"tract {tract} patch {patch} {band} skipped, covered {covered:.3f}: {why}")
                    assert too_small.search(why) and covered < 0.25, (tract, patch, band, covered, why)
                    in_patch = objects["patch"] == patch
                    assert not np.isfinite(objects[f"{band}_psf_flux"][in_patch]).any()
            assert set(objects["ref_band"]) <= set(coadds)
        assert set(site.sky.tracts) <= archived


def test_survey_maps_plots_and_metrics_at_the_campaign_site(result, sites_file):
    from drp_flows.tasks.step7 import CONSOLIDATED

    home = open_butler(load_sites(sites_file)["usdf"],
                              collections=f"ComCamSim/runs/{CAMPAIGN}")
    bands = {r.dataId["band"] for r in home.registry.queryDatasets("deep_coadd_n_exposure_map_sum")}
    assert len(bands) >= 4
    for band in bands:
        for name in CONSOLIDATED.values():
            assert home.get(name, skymap="mini_skymap", band=band).n_valid > 0
        plot = home.find_dataset("deep_coadd_property_map_survey_plot", skymap="mini_skymap",
                                 band=band)
        with open_dataset_file(home, plot) as f:
            assert f.read().startswith(b"\x89PNG")
        metrics = home.get("property_map_metrics", skymap="mini_skymap", band=band)
        assert list(metrics["property"]) == ["n_exposure", "exposure_time", "psf_size", "psf_maglim"]
        assert (metrics["area_deg2"] > 0).all()


def test_progress_and_transfers_published_as_artifacts(campaign):
    """What the Prefect UI shows: a table per transfer, a progress table per group, the
    campaign's summary (on the server the campaign ran on)."""
    from prefect_ops import api

    def latest(pattern: str) -> dict:
        found = api(campaign.env, "POST", "/artifacts/latest/filter",
                    {"artifacts": {"key": {"like_": pattern}}})
        return {a["key"]: a for a in found}

    result = campaign.result
    transfers = latest(f"transfer-{CAMPAIGN}-%")
    assert len(transfers) == len(result["transfers"])
    key = f"transfer-{CAMPAIGN}-final-visit-summaries-in-frdf-usdf"
    (table,) = api(campaign.env, "POST", "/artifacts/filter",
                   {"artifacts": {"key": {"any_": [key]}}})
    ledger = next(t for t in result["transfers"] if t["label"] == "final visit summaries in"
                  and t["source"] == "frdf")
    shown = json.loads(table["data"])[0]
    assert shown["files"] == ledger["files"] > 0 and shown["bytes"] == ledger["bytes"], shown
    assert shown["mb_per_s"] > 0, shown
    progress = latest(f"progress-{CAMPAIGN}-frdf-stage1-%").values()
    # frdf's 12 visits in three groups, its three tracts a group each
    assert sorted("calibrateImage" in a["data"] for a in progress) == [False] * 3 + [True] * 3
    assert sum("isolatedStarAssociation" in a["data"] for a in progress) == 3
    summary = latest(f"campaign-{CAMPAIGN}")[f"campaign-{CAMPAIGN}"]["data"]
    assert "## Transfers" in summary and "boundary visits across" in summary


def test_a_campaign_with_quarantined_quanta_is_completed_with_failures(campaign):
    """The deployment run of the shared campaign (one truncated raw) ends in a state the
    Prefect UI shows as "Completed with failures", saying what and how to rescue it."""
    from prefect_ops import flow_run_named

    state = flow_run_named(campaign.env, CAMPAIGN)["state"]
    assert state["type"] == "COMPLETED" and state["name"] == "Completed with failures", state
    assert state["message"].startswith(f"1 quanta quarantined (`drp rescue {CAMPAIGN}`"), state


def test_no_secret_in_any_file_or_log(campaign, tmp_path_factory):
    """The campaign ran with recognisable fake S3 keys and a PostgreSQL password in its
    environment (conftest.FAKE_SECRETS): none is in any file the tests wrote (sites, survey,
    Prefect homes and logs, reports), in any object of ukdf's S3 storage, or in anything the
    Prefect server or a registry keeps (logs, parameters, job variables, artifacts)."""
    secrets = [v.encode() for v in FAKE_SECRETS.values()]
    roots = [tmp_path_factory.getbasetemp(), Path(os.environ["PREFECT_HOME"])]
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 1000
    leaks = [str(p) for p in files if any(s in p.read_bytes() for s in secrets)]
    ukdf = load_sites(campaign.site_file)["ukdf"]
    objects = ukdf.store.fs.find(ukdf.store.path(ukdf.store.root))
    assert len(objects) > 100
    leaks += [f"s3://{o}" for o, data in ukdf.store.fs.cat(objects).items()
              if any(s in data for s in secrets)]
    # what the Prefect server keeps (logs, parameters, job variables, artifacts) and the
    # registries: their databases whole (a SQLite server's database is a file, read above)
    server = postgres_server()
    kept = {"drp_prefect_campaign": b"calibrateImage", "drp_test": b"preliminary_visit_image"}
    for database, sample in (kept.items() if server else ()):
        dump = subprocess.run(["pg_dump", "--data-only", f"{server}/{database}"], check=True,
                              capture_output=True).stdout
        assert sample in dump, database          # the dump holds what the database does
        leaks += [f"database {database}: {s.decode()}" for s in secrets if s in dump]
    assert not leaks, leaks


def test_status_shows_every_group(result, sites_file):
    from typer.testing import CliRunner

    from drp_flows.cli import app

    out = CliRunner().invoke(app, ["status", CAMPAIGN, "--sites", sites_file])
    assert out.exit_code == 0, out.output
    for text in ("calibrateImage", "fgcmFitCycle", "drpDiaCalculation", "usdf", "frdf", "ukdf"):
        assert text in out.output
    assert "failed: frdf calibrateImage" in out.output          # the quarantined CCD
    # --watch: bars per site and stage until the campaign has ended (here it has)
    watched = CliRunner().invoke(app, ["status", CAMPAIGN, "--sites", sites_file, "--watch"])
    assert watched.exit_code == 0, watched.output
    stage1 = sum(r["total"] for r in result["progress"]
                 if r["site"] == "frdf" and r["stage"] == "stage1")
    assert re.search(rf"frdf stage1 .* {stage1}/{stage1}", watched.output), watched.output
    none = CliRunner().invoke(app, ["status", "no-such-campaign", "--sites", sites_file])
    assert none.exit_code == 1 and "no progress recorded" in none.output


@pytest.mark.changes_campaign
def test_rescue_reruns_only_what_failed(campaign, corrupt, sites_file):
    """Mend the corrupt raw and rescue stage 1 (the later stages would find everything done,
    as the re-run above shows): a new attempt runs that CCD alone, in its own RUN collection
    chained in front of the first attempt's; nothing finished is redone, not even the visit's
    consolidation, made from its other 8 CCDs."""
    from drp_flows.datamodel import group_run
    from drp_flows.flows.campaign import campaign_flow

    open(corrupt["path"], "wb").write(corrupt["original"])
    rescued = campaign_flow(campaign.in_process, CAMPAIGN, rescue=True, stages=["stage1"],
                            **GROUPS)
    assert not rescued["quarantined"]
    worked = [r for r in rescued["progress"] if r["done"]]
    assert [(r["site"], r["step"], r["done"], r["attempt"], r["state"]) for r in worked] == [
        ("frdf", "calibrateImage", 1, 2, "rescued")], worked
    butler = open_butler(load_sites(sites_file)["frdf"])
    chain = list(butler.registry.getCollectionChain(f"ComCamSim/runs/{CAMPAIGN}"))
    run = group_run(CAMPAIGN, "step1", worked[0]["group"], 2)
    assert chain.index(run) < chain.index(group_run(CAMPAIGN, "step1", worked[0]["group"], 1))
    refs = butler.registry.queryDatasets("preliminary_visit_image", collections=run)
    assert [(r.dataId["visit"], r.dataId["detector"]) for r in refs] == [
        (corrupt["visit"], corrupt["detector"])]


def damage(store, uri: str, how: str) -> None:
    """Truncate a file, change one of its bytes or delete it; a file inside a zip (transferred
    small files are kept so) by writing the zip again with that file alone changed."""
    import io
    import zipfile

    from drp_flows.sites.storage import ZIP_MEMBER, zip_bytes

    def changed(data: bytes) -> bytes:
        return (data[:len(data) // 2] if how == "truncate" else
                data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])

    if ZIP_MEMBER not in uri:
        data = store.open(uri).read()
        if how == "delete":
            store.rm(uri)
        else:
            with store.open(uri, "wb") as f:
                f.write(changed(data))
        return
    archive, _, name = uri.partition(ZIP_MEMBER)
    with store.open(archive) as f, zipfile.ZipFile(io.BytesIO(f.read())) as z:
        members = {n: z.read(n) for n in z.namelist()}
    if how == "delete":
        del members[name]
    else:
        members[name] = changed(members[name])
    with store.open(archive, "wb") as f:
        f.write(zip_bytes(members))


@pytest.mark.changes_campaign
def test_verify_finds_every_damaged_product_and_a_rerun_repairs_them(campaign):
    """Products of the whole campaign damaged at every site (one truncated, one with a byte
    changed, one deleted; on S3 at ukdf, transferred copies among them): `drp verify` names
    exactly those and exits 5; `--repair` unregisters them; a re-run makes or transfers them
    again and verify finds everything intact."""
    import random

    from typer.testing import CliRunner

    from drp_flows.cli import app
    from drp_flows.engine.integrity import campaign_runs, orphan_zips, products, verify_campaign
    from drp_flows.engine.planning import dataset_uris
    from drp_flows.flows.campaign import campaign_flow

    sites = load_sites(campaign.in_process)
    rng, damaged, which = random.Random(11), set(), []
    for name, site in sites.sites.items():
        butler = open_butler(site)
        refs = rng.sample(sorted(products(butler, campaign_runs(butler, CAMPAIGN)),
                                 key=lambda r: str(r.id)), 3)
        which += [(name, r.datasetType.name, dict(r.dataId.required)) for r in refs]
        for how, uri in zip(("truncate", "flip", "delete"), dataset_uris(butler, site.store, refs),
                            strict=True):
            damage(site.store, uri, how)
            damaged.add((name, uri))
    # a zip no record names (a registration that failed after its cluster wrote it), an hour
    # old, and one just written (a registration may be on its way): only the first is an orphan
    usdf = sites["usdf"].store
    orphan, young = usdf.join("repo", "zips", "orphan.zip"), usdf.join("repo", "zips", "young.zip")
    for uri in (orphan, young):
        with usdf.open(uri, "wb") as f:
            f.write(b"PK\x05\x06" + bytes(18))
    os.utime(usdf.path(orphan), (time.time() - 7200, time.time() - 7200))
    # the campaign's own zips (clusters', transfers') are all named by records
    assert len(usdf.fs.glob(usdf.path(usdf.join("repo", "zips")) + "/*.zip")) > 2
    assert orphan_zips(open_butler(sites["usdf"]), usdf, min_age=0) == sorted([orphan, young])
    out = CliRunner().invoke(app, ["verify", CAMPAIGN, "--sites", campaign.in_process, "--repair"])
    assert out.exit_code == 5, out.output
    lines = [line for line in out.output.splitlines() if line.startswith("damaged ")]
    # exactly those, no false alarm: "damaged <site> <type>(<data ID>) <uri>: <why>"
    assert {(line.split()[1], line.rsplit(": ", 1)[0].rsplit(" ", 1)[1]) for line in lines} \
        == damaged and len(lines) == len(damaged)
    for name in sites.sites:
        orphans = ", 1 orphan zips deleted" if name == "usdf" else ""
        assert re.search(rf"^{name}: (\d+) products checked, 3 damaged, 3 unregistered{orphans}$",
                         out.output, re.M), out.output
    assert not usdf.fs.exists(usdf.path(orphan)) and usdf.fs.exists(usdf.path(young))
    again = campaign_flow(campaign.in_process, CAMPAIGN, **GROUPS)
    # nothing quarantined but the fixture's corrupt raw, when no test before restored it
    corrupt = {"visit": campaign.corrupt["visit"], "detector": campaign.corrupt["detector"]}
    assert all(q["data_id"] == corrupt for q in again["quarantined"]), again["quarantined"]
    after = verify_campaign(sites, CAMPAIGN)
    assert all(not v.damaged for v in after.values()), after
    # each damaged product is registered again (in the latest attempt's RUN, checked intact
    # just now)
    for name, dataset_type, data_id in which:
        assert list(open_butler(sites[name]).registry.queryDatasets(
            dataset_type, collections=f"ComCamSim/runs/{CAMPAIGN}", dataId=data_id)), data_id
