"""Step 1 on one visit drawn another way: how the pipeline's calibration holds on a sky it
does not model (validation/galsim_sky.py) against the same CCDs drawn as Moffats.

Each CCD is simulated, put through ISR with its true calibrations (so that only the sky
differs) and calibrated, and the visit's star tables get the visit-level PSF size correction
as consolidateVisitSummary makes it; the results are compared with the truth: the zeropoint,
the WCS at bright stars, and what validation/qa_psf.py measures over a campaign (the PSF model
against the true PSF at reserved stars, PSF magnitudes against true ones, their gradient over
a CCD).
Run `python -m drp_flows.validation.scenes` for the table per band, each sky with either PSF
model (the empirical one the campaign fits, and the Moffat it fitted before issue 21).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from drp_flows.errors import DataError
from drp_flows.tasks.calibrate import EMPIRICAL, PSF_MODELS, calibrate
from drp_flows.tasks.isolated_stars import unit_vectors
from drp_flows.tasks.isr import run_isr
from drp_flows.tasks.visit_psf import correct_fluxes
from drp_flows.validation.qa import ccd_flux_fraction, true_zeropoint
from drp_flows.validation.qa_psf import BRIGHT_SNR, band_psf_qa, ccd_psf_qa
from drp_flows.validation.simulate import (
    EXPTIME,
    ZEROPOINT,
    SurveyConfig,
    Visit,
    galaxies,
    hot_pixels,
    make_asteroids,
    make_refcat,
    make_stars,
    plan_visits,
    response,
    simulate_science_ccd,
)


def calibrate_scene(cfg: SurveyConfig, visit: Visit, detector: int, stars: Table,
                    asteroids: Table, galaxy_table: Table | None, refcat: Table,
                    psf_model: str = EMPIRICAL) -> dict:
    """One CCD through ISR and calibrate (with `psf_model`), against its truth (mmag, mas),
    with the calibrated image, its star table and its truth ("image", "stars", "truth")."""
    raw, truth = simulate_science_ccd(cfg, visit, detector, stars, asteroids, galaxy_table)
    cam, n = cfg.camera, cfg.ccd_size
    post = run_isr(raw, cam, detector, np.zeros((n, n), np.float32),
                   hot_pixels(cam, detector).astype(np.float32),
                   response(cam, detector).astype(np.float32))
    try:
        image, found = calibrate(post, refcat, visit.band, psf_model=psf_model)
    except DataError as e:
        return {"band": visit.band, "detector": detector, "error": str(e)}
    # the true zeropoint on the scale of the CCD's fluxes (qa.true_zeropoint)
    truth_row = {"zp_true": ZEROPOINT[visit.band] + 2.5 * np.log10(EXPTIME) - visit.extinction
                 - truth["zp_offset"]}
    zp_true = true_zeropoint(truth_row, ccd_flux_fraction(image.psf, image.metadata, cam, detector,
                                                          truth.get("psf_field", ""), visit.seeing))
    return {"image": image, "stars": found, "truth": truth,
            "band": visit.band, "detector": detector, "seeing": visit.seeing,
            "zp_mmag": (float(image.metadata["ZP"]) - zp_true) * 1e3,
            "zp_err_mmag": float(image.metadata["ZP_ERR"]) * 1e3,
            # the WCS at the bright stars' true positions, as the campaign's QA measures it
            "wcs_mas": wcs_at_stars(image.wcs, WCS(truth["wcs"]), found, stars),
            "apcorr": float(image.metadata.get("APCORR", np.nan)),
            "psf_size_rms": float(image.metadata.get("PSF_DSIZ", np.nan)),
            "psf_e_rms": float(np.hypot(image.metadata.get("PSF_DE1", np.nan),
                                        image.metadata.get("PSF_DE2", np.nan)) / np.sqrt(2))}


def calibrate_visit(cfg: SurveyConfig, visit: Visit, stars: Table, asteroids: Table,
                    galaxy_table: Table | None, refcat: Table, psf_model: str = EMPIRICAL,
                    detectors=None) -> list[dict]:
    """`calibrate_scene` for the visit's CCDs, then what consolidateVisitSummary does with
    their star tables (the visit's PSF size field: visit_psf.size_factors), then the PSF QA
    of each ("psf": qa_psf.ccd_psf_qa). CCDs that calibrate refuses are left out."""
    rows = [calibrate_scene(cfg, visit, d, stars, asteroids, galaxy_table, refcat, psf_model)
            for d in (cfg.camera.detectors if detectors is None else detectors)]
    rows = [r for r in rows if "error" not in r]
    if psf_model == EMPIRICAL:
        correct_fluxes({r["detector"]: r["stars"] for r in rows}, cfg.camera,
                       {r["detector"]: float(r["image"].metadata["PSF_KSIZ"]) for r in rows})
    for r in rows:
        r["psf"] = ccd_psf_qa(r["image"].psf, r["stars"], stars, galaxy_table, cfg.camera,
                              r["detector"], r["truth"].get("psf_field", ""), visit.seeing,
                              visit.band, visit.mjd)
    return rows


def wcs_at_stars(fitted: WCS, true_wcs: WCS, found: Table, stars: Table) -> float:
    """rms (mas) of the fitted WCS at bright reference stars' true pixel positions."""
    bright = found[(found["snr"] >= BRIGHT_SNR) & (found["ref_id"] >= 0)]
    truth = stars[np.searchsorted(stars["id"], bright["ref_id"])]
    ra, dec = np.asarray(truth["ra"]), np.asarray(truth["dec"])
    tx, ty = true_wcs.all_world2pix(ra, dec, 0)
    sep = np.linalg.norm(unit_vectors(*fitted.all_pix2world(tx, ty, 0)) - unit_vectors(ra, dec),
                         axis=1)
    return float(np.sqrt(np.mean(sep ** 2))) * 206264.806e3


def probe(cfg: SurveyConfig, psf_model: str, n_visits: int = 6) -> list[dict]:
    """`calibrate_visit` for the first visit in each of the survey's bands (up to n_visits)."""
    stars, asteroids, galaxy_table = make_stars(cfg), make_asteroids(cfg), galaxies(cfg)
    refcat = make_refcat(cfg, stars)
    seen, rows = set(), []
    for visit in plan_visits(cfg):
        if visit.band in seen or len(seen) >= n_visits:
            continue
        seen.add(visit.band)
        rows += [{k: v for k, v in r.items() if k not in ("image", "stars", "truth")} for r in
                 calibrate_visit(cfg, visit, stars, asteroids, galaxy_table, refcat, psf_model)]
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per band: mean and rms zeropoint error, mean reported error, worst WCS, the PSF QA
    (`band_psf_qa`: PSF magnitude residual, gradient, model vs truth, galaxies), the PSF
    model's own residuals at reserved stars (data - model) and the aperture correction."""
    psf = band_psf_qa([r["psf"] for r in rows])
    out = []
    for band in sorted({r["band"] for r in rows}):
        r = Table(rows=[{k: v for k, v in row.items() if k != "psf"}
                        for row in rows if row["band"] == band])
        p = psf[band]
        out.append({"band": band, "ccds": len(r),
                    "zp_mean_mmag": float(np.mean(r["zp_mmag"])),
                    "zp_rms_mmag": float(np.sqrt(np.mean(r["zp_mmag"] ** 2))),
                    "zp_reported_mmag": float(np.mean(r["zp_err_mmag"])),
                    "wcs_max_mas": float(np.max(r["wcs_mas"])),
                    "psf_mag_median_mmag": p["psf_mag_mmag"], "gradient_mmag": p["gradient_mmag"],
                    "apcorr": float(np.nanmean(r["apcorr"])),
                    "galaxies_in_psf_stars": p["galaxy_fraction"],
                    "psf_size_rms": float(np.sqrt(np.nanmean(r["psf_size_rms"] ** 2))),
                    "psf_e_rms": float(np.sqrt(np.nanmean(r["psf_e_rms"] ** 2))),
                    "psf_size_truth": p["psf_size"], "psf_e_truth": p["psf_e"]})
    return out


def main(argv: list[str]) -> None:
    size = int(argv[0]) if argv else 1024
    base = SurveyConfig(ccd_size=size, nights=1, rounds_per_night=6)
    for cfg, psf_model in ((c, m) for c in (base, replace(base, sky="galsim")) for m in PSF_MODELS):
        print(f"\n{cfg.sky} sky, {psf_model} PSF, {size} px CCDs (targets: zp rms <= 10, "
              "WCS <= 10 mas, PSF mag - truth |median| <= 2, gradient <= 3 mmag, model vs "
              "truth size <= 0.005, e <= 0.005)")
        rows = summary(probe(cfg, psf_model))
        print(" | ".join(rows[0]))
        for r in rows:
            print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
